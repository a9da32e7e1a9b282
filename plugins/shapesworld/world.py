"""ShapesWorld scenes: seeded sampling, GenEval-style prompts, POPE-style questions, edits and rendering.

A scene is 1-4 coloured shapes on a plain, slightly noisy background. Every scene is drawn for one GenEval
category (single_object, two_object, counting, colors, position, color_attr) and comes with that category's
GenEval spec (``include``/``exclude``) and prompt, so the oracle can score any image against the prompt.

Splits: ``train`` uses 12 of the 18 colour-shape combinations; ``heldout`` uses only the other 6, so a
model evaluated on ``heldout`` has never seen those combinations (each colour and each shape alone is seen).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 35),
    "purple": (150, 60, 200),
    "cyan": (40, 195, 210),
}
TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}

# Colour i is held out with shape i % 3: every colour and every shape still occurs in training.
HELDOUT_COMBOS: frozenset[tuple[str, str]] = frozenset(
    (color, SHAPES[i % len(SHAPES)]) for i, color in enumerate(COLORS)
)
ALL_COMBOS: frozenset[tuple[str, str]] = frozenset((c, s) for c in COLORS for s in SHAPES)
SPLITS = {"train": ALL_COMBOS - HELDOUT_COMBOS, "heldout": HELDOUT_COMBOS, "all": ALL_COMBOS}

# The first phrasing is GenEval's own; the others vary training captions.
PHRASINGS: tuple[str, ...] = ("a photo of {}", "an image of {}", "a picture showing {}", "{}", "a drawing of {}")
POSITION_THRESHOLD = 0.1  # GenEval's default: offsets shrink by this fraction of the two boxes' sizes
PLACEMENT_THRESHOLD = 0.15  # scenes are drawn with a wider one, so a judge's box estimates keep the relation


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def plural(shape: str) -> str:
    return f"{shape}s"


def relative_position(subject: Any, anchor: Any, threshold: float = POSITION_THRESHOLD) -> set[str]:
    """GenEval's relations of ``subject`` to ``anchor`` (the oracle's detections, or anything with a box centre
    ``cx, cy`` and side ``side``, such as a scene's shapes): each axis's box-centre offset shrinks towards zero by
    ``threshold`` x the two boxes' sizes along that axis; a relation holds when its shrunk offset, divided by
    the length of the whole offset, exceeds one half (so a mostly vertical offset is no "left of")."""
    offset = np.array([subject.cx - anchor.cx, subject.cy - anchor.cy])
    sizes = np.array([subject.side + anchor.side] * 2)  # ShapesWorld boxes are square
    shrunk = np.maximum(np.abs(offset) - threshold * sizes, 0) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    named = {"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}
    return {relation for relation, holds in named.items() if holds}


@dataclass(frozen=True)
class Shape:
    """One object: class, colour name, bounding-box side and centre in pixels."""

    shape: str
    color: str
    side: float
    cx: float
    cy: float

    def box(self) -> tuple[float, float, float, float]:
        half = self.side / 2
        return (self.cx - half, self.cy - half, self.cx + half, self.cy + half)


@dataclass(frozen=True)
class Scene:
    """A renderable scene: objects, image side, background colour and the seed of its pixel noise."""

    objects: tuple[Shape, ...]
    size: int
    background: tuple[int, int, int]
    noise_seed: int
    noise_std: float = 3.0
    color_jitter: int = 10

    def combos(self) -> set[tuple[str, str]]:
        return {(o.color, o.shape) for o in self.objects}

    def describe(self) -> str:
        """Left-to-right caption naming every object, e.g. "a red circle, a blue square and a cyan triangle"."""
        names = [f"{article(o.color)} {o.color} {o.shape}" for o in sorted(self.objects, key=lambda o: o.cx)]
        return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


@dataclass(frozen=True)
class Example:
    """A scene with the GenEval record (``tag``, ``include``, optional ``exclude``, ``prompt``) it satisfies."""

    scene: Scene
    record: dict[str, Any]

    @property
    def prompt(self) -> str:
        return self.record["prompt"]


class SceneSampler:
    """Draws examples of a split reproducibly: ``sampler.example(i)`` depends only on ``(seed, split, i)``."""

    def __init__(
        self,
        split: str = "train",
        seed: int = 0,
        size: int = 64,
        tags: tuple[str, ...] = TAGS,
        min_side: float = 0.2,
        max_side: float = 0.3,
        noise_std: float = 3.0,
        color_jitter: int = 10,
    ):
        if split not in SPLITS:
            raise ValueError(f"unknown ShapesWorld split {split!r}; splits are {', '.join(SPLITS)}")
        unknown = set(tags) - set(TAGS)
        if unknown or not tags:
            raise ValueError(f"unknown or empty tags {sorted(unknown)}; tags are {', '.join(TAGS)}")
        if size < 32:
            raise ValueError(f"ShapesWorld images need size >= 32 pixels, got {size}")
        self.split, self.seed, self.size, self.tags = split, seed, size, tuple(tags)
        self.combos = sorted(SPLITS[split])
        self.min_side, self.max_side = min_side, max_side
        self.noise_std, self.color_jitter = noise_std, color_jitter

    def rng(self, index: int, purpose: str = "scene") -> random.Random:
        return random.Random(f"shapesworld/{self.seed}/{self.split}/{index}/{purpose}")

    def example(self, index: int) -> Example:
        rng = self.rng(index)
        tag = self.tags[index % len(self.tags)]  # categories in equal numbers, as in a benchmark
        combos, record = self._objects_for(tag, rng)
        objects = self._place(combos, rng, record)
        background = tuple(rng.randint(205, 240) + rng.randint(-6, 6) for _ in range(3))
        scene = Scene(objects, self.size, background, rng.randrange(2**31), self.noise_std, self.color_jitter)
        record["prompt"] = PHRASINGS[0].format(record.pop("phrase"))
        return Example(scene, record)

    def caption(self, example: Example, rng: random.Random) -> str:
        """The example's prompt in a random phrasing (training captions)."""
        body = example.prompt.removeprefix("a photo of ")
        return rng.choice(PHRASINGS).format(body)

    def _pick(self, rng: random.Random, exclude_shapes: set[str] = frozenset()) -> tuple[str, str]:
        return rng.choice([c for c in self.combos if c[1] not in exclude_shapes])

    def _objects_for(self, tag: str, rng: random.Random) -> tuple[list[tuple[str, str]], dict[str, Any]]:
        if tag in ("single_object", "colors"):
            color, shape = self._pick(rng)
            item = {"class": shape, "count": 1} | ({"color": color} if tag == "colors" else {})
            phrase = f"{article(color if tag == 'colors' else shape)} {color + ' ' if tag == 'colors' else ''}{shape}"
            return [(color, shape)], {"tag": tag, "include": [item], "phrase": phrase}
        if tag == "counting":
            shape = rng.choice(sorted({s for _, s in self.combos}))
            count = rng.randint(2, 4)
            colors = [c for c, s in self.combos if s == shape]
            combos = [(rng.choice(colors), shape) for _ in range(count)]
            record = {
                "tag": tag,
                "include": [{"class": shape, "count": count}],
                "exclude": [{"class": shape, "count": count + 1}],
                "phrase": f"{NUMBER_WORDS[count]} {plural(shape)}",
            }
            return combos, record
        first = self._pick(rng)
        second = self._pick(rng, exclude_shapes={first[1]})
        if tag == "two_object":
            include = [{"class": first[1], "count": 1}, {"class": second[1], "count": 1}]
            phrase = f"{article(first[1])} {first[1]} and {article(second[1])} {second[1]}"
        elif tag == "color_attr":
            include = [{"class": s, "count": 1, "color": c} for c, s in (first, second)]
            phrase = f"{article(first[0])} {first[0]} {first[1]} and {article(second[0])} {second[0]} {second[1]}"
        else:  # position: GenEval puts the anchor first and the subject, with [relation, 0], second
            relation = rng.choice(RELATIONS)
            include = [{"class": first[1], "count": 1}, {"class": second[1], "count": 1, "position": [relation, 0]}]
            phrase = f"{article(second[1])} {second[1]} {relation} {article(first[1])} {first[1]}"
        return [first, second], {"tag": tag, "include": include, "phrase": phrase}

    def _place(self, combos: list[tuple[str, str]], rng: random.Random, record: dict[str, Any]) -> tuple[Shape, ...]:
        size = self.size
        relation = record["include"][-1].get("position", [None])[0]
        for _ in range(1000):
            placed: list[Shape] = []
            for color, shape in combos:
                side = rng.uniform(self.min_side, self.max_side) * size
                candidate = self._free_spot(color, shape, side, placed, rng)
                if candidate is None:
                    break
                placed.append(candidate)
            else:
                if relation is None or relation in relative_position(placed[1], placed[0], PLACEMENT_THRESHOLD):
                    return tuple(placed)
        raise RuntimeError(f"could not place {len(combos)} objects on a {size}px image; use a larger size")

    def _free_spot(self, color: str, shape: str, side: float, placed: list[Shape], rng: random.Random) -> Shape | None:
        margin = 0.04 * self.size
        for _ in range(100):
            lo, hi = side / 2 + margin, self.size - side / 2 - margin
            candidate = Shape(shape, color, side, rng.uniform(lo, hi), rng.uniform(lo, hi))
            # objects keep a gap so that counting and segmentation never see two shapes touch
            if all(
                max(
                    abs(candidate.cx - o.cx) - (candidate.side + o.side) / 2,
                    abs(candidate.cy - o.cy) - (candidate.side + o.side) / 2,
                )
                > margin
                for o in placed
            ):
                return candidate
        return None

    def pope_questions(self, example: Example, rng: random.Random, per_image: int = 2) -> list[tuple[str, str]]:
        """Balanced yes/no questions: ``per_image`` present and ``per_image`` absent objects (with and
        without colour; absent ones favour a present shape in another colour, POPE's adversarial setting)."""
        present = sorted(example.scene.combos())
        present_shapes = {s for _, s in present}
        absent = sorted(ALL_COMBOS - set(present))
        adversarial = [c for c in absent if c[1] in present_shapes]
        questions = []
        for i in range(per_image):
            color, shape = rng.choice(present)
            questions.append((self._question(color if i % 2 == 0 else None, shape), "yes"))
            pool = adversarial if adversarial and i % 2 == 0 else absent
            color, shape = rng.choice(pool)
            if i % 2 == 1 and shape not in present_shapes:
                questions.append((self._question(None, shape), "no"))
            else:
                questions.append((self._question(color, shape), "no"))
        return questions

    def training_question(self, example: Example, rng: random.Random) -> tuple[str, str]:
        """One yes/no question for training whose wording carries no hint of its answer: the answer is a fair
        coin and so is naming a colour, for either answer. (The evaluation's :meth:`pope_questions` ask colour
        questions more often with "no", so a model trained on them can score ~0.62 without looking.)"""
        present = sorted(example.scene.combos())
        present_shapes = {s for _, s in present}
        with_color = rng.random() < 0.5
        if rng.random() < 0.5:
            color, shape = rng.choice(present)
            return self._question(color if with_color else None, shape), "yes"
        absent_shapes = sorted(set(SHAPES) - present_shapes)
        if not with_color and absent_shapes:
            return self._question(None, rng.choice(absent_shapes)), "no"
        absent = sorted(ALL_COMBOS - set(present))
        adversarial = [c for c in absent if c[1] in present_shapes]
        color, shape = rng.choice(adversarial if adversarial and rng.random() < 0.5 else absent)
        return self._question(color, shape), "no"

    @staticmethod
    def _question(color: str | None, shape: str) -> str:
        thing = f"{color} {shape}" if color else shape
        return f"Is there {article(thing)} {thing} in the image?"

    def edit(self, example: Example, rng: random.Random) -> tuple[str, Scene]:
        """An instruction and the edited scene: recolour one object (within the split's combinations) or,
        with several objects, remove one."""
        scene = example.scene
        target = rng.randrange(len(scene.objects))
        obj = scene.objects[target]
        recolours = [c for c, s in self.combos if s == obj.shape and c != obj.color]
        if recolours and (len(scene.objects) == 1 or rng.random() < 0.5):
            color = rng.choice(recolours)
            objects = tuple(replace(o, color=color) if i == target else o for i, o in enumerate(scene.objects))
            return f"Make the {obj.color} {obj.shape} {color}.", replace(scene, objects=objects)
        if len(scene.objects) == 1:
            raise ValueError("cannot edit a single-object scene without a recolouring")
        objects = tuple(o for i, o in enumerate(scene.objects) if i != target)
        return f"Remove the {obj.color} {obj.shape}.", replace(scene, objects=objects)


SUPERSAMPLE = 4


def render(scene: Scene) -> Image.Image:
    """Anti-aliased RGB render (drawn at 4x, box-filtered down), colours jittered and pixel noise added,
    all from the scene's own seed: the same scene always gives the same bytes."""
    rng = np.random.default_rng(scene.noise_seed)
    big = scene.size * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), scene.background)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        jitter = rng.integers(-scene.color_jitter, scene.color_jitter + 1, size=3)
        fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLORS[obj.color], jitter, strict=True))
        x0, y0, x1, y1 = (v * SUPERSAMPLE for v in obj.box())
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    image = canvas.resize((scene.size, scene.size), Image.Resampling.BOX)
    if scene.noise_std > 0:
        noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, scene.noise_std, (scene.size, scene.size, 3))
        image = Image.fromarray(np.clip(noisy + 0.5, 0, 255).astype(np.uint8), mode="RGB")
    return image
