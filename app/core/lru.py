"""A bounded, thread-safe cache of loaded things (base models, adapted models): per process and
safe to lose."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRU(Generic[K, V]):
    """A thread-safe LRU whose ``get_or_load`` loads each key once even under concurrent misses: one
    lock per key being loaded, shared by every caller that waits for it and dropped when the last
    of them is done (so a key never has two locks, and failed keys leave nothing behind)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[K, tuple[threading.Lock, list[int]]] = {}

    def get_or_load(self, key: K, load: Callable[[], V]) -> V:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            key_lock, users = self._key_locks.setdefault(key, (threading.Lock(), [0]))
            users[0] += 1
        try:
            with key_lock:
                with self._lock:
                    if key in self._items:
                        self._items.move_to_end(key)
                        return self._items[key]
                value = load()
                with self._lock:
                    self._items[key] = value
                    self._items.move_to_end(key)
                    while len(self._items) > self.capacity:
                        self._items.popitem(last=False)
                return value
        finally:
            with self._lock:
                users[0] -= 1
                if users[0] == 0:
                    self._key_locks.pop(key, None)

    def discard(self, predicate: Callable[[K], bool]) -> None:
        with self._lock:
            for key in [k for k in self._items if predicate(k)]:
                del self._items[key]

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> list[K]:
        with self._lock:
            return list(self._items)
