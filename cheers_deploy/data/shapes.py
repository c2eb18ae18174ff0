"""The synthetic shapes world: scenes, renderer, text (captions / prompts / QA) and splits.
One file because it is one specification read as one namespace (`shapes as W` in data, training, eval, precision
and tests): the split and question guarantees below rest on the geometry, palette and vocabulary defined together.

A tiny Cheers model (~5M parameters) is trained on this world and evaluated on it: understanding by
exact-match accuracy on single-word answers, generation by a GenEval-style score computed with the
deterministic OpenCV detector in :mod:`cheers_deploy.eval.detector`. Everything is numpy + cv2 and
fully deterministic given a seed (no global RNG state is touched).

World
-----
* 5 shapes (:data:`SHAPES`), 6 saturated, well separated colours (:data:`COLORS`), 5 positions
  (:data:`POSITIONS`, fixed anchor points plus a jitter of at most :data:`JITTER` of the image side),
  2 sizes (:data:`SIZES`, "radius" :data:`SIZE_RADIUS` of the image side: every shape fits in a
  square of side 2 * radius around its centre), fixed orientation.
* Light backgrounds (:data:`BACKGROUNDS`), optionally with a low-amplitude smooth noise texture.
* One object (70 %) or two objects (30 %) per scene; two objects never share a position and never
  share the same colour+shape combination (so every question has exactly one answer).
* Geometry is chosen so that objects never touch each other or the border at any resolution:
  adjacent anchors are 0.32 of the side apart, two large objects need at most 0.25 plus 0.03 of
  jitter, which leaves a gap of >= 0.04 of the side (2.5 px at 64, 5 px at 128).

Resolution (default 64)
-----------------------
``DEFAULT_RESOLUTION = 64``. The questions only need a coarse layout: five anchor positions, two
sizes, five shapes and six colours. At 64 px a small object spans 9-12 px (radius 0.09 * 64 =
5.8 px), a large one 13-16 px (radius 8 px), anchors are 20 px apart and objects stay >= 2.5 px
apart, which the detector resolves at > 99 % on clean renders and under mild blur/noise. Training
cost grows with the number of image tokens, i.e. ~4x for 128 px (4x the latent positions for the
same patch size), and the point of this world is a model that learns in minutes. ``render`` works at any
resolution >= 32 (128 is tested); the layout is defined in fractions of the image side, so a scene
renders identically (up to sampling) at 64 and 128.

Splits
------
* :data:`HELDOUT_COMBOS` (4 of the 30 colour-shape combinations, one per colour/shape so every colour
  and every shape still occurs in training) never occurs in "train" or "heldout" (neither as a single
  object nor in a two-object scene) and occurs in every "compositional" scene.
* "train" and "heldout" are disjoint by *scene identity*: the canonical description of the objects
  (shape, colour, position, size of each, order-free; background, texture and jitter are nuisance
  variables and not part of the identity, see :func:`scene_key`). A scene belongs to "heldout" iff
  ``stable_hash(scene_key) % HELDOUT_MODULUS == 0``; so a held-out scene never appears in train with
  any background or jitter.
* ``make_split`` is prefix-stable: sample ``i`` depends only on (split, seed, i).
"""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import cv2
import numpy as np

# --------------------------------------------------------------------------------------------------
# constants
# --------------------------------------------------------------------------------------------------

DEFAULT_RESOLUTION = 64

SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")

# Saturated palette (RGB), pairwise far apart and far from every (light) background.
COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "green": (30, 150, 55),
    "blue": (35, 70, 215),
    "yellow": (235, 200, 20),
    "purple": (135, 45, 175),
    "orange": (245, 125, 15),
}
COLOR_NAMES: Tuple[str, ...] = tuple(COLORS)

POSITIONS: Tuple[str, ...] = ("left", "right", "top", "bottom", "center")
# Anchor of each position, (x, y) as fractions of the image side.
ANCHORS: Dict[str, Tuple[float, float]] = {
    "left": (0.18, 0.50),
    "right": (0.82, 0.50),
    "top": (0.50, 0.18),
    "bottom": (0.50, 0.82),
    "center": (0.50, 0.50),
}
POSITION_PHRASES: Dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}

