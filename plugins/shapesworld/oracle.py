"""A deterministic judge for ShapesWorld images, as strict as a person looking at a generated picture.

It plays the part of GenEval's object detector (scoring generated images against their prompt spec) and of a
perfect VQA model (answering POPE-style questions), so generation and understanding can be scored on CPU.

How it reads an image:

1. The background is the median colour of the image's border (scenes are a plain, slightly noisy background).
2. Every pixel is explained, if it can be, as the background blended with one palette colour (an anti-aliased
   edge is such a blend): its colour is the nearest palette entry along that line and its coverage the blend
   weight. Pixels far from the background that no such blend explains (a mix of two palette colours, a smear)
   are unexplained.
3. Each connected region of one colour (coverage over one half) is an object candidate. Its fill colour (the
   mean of its fully covered interior) must be close to its palette entry. Its coverage map is compared with
   the ideal circle, square and triangle of the same area and centre, each blurred by the amount that fits
   best: the best fit names the class, and the object must match it closely (a rounded square, an ellipse, a
   half disc or a blob do not) and be sharp (a heavily blurred shape is a soft blob, not a shape).
4. Anything else that is visible is a defect: a stray fragment too small to be an object, a patch of
   unexplained colour, an object with the wrong colour, outline or sharpness. An image with a defect fails
   every prompt, as a person fails a picture of "a red circle" that shows a red circle and stray blots.

Prompts are then scored by GenEval's rules, relative positions included (``relative_position``).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from tarkit_plugins.shapesworld.world import COLORS, SHAPES, Scene, relative_position

PALETTE = np.array(list(COLORS.values()), dtype=np.float32)
COLOR_NAMES = list(COLORS)

# Thresholds, measured on renders, mildly perturbed renders and hard negatives (tests/plugins/shapesworld/
# test_hard_negatives.py): values are in RGB distance (0-441), pixels, or fractions of an object's area.
BLEND_DISTANCE = 60.0  # at most this far from a background-to-palette blend, a pixel is of that colour (JPEG
# shifts edge colours by up to ~50; a blend of two palette colours is 60-100 away from every such line)
UNEXPLAINED_DISTANCE = 60.0  # an unexplained pixel this far from the background is visibly drawn
FILL_DISTANCE = 30.0  # an object's fill stays this close to its palette colour (renders jitter by <= 17)
MIN_OBJECT_AREA = 0.004  # fraction of the image: smaller regions are not objects but fragments ...
MIN_FRAGMENT_AREA = 3.0  # ... and regions of at least this many pixels are visible fragments
MIN_UNEXPLAINED_AREA = 4  # a patch of unexplained colour this large (pixels) is visible
MAX_MISFIT = 0.2  # L1 distance between an object's coverage and its class's ideal, as a fraction of its area
MAX_LOCAL_MISFIT = 0.15  # the largest smoothed local error: a rounded corner, a bump or a dent (renders <= 0.07)
MAX_BLUR = 1.2  # px: the Gaussian blur (sigma) beyond which an object is a soft blob, not a shape
BLURS = (0.0, 0.35, 0.7, 0.9, 1.1, 1.3, 1.6, 2.0, 2.8)  # px: the blurs the ideal shapes are compared at
SUPERSAMPLE = 4  # ideal shapes are drawn on a 4x grid and box-filtered down, like world.render


class OracleError(ValueError):
    """The oracle cannot judge this input (e.g. a class that is not a ShapesWorld shape)."""


@dataclass(frozen=True)
class Detection:
    """One object found in an image: class, colour, box centre and side (pixels), coverage area and how well it
    matches its class's ideal shape (``confidence`` = 1 - misfit, the detector score GenEval ranks by)."""

    shape: str
    color: str
    cx: float
    cy: float
    area: int
    side: float = 0.0
    confidence: float = 1.0


@dataclass(frozen=True)
class Analysis:
    """What the oracle sees in an image: the well-drawn objects, and everything else it could not accept."""

    detections: list[Detection]
    defects: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Fit:
    shape: str
    cx: float
    cy: float
    side: float
    blur: float
    misfit: float
    local_misfit: float


# --- pixels ------------------------------------------------------------------------------------------------


def _pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise OracleError(f"expected an RGB image, got an array of shape {pixels.shape}")
    return pixels


def _background(pixels: np.ndarray) -> np.ndarray:
    """The median colour of the 2-pixel border: scenes keep their objects off the edges."""
    border = np.concatenate(
        [
            pixels[:2].reshape(-1, 3),
            pixels[-2:].reshape(-1, 3),
            pixels[:, :2].reshape(-1, 3),
            pixels[:, -2:].reshape(-1, 3),
        ]
    )
    return np.median(border, axis=0)


