"""Hard negatives and mild perturbations of ShapesWorld renders: the test set that proves the oracle is as strict
as a person on generated images, and as forgiving as one.

A hard negative starts from a render and breaks it the way a weak de-tokenizer does, always on an object the
prompt asks for, so that a person would say the image no longer shows the prompt:

- ``heavy_blur``: the whole image blurred (or drawn at a fifth of the resolution) until shapes are soft blobs;
- ``melted``: two shapes pushed together and smeared into one blob (a lone object melts into a new neighbour);
- ``color_mix``: an object whose colour the prompt names, filled with a blend of that colour and another palette
  colour, or half one colour and half the other;
- ``silhouette``: an object drawn with the wrong outline: an ellipse or a half disc for a circle, a rounded square
  or an oblong for a square, a cut-off (trapezoid) triangle, or an irregular blob;
- ``fragments``: stray dots and splinters of palette colours beside the objects, big enough to see.

A mild perturbation is what a good de-tokenizer draws: a slight blur, extra noise, light JPEG, a 1-pixel shift.

Everything is seeded: the same ``(seed, split, index, kind)`` always gives the same image.
"""

from __future__ import annotations

import io
import itertools
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter
from scipy import ndimage

from tarkit_plugins.shapesworld.world import (
    COLORS,
    SHAPES,
    SUPERSAMPLE,
    TAGS,
    Example,
    Scene,
    SceneSampler,
    Shape,
    render,
)

HARD_KINDS: tuple[str, ...] = ("heavy_blur", "melted", "color_mix", "silhouette", "fragments")
MILD_KINDS: tuple[str, ...] = ("mild_blur", "mild_noise", "jpeg", "shift", "combined")
SPLITS: tuple[str, ...] = ("train", "heldout")

Box = tuple[float, float, float, float]
Painter = Callable[[ImageDraw.ImageDraw, float], None]  # draws in white at the given scale


@dataclass(frozen=True)
class Variant:
    """A render changed by one corruption (``kind``, and how: ``variant``), with the example it was made from."""

    kind: str
    variant: str
    example: Example
    image: Image.Image


# --- drawing: anti-aliased coverage layers composited over a render, as world.render draws its shapes ---------


def coverage(size: int, paint: Painter) -> np.ndarray:
    """Coverage in [0, 1] of what ``paint`` draws: drawn at 4x and box-filtered down, like world.render."""
    big = Image.new("L", (size * SUPERSAMPLE, size * SUPERSAMPLE), 0)
    paint(ImageDraw.Draw(big), SUPERSAMPLE)
    return np.asarray(big.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255


def scaled(box: Box, s: float) -> Box:
    return tuple(v * s for v in box)


def ideal(shape: str, box: Box) -> Painter:
    """The renderer's own outline of ``shape`` in ``box``."""

    def paint(draw: ImageDraw.ImageDraw, s: float) -> None:
        x0, y0, x1, y1 = scaled(box, s)
        if shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=255)
        elif shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=255)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=255)

    return paint


def jittered(rgb: np.ndarray, scene: Scene, rng: random.Random) -> np.ndarray:
    """A fill colour jittered per channel as the renderer jitters its palette colours."""
    jitter = np.array([rng.randint(-scene.color_jitter, scene.color_jitter) for _ in range(3)], dtype=np.float32)
    return np.clip(np.asarray(rgb, dtype=np.float32) + jitter, 0, 255)


def composite(
    base: Image.Image, layers: list[tuple[np.ndarray, np.ndarray]], scene: Scene, rng: random.Random
) -> Image.Image:
    """Paint ``(coverage, colour)`` layers over ``base`` (colour an RGB triple or an HxWx3 field), with the
    renderer's pixel noise on what they cover so painted objects look like rendered ones."""
    out = np.asarray(base, dtype=np.float32)
    noise = np.random.default_rng(rng.randrange(2**31))
    for alpha, color in layers:
        a = alpha[..., None]
        out = out * (1 - a) + np.broadcast_to(color, out.shape) * a
        out += noise.normal(0, scene.noise_std, out.shape) * a
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), mode="RGB")


def without(scene: Scene, *drop: Shape) -> Image.Image:
    """The scene rendered without the given objects, the canvas corruptions repaint them on."""
    return render(replace(scene, objects=tuple(o for o in scene.objects if o not in drop)))


def palette(name: str) -> np.ndarray:
    return np.array(COLORS[name], dtype=np.float32)


def required(example: Example, needs_color: bool = False) -> list[Shape]:
    """Objects the prompt asks for (with a named colour when ``needs_color``): breaking one breaks the prompt.
    Every object in a ShapesWorld scene is asked for, by class and, in colour prompts, by colour."""
    items = [it for it in example.record["include"] if "color" in it or not needs_color]
    return [
        o
        for o in example.scene.objects
        if any(o.shape == it["class"] and it.get("color", o.color) == o.color for it in items)
    ]


