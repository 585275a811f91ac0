"""The quality benchmark's worlds cannot silently change: renderer, pool compositions, disjoint splits.
Fast (no model, no pretraining)."""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter

import numpy as np
import pytest

from bench.quality import guard_record, spread
from bench.shapes.models import MODELS, pretraining_pool
from bench.shapes.world import (
    CLASSES,
    EXTRA_SHAPES,
    FOUR_COLOURS,
    SIZE,
    colour_caption,
    make_split,
    render_shape,
)
from bench.shapes.worlds import (
    DOMINANT_SHARE,
    LONGTAIL_RATIO,
    OPEN_SHARE,
    UNKNOWN,
    WORLDS,
    composition_counts,
)


def _digest(images: list) -> str:
    h = hashlib.sha256()
    for im in images:
        h.update(im.tobytes())
    return h.hexdigest()


def test_the_32px_renderer_is_unchanged() -> None:
    """make_split at 32 px gives the images of the original world (bench.synthetic's checkpoints)."""
    h = hashlib.sha256()
    for style in ("photo", "outlined", "sketch", "marker"):
        images, _labels, caps = make_split(style, 3, seed=5, stream=2, captions=True)  # type: ignore[arg-type]
        for im in images:
            h.update(im.tobytes())
        if style != "marker":  # marker captions are new (style-only marker captions)
            h.update(repr(caps).encode())
    assert h.hexdigest() == "4a40bdb42b90c625b58c6c294f2fdb1915b7f7628a0f9e519ffdf18125baac82"


@pytest.mark.parametrize("size", [32, 70])
def test_renderer_is_deterministic_and_sized(size: int) -> None:
    for shape in [*CLASSES, *EXTRA_SHAPES]:
        a, ca = render_shape(shape, "marker", np.random.default_rng(3), size)
        b, cb = render_shape(shape, "marker", np.random.default_rng(3), size)
        assert a.size == (size, size) and a.mode == "RGB"
        assert a.tobytes() == b.tobytes() and ca == cb
    c, _ = render_shape("circle", "marker", np.random.default_rng(4), size)
    assert c.tobytes() != a.tobytes()


def test_the_40_colour_classes_are_drawable_and_coloured() -> None:
    world = WORLDS["colours70"]
    assert len(world.class_names) == 40 and len(set(world.class_names)) == 40
    assert world.class_names[0] == "red circle"
    images, labels = world.test_set(1, seed=0)
    assert len(images) == 40 and labels == list(range(40))
    minima = []
    for (shape, colour), img in zip(world.classes, images, strict=True):
        assert colour in FOUR_COLOURS and shape in CLASSES
        arr = np.asarray(img, dtype=np.float32)
        assert arr.std() > 5  # something is drawn
        minima.append((colour, arr.reshape(-1, 3).min(0)))
    # the ink is the class colour: e.g. red images have a dark green/blue minimum, blue ones a dark red
    for colour, minimum in minima:
        r, g, b = minimum
        if colour == "red":
            assert g < 120 and b < 120
        if colour == "blue":
            assert r < 120 and g < 140


def test_world_table() -> None:
    assert [n for n, w in WORLDS.items() if w.tune] == ["marker32", "marker70"]
    assert len(WORLDS) == 7
    for w in WORLDS.values():
        assert w.model in MODELS
        assert set(w.class_names).isdisjoint(EXTRA_SHAPES)  # open-set shapes are never classes
    assert WORLDS["sketch32"].target == "sketch"
    assert {WORLDS[n].model for n in ("marker70", "longtail70", "open70", "colours70")} == {"M70"}


def test_longtail_pool_is_a_10_to_1_geometric_tail() -> None:
    world = WORLDS["longtail70"]
    labels = world.pool_labels(600, seed=1)
    assert len(labels) == 600 and UNKNOWN not in labels
    counts = sorted(Counter(labels).values(), reverse=True)
    assert len(counts) == 10
    assert counts[0] / counts[-1] == pytest.approx(LONGTAIL_RATIO, rel=0.1)
    ratios = [a / b for a, b in itertools.pairwise(counts)]
    assert all(r == pytest.approx(LONGTAIL_RATIO ** (1 / 9), rel=0.15) for r in ratios)
    # the head class depends on the seed
    heads = {Counter(world.pool_labels(600, seed=s)).most_common(1)[0][0] for s in range(6)}
    assert len(heads) > 1