def _blend_lines(offset: np.ndarray, background: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each pixel (``offset`` = colour - background): the palette colour whose blend with the background is
    nearest, the blend weight (coverage) along it and the distance to that blend."""
    directions = PALETTE - background  # (K, 3)
    lengths = (directions**2).sum(axis=1)
    dots = offset @ directions.T  # (H, W, K)
    weights = dots / lengths
    clipped = np.clip(weights, 0, 1)
    # |offset - w d|^2 expanded, so no (H, W, K, 3) array of blends is built
    squared = (offset**2).sum(axis=-1, keepdims=True) - 2 * clipped * dots + clipped**2 * lengths
    nearest = squared.argmin(axis=-1)
    pick = nearest[..., None]
    distance = np.sqrt(np.maximum(np.take_along_axis(squared, pick, -1)[..., 0], 0))
    return nearest, np.take_along_axis(weights, pick, -1)[..., 0], distance


# --- shapes ------------------------------------------------------------------------------------------------


def _ideal(shape: str, cx: float, cy: float, side: float, top: int, left: int, height: int, width: int):
    """Coverage of the ideal ``shape`` (box side ``side`` centred at ``cx, cy``) over a patch of the image."""
    step = 1 / SUPERSAMPLE
    ys = top + step / 2 + step * np.arange(height * SUPERSAMPLE)[:, None]
    xs = left + step / 2 + step * np.arange(width * SUPERSAMPLE)[None, :]
    half = side / 2
    if shape == "circle":
        inside = (xs - cx) ** 2 + (ys - cy) ** 2 <= half**2
    elif shape == "square":
        inside = (np.abs(xs - cx) <= half) & (np.abs(ys - cy) <= half)
    else:  # upright, as world.render draws it: apex at the top middle, base as wide as the box
        depth = ys - (cy - half)
        inside = (depth >= 0) & (depth <= side) & (np.abs(xs - cx) <= depth / 2)
    return inside.reshape(height, SUPERSAMPLE, width, SUPERSAMPLE).mean(axis=(1, 3))


def _moment_boxes(coverage: np.ndarray, top: int, left: int) -> dict[str, tuple[float, float, float]]:
    """Each class's box (centre and side) with the coverage's area and centroid: exact for ideal shapes, and
    robust to noise and blur (a blur keeps both)."""
    area = coverage.sum()
    ys, xs = np.indices(coverage.shape)
    cy = top + 0.5 + (coverage * ys).sum() / area
    cx = left + 0.5 + (coverage * xs).sum() / area
    triangle_side = np.sqrt(2 * area)  # its centroid lies a sixth of the side below the box centre
    return {
        "circle": (cx, cy, 2 * np.sqrt(area / np.pi)),
        "square": (cx, cy, np.sqrt(area)),
        "triangle": (cx, cy - triangle_side / 6, triangle_side),
    }


def _fit(coverage: np.ndarray, body: np.ndarray, top: int, left: int) -> _Fit:
    """The class, box and blur whose ideal shape is nearest the coverage (L1 distance over the area); its
    largest local error is looked for on the object's ``body`` and its outline."""
    area = coverage.sum()
    boxes = _moment_boxes(coverage, top, left)
    sharp = {shape: _ideal(shape, *box, top, left, *coverage.shape) for shape, box in boxes.items()}

    def misfit(shape: str, blur: float) -> tuple[float, np.ndarray]:
        model = ndimage.gaussian_filter(sharp[shape], blur, mode="constant") if blur else sharp[shape]
        return float(np.abs(coverage - model).sum() / area), model

    # the class is plain at a typical render's softness; only then is the blur searched, for that class alone
    shape = min(boxes, key=lambda s: misfit(s, BLURS[1])[0])
    blur = min(BLURS, key=lambda b: misfit(shape, b)[0])
    error, model = misfit(shape, blur)
    # a wrong outline leaves a coherent surplus or deficit in one place (a rounded corner, a bump), where noise
    # and JPEG ringing leave scattered pixels of either sign: smoothing the signed residual tells them apart
    # (on the body, not around it, where JPEG rings: a ringing speck is no part of the object's outline)
    smoothed = np.abs(ndimage.gaussian_filter(coverage - model, 1.0, mode="constant"))
    local = float(smoothed[ndimage.binary_dilation(body | (model > 0.5))].max())
    cx, cy, side = boxes[shape]
    return _Fit(shape, float(cx), float(cy), float(side), blur, error, local)


def _patch(mask: np.ndarray, pad: int) -> tuple[slice, slice]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    height, width = mask.shape
    return (
        slice(max(rows[0] - pad, 0), min(rows[-1] + pad + 1, height)),
        slice(max(cols[0] - pad, 0), min(cols[-1] + pad + 1, width)),
    )


def _judge_object(
    pixels: np.ndarray, background: np.ndarray, region: np.ndarray, others: np.ndarray, color_index: int
) -> tuple[Detection | None, list[str]]:
    """Fill colour, outline and sharpness of one object candidate (``region``: its pixels over half covered;
    ``others``: every other region's)."""
    color = COLOR_NAMES[color_index]
    interior = ndimage.binary_erosion(region)
    fill = pixels[interior if interior.any() else region].mean(axis=0)
    rows, cols = _patch(region, pad=7)
    # coverage against the object's own fill, so the renderer's colour jitter does not read as a ragged outline
    direction = fill - background
    offset = pixels[rows, cols] - background
    coverage = np.clip(offset @ direction / (direction @ direction), 0, 1)
    # five pixels around the region hold the tails of a heavy blur, which the blur fit has to see
    near = ndimage.binary_dilation(region[rows, cols], iterations=5) & ~ndimage.binary_dilation(others[rows, cols])
    coverage = np.where(near, coverage, 0.0)
    fit = _fit(coverage, region[rows, cols], rows.start, cols.start)
    where = f"{color} object at ({fit.cx:.0f}, {fit.cy:.0f})"
    defects = []
    if np.linalg.norm(fill - PALETTE[color_index]) > FILL_DISTANCE:
        defects.append(f"{where} has a colour between palette entries")
    if fit.misfit > MAX_MISFIT or fit.local_misfit > MAX_LOCAL_MISFIT:
        defects.append(
            f"{where} is no clean circle, square or triangle (misfit {fit.misfit:.2f}, locally {fit.local_misfit:.2f})"
        )
    if fit.blur > MAX_BLUR:
        defects.append(f"{where} is blurred (about {fit.blur:.1f} px)")
    if defects:
        return None, defects
    area = int(round(coverage.sum()))
    return Detection(fit.shape, color, fit.cx, fit.cy, area, fit.side, 1 - fit.misfit), []


def _regions(nearest: np.ndarray, covered: np.ndarray) -> list[tuple[np.ndarray, int]]:
    """``(mask, colour index)`` of each connected region of one colour, at least a visible fragment in size."""
    regions = []
    for color_index in range(len(COLOR_NAMES)):
        labels, count = ndimage.label(covered & (nearest == color_index), structure=np.ones((3, 3)))
        sizes = ndimage.sum(covered, labels, range(1, count + 1))
        regions += [(labels == i + 1, color_index) for i in np.flatnonzero(sizes >= MIN_FRAGMENT_AREA)]
    return regions


def analyse(image: Image.Image | np.ndarray) -> Analysis:
    """The objects in an RGB image (left to right) and its defects (see the module docstring)."""
    pixels = _pixels(image)
    background = _background(pixels)
    offset = pixels - background
    nearest, weight, distance = _blend_lines(offset, background)
    explained = distance < BLEND_DISTANCE
    regions = _regions(nearest, explained & (weight > 0.5))  # pixels over half covered by one colour
    min_area = MIN_OBJECT_AREA * pixels.shape[0] * pixels.shape[1]
    objects = [(mask, c) for mask, c in regions if mask.sum() >= min_area]
    everything, anything = np.zeros(nearest.shape, dtype=bool), np.zeros(nearest.shape, dtype=bool)
    for mask, _ in objects:
        everything |= mask
    for mask, _ in regions:
        anything |= mask
    rims = ndimage.binary_dilation(everything)
    defects = []
    for mask, color_index in regions:
        # a small region touching an object is its rim in a shifted colour (JPEG, blur), not a stray fragment
        if mask.sum() < min_area and not (mask & rims).any():
            ys, xs = np.nonzero(mask)
            defects.append(f"stray {COLOR_NAMES[color_index]} fragment at ({xs.mean():.0f}, {ys.mean():.0f})")
    found = []
    for mask, color_index in objects:
        # judged without its neighbours, fragments included, so their defects stay theirs
        detection, problems = _judge_object(pixels, background, mask, anything & ~mask, color_index)
        defects += problems
        if detection is not None:
            found.append(detection)
    drawn = np.linalg.norm(offset, axis=-1) > UNEXPLAINED_DISTANCE
    defects += _unexplained(drawn & ~explained & ~ndimage.binary_dilation(everything, iterations=2))
    return Analysis(sorted(found, key=lambda d: d.cx), defects)


def _unexplained(mask: np.ndarray) -> list[str]:
    """Patches of drawn colour that no palette colour explains (a smear, a blend of two colours), beyond the
    two-pixel rim of an object where JPEG and blur leave a few off colours."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    sizes = ndimage.sum(mask, labels, range(1, count + 1))
    out = []
    for index in np.flatnonzero(sizes >= MIN_UNEXPLAINED_AREA):
        ys, xs = np.nonzero(labels == index + 1)
        out.append(f"unexplained colour at ({xs.mean():.0f}, {ys.mean():.0f})")
    return out


def detect(image: Image.Image | np.ndarray) -> list[Detection]:
    """The well-drawn objects in an RGB image, left to right."""
    return analyse(image).detections


# --- GenEval's rules ---------------------------------------------------------------------------------------


def _check_class(name: str) -> None:
    if name not in SHAPES:
        raise OracleError(
            f"class {name!r} is not a ShapesWorld shape ({', '.join(SHAPES)}); score such images with GenEval's "
            "own detector-based evaluator"
        )


def score_record(detections: list[Detection], record: dict[str, Any]) -> tuple[bool, str]:
    """GenEval's rule for one image: every ``include`` entry found at least ``count`` times (with its colour
    when given); for a ``position``, its ``count`` most confident objects each stand in that relation to each of
    the anchor entry's; no ``exclude`` entry found ``count`` times or more."""
    groups: list[list[Detection]] = []
    for item in record["include"]:
        _check_class(item["class"])
        wanted = [d for d in detections if d.shape == item["class"] and item.get("color", d.color) == d.color]
        label = f"{item.get('color', '')} {item['class']}".strip()
        if len(wanted) < item["count"]:
            return False, f"expected {label}>={item['count']}, found {len(wanted)}"
        groups.append(sorted(wanted, key=lambda d: -d.confidence)[: item["count"]])
    for item, group in zip(record["include"], groups, strict=True):
        if "position" not in item:
            continue
        relation, anchor_index = item["position"]
        for subject in group:
            for anchor in groups[anchor_index]:
                found = relative_position(subject, anchor)
                if relation not in found:
                    anchor_class = record["include"][anchor_index]["class"]
                    seen = " and ".join(sorted(found)) or "no relation to"
                    return False, f"expected {item['class']} {relation} {anchor_class}, found {seen} it"
    for item in record.get("exclude", []):
        _check_class(item["class"])
        count = sum(d.shape == item["class"] for d in detections)
        if count >= item["count"]:
            return False, f"expected {item['class']}<{item['count']}, found {count}"
    return True, "correct"