# --- hard negatives ----------------------------------------------------------------------------------------


def heavy_blur(example: Example, rng: random.Random) -> tuple[str, Image.Image]:
    """Shapes blurred into soft blobs: a Gaussian blur of 1.8-3 px, or the image drawn at a fifth or a sixth of
    its size and scaled back up (the look of a decoder whose codes are too coarse)."""
    image = render(example.scene)
    if rng.random() < 0.5:
        return "gaussian", image.filter(ImageFilter.GaussianBlur(rng.uniform(1.8, 3.0)))
    size = example.scene.size
    small_size = size // rng.choice([5, 6])  # at a quarter, shapes aligned with the grid stay fairly crisp
    small = image.resize((small_size, small_size), Image.Resampling.BOX)
    return "low_res", small.resize((size, size), Image.Resampling.BICUBIC)


def _neighbour(scene: Scene, target: Shape, rng: random.Random) -> Shape:
    """The object ``target`` melts into: its nearest neighbour, or a new shape of another class for a lone one."""
    others = [o for o in scene.objects if o is not target]
    if others:
        return min(others, key=lambda o: math.hypot(o.cx - target.cx, o.cy - target.cy))
    shape = rng.choice([s for s in SHAPES if s != target.shape])
    side = rng.uniform(0.2, 0.3) * scene.size
    # only its direction from the target matters (towards the middle of the image, where there is room)
    toward_centre = math.atan2(scene.size / 2 - target.cy, scene.size / 2 - target.cx) + rng.uniform(-0.8, 0.8)
    return Shape(
        shape, rng.choice(list(COLORS)), side, target.cx + math.cos(toward_centre), target.cy + math.sin(toward_centre)
    )


def melted(example: Example, rng: random.Random) -> tuple[str, Image.Image]:
    """Two shapes pushed until their boxes overlap, joined by a smear and blurred together, their colours
    bleeding across the seam: one blob where the prompt needs two separate objects (or one clean shape)."""
    scene = example.scene
    a = rng.choice(required(example))
    b = _neighbour(scene, a, rng)
    angle = math.atan2(b.cy - a.cy, b.cx - a.cx)
    reach = (a.side + b.side) / 2 * rng.uniform(0.6, 0.8)
    lo, hi = b.side / 2 + 1, scene.size - b.side / 2 - 1
    b = replace(
        b,
        cx=float(np.clip(a.cx + reach * math.cos(angle), lo, hi)),
        cy=float(np.clip(a.cy + reach * math.sin(angle), lo, hi)),
    )
    cov_a, cov_b = coverage(scene.size, ideal(a.shape, a.box())), coverage(scene.size, ideal(b.shape, b.box()))
    width = 0.5 * min(a.side, b.side)
    bridge = coverage(
        scene.size, lambda d, s: d.line([(a.cx * s, a.cy * s), (b.cx * s, b.cy * s)], 255, round(width * s))
    )
    sigma = rng.uniform(1.0, 1.5)
    alpha = np.clip(ndimage.gaussian_filter(np.maximum.reduce([cov_a, cov_b, bridge]), sigma), 0, 1)
    weight_a, weight_b = ndimage.gaussian_filter(cov_a, 3.0), ndimage.gaussian_filter(cov_b, 3.0)
    share = (weight_a / (weight_a + weight_b + 1e-6))[..., None]
    field = share * jittered(palette(a.color), scene, rng) + (1 - share) * jittered(palette(b.color), scene, rng)
    variant = "same_color" if a.color == b.color else "two_colors"
    return variant, composite(without(scene, a, b), [(alpha, field)], scene, rng)


def color_mix(example: Example, rng: random.Random) -> tuple[str, Image.Image] | None:
    """An object whose colour the prompt names, filled with a 40-60 % blend of that colour and another palette
    colour, or split half and half between the two; ``None`` for prompts that name no colour."""
    targets = required(example, needs_color=True)
    if not targets:
        return None
    scene, target = example.scene, rng.choice(targets)
    other = rng.choice([c for c in COLORS if c != target.color])
    own, mix = jittered(palette(target.color), scene, rng), jittered(palette(other), scene, rng)
    silhouette = coverage(scene.size, ideal(target.shape, target.box()))
    base = without(scene, target)
    if rng.random() < 0.5:
        t = rng.uniform(0.4, 0.6)
        return "blend", composite(base, [(silhouette, (1 - t) * own + t * mix)], scene, rng)
    x0, y0, x1, y1 = target.box()
    half: Box = rng.choice(
        [(x0, y0, target.cx, y1), (target.cx, y0, x1, y1), (x0, y0, x1, target.cy), (x0, target.cy, x1, y1)]
    )
    first = silhouette * coverage(scene.size, lambda d, s: d.rectangle(scaled(half, s), fill=255))
    return "two_tone", composite(base, [(silhouette, mix), (first, own)], scene, rng)


