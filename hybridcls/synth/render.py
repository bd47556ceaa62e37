"""Attribute vocabularies and the image renderer of the synthetic world.

A class is a composition of three visual attributes (colour x texture x
shape). :func:`render` draws one small RGB image of such a composition with
nuisance variation: position, scale, rotation, background colour and
gradient, colour jitter and pixel noise. Everything random comes from the
``numpy.random.Generator`` passed in, so a seeded generator gives the same
pixels on every run.

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
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "COLOURS",
    "SHAPES",
    "TEXTURES",
    "Attributes",
    "all_attributes",
    "render",
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


def all_attributes() -> list[Attributes]:
    """Every composition of the vocabularies, in a fixed order (144 by default)."""
    return [Attributes(c, t, s) for c, t, s in itertools.product(COLOURS, TEXTURES, SHAPES)]


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


def render(attrs: Attributes, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """Draw one image of ``attrs`` with random nuisances taken from ``rng``.

    Args:
        attrs: The colour, texture and shape to draw.
        rng: Source of every random choice; a seeded generator gives identical pixels.
        size: Side of the square output image, in pixels.

    Returns:
        An RGB ``PIL.Image`` of ``size`` x ``size`` pixels.

    Example:
        >>> import numpy as np
        >>> img = render(Attributes("blue", "dotted", "star"), np.random.default_rng(1), size=32)
        >>> img.mode, img.size
        ('RGB', (32, 32))
    """
    # Nuisances, drawn in a fixed order so that the stream stays reproducible.
    r = size * rng.uniform(0.25, 0.36)
    # Roughly centred, as photographers frame their subject.
    cx = size * (0.5 + rng.uniform(-0.12, 0.12))
    cy = size * (0.5 + rng.uniform(-0.12, 0.12))
    theta = rng.uniform(-0.2, 0.2)  # about +-11 degrees: photos are mostly upright
    period = r * rng.uniform(0.30, 0.40)
    bg_level = rng.uniform(120.0, 220.0)
    bg_tint = rng.uniform(-22.0, 22.0, size=3)
    grad_dir = rng.uniform(0.0, 2.0 * math.pi)
    grad_amp = rng.uniform(0.0, 45.0)
    jitter = rng.uniform(0.88, 1.08, size=3)
    shade = rng.uniform(0.30, 0.50)
    noise_sigma = rng.uniform(2.0, 9.0)

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
