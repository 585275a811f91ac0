"""Ten shape classes in four drawing styles, rendered deterministically at any size (32 px default).

- ``photo``: a filled shape in one of eight colours on a random plain background;
- ``outlined``: the same filled shape with a thick dark border;
- ``sketch``: a thin ink outline on paper, with no fill. A TARGET style;
- ``marker``: a thick coloured outline with a pale wash of the colour inside, on paper. A TARGET style.

Sizes, strokes and shifts scale with the image size (in units of a 32 px image), so a 70 px image shows
the same scene at a finer resolution; at 32 px the output is exactly that of the original 32 px world.
A colour can be fixed (``colour=``) or drawn from a ``palette`` (colour-shape classes such as
"red circle" use the first). ``EXTRA_SHAPES`` (pentagon, ring, scribble) are drawable but are never
classes and never appear in captions: they are the open-set distractors of the benchmark.

A tiny CLIP is pretrained contrastively (bench/shapes/pretrain.py) on ``photo`` and ``outlined``
images whose captions name the shape, plus ``sketch`` images whose captions name only the style
("a sketch."), never the shape. The target style is therefore seen but never labelled: its image
features can separate the shapes (edges learned from the outlined style carry over), while the
image-text alignment, learned on filled shapes, transfers only in part. That is the situation in
which LaFTer is meant to help, as web-scale pretraining gives real CLIP on a new domain.

Nuisances: colour, background colour, size, small rotation and shift, pixel noise, stroke width.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

Style = Literal["photo", "outlined", "sketch", "marker"]
SIZE = 32
_SUPERSAMPLE = 4
CLASSES = [
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "heart",
    "hexagon",
    "diamond",
    "crescent",
    "arrow",
]
EXTRA_SHAPES = ["pentagon", "ring", "scribble"]
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 200, 40),
    "purple": (150, 60, 190),
    "orange": (240, 130, 30),
    "pink": (240, 120, 180),
    "cyan": (40, 200, 210),
}
FOUR_COLOURS = ["red", "green", "blue", "yellow"]
_STYLE_IDS = {"photo": 1, "outlined": 2, "sketch": 3, "marker": 4}


def _ring(n: int, phase: float = 0.0) -> np.ndarray:
    return np.array(
        [(math.cos(phase + 2 * math.pi * k / n), math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]
    )


def _outline(name: str) -> np.ndarray:
    """Polygon of a class, in a unit box centred on 0."""
    if name == "circle":
        return _ring(40)
    if name == "square":
        return _ring(4, math.pi / 4)
    if name == "triangle":
        return _ring(3, -math.pi / 2)
    if name == "hexagon":
        return _ring(6)
    if name == "pentagon":
        return _ring(5, -math.pi / 2)
    if name == "star":
        pts = []
        for k in range(5):
            for r, off in ((1.0, 0.0), (0.42, 0.5)):
                t = -math.pi / 2 + 2 * math.pi * (k + off) / 5
                pts.append((r * math.cos(t), r * math.sin(t)))
        return np.array(pts)
    if name == "cross":
        a, b = 0.33, 1.0
        return np.array(
            [
                (-a, -b),
                (a, -b),
                (a, -a),
                (b, -a),
                (b, a),
                (a, a),
                (a, b),
                (-a, b),
                (-a, a),
                (-b, a),
                (-b, -a),
                (-a, -a),
            ]
        )
    if name == "heart":
        t = np.linspace(0, 2 * math.pi, 60)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return np.stack([x, y], 1) / 17
    if name == "diamond":
        return np.array([(0, -1), (0.6, 0), (0, 1), (-0.6, 0)])
    if name == "crescent":
        t = np.linspace(-math.pi / 2, math.pi / 2, 30)
        outer = np.stack([np.cos(t), np.sin(t)], 1)
        inner = np.stack([0.35 * np.cos(t[::-1]), np.sin(t[::-1])], 1)
        return np.concatenate([outer, inner]) - [0.3, 0]
    if name == "arrow":
        return np.array(
            [
                (-1.0, -0.24),
                (0.15, -0.24),
                (0.15, -0.66),
                (1.0, 0.0),
                (0.15, 0.66),
                (0.15, 0.24),
                (-1.0, 0.24),
            ]
        )
    raise ValueError(name)


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: float) -> tuple[int, int, int]:
    r, g, b = (int(np.clip(v + rng.uniform(-amount, amount), 0, 255)) for v in rgb)
    return r, g, b


def render(
    label: int,
    style: Style,
    rng: np.random.Generator,
    size: int = SIZE,
    colour: str | None = None,
    palette: list[str] | None = None,
) -> tuple[Image.Image, str]:
    """One image of class ``label`` in ``style``; returns it with the colour name used."""
    return render_shape(CLASSES[label], style, rng, size, colour, palette)


def render_shape(
    shape: str,
    style: Style,
    rng: np.random.Generator,
    size: int = SIZE,
    colour: str | None = None,
    palette: list[str] | None = None,
) -> tuple[Image.Image, str]:
    """One image of ``shape`` (a class or one of ``EXTRA_SHAPES``) in ``style`` at ``size`` px.

    ``colour`` fixes the colour; otherwise it is drawn from ``palette`` (default: all ``COLOURS``).
    Returns the image and the colour name used."""
    if colour is None:
        names = palette if palette is not None else list(COLOURS)
        colour = names[int(rng.integers(len(names)))]
    k = size / SIZE  # geometry is specified in pixels of a 32 px image
    fg = _jitter(COLOURS[colour], rng, 25)
    if style in ("sketch", "marker"):
        bg = _jitter((235, 230, 215), rng, 15)
    else:
        bg = (int(rng.integers(256)), int(rng.integers(256)), int(rng.integers(256)))
        while sum(abs(a - b) for a, b in zip(bg, fg, strict=True)) < 150:
            bg = (int(rng.integers(256)), int(rng.integers(256)), int(rng.integers(256)))
    s = size * _SUPERSAMPLE
    img = Image.new("RGB", (s, s), bg)
    draw = ImageDraw.Draw(img)
    angle = rng.uniform(-0.2, 0.2)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    radius = rng.uniform(0.36, 0.44) * size
    centre = np.array([size / 2 + rng.uniform(-1.5 * k, 1.5 * k), size / 2 + rng.uniform(-1.5 * k, 1.5 * k)])

    def place(outline: np.ndarray) -> list[tuple[float, float]]:
        pts_arr = ((outline @ rot.T) * radius + centre) * _SUPERSAMPLE
        return [(float(x), float(y)) for x, y in pts_arr]

    if shape == "ring":
        rings = [place(_ring(40)), place(0.55 * _ring(40))]
    elif shape == "scribble":  # a random open polyline: no shape at all
        n = int(rng.integers(5, 9))
        rings = [place(rng.uniform(-1, 1, size=(n, 2)))]
    else:
        rings = [place(_outline(shape))]
    closed = shape != "scribble"
    pts = rings[0]

    def stroke(points: list[tuple[float, float]], fill: tuple[int, ...], width: int) -> None:
        draw.line([*points, points[0]] if closed else points, fill=fill, width=width, joint="curve")

    if style in ("photo", "outlined"):
        if closed:
            draw.polygon(pts, fill=fg)
            for hole in rings[1:]:
                draw.polygon(hole, fill=bg)
        else:
            stroke(pts, fg, max(1, int(3.0 * k * _SUPERSAMPLE)))
        if style == "outlined":
            border = _jitter((30, 30, 30), rng, 20)
            for ring in rings:
                stroke(ring, border, int(2.5 * k * _SUPERSAMPLE))
    else:
        lo, hi = (1.0, 1.8) if style == "sketch" else (2.2, 3.2)
        width = int(rng.uniform(lo * k, hi * k) * _SUPERSAMPLE)
        ink = _jitter((30, 30, 60), rng, 25) if style == "sketch" else fg
        if style == "marker" and closed:  # a pale wash of the colour inside the outline
            wash = tuple(int(0.35 * f + 0.65 * p) for f, p in zip(fg, bg, strict=True))
            draw.polygon(pts, fill=wash)
            for hole in rings[1:]:
                draw.polygon(hole, fill=bg)
        for ring in rings:
            stroke(ring, ink, width)
    small = np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.float32)
    small = small + rng.normal(0, 3, small.shape)
    return Image.fromarray(small.clip(0, 255).astype(np.uint8)), colour


def caption(label: int, style: Style, rng: np.random.Generator) -> str:
    """A caption naming the shape for the labelled styles; only the style for ``sketch``."""
    name = CLASSES[label]
    art = "an" if name[0] in "aeiou" else "a"
    if style == "photo":
        options = [
            f"{art} {name}.",
            f"a {name} shape.",
            f"a photo of {art} {name}.",
            f"a picture of {art} {name}.",
            f"this is {art} {name}.",
        ]
    elif style == "outlined":
        options = [
            f"an outlined {name}.",
            f"a drawing of {art} {name}.",
            f"{art} {name} with a thick border.",
            f"{art} {name}.",
        ]
    elif style == "marker":
        options = ["a marker drawing.", "a felt-tip doodle.", "drawn with a marker pen.", "a marker doodle."]
    else:
        options = ["a sketch.", "an ink drawing on paper.", "a pen sketch.", "a drawing on paper."]
    return options[int(rng.integers(len(options)))]


def make_split(
    style: Style, n_per_class: int, seed: int, stream: int = 0, captions: bool = False
) -> tuple[list[Image.Image], list[int], list[str]]:
    """``n_per_class`` images of every class (interleaved), their labels, and captions if asked.
    ``stream`` keeps uses apart: the pretraining pool is stream 1, benchmark splits use others."""
    rng = np.random.default_rng([seed, _STYLE_IDS[style], stream])
    images, labels, caps = [], [], []
    for _ in range(n_per_class):
        for label in range(len(CLASSES)):
            img, _colour = render(label, style, rng)
            images.append(img)
            labels.append(label)
            if captions:
                caps.append(caption(label, style, rng))
    return images, labels, caps


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def colour_caption(label: int, colour: str, style: Style, rng: np.random.Generator) -> str:
    """A caption naming colour and shape ("a red circle.") for the labelled styles ``photo`` and
    ``outlined``; the target styles keep their style-only captions (see ``caption``)."""
    if style not in ("photo", "outlined"):
        return caption(label, style, rng)
    thing = f"{colour} {CLASSES[label]}"
    art = _article(thing)
    if style == "photo":
        options = [
            f"{art} {thing}.",
            f"{art} {thing} shape.",
            f"a photo of {art} {thing}.",
            f"a picture of {art} {thing}.",
            f"this is {art} {thing}.",
        ]
    else:
        options = [
            f"an outlined {thing}.",
            f"a drawing of {art} {thing}.",
            f"{art} {thing} with a thick border.",
            f"{art} {thing}.",
        ]
    return options[int(rng.integers(len(options)))]