def score_scene(scene: Scene, record: dict[str, Any]) -> tuple[bool, str]:
    """GenEval's verdict on a scene's own objects (exact boxes): what a perfect judge says of its clean render."""
    truth = [Detection(o.shape, o.color, o.cx, o.cy, 0, o.side) for o in scene.objects]
    return score_record(truth, record)


def score_image(image: Image.Image, record: dict[str, Any]) -> tuple[bool, str]:
    """GenEval's verdict and reason for one image; an image with a defect fails whatever it is asked for."""
    for item in record["include"] + record.get("exclude", []):
        _check_class(item["class"])  # an unknown class is an error even on a defective image
    analysis = analyse(image)
    if analysis.defects:
        return False, "; ".join(analysis.defects)
    return score_record(analysis.detections, record)


def score_edit(image: Image.Image, edited: Scene) -> tuple[bool, str]:
    """The verdict on an edited image: no defect, and exactly the edited scene's objects by colour and shape (the
    recoloured object in its new colour, a removed one gone, every other one kept)."""
    analysis = analyse(image)
    if analysis.defects:
        return False, "; ".join(analysis.defects)
    found = Counter((d.color, d.shape) for d in analysis.detections)
    wanted = Counter((o.color, o.shape) for o in edited.objects)
    if found != wanted:
        missing, extra = wanted - found, found - wanted
        said = [f"missing {c} {s}" for c, s in sorted(missing.elements())] + [
            f"unexpected {c} {s}" for c, s in sorted(extra.elements())
        ]
        return False, ", ".join(said)
    return True, "correct"


_QUESTION = re.compile(
    rf"is there an? (?:(?P<color>{'|'.join(COLORS)}) )?(?P<shape>{'|'.join(SHAPES)})\b", re.IGNORECASE
)


def answer_question(image: Image.Image, question: str) -> str:
    """ "yes"/"no" for POPE-style questions "Is there a [colour] <shape> in the image?"."""
    match = _QUESTION.search(question)
    if match is None:
        raise OracleError(f"cannot parse question {question!r}; expected 'Is there a [colour] <shape> ...?'")
    color, shape = match["color"], match["shape"].lower()
    found = any(d.shape == shape and (color is None or d.color == color.lower()) for d in detect(image))
    return "yes" if found else "no"