SIZES: Tuple[str, ...] = ("small", "large")
# "Radius" of an object (half the side of the square it fits in), as a fraction of the image side.
SIZE_RADIUS: Dict[str, float] = {"small": 0.09, "large": 0.125}
# Maximal jitter of the object centre around its anchor, per axis, fraction of the image side.
JITTER = 0.015

# Light backgrounds (RGB).
BACKGROUNDS: Dict[str, Tuple[int, int, int]] = {
    "gray": (232, 232, 232),
    "beige": (240, 232, 212),
    "mist": (222, 230, 238),
}
BACKGROUND_NAMES: Tuple[str, ...] = tuple(BACKGROUNDS)
TEXTURE_AMPLITUDE = 6.0  # peak amplitude (0..255 scale) of the smooth noise texture

# Colour-shape combinations that only appear in the "compositional" split.
HELDOUT_COMBOS: Tuple[Tuple[str, str], ...] = (
    ("red", "star"),
    ("blue", "triangle"),
    ("green", "cross"),
    ("yellow", "circle"),
)

SPLITS: Tuple[str, ...] = ("train", "heldout", "compositional")
HELDOUT_MODULUS = 8          # ~1/8 of the scene identities are reserved for "heldout"
TWO_OBJECT_FRACTION = 0.3    # 70 % single-object, 30 % two-object scenes

NUMBER_WORDS: Tuple[str, ...] = ("zero", "one", "two")  # indexed by the object count
QUESTION_TYPES: Tuple[str, ...] = ("color", "shape", "position", "count", "exists")

_SUPERSAMPLE = 4
_SPLIT_CODES = {"train": 1, "heldout": 2, "compositional": 3}


# --------------------------------------------------------------------------------------------------
# scene description
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShapeObject:
    """One object. ``dx``/``dy``: jitter of its centre, fraction of the image side (|.| <= JITTER)."""

    shape: str
    color: str
    position: str
    size: str
    dx: float = 0.0
    dy: float = 0.0

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.color not in COLORS:
            raise ValueError(f"unknown color {self.color!r}; expected one of {COLOR_NAMES}")
        if self.position not in POSITIONS:
            raise ValueError(f"unknown position {self.position!r}; expected one of {POSITIONS}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; expected one of {SIZES}")
        if abs(self.dx) > JITTER + 1e-9 or abs(self.dy) > JITTER + 1e-9:
            raise ValueError(f"jitter ({self.dx}, {self.dy}) exceeds JITTER={JITTER}")

    @property
    def combo(self) -> Tuple[str, str]:
        return (self.color, self.shape)

    @property
    def center(self) -> Tuple[float, float]:
        ax, ay = ANCHORS[self.position]
        return (ax + self.dx, ay + self.dy)

    def describe(self, with_size: bool = True) -> str:
        words_ = ([self.size] if with_size else []) + [self.color, self.shape]
        return f"{article(words_[0])} {' '.join(words_)} {POSITION_PHRASES[self.position]}"


def article(word: str) -> str:
    """"an" before a vowel ("an orange star"), "a" otherwise."""
    return "an" if word[:1] in "aeiou" else "a"


@dataclass(frozen=True)
class Scene:
    """A scene: 1 or 2 objects at distinct positions, a light background, optional texture."""

    objects: Tuple[ShapeObject, ...]
    background: str = "gray"
    texture: bool = False
    texture_seed: int = 0

    def __post_init__(self):
        objs = tuple(self.objects)
        object.__setattr__(self, "objects", objs)
        if not 1 <= len(objs) <= 2:
            raise ValueError(f"a scene has 1 or 2 objects, got {len(objs)}")
        if len({o.position for o in objs}) != len(objs):
            raise ValueError("two objects share a position")
        if len({o.combo for o in objs}) != len(objs):
            raise ValueError("two objects share the same color+shape combination")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; expected one of {BACKGROUND_NAMES}")

    @property
    def key(self) -> str:
        return scene_key(self)

    def ordered_objects(self) -> Tuple[ShapeObject, ...]:
        """Objects in canonical order (by position: left, right, top, bottom, center)."""
        return tuple(sorted(self.objects, key=lambda o: POSITIONS.index(o.position)))


