"""A deterministic judge for ShapesWorld images: colour segmentation, connected components, shape features.

It plays the part of GenEval's object detector (scoring generated images against their prompt spec) and of a
perfect VQA model (answering POPE-style questions), so generation and understanding can be scored on CPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from tarkit_plugins.shapesworld.world import COLORS, SHAPES, relation_holds

PALETTE = np.array(list(COLORS.values()), dtype=np.float32)
COLOR_NAMES = list(COLORS)
MAX_COLOR_DISTANCE = 80.0  # a pixel further than this from every palette colour is background or an edge
CORE_COLOR_DISTANCE = 36.0  # shape features use only (almost) fully covered pixels, not anti-aliased edges
MIN_AREA_FRACTION = 0.004  # components smaller than this fraction of the image are noise


class OracleError(ValueError):
    """The oracle cannot judge this input (e.g. a class that is not a ShapesWorld shape)."""


@dataclass(frozen=True)
class Detection:
    """One object found in an image."""

    shape: str
    color: str
    cx: float
    cy: float
    area: int


def _classify_shape(mask: np.ndarray) -> str:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    box = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    height, width = box.shape
    widths = box.sum(axis=1)
    # an upright triangle is narrow at the top and wide at the bottom; circles and squares are symmetric
    third = max(1, height // 3)
    if widths[:third].mean() < 0.6 * widths[-third:].mean():
        return "triangle"
    # a square fills the corners of its bounding box, a circle leaves them empty (measured on 2,000 renders:
    # squares >= 0.78, circles <= 0.63)
    patch = max(2, round(0.25 * min(height, width)))
    corners = [box[:patch, :patch], box[:patch, -patch:], box[-patch:, :patch], box[-patch:, -patch:]]
    return "square" if np.mean([c.mean() for c in corners]) > 0.7 else "circle"


def detect(image: Image.Image | np.ndarray) -> list[Detection]:
    """Objects in an RGB image, left to right."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise OracleError(f"expected an RGB image, got an array of shape {pixels.shape}")
    distances = np.linalg.norm(pixels[:, :, None, :] - PALETTE[None, None], axis=-1)
    nearest = distances.argmin(axis=-1)
    closest = distances.min(axis=-1)
    assigned = closest < MAX_COLOR_DISTANCE
    min_area = MIN_AREA_FRACTION * pixels.shape[0] * pixels.shape[1]
    found = []
    for color_index, color in enumerate(COLOR_NAMES):
        labels, count = ndimage.label(assigned & (nearest == color_index))
        for component in range(1, count + 1):
            mask = labels == component
            area = int(mask.sum())
            if area < min_area:
                continue
            ys, xs = np.nonzero(mask)
            # the box centre, as a box detector (GenEval's) reports it; a triangle's centroid sits lower
            cx, cy = (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2
            # opening drops the stray anti-aliased pixels along the edges that would stretch the bounding box
            core = ndimage.binary_opening(mask & (closest < CORE_COLOR_DISTANCE), structure=np.ones((3, 3)))
            shape = _classify_shape(core if core.any() else mask)
            found.append(Detection(shape, color, float(cx), float(cy), area))
    return sorted(found, key=lambda d: d.cx)


def _check_class(name: str) -> None:
    if name not in SHAPES:
        raise OracleError(
            f"class {name!r} is not a ShapesWorld shape ({', '.join(SHAPES)}); score such images with GenEval's "
            "own detector-based evaluator"
        )


def score_record(detections: list[Detection], record: dict[str, Any], size: int) -> tuple[bool, str]:
    """GenEval's rule for one image: every ``include`` entry found at least ``count`` times (with its colour
    and relative position when given), no ``exclude`` entry found ``count`` times or more."""
    matched: list[list[Detection]] = []
    for item in record["include"]:
        _check_class(item["class"])
        of_class = [d for d in detections if d.shape == item["class"]]
        wanted = [d for d in of_class if d.color == item["color"]] if "color" in item else of_class
        label = f"{item.get('color', '')} {item['class']}".strip()
        if len(wanted) < item["count"]:
            return False, f"expected {label}>={item['count']}, found {len(wanted)}"
        matched.append(wanted)
    for item, found in zip(record["include"], matched, strict=True):
        if "position" not in item:
            continue
        relation, anchor_index = item["position"]
        if not any(
            relation_holds(relation, (d.cx, d.cy), (a.cx, a.cy), size) for d in found for a in matched[anchor_index]
        ):
            return False, f"expected {item['class']} {relation} {record['include'][anchor_index]['class']}"
    for item in record.get("exclude", []):
        _check_class(item["class"])
        count = sum(d.shape == item["class"] for d in detections)
        if count >= item["count"]:
            return False, f"expected {item['class']}<{item['count']}, found {count}"
    return True, "correct"


def score_image(image: Image.Image, record: dict[str, Any]) -> tuple[bool, str]:
    return score_record(detect(image), record, image.size[0])


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