def _wrong_outline(target: Shape, rng: random.Random) -> tuple[str, Painter]:
    """A silhouette a person would not call ``target.shape``, in the object's place and of about its size."""
    x0, y0, x1, y1 = box = target.box()
    side, cx, cy = target.side, target.cx, target.cy
    choices = {
        "circle": ("ellipse", "half_disc", "blob"),
        "square": ("rounded_square", "oblong", "blob"),
        "triangle": ("trapezoid", "blob"),
    }[target.shape]
    variant = rng.choice(choices)
    if variant in ("ellipse", "oblong"):
        short = side * rng.uniform(0.55, 0.72) / 2
        flat = (x0, cy - short, x1, cy + short) if rng.random() < 0.5 else (cx - short, y0, cx + short, y1)
        if variant == "ellipse":
            return variant, lambda d, s: d.ellipse(scaled(flat, s), fill=255)
        return variant, lambda d, s: d.rectangle(scaled(flat, s), fill=255)
    if variant == "half_disc":
        start = rng.choice([0, 90, 180, 270])  # the flat side through the centre, in one of four directions
        return variant, lambda d, s: d.pieslice(scaled(box, s), start, start + 180, fill=255)
    if variant == "rounded_square":
        radius = rng.uniform(0.25, 0.4) * side
        return variant, lambda d, s: d.rounded_rectangle(scaled(box, s), radius * s, fill=255)
    if variant == "trapezoid":
        cut = rng.uniform(0.3, 0.45)  # the top of the triangle cut off at this fraction of its height
        top, half_top = y0 + cut * side, cut * side / 2
        corners = [(cx - half_top, top), (cx + half_top, top), (x1, y1), (x0, y1)]
        return variant, lambda d, s: d.polygon([(x * s, y * s) for x, y in corners], fill=255)
    # an irregular blob: seven radii that vary by at least 1.75x around the centre
    radii = [rng.uniform(0.45, 0.75) * side for _ in range(7)]
    low, high = rng.sample(range(7), 2)
    radii[low], radii[high] = 0.4 * side, 0.7 * side
    start = rng.uniform(0, 2 * math.pi)
    points = [
        (cx + r * math.cos(start + 2 * math.pi * i / 7), cy + r * math.sin(start + 2 * math.pi * i / 7))
        for i, r in enumerate(radii)
    ]
    return "blob", lambda d, s: d.polygon([(x * s, y * s) for x, y in points], fill=255)


def silhouette(example: Example, rng: random.Random) -> tuple[str, Image.Image]:
    """One asked-for object drawn with a wrong outline (see ``_wrong_outline``), in its own colour."""
    scene = example.scene
    target = rng.choice(required(example))
    variant, paint = _wrong_outline(target, rng)
    layer = (coverage(scene.size, paint), jittered(palette(target.color), scene, rng))
    return variant, composite(without(scene, target), [layer], scene, rng)


def _stray(scene: Scene, taken: np.ndarray, rng: random.Random) -> Painter | None:
    """A dot (2.6-4.4 px across) or a splinter (4-7 px long) a few pixels beyond an object, with at least a
    pixel of background between it and everything drawn (``taken``); ``None`` when none fits."""
    obj = rng.choice(scene.objects)
    for _ in range(30):
        angle = rng.uniform(0, 2 * math.pi)
        reach = obj.side / 2 * rng.uniform(1.0, 1.4) + rng.uniform(1.5, 4.0)
        x, y = obj.cx + reach * math.cos(angle), obj.cy + reach * math.sin(angle)
        if rng.random() < 0.5:
            r = rng.uniform(1.3, 2.2)
            paint = _dot(x, y, r)
        else:
            paint = _splinter(x, y, rng.uniform(4, 7), rng.uniform(1.6, 2.4), rng.uniform(0, math.pi))
        mark = coverage(scene.size, paint)
        inside = 3 <= x < scene.size - 3 and 3 <= y < scene.size - 3
        if inside and not (ndimage.binary_dilation(mark > 0, iterations=1) & (taken > 0)).any():
            return paint
    return None


def _dot(x: float, y: float, r: float) -> Painter:
    return lambda d, s: d.ellipse(((x - r) * s, (y - r) * s, (x + r) * s, (y + r) * s), fill=255)