def scene_key(scene: Scene) -> str:
    """Identity of a scene: its objects (shape, colour, position, size), order-free.

    Background, texture and jitter are nuisance variables and deliberately excluded.
    """
    parts = sorted(f"{o.position}:{o.size}:{o.color}:{o.shape}" for o in scene.objects)
    return "|".join(parts)


def stable_hash(text: str) -> int:
    """Process-independent 64-bit hash (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def is_heldout_key(key: str) -> bool:
    return stable_hash(key) % HELDOUT_MODULUS == 0


def scene_split(scene: Scene) -> str:
    """The split a scene belongs to ("train", "heldout" or "compositional")."""
    if any(o.combo in HELDOUT_COMBOS for o in scene.objects):
        return "compositional"
    return "heldout" if is_heldout_key(scene_key(scene)) else "train"


# --------------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------------

def shape_polygon(shape: str, cx: float, cy: float, r: float) -> Optional[np.ndarray]:
    """Vertices (N, 2) float of ``shape`` centred at (cx, cy) with "radius" r (half the box side).

    Returns None for the circle. Orientation is fixed (triangle and star point up; the cross is a
    plus sign). All shapes fit in the square [cx - r, cx + r] x [cy - r, cy + r].
    """
    if shape == "circle":
        return None
    if shape == "square":
        h = 0.8 * r
        pts = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif shape == "triangle":
        # equilateral, side 1.96 r, its bounding box centred on (cx, cy) (the centroid sits 0.28 r
        # below the centre); a triangle with circumradius r would look much smaller than the others
        hw = 0.98 * r
        hh = 0.5 * np.sqrt(3.0) * hw
        pts = [(0.0, -hh), (hw, hh), (-hw, hh)]
    elif shape == "star":
        inner = 0.5 * r
        pts = []
        for k in range(10):
            a = k * np.pi / 5
            rr = r if k % 2 == 0 else inner
            pts.append((rr * np.sin(a), -rr * np.cos(a)))
    elif shape == "cross":
        w = 0.34 * r
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w),
               (-r, w), (-r, -w), (-w, -w)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(pts, dtype=np.float64) + np.array([cx, cy])


def shape_unit_area(shape: str) -> float:
    """Area of ``shape`` with radius 1 (see :func:`shape_polygon`)."""
    if shape == "circle":
        return float(np.pi)
    poly = shape_polygon(shape, 0.0, 0.0, 1.0)
    x, y = poly[:, 0], poly[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def draw_shape(canvas: np.ndarray, shape: str, cx: float, cy: float, r: float, color) -> None:
    """Draw a filled shape in place (pixel coordinates: pixel i covers [i, i+1), centre i + 0.5)."""
    shift = 4
    scale = 1 << shift
    color = (int(color),) * 3 if np.isscalar(color) else tuple(int(c) for c in color)
    if shape == "circle":
        center = (int(round((cx - 0.5) * scale)), int(round((cy - 0.5) * scale)))
        cv2.circle(canvas, center, int(round(r * scale)), color, thickness=-1, lineType=cv2.LINE_AA,
                   shift=shift)
        return
    poly = shape_polygon(shape, cx, cy, r) - 0.5
    pts = np.round(poly * scale).astype(np.int32).reshape(-1, 1, 2)
    cv2.fillPoly(canvas, [pts], color, lineType=cv2.LINE_AA, shift=shift)


def _texture(seed: int, resolution: int) -> np.ndarray:
    """Smooth, low-amplitude noise (H, W, 1) float32 in [-TEXTURE_AMPLITUDE, TEXTURE_AMPLITUDE]."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 7919])
    coarse = rng.uniform(-1.0, 1.0, size=(8, 8)).astype(np.float32)
    smooth = cv2.resize(coarse, (resolution, resolution), interpolation=cv2.INTER_CUBIC)
    fine = rng.uniform(-0.35, 0.35, size=(resolution, resolution)).astype(np.float32)
    tex = np.clip(0.75 * smooth + fine, -1.0, 1.0) * TEXTURE_AMPLITUDE
    return tex[:, :, None]


