"""Attribute vocabularies and the image renderer of the synthetic world.

A class is a composition of three visual attributes (colour x texture x
shape), one value from each family's vocabulary (:data:`VOCABULARY`; a world
may use a subset, :func:`vocabulary`). :func:`render` draws one small RGB
image of such a composition with nuisance variation: position, scale,
rotation, background colour and gradient, colour jitter and pixel noise,
their amplitudes scaled by one ``nuisance`` factor (1 = the default world's).
Everything random comes from the ``numpy.random.Generator`` passed in, so a
seeded generator gives the same pixels on every run.

Example:
    >>> import numpy as np
    >>> from hybridcls.synth.render import Attributes, render
    >>> attrs = Attributes("red", "striped", "circle")
    >>> attrs.name, attrs.folder
    ('red striped circle', 'red_striped_circle')
    >>> render(attrs, np.random.default_rng(0), size=64).size
    (64, 64)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from hybridcls.errors import InputError

__all__ = [
    "COLOURS",
    "FAMILIES",
    "MAX_NUISANCE",
    "SHAPES",
    "TEXTURES",
    "VOCABULARY",
    "Attributes",
    "all_attributes",
    "check_nuisance",
    "render",
    "vocabulary",
]

# Reference RGB of each colour word; the renderer jitters around it.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (240, 135, 25),
    "yellow": (235, 215, 45),
    "green": (45, 165, 65),
    "blue": (45, 90, 215),
    "purple": (135, 60, 185),
}
TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted", "checkered")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart")

# Drawing the silhouette this many times larger and box-filtering it down
# gives anti-aliased edges without a dependency beyond PIL.
_SUPERSAMPLE = 4


class Attributes(NamedTuple):
    """One composition of visual attributes, i.e. one class of the world."""

    colour: str
    texture: str
    shape: str

    @property
    def name(self) -> str:
        """Readable class name, the spelling of prompts and labels: ``red striped circle``."""
        return " ".join(self)

    @property
    def folder(self) -> str:
        """ImageFolder directory name, spelled like real datasets: ``red_striped_circle``."""
        return "_".join(self)


# The attribute families, in the order of a class name's words.
FAMILIES: tuple[str, ...] = Attributes._fields
# Every value of every family: the words the tiny CLIP was pretrained on.
VOCABULARY: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "texture": TEXTURES,
    "shape": SHAPES,
}
# Largest nuisance factor: at 2 the object's centre moves up to 24% of the side
# and its radius reaches 42%, so parts of it already leave the frame.
MAX_NUISANCE = 2.0


def vocabulary(restrict: Mapping[str, Sequence[str]] | None = None) -> dict[str, tuple[str, ...]]:
    """The values each family may take: :data:`VOCABULARY`, with some families restricted.

    Args:
        restrict: ``{family: values}`` for the families to restrict, e.g.
            ``{"texture": ["plain"]}``: every class is plain, so colour and shape
            alone tell the classes apart. Values keep :data:`VOCABULARY`'s order.

    Returns:
        ``{family: values}`` for every family of :data:`FAMILIES`.

    Raises:
        InputError: An unknown family or value (the tiny CLIP knows only the
            vocabulary's words), a repeated value, or a family left with no value.

    Example:
        >>> vocabulary({"texture": ["plain"]})["texture"]
        ('plain',)
    """
    chosen = dict(VOCABULARY)
    for family, values in (restrict or {}).items():
        if family not in VOCABULARY:
            raise InputError(f"vocabulary: unknown attribute family {family!r}; "
                             f"expected {', '.join(FAMILIES)}")
        values = [values] if isinstance(values, str) else list(values)
        unknown = [v for v in values if v not in VOCABULARY[family]]
        if unknown:
            raise InputError(f"vocabulary[{family!r}]: unknown value {unknown[0]!r}; "
                             f"expected some of {', '.join(VOCABULARY[family])}")
        if len(set(values)) != len(values):
            raise InputError(f"vocabulary[{family!r}]: values repeat ({values})")
        if not values:
            raise InputError(f"vocabulary[{family!r}]: no value left; give at least one")
        chosen[family] = tuple(v for v in VOCABULARY[family] if v in values)
    return chosen


def all_attributes(vocab: Mapping[str, Sequence[str]] | None = None) -> list[Attributes]:
    """Every composition of the vocabularies, in a fixed order (144 by default).

    Args:
        vocab: ``{family: values}`` (:func:`vocabulary`); ``None``: :data:`VOCABULARY`.
    """
    v = VOCABULARY if vocab is None else vocab
    return [Attributes(*a) for a in itertools.product(*(v[f] for f in FAMILIES))]


def _outline(shape: str) -> np.ndarray:
    """Polygon of ``shape`` around the origin, radius about 1, as an (n, 2) array."""
    if shape == "circle":
        a = np.linspace(0.0, 2.0 * math.pi, 48, endpoint=False)
        return np.stack([np.cos(a), np.sin(a)], axis=1)
    if shape == "square":
        h = 0.8  # same visual mass as the circle rather than the same circumradius
        return np.array([[-h, -h], [h, -h], [h, h], [-h, h]], dtype=float)
    if shape == "triangle":
        a = np.array([-90.0, 30.0, 150.0]) * math.pi / 180.0
        return np.stack([np.cos(a), np.sin(a)], axis=1) * 1.1
    if shape == "star":
        a = np.linspace(-math.pi / 2, 1.5 * math.pi, 10, endpoint=False)
        r = np.where(np.arange(10) % 2 == 0, 1.1, 0.48)
        return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)
    if shape == "cross":
        w, h = 0.34, 0.95
        return np.array(
            [
                [-w, -h],
                [w, -h],
                [w, -w],
                [h, -w],
                [h, w],
                [w, w],
                [w, h],
                [-w, h],
                [-w, w],
                [-h, w],
                [-h, -w],
                [-w, -w],
            ],
            dtype=float,
        )
    if shape == "heart":
        t = np.linspace(0.0, 2.0 * math.pi, 48, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return np.stack([x, y + 2.5], axis=1) / 15.0
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _silhouette(shape: str, size: int, cx: float, cy: float, r: float, theta: float) -> np.ndarray:
    """Coverage in [0, 1] of ``shape`` centred at (cx, cy), radius r, rotated by theta."""
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    pts = (_outline(shape) @ rot.T * r + (cx, cy)) * _SUPERSAMPLE
    big = Image.new("L", (size * _SUPERSAMPLE, size * _SUPERSAMPLE), 0)
    ImageDraw.Draw(big).polygon([tuple(p) for p in pts.tolist()], fill=255)
    small = big.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _texture(texture: str, u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    """Mask (1 = secondary colour) of ``texture`` in the object's own (u, v) frame."""
    if texture == "plain":
        return np.zeros_like(u)
    if texture == "striped":
        return ((u / period) % 1.0 < 0.5).astype(np.float32)
    if texture == "checkered":
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    if texture == "dotted":
        du = (u / period) % 1.0 - 0.5
        dv = (v / period) % 1.0 - 0.5
        return (du * du + dv * dv < 0.3**2).astype(np.float32)
    raise ValueError(f"unknown texture {texture!r}; expected one of {TEXTURES}")


def check_nuisance(nuisance: float) -> float:
    """``nuisance`` itself when it is a factor :func:`render` accepts (0 to :data:`MAX_NUISANCE`).

    Raises:
        InputError: Out of range (or not a number), naming the parameter.
    """
    if not isinstance(nuisance, (int, float)) or not 0.0 <= nuisance <= MAX_NUISANCE:
        raise InputError(f"nuisance must be between 0 and {MAX_NUISANCE:g}, got {nuisance!r}")
    return float(nuisance)


def _scaled(value: np.ndarray | float, centre: float, nuisance: float) -> np.ndarray | float:
    """``value``'s deviation from ``centre`` times ``nuisance``; 1 returns ``value`` itself."""
    # Scaling after the draw keeps the stream (the same draws for every factor), and
    # the default world's pixels bit for bit: no arithmetic at all at 1.
    return value if nuisance == 1.0 else centre + nuisance * (value - centre)


def render(attrs: Attributes, rng: np.random.Generator, size: int = 64,
           nuisance: float = 1.0) -> Image.Image:
    """Draw one image of ``attrs`` with random nuisances taken from ``rng``.

    Args:
        attrs: The colour, texture and shape to draw.
        rng: Source of every random choice; a seeded generator gives identical pixels.
        size: Side of the square output image, in pixels.
        nuisance: Scales the amplitude of every nuisance around its middle value:
            size and position of the object, rotation, background level, tint and
            gradient, colour jitter and noise (0: all at their middle, no noise;
            1: the default world's ranges, bit for bit; at most :data:`MAX_NUISANCE`).
            The texture's period and shade belong to the class and stay.

    Returns:
        An RGB ``PIL.Image`` of ``size`` x ``size`` pixels.

    Example:
        >>> import numpy as np
        >>> img = render(Attributes("blue", "dotted", "star"), np.random.default_rng(1), size=32)
        >>> img.mode, img.size
        ('RGB', (32, 32))
    """
    f = check_nuisance(nuisance)
    # Nuisances, drawn in a fixed order so that the stream stays reproducible.
    r = size * _scaled(rng.uniform(0.25, 0.36), 0.305, f)
    # Roughly centred, as photographers frame their subject.
    cx = size * (0.5 + _scaled(rng.uniform(-0.12, 0.12), 0.0, f))
    cy = size * (0.5 + _scaled(rng.uniform(-0.12, 0.12), 0.0, f))
    theta = _scaled(rng.uniform(-0.2, 0.2), 0.0, f)  # about +-11 degrees: photos are mostly upright
    period = r * rng.uniform(0.30, 0.40)
    bg_level = _scaled(rng.uniform(120.0, 220.0), 170.0, f)
    bg_tint = _scaled(rng.uniform(-22.0, 22.0, size=3), 0.0, f)
    grad_dir = rng.uniform(0.0, 2.0 * math.pi)
    grad_amp = _scaled(rng.uniform(0.0, 45.0), 0.0, f)
    jitter = _scaled(rng.uniform(0.88, 1.08, size=3), 1.0, f)
    shade = rng.uniform(0.30, 0.50)
    noise_sigma = _scaled(rng.uniform(2.0, 9.0), 0.0, f)

    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    # Background: a desaturated colour with a linear gradient across the frame.
    ramp = ((xs - size / 2) * math.cos(grad_dir) + (ys - size / 2) * math.sin(grad_dir)) / size
    background = bg_level + bg_tint[None, None, :] + grad_amp * ramp[..., None]

    # The texture lives in the object's rotated frame so it turns with the object.
    u = (xs - cx) * math.cos(theta) + (ys - cy) * math.sin(theta)
    v = -(xs - cx) * math.sin(theta) + (ys - cy) * math.cos(theta)
    pattern = _texture(attrs.texture, u, v, period)[..., None]
    base = np.clip(np.asarray(COLOURS[attrs.colour], dtype=np.float32) * jitter, 0, 255)
    foreground = base * (1.0 - pattern) + base * shade * pattern

    alpha = _silhouette(attrs.shape, size, cx, cy, r, theta)[..., None]
    image = background * (1.0 - alpha) + foreground * alpha
    image = image + rng.normal(0.0, noise_sigma, size=image.shape)
    return Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8), mode="RGB")