def _splinter(x: float, y: float, length: float, width: float, angle: float) -> Painter:
    dx, dy = length / 2 * math.cos(angle), length / 2 * math.sin(angle)
    return lambda d, s: d.line([((x - dx) * s, (y - dy) * s), ((x + dx) * s, (y + dy) * s)], 255, round(width * s))


def fragments(example: Example, rng: random.Random) -> tuple[str, Image.Image] | None:
    """Two to four stray palette-coloured dots and splinters beside the objects: things the prompt never asked
    for, which a counting prompt would count and a person would not call a clean picture of the prompt;
    ``None`` if no stray fits beside the objects."""
    scene = example.scene
    taken = np.maximum.reduce([coverage(scene.size, ideal(o.shape, o.box())) for o in scene.objects])
    layers = []
    for _ in range(rng.randint(2, 4)):
        paint = _stray(scene, taken, rng)
        if paint is not None:
            mark = coverage(scene.size, paint)
            taken = np.maximum(taken, mark)
            layers.append((mark, jittered(palette(rng.choice(list(COLORS))), scene, rng)))
    if not layers:
        return None
    return f"{len(layers)}_strays", composite(render(scene), layers, scene, rng)


HARD_NEGATIVES: dict[str, Callable[[Example, random.Random], tuple[str, Image.Image] | None]] = {
    "heavy_blur": heavy_blur,
    "melted": melted,
    "color_mix": color_mix,
    "silhouette": silhouette,
    "fragments": fragments,
}


# --- mild perturbations ------------------------------------------------------------------------------------


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _noisy(image: Image.Image, std: float, rng: random.Random) -> Image.Image:
    noise = np.random.default_rng(rng.randrange(2**31)).normal(0, std, (*image.size[::-1], 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + noise + 0.5, 0, 255).astype(np.uint8))


def mild(image: Image.Image, kind: str, rng: random.Random) -> Image.Image:
    """What a good de-tokenizer draws: a 0.5-0.7 px blur, 3-6 levels of extra noise, JPEG at quality 80-95,
    a 1-pixel shift, or a light blur, noise and JPEG together."""
    if kind == "mild_blur":
        return image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 0.7)))
    if kind == "mild_noise":
        return _noisy(image, rng.uniform(3, 6), rng)
    if kind == "jpeg":
        return _jpeg(image, rng.randint(80, 95))
    if kind == "shift":
        dx, dy = rng.choice([(1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, -1), (1, -1), (-1, 1)])
        return ImageChops.offset(image, dx, dy)  # the wrapped row and column are background
    if kind == "combined":
        blurred = image.filter(ImageFilter.GaussianBlur(0.5))
        return _jpeg(_noisy(blurred, 3, rng), 90)
    raise ValueError(f"unknown mild perturbation {kind!r}; kinds are {', '.join(MILD_KINDS)}")


# --- test sets ---------------------------------------------------------------------------------------------


def examples(
    seed: int = 0, splits: tuple[str, ...] = SPLITS, tags: tuple[str, ...] = TAGS
) -> Iterator[tuple[str, int, Example]]:
    """Endless ``(split, index, example)``, alternating splits; every tag in turn within each split."""
    samplers = [SceneSampler(split, seed=seed, tags=tags) for split in splits]
    index = 0
    while True:
        for sampler in samplers:
            yield sampler.split, index, sampler.example(index)
        index += 1


def _rng(seed: int, split: str, index: int, kind: str) -> random.Random:
    return random.Random(f"shapesworld-hard-negatives/{seed}/{split}/{index}/{kind}")


def hard_negatives(kind: str, count: int, seed: int = 0, splits: tuple[str, ...] = SPLITS) -> list[Variant]:
    """``count`` hard negatives of one kind, from scenes of every tag the kind applies to (colour mixing needs a
    prompt that names a colour; the others apply to every tag)."""
    if kind not in HARD_NEGATIVES:
        raise ValueError(f"unknown hard negative {kind!r}; kinds are {', '.join(HARD_KINDS)}")
    out: list[Variant] = []
    for split, index, example in examples(seed, splits):
        if len(out) == count:
            break
        made = HARD_NEGATIVES[kind](example, _rng(seed, split, index, kind))
        if made is not None:
            out.append(Variant(kind, made[0], example, made[1]))
    return out


def mild_perturbations(count: int, seed: int = 0, splits: tuple[str, ...] = SPLITS) -> list[Variant]:
    """``count`` mildly perturbed renders, the mild kinds in turn over scenes of every tag."""
    out: list[Variant] = []
    for i, (split, index, example) in enumerate(itertools.islice(examples(seed, splits), count)):
        kind = MILD_KINDS[i % len(MILD_KINDS)]
        image = mild(render(example.scene), kind, _rng(seed, split, index, kind))
        out.append(Variant(kind, kind, example, image))
    return out