def render(scene: Scene, resolution: int = DEFAULT_RESOLUTION) -> np.ndarray:
    """Render ``scene`` to an (H, W, 3) uint8 RGB image, H = W = ``resolution``.

    Shapes are drawn anti-aliased at 4x and area-downsampled; the texture (if any) is added at the
    output resolution so it keeps its amplitude.
    """
    resolution = int(resolution)
    if resolution < 32:
        raise ValueError(f"resolution must be >= 32, got {resolution}")
    big = resolution * _SUPERSAMPLE
    canvas = np.empty((big, big, 3), dtype=np.uint8)
    canvas[:] = BACKGROUNDS[scene.background]
    for o in scene.objects:
        cx, cy = o.center
        draw_shape(canvas, o.shape, cx * big, cy * big, SIZE_RADIUS[o.size] * big, COLORS[o.color])
    img = cv2.resize(canvas, (resolution, resolution), interpolation=cv2.INTER_AREA)
    if scene.texture:
        img = np.clip(np.rint(img.astype(np.float32) + _texture(scene.texture_seed, resolution)), 0, 255)
        img = img.astype(np.uint8)
    return img


# --------------------------------------------------------------------------------------------------
# text
# --------------------------------------------------------------------------------------------------

def caption(scene: Scene) -> str:
    """Full description, objects in canonical order, e.g. "a small red circle on the left"."""
    return " and ".join(o.describe(with_size=True) for o in scene.ordered_objects())


def t2i_prompts(scene: Scene) -> List[str]:
    """Text-to-image prompts for ``scene``; the first one is canonical (== ``caption(scene)``).

    Variants: with / without sizes and, for two objects, both object orders. Every prompt parses
    back with :func:`parse_prompt`.
    """
    objs = scene.ordered_objects()
    orders = [objs] if len(objs) == 1 else [objs, objs[::-1]]
    prompts: List[str] = []
    for with_size in (True, False):
        for order in orders:
            p = " and ".join(o.describe(with_size=with_size) for o in order)
            if p not in prompts:
                prompts.append(p)
    return prompts


_PROMPT_OBJ = re.compile(
    r"^an? (?:(?P<size>%s) )?(?P<color>%s) (?P<shape>%s) (?P<pos>%s)$"
    % ("|".join(SIZES), "|".join(COLOR_NAMES), "|".join(SHAPES),
       "|".join(re.escape(p) for p in POSITION_PHRASES.values()))
)
_PHRASE_TO_POSITION = {v: k for k, v in POSITION_PHRASES.items()}


@dataclass(frozen=True)
class ObjectSpec:
    """What a prompt asks for; ``size`` is None when the prompt does not say."""

    shape: str
    color: str
    position: Optional[str]
    size: Optional[str] = None


def parse_prompt(prompt: str) -> List[ObjectSpec]:
    """Inverse of :func:`t2i_prompts`: "a small red circle on the left and a green star at the top"."""
    text = " ".join(prompt.strip().lower().rstrip(".").split())
    specs = []
    for part in text.split(" and "):
        m = _PROMPT_OBJ.match(part.strip())
        if m is None:
            raise ValueError(f"cannot parse prompt part {part!r} of {prompt!r}")
        specs.append(ObjectSpec(shape=m["shape"], color=m["color"],
                                position=_PHRASE_TO_POSITION[m["pos"]], size=m["size"]))
    return specs


def scene_specs(scene: Scene) -> List[ObjectSpec]:
    return [ObjectSpec(o.shape, o.color, o.position, o.size) for o in scene.ordered_objects()]


QA = Tuple[str, str, str]  # (question_type, question, answer)