def test_dominant_pool() -> None:
    labels = WORLDS["dominant32"].pool_labels(600, seed=0)
    counts = Counter(labels)
    top, n_top = counts.most_common(1)[0]
    assert n_top == round(DOMINANT_SHARE * 600)
    rest = [c for k, c in counts.items() if k != top]
    assert len(rest) == 9 and max(rest) - min(rest) <= 1


def test_open_pool_has_unknowns_that_are_not_classes() -> None:
    world = WORLDS["open70"]
    images, labels = world.pool(80, seed=0)
    assert labels.count(UNKNOWN) == round(OPEN_SHARE * 80)
    known = Counter(y for y in labels if y != UNKNOWN)
    assert len(known) == 10 and max(known.values()) - min(known.values()) <= 1
    assert len(images) == 80


def test_test_images_are_not_in_the_pool_or_the_probe_set() -> None:
    world = WORLDS["marker32"]
    pool, _ = world.pool(100, seed=0)
    test, test_y = world.test_set(10, seed=0)
    probe, _ = world.probe_train_set(10, seed=0)
    assert Counter(test_y) == dict.fromkeys(range(10), 10)  # balanced
    pool_bytes = {im.tobytes() for im in pool}
    probe_bytes = {im.tobytes() for im in probe}
    assert not any(im.tobytes() in pool_bytes or im.tobytes() in probe_bytes for im in test)
    # and the same stream with another seed or world differs
    assert _digest(world.test_set(2, seed=1)[0]) != _digest(world.test_set(2, seed=0)[0])
    assert _digest(WORLDS["dominant32"].test_set(2, seed=0)[0]) != _digest(world.test_set(2, seed=0)[0])


def test_splits_are_deterministic() -> None:
    world = WORLDS["open70"]
    assert _digest(world.pool(12, seed=4)[0]) == _digest(world.pool(12, seed=4)[0])
    assert world.pool_labels(50, seed=4) == world.pool_labels(50, seed=4)


def test_pretraining_captions_never_name_target_classes_or_extras() -> None:
    spec = MODELS["M70"]
    small = type(spec)(**{**spec.__dict__, "per_class": {"photo": 2, "outlined": 2, "marker": 2}})
    images, captions = pretraining_pool(small, seed=0)
    assert images.shape == (60, 3, 70, 70)
    photo, marker = captions[:40], captions[40:]
    assert all(any(c in cap for c in CLASSES) for cap in photo)
    assert any(any(c in cap for c in FOUR_COLOURS) for cap in photo)
    for cap in marker:
        assert not any(c in cap for c in [*CLASSES, *EXTRA_SHAPES, *FOUR_COLOURS])
    assert colour_caption(0, "red", "marker", np.random.default_rng(0)).count("circle") == 0


def test_composition_counts_sum() -> None:
    rng = np.random.default_rng(0)
    for comp in ("balanced", "longtail", "dominant", "open"):
        for n in (37, 600, 1000):
            counts = composition_counts(comp, 10, n, rng)  # type: ignore[arg-type]
            assert sum(counts) == n and len(counts) == 11 and min(counts) >= 0


def test_guard_record_and_spread() -> None:
    rows = [
        {
            "world": "w",
            "seed": 0,
            "zero_shot": 0.5,
            "text_classifier": 0.6,
            "lafter_default": 0.7,
            "served": 0.7,
            "served_kind": "lafter",
        },
        {
            "world": "w",
            "seed": 1,
            "zero_shot": 0.5,
            "text_classifier": 0.6,
            "lafter_default": 0.2,
            "served": 0.5,
            "served_kind": "zero_shot",
        },
    ]
    g = guard_record(rows)
    assert (
        g["served_is_best"] == 1
        and g["worst_loss"] == pytest.approx(0.1)
        and g["mean_loss"] == pytest.approx(0.05)
    )
    s = spread([0.1, 0.3])
    assert s["mean"] == pytest.approx(0.2) and s["min"] == 0.1 and s["max"] == 0.3
    assert SIZE == 32
