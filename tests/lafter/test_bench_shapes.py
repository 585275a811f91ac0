"""The synthetic world used to prove adaptation: deterministic, and the classes really differ."""

from __future__ import annotations

import numpy as np

from bench.shapes.world import CLASSES, make_split


def test_world_is_deterministic_and_labelled_styles_only_caption_the_class():
    a, ya, ca = make_split("photo", 2, seed=5, stream=1, captions=True)
    b, yb, cb = make_split("photo", 2, seed=5, stream=1, captions=True)
    assert ya == yb == list(range(10)) * 2 and ca == cb
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b, strict=True))
    assert all(CLASSES[y] in c for y, c in zip(ya, ca, strict=True))
    _, _, cs = make_split("sketch", 2, seed=5, stream=1, captions=True)
    assert not any(name in c for c in cs for name in CLASSES)  # the target style is never labelled


def test_shapes_differ_between_classes_in_every_style():
    for style in ("photo", "sketch", "marker"):
        images, labels, _ = make_split(style, 8, seed=0, stream=9)  # type: ignore[arg-type]
        dark = np.stack([(np.asarray(im).mean(-1) < 128).astype(float) for im in images])
        ink = np.stack([dark[np.array(labels) == k].mean(0) for k in range(10)])
        # mean ink maps of two different classes are far apart
        dists = [np.abs(ink[i] - ink[j]).mean() for i in range(10) for j in range(i + 1, 10)]
        assert min(dists) > 0.01, style