def qa_pairs(scene: Scene) -> List[QA]:
    """All questions about ``scene`` as (question_type, question, answer); answers are one word.

    Types: color, shape, position, count, exists. Questions are unambiguous: when two objects have
    the same shape, the colour question names the position too. The "exists" questions are balanced
    (one "yes" and one "no" per object); the negatives are chosen deterministically from the scene
    key and alternate between "same shape, other colour" and "same colour, other shape".
    """
    objs = scene.ordered_objects()
    qa: List[QA] = []
    shape_counts = {s: sum(o.shape == s for o in objs) for s in SHAPES}
    for o in objs:
        if shape_counts[o.shape] == 1:
            q = f"what color is the {o.shape}?"
        else:
            q = f"what color is the {o.shape} {POSITION_PHRASES[o.position]}?"
        qa.append(("color", q, o.color))
    for o in objs:
        qa.append(("shape", f"what shape is {POSITION_PHRASES[o.position]}?", o.shape))
    for o in objs:
        qa.append(("position", f"where is the {o.color} {o.shape}?", o.position))
    qa.append(("count", "how many shapes are there?", NUMBER_WORDS[len(objs)]))
    used = {o.combo for o in objs}
    rng = np.random.default_rng(stable_hash("qa|" + scene_key(scene)))
    for i, o in enumerate(objs):
        qa.append(("exists", f"is there {article(o.color)} {o.color} {o.shape}?", "yes"))
        if i % 2 == 0:
            cands = [(c, o.shape) for c in COLOR_NAMES if (c, o.shape) not in used]
        else:
            cands = [(o.color, s) for s in SHAPES if (o.color, s) not in used]
        c, s = cands[int(rng.integers(len(cands)))]
        used.add((c, s))  # no question twice
        qa.append(("exists", f"is there {article(c)} {c} {s}?", "no"))
    return qa


_WORD_RE = re.compile(r"[a-z]+|[?.,]")


def words(text: str) -> List[str]:
    """Split text of this world into words and punctuation tokens ("?" is its own token)."""
    return _WORD_RE.findall(text.lower())


@lru_cache(maxsize=1)
def _vocabulary() -> Tuple[str, ...]:
    vocab = set()
    scenes = []
    combos = [(c, s) for c in COLOR_NAMES for s in SHAPES]
    for (c, s), p, z in itertools.product(combos, POSITIONS, SIZES):
        scenes.append(Scene((ShapeObject(s, c, p, z),)))
    # every template that two objects can produce (same / different shape, every position pair)
    for s1, s2 in itertools.product(SHAPES, SHAPES):
        for p1, p2 in itertools.permutations(POSITIONS, 2):
            scenes.append(Scene((ShapeObject(s1, "red", p1, "small"),
                                 ShapeObject(s2, "blue", p2, "large"))))
    for sc in scenes:
        texts = [caption(sc)] + t2i_prompts(sc)
        for _, q, a in qa_pairs(sc):
            texts += [q, a]
        for t in texts:
            vocab.update(words(t))
    return tuple(sorted(vocab))


def vocabulary() -> List[str]:
    """Every word / punctuation token that captions, prompts, questions and answers can contain."""
    return list(_vocabulary())


def answer_vocabulary() -> List[str]:
    """Every possible answer (single lowercase words)."""
    return sorted(set(COLOR_NAMES) | set(SHAPES) | set(POSITIONS) | {"yes", "no"}
                  | set(NUMBER_WORDS[1:3]))


# --------------------------------------------------------------------------------------------------
# sampling and splits
# --------------------------------------------------------------------------------------------------

@dataclass
class Sample:
    """One example. ``image`` is rendered lazily (and cached) at ``resolution``."""

    scene: Scene
    caption: str
    prompts: List[str]
    qa: List[QA]
    split: str
    index: int
    resolution: int = DEFAULT_RESOLUTION
    _image: Optional[np.ndarray] = field(default=None, repr=False, compare=False)

    @property
    def image(self) -> np.ndarray:
        if self._image is None:
            self._image = render(self.scene, self.resolution)
        return self._image

    @property
    def key(self) -> str:
        return scene_key(self.scene)


def _sample_object(rng: np.random.Generator, combos: Sequence[Tuple[str, str]], position: str) -> ShapeObject:
    color, shape = combos[int(rng.integers(len(combos)))]
    size = SIZES[int(rng.integers(len(SIZES)))]
    dx, dy = rng.uniform(-JITTER, JITTER, size=2)
    return ShapeObject(shape=shape, color=color, position=position, size=size, dx=float(dx), dy=float(dy))


_ALL_COMBOS = tuple((c, s) for c in COLOR_NAMES for s in SHAPES)
_TRAIN_COMBOS = tuple(cs for cs in _ALL_COMBOS if cs not in HELDOUT_COMBOS)


def sample_scene(rng: np.random.Generator, split: str, two_object_fraction: float = TWO_OBJECT_FRACTION) -> Scene:
    """Draw one scene of ``split`` from ``rng`` (rejection sampling on the scene identity).

    Compositional scenes contain at least one HELDOUT_COMBOS object (the other object, if any, may
    be any combination); train/heldout objects are drawn from the other 26 combinations.
    """
    if split not in _SPLIT_CODES:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    n_obj = 2 if rng.random() < two_object_fraction else 1
    background = BACKGROUND_NAMES[int(rng.integers(len(BACKGROUND_NAMES)))]
    texture = bool(rng.random() < 0.5)
    texture_seed = int(rng.integers(2**31 - 1))
    for _ in range(10_000):
        positions = [POSITIONS[i] for i in rng.permutation(len(POSITIONS))[:n_obj]]
        if split == "compositional":
            first = _sample_object(rng, HELDOUT_COMBOS, positions[0])
            objs = [first] + [_sample_object(rng, _ALL_COMBOS, p) for p in positions[1:]]
        else:
            objs = [_sample_object(rng, _TRAIN_COMBOS, p) for p in positions]
        if len({o.combo for o in objs}) != len(objs):
            continue
        scene = Scene(tuple(objs), background=background, texture=texture, texture_seed=texture_seed)
        if scene_split(scene) == split:
            return scene
    raise RuntimeError(f"could not sample a scene for split {split!r}")  # pragma: no cover


def make_sample(scene: Scene, split: str = "", index: int = 0, resolution: int = DEFAULT_RESOLUTION,
                eager: bool = False) -> Sample:
    s = Sample(scene=scene, caption=caption(scene), prompts=t2i_prompts(scene), qa=qa_pairs(scene),
               split=split, index=index, resolution=resolution)
    if eager:
        s.image  # noqa: B018  (render now)
    return s


def make_split(split: str, n: int, seed: int = 0, resolution: int = DEFAULT_RESOLUTION,
               eager: bool = False, two_object_fraction: float = TWO_OBJECT_FRACTION) -> List[Sample]:
    """``n`` samples of ``split`` ("train", "heldout" or "compositional").

    Deterministic and prefix-stable: sample ``i`` depends only on (split, seed, i). Images are
    rendered lazily unless ``eager``.
    """
    if split not in _SPLIT_CODES:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    out = []
    for i in range(int(n)):
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, _SPLIT_CODES[split], i])
        scene = sample_scene(rng, split, two_object_fraction)
        out.append(make_sample(scene, split=split, index=i, resolution=resolution, eager=eager))
    return out


def iter_batches(samples: Sequence[Sample], batch_size: int) -> Iterable[Tuple[np.ndarray, List[Sample]]]:
    """Yield (images (B, H, W, 3) uint8, samples) batches."""
    for i in range(0, len(samples), batch_size):
        chunk = list(samples[i:i + batch_size])
        yield np.stack([s.image for s in chunk]), chunk


__all__ = [
    "DEFAULT_RESOLUTION", "SHAPES", "COLORS", "COLOR_NAMES", "POSITIONS", "ANCHORS", "POSITION_PHRASES",
    "SIZES", "SIZE_RADIUS", "JITTER", "BACKGROUNDS", "HELDOUT_COMBOS", "SPLITS", "QUESTION_TYPES",
    "NUMBER_WORDS", "ShapeObject", "Scene", "ObjectSpec", "Sample", "scene_key", "scene_split",
    "stable_hash", "shape_polygon", "shape_unit_area", "draw_shape", "render", "caption",
    "t2i_prompts", "parse_prompt", "scene_specs", "qa_pairs", "words", "vocabulary",
    "answer_vocabulary", "sample_scene", "make_sample", "make_split", "iter_batches",
]
