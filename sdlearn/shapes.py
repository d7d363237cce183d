"""The TinySD world: procedural captioned scenes, and a judge that scores an image against its caption.

Stable Diffusion 1.5 learned from billions of captioned photos; TinySD learns from this module. A scene
is a plain background with one to three flat objects, and its caption says what is there:

    "a small red circle at the top left on a blue background"
    "two yellow triangles on a white background"
    "a large green square in the center, black background"
    "a purple background with a small white star at the bottom and a large orange cross on the right"

The world is small enough for a few-million-parameter model trained for minutes on a CPU (64x64 images,
an 8x8x4 latent), and rich enough to teach every word a prompt can carry: colour, shape, size, position,
count and background. Because the world is procedural, a caption can be *checked*: `judge(image,
caption)` looks at a (generated) image with simple image analysis and says which parts of the caption
it obeys. That turns "does the model follow the prompt?" into numbers, so a notebook can plot accuracy
against CFG scale, steps or sampler.

Reading order:
  1. the vocabulary (colours, shapes, sizes, positions) and the held-out colour-shape pairs;
  2. `Scene` — the structure behind a caption — `sample_scene`, and `render` (drawn 4x larger and
     box-downsampled, i.e. anti-aliased);
  3. captions: `scene_to_caption` writes one, `parse_caption` reads one back (the grammar is below);
  4. `random_scene(rng)` = sample + caption + render, and `dataset(n)` for training;
     `dataset(n, new_colour="pink")` draws scenes that use a word TinySD was never trained on (below);
  5. the judge: find the background, cut the image into objects, name each object's colour, shape,
     size and position, match them to what the caption asked for; `accuracy` over many images.

Caption grammar (what `scene_to_caption` writes and `parse_caption` reads):

    caption    := objects " on a " BG " background" | objects " against a " BG " background"
                | objects ", " BG " background"      | "a " BG " background with " objects
                | objects                                   (no background: parse only, never generated)
    objects    := group | group " and " group | group ", " group " and " group
    group      := ("a" | "an" | "one") [SIZE] COLOUR SHAPE [POSITION]       one object
                | ("two" | "three") [SIZE] COLOUR SHAPE "s"                  several identical objects
    SIZE       := "small" | "large"
    POSITION   := "at the top left" | "in the top left corner" | "at the top" | "on the left"
                | "in the center" | "in the middle" | ...                     (see POSITION_PHRASES)

Words left out of a caption (size, position) are left free: the judge does not check them. Several
identical objects ("two yellow triangles") never state positions; every object sits in its own cell
of a 3x3 grid, so objects never touch.
"""

import math
import random
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

# ---------------------------------------------------------------------------------------------------
# 1. Vocabulary
# ---------------------------------------------------------------------------------------------------

# Eight colours, saturated and far apart in RGB (the closest pair, orange-yellow, is ~100 apart on the
# 0..255 scale), used both for objects and for backgrounds. An object is never drawn on a background
# closer than MIN_CONTRAST to its own colour (so no orange on red, orange on yellow, blue on purple):
# a 64x64 image and a blurry generator need the object to stand out.
COLOURS = {
    "red": (215, 30, 35),
    "orange": (250, 125, 15),
    "yellow": (250, 225, 30),
    "green": (35, 160, 60),
    "blue": (35, 75, 215),
    "purple": (135, 45, 175),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
MIN_CONTRAST = 120.0

# New words: colours that exist in the world's grammar and renderer but are never drawn by the default
# scenes, so TinySD never sees them in training. Fine-tuning (sdlearn.finetune) teaches one of them to
# the finished model — what a designer does with a LoRA or an embedding for a style the checkpoint does
# not know. Pink sits at least 140 from every colour above (nearest: purple and white), so neither the
# judge nor a blurry generator can mistake it for an old colour. The judge only considers a new colour
# when the caption uses one: every verdict on a base-world caption is exactly what it was before.
NEW_COLOURS = {
    "pink": (255, 110, 190),
}
ALL_COLOURS = {**COLOURS, **NEW_COLOURS}

# Six shapes that stay distinguishable at 16 pixels across, even blurred: each has a different outline
# (round, square corners, one apex, four points, five points, four arms). All are drawn upright.
# (A heart, a ring or a hexagon turn into the same blob as a circle when a small model draws them.)
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles",
           "diamond": "diamonds", "star": "stars", "cross": "crosses"}

# Size = the object's larger bounding-box side, as a fraction of the image side: 16 and 24 pixels in a
# 64x64 image, i.e. two and three latent pixels of the 8x8 latent. The judge calls anything above
# the midpoint "large".
SIZES = {"small": 0.25, "large": 0.375}
_SIZE_THRESHOLD = 0.3125

# Positions: the cells of a 3x3 grid, named as a person would say them. (row, column), 0 = top/left.
POSITIONS = {
    "top left": (0, 0), "top": (0, 1), "top right": (0, 2),
    "left": (1, 0), "center": (1, 1), "right": (1, 2),
    "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2),
}
# Every phrase the generator writes for a position, canonical phrase first.
POSITION_PHRASES = {
    "top left": ("at the top left", "in the top left corner"),
    "top": ("at the top",),
    "top right": ("at the top right", "in the top right corner"),
    "left": ("on the left",),
    "center": ("in the center", "in the middle"),
    "right": ("on the right",),
    "bottom left": ("at the bottom left", "in the bottom left corner"),
    "bottom": ("at the bottom",),
    "bottom right": ("at the bottom right", "in the bottom right corner"),
}
# How far (fraction of the image side) an object may sit from the centre of its cell: small, so that
# a position word always means the same place, but not zero, so the model cannot memorise pixels.
_JITTER = 0.03
# Smallest gap between two objects' bounding boxes (fraction of the image side): they never touch,
# so the judge can count them as separate blobs. (Two large objects never sit in neighbouring cells.)
_MIN_GAP = 0.06
_EDGE_MARGIN = 0.05      # smallest gap between an object and the image edge

NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}
MAX_OBJECTS = 3

# Held-out colour-shape pairs: split="train" never draws these combinations, split="heldout" always
# draws at least one. Each colour and each shape still appears in training, in other combinations,
# so a model that scores well on the held-out split has composed "blue" and "star" on its own.
HELD_OUT = frozenset({("red", "triangle"), ("blue", "star"), ("yellow", "cross"), ("green", "circle")})
SPLITS = ("train", "heldout", "all")


class CaptionError(ValueError):
    """A caption that is outside the shapes-world grammar (the message says which part and why)."""


# ---------------------------------------------------------------------------------------------------
# 2. Scenes and rendering
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SceneObject:
    shape: str        # one of SHAPES
    colour: str       # one of COLOURS
    size: str         # "small" | "large"
    position: str     # one of POSITIONS (the grid cell)
    dx: float = 0.0   # offset from the cell centre, fraction of the image side (|dx| <= _JITTER)
    dy: float = 0.0


@dataclass(frozen=True)
class Scene:
    """Everything needed to draw one image: `render(scene)` is a pure function of this."""
    background: str
    objects: tuple    # tuple of SceneObject, drawn in this order
    image_size: int = 64


def _check_image_size(size):
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 32:
        raise ValueError(f"image size must be an integer of at least 32 pixels, got {size!r}; "
                         "TinySD uses 64 (the latent is then 8x8)")
    return int(size)


@lru_cache(maxsize=None)
def _shape_outline(shape):
    """The shape's outline as a polygon, scaled so its bounding box is [0, 1] x [0, 1].

    Returns (points, aspect): points in bounding-box units, aspect = width / height of the real shape
    (the triangle is wider than tall, the star slightly wider than tall, the diamond narrower).
    """
    if shape == "circle":
        pts = [(math.cos(a), math.sin(a)) for a in np.linspace(0, 2 * math.pi, 96, endpoint=False)]
    elif shape == "square":
        pts = [(0, 0), (1, 0), (1, 1), (0, 1)]
    elif shape == "triangle":                        # equilateral, apex up
        pts = [(0.5, 0), (1, math.sqrt(3) / 2), (0, math.sqrt(3) / 2)]
    elif shape == "diamond":                         # a playing-card diamond: 4 points, 0.8 as wide as tall
        pts = [(0.4, 0), (0.8, 0.5), (0.4, 1), (0, 0.5)]
    elif shape == "star":                            # five points, inner radius 0.45 of the outer: chunky,
        pts = []                                     # so the points survive at 16 px
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((r * math.cos(a), r * math.sin(a)))
    elif shape == "cross":                           # a plus sign, arms 0.36 of the width
        a, b = 0.32, 0.68
        pts = [(a, 0), (b, 0), (b, a), (1, a), (1, b), (b, b), (b, 1), (a, 1), (a, b), (0, b), (0, a), (a, a)]
    else:
        raise ValueError(f"unknown shape {shape!r}; the shapes are {', '.join(SHAPES)}")
    xs, ys = zip(*pts)
    w, h = max(xs) - min(xs), max(ys) - min(ys)
    points = tuple(((x - min(xs)) / w, (y - min(ys)) / h) for x, y in pts)
    return points, w / h


_SUPERSAMPLE = 4   # draw 4x larger, then average 4x4 blocks: anti-aliased edges


def _object_box(obj, size):
    """The object's bounding box (x0, y0, x1, y1) in pixels of a `size` x `size` image."""
    _, aspect = _shape_outline(obj.shape)
    extent = SIZES[obj.size] * size                  # the larger side
    w, h = (extent, extent / aspect) if aspect >= 1 else (extent * aspect, extent)
    row, col = POSITIONS[obj.position]
    cx = ((col + 0.5) / 3 + obj.dx) * size
    cy = ((row + 0.5) / 3 + obj.dy) * size
    # Keep a margin between object and image edge (large objects in corner cells would touch it): the
    # image border then shows only background, which is how the judge finds the background colour.
    margin = _EDGE_MARGIN * size
    cx = min(max(cx, w / 2 + margin), size - w / 2 - margin)
    cy = min(max(cy, h / 2 + margin), size - h / 2 - margin)
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def _check_scene(scene):
    if scene.background not in ALL_COLOURS:
        raise ValueError(f"unknown background colour {scene.background!r}; the colours are {', '.join(ALL_COLOURS)}")
    for obj in scene.objects:
        for name, value, allowed in (("shape", obj.shape, SHAPES), ("colour", obj.colour, ALL_COLOURS),
                                     ("size", obj.size, SIZES), ("position", obj.position, POSITIONS)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r} in {obj}; allowed: {', '.join(allowed)}")
    _check_image_size(scene.image_size)


def render(scene):
    """Draw a Scene as an RGB PIL image of scene.image_size pixels, anti-aliased."""
    _check_scene(scene)
    big = scene.image_size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), ALL_COLOURS[scene.background])
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        x0, y0, x1, y1 = (v * _SUPERSAMPLE for v in _object_box(obj, scene.image_size))
        points, _ = _shape_outline(obj.shape)
        draw.polygon([(x0 + u * (x1 - x0), y0 + v * (y1 - y0)) for u, v in points], fill=ALL_COLOURS[obj.colour])
    # Image.reduce averages each 4x4 block: every pixel gets the fraction of it the shape covers.
    return img.reduce(_SUPERSAMPLE)


def _as_random(rng):
    """A random.Random from a seed, a random.Random or a numpy Generator (None: unseeded)."""
    if rng is None or isinstance(rng, random.Random):
        return rng if rng is not None else random.Random()
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return random.Random(int(rng))
    if isinstance(rng, np.random.Generator):
        return random.Random(int(rng.integers(2**63)))
    raise TypeError(f"rng must be an int seed, a random.Random or a numpy Generator, got {type(rng).__name__}")


def _boxes_apart(a, b, gap):
    """True when two boxes (x0, y0, x1, y1) are at least `gap` apart horizontally or vertically."""
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def sample_scene(rng, size=64, split="train", new_colour=None):
    """Draw a random Scene: 1-3 objects in 1-3 kinds, each kind a distinct (colour, shape).

    split="train" never uses a HELD_OUT colour-shape pair, "heldout" always uses at least one,
    "all" draws from everything. new_colour (one of NEW_COLOURS, e.g. "pink"): one kind, chosen at
    random, takes that colour and a random shape; the other kinds follow `split` ("train" or "all").
    Without it (the default) the scene uses only COLOURS, drawn exactly as before new words existed.
    """
    size = _check_image_size(size)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if new_colour is not None:
        if new_colour not in NEW_COLOURS:
            raise ValueError(f"new_colour must be one of the new words {', '.join(NEW_COLOURS)}, got {new_colour!r}"
                             + (" (a colour TinySD already knows)" if new_colour in COLOURS else ""))
        if split == "heldout":
            raise ValueError("new_colour scenes use split='train' or 'all'; held-out pairs are about old colours")
    rng = _as_random(rng)
    all_pairs = [(c, s) for c in COLOURS for s in SHAPES]
    allowed = [p for p in all_pairs if p not in HELD_OUT] if split == "train" else all_pairs

    # How many objects, grouped into kinds: [2, 1] = two of one kind and one of another. 45% of scenes
    # hold one object, 30% two, 25% three.
    layout = rng.choices([[1], [2], [1, 1], [3], [2, 1], [1, 2], [1, 1, 1]],
                         weights=[45, 15, 15, 9, 4.5, 4.5, 7])[0]
    while True:
        pairs = rng.sample(allowed, len(layout))      # distinct (colour, shape) per kind
        if split == "heldout" and not any(p in HELD_OUT for p in pairs):
            pairs[rng.randrange(len(pairs))] = rng.choice(sorted(p for p in HELD_OUT if p not in pairs))
        if new_colour is not None:       # (only this branch draws more numbers: the default path is unchanged)
            pairs[rng.randrange(len(pairs))] = (new_colour, rng.choice(SHAPES))
        colours = {c for c, _ in pairs}
        backgrounds = [b for b in COLOURS     # backgrounds stay old colours: the new word is the object's
                       if all(math.dist(COLOURS[b], ALL_COLOURS[c]) >= MIN_CONTRAST for c in colours)]
        if backgrounds:
            break
    background = rng.choice(backgrounds)
    kinds = [(colour, shape, rng.choice(list(SIZES))) for colour, shape in pairs]

    # Place every object in its own cell, jittered, with a clear gap to the others; placements where
    # two objects come too close (large objects in neighbouring cells) are drawn again.
    cells = list(POSITIONS)
    for _ in range(1000):
        chosen = rng.sample(cells, sum(layout))
        objects, k = [], 0
        for (colour, shape, sz), count in zip(kinds, layout):
            for _ in range(count):
                objects.append(SceneObject(shape, colour, sz, chosen[k],
                                           dx=rng.uniform(-_JITTER, _JITTER), dy=rng.uniform(-_JITTER, _JITTER)))
                k += 1
        boxes = [_object_box(o, size) for o in objects]
        if all(_boxes_apart(boxes[i], boxes[j], _MIN_GAP * size)
               for i in range(len(boxes)) for j in range(i)):
            return Scene(background, tuple(objects), size)
    raise RuntimeError("could not place the objects apart; this is a bug in sample_scene")  # pragma: no cover


# ---------------------------------------------------------------------------------------------------
# 3. Captions
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ObjectSpec:
    """One kind of object a caption asks for; None = the caption leaves it free."""
    colour: str
    shape: str
    count: int = 1
    size: str = None
    position: str = None     # only for count == 1


@dataclass(frozen=True)
class SceneSpec:
    """What a caption asks for: parse_caption's result, and the judge's yardstick."""
    background: str          # None when the caption names no background
    objects: tuple           # tuple of ObjectSpec

    @property
    def n_objects(self):
        return sum(o.count for o in self.objects)


def _article(word):
    return "an" if word[0] in "aeiou" else "a"


def _group_objects(scene):
    """Objects with the same (colour, shape, size) form one counted kind, in order of first appearance."""
    groups = {}
    for obj in scene.objects:
        groups.setdefault((obj.colour, obj.shape, obj.size), []).append(obj)
    return list(groups.values())


def scene_to_caption(scene, rng=None):
    """Write a caption for a Scene.

    rng=None writes the canonical caption: every size and position stated, "on a ... background".
    With an rng (seed, random.Random, numpy Generator) the phrasing varies: size or position is
    sometimes left out, position and background are said in different ways.
    """
    _check_scene(scene)
    if not 1 <= len(scene.objects) <= MAX_OBJECTS:
        raise ValueError(f"the scene has {len(scene.objects)} objects; a caption needs 1 to {MAX_OBJECTS}")
    rng = _as_random(rng) if rng is not None else None
    vary = rng is not None
    groups = _group_objects(scene)
    # Two kinds that share colour and shape (a small and a large red circle) need their size said.
    looks = [(g[0].colour, g[0].shape) for g in groups]
    same_look = {look for look in looks if looks.count(look) > 1}

    phrases = []
    for group in groups:
        first = group[0]
        say_size = not vary or (first.colour, first.shape) in same_look or rng.random() < 0.85
        words = [first.colour, first.shape if len(group) == 1 else PLURALS[first.shape]]
        if say_size:
            words.insert(0, first.size)
        if len(group) == 1:
            number = "one" if vary and rng.random() < 0.1 else _article(words[0])
        else:
            number = {2: "two", 3: "three"}[len(group)]
        phrase = " ".join([number] + words)
        if len(group) == 1 and (not vary or rng.random() < (0.85 if len(scene.objects) == 1 else 0.7)):
            options = POSITION_PHRASES[first.position]
            phrase += " " + (options[0] if not vary or rng.random() < 0.7 else rng.choice(options))
        phrases.append(phrase)
    objects = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]

    bg = scene.background
    form = 0 if not vary else rng.choices([0, 1, 2, 3], weights=[55, 15, 15, 15])[0]
    return [f"{objects} on {_article(bg)} {bg} background",
            f"{objects}, {bg} background",
            f"{objects} against {_article(bg)} {bg} background",
            f"{_article(bg)} {bg} background with {objects}"][form]


# Parsing: every accepted position phrase -> grid cell (the generator's phrases and a few more).
_POSITION_WORDS = dict(
    {name: name for name in POSITIONS},
    **{"middle": "center", "top center": "top", "bottom center": "bottom", "center left": "left",
       "center right": "right", "middle left": "left", "middle right": "right"},
    **{f"{c} corner": c for c in ("top left", "top right", "bottom left", "bottom right")},
)
_BACKGROUND_FORMS = [   # (regex, which group is the background, which the objects)
    (re.compile(r"^(?:an?|the) (\w+) background with (.+)$"), 1, 2),
    (re.compile(r"^(.+?) (?:on|against) (?:an?|the) (\w+) background$"), 2, 1),
    (re.compile(r"^(.+?), (?:an? |the )?(\w+) background$"), 2, 1),
]


def _parse_group(text, caption):
    words = text.split()
    where = f"in {text!r} (caption {caption!r})"
    if len(words) < 3:
        raise CaptionError(f"expected '<a|one|two|three> [small|large] <colour> <shape> [position]' {where}")
    if words[0] not in NUMBERS:
        raise CaptionError(f"expected a number word (a, an, one, two, three) first, got {words[0]!r} {where}")
    count, i = NUMBERS[words[0]], 1
    size = None
    if words[i] in SIZES:
        size, i = words[i], i + 1
    if i >= len(words) or words[i] not in ALL_COLOURS:
        got = words[i] if i < len(words) else "nothing"
        raise CaptionError(f"expected a colour ({', '.join(ALL_COLOURS)}), got {got!r} {where}")
    colour, i = words[i], i + 1
    singular = {v: k for k, v in PLURALS.items()}
    noun = words[i] if i < len(words) else "nothing"
    if noun in SHAPES and count == 1:
        shape = noun
    elif noun in singular and count > 1:
        shape = singular[noun]
    elif noun in SHAPES or noun in singular:
        raise CaptionError(f"{words[0]!r} does not agree with {noun!r} {where}")
    else:
        raise CaptionError(f"expected a shape ({', '.join(SHAPES)}), got {noun!r} {where}")
    rest = words[i + 1:]
    position = None
    if rest:
        if count > 1:
            raise CaptionError(f"a position can only be given for one object, not for {count} {where}")
        if len(rest) < 3 or rest[0] not in ("at", "in", "on") or rest[1] != "the" \
                or " ".join(rest[2:]) not in _POSITION_WORDS:
            raise CaptionError(f"could not read the position {' '.join(rest)!r} {where}; say e.g. "
                               "'at the top left', 'on the right', 'in the center', 'at the bottom'")
        position = _POSITION_WORDS[" ".join(rest[2:])]
    return ObjectSpec(colour=colour, shape=shape, count=count, size=size, position=position)


def parse_caption(caption):
    """Read a caption into a SceneSpec; raises CaptionError for anything outside the grammar."""
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a string, got {type(caption).__name__}")
    text = caption.lower().replace("-", " ").replace("centre", "center").strip().rstrip(".").strip()
    text = re.sub(r"\s+", " ", text)
    if not text:
        raise CaptionError("the caption is empty; try e.g. 'a small red circle at the top left on a blue background'")
    background, objects = None, text
    for pattern, bg_group, obj_group in _BACKGROUND_FORMS:
        m = pattern.match(text)
        if m:
            background, objects = m.group(bg_group), m.group(obj_group)
            if background not in ALL_COLOURS:
                raise CaptionError(f"unknown background colour {background!r} in {caption!r}; "
                                   f"the colours are {', '.join(ALL_COLOURS)}")
            break
    groups = tuple(_parse_group(g, caption) for g in re.split(r", and |, | and ", objects))
    spec = SceneSpec(background=background, objects=groups)
    if spec.n_objects > MAX_OBJECTS:
        raise CaptionError(f"{caption!r} asks for {spec.n_objects} objects; the shapes world has at most {MAX_OBJECTS}")
    return spec


# ---------------------------------------------------------------------------------------------------
# 4. The generator the training loop calls
# ---------------------------------------------------------------------------------------------------

def random_scene(rng, size=64, split="train", new_colour=None):
    """One random (PIL image, caption). Deterministic for a given seed.

    Equal to: r = random.Random(seed); scene = sample_scene(r, size, split, new_colour);
    caption = scene_to_caption(scene, r); image = render(scene).
    """
    rng = _as_random(rng)
    scene = sample_scene(rng, size, split, new_colour)
    return render(scene), scene_to_caption(scene, rng)


def dataset(n, seed=0, size=64, split="train", new_colour=None):
    """n random scenes as (uint8 array (n, size, size, 3), list of n captions), for training.

    new_colour="pink": every scene has one kind of object in that new colour ("a small pink star on
    the left, black background"): the fine-tuning data of sdlearn.finetune.
    """
    rng = random.Random(seed)
    images, captions = np.empty((n, size, size, 3), np.uint8), []
    for i in range(n):
        image, caption = random_scene(rng, size, split, new_colour)
        images[i] = np.asarray(image)
        captions.append(caption)
    return images, captions


# ---------------------------------------------------------------------------------------------------
# 5. The judge
# ---------------------------------------------------------------------------------------------------
#
# The judge sees only pixels. Its steps, each one simple enough to check by eye:
#   a. background = the palette colour most of the image border is nearest to (objects cover only a
#      little of the border);
#   b. objects = connected blobs of pixels farther than _FOREGROUND from the background colour and
#      nearer another palette colour, found on a lightly smoothed copy (so pixel noise makes no blobs);
#      blobs under _MIN_AREA are dropped;
#   c. a blob's colour = the median of its fifth farthest from the background (edge pixels are blends
#      with the background), named by the nearest palette colour;
#   d. a blob's coverage alpha = how far each pixel is along the line from the background colour to the
#      blob's colour (0 = background, 1 = object, 0.5 = half covered, as on an anti-aliased edge);
#   e. its shape: for every stencil, choose the box and the blur that reproduce the blob's area, centroid
#      and spread (second moments), draw that stencil there, and measure how much of alpha it explains
#      (fit = 1 - sum (alpha - drawn)^2 / sum alpha^2, scaled down when the blob is stretched: a 2:1
#      ellipse is no circle). The best-fitting stencil names the shape and its box gives the size.
#      Fitting the blur is what keeps a blurred star from matching a sharp circle;
#   f. position = the grid cell of the centroid;
#   g. the blobs are matched one-to-one with the caption's objects (Hungarian matching, agreeing on as
#      many words as possible); each word is checked on the matched pairs, the count on the totals.

_FOREGROUND = 45.0       # RGB distance from the background that makes a pixel "object"
_GROW = 3               # pixels (at 64x64) a blob is grown by to take in its blurred edge
_MIN_AREA = 0.004        # of the image area: 16 pixels at 64x64; a small star covers ~90
_COLOUR_MATCH = 90.0     # a blob whose colour is farther than this from every palette colour is "unknown"
_SHAPE_MATCH = 0.6       # a blob whose best stencil fit is lower than this has an "unknown" shape
_PALETTE = np.array(list(COLOURS.values()), np.float32)        # (8, 3)
_NAMES = list(COLOURS)
_JUDGE_SIZE = 128       # larger images (an SD1.5 512x512) are averaged down to this short side first


def _as_array(image):
    """(H, W, 3) float32 in 0..255 from a PIL image or an (H, W, 3) uint8 / [0, 1] float array."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) RGB array, got shape {image.shape}")
        if image.dtype.kind == "f":
            image = np.clip(image * 255.0, 0, 255).round()
        image = Image.fromarray(image.astype(np.uint8))
    elif not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL image or a numpy (H, W, 3) array, got {type(image).__name__}")
    w, h = image.size
    if min(w, h) < 32:
        raise ValueError(f"the image is {w}x{h}; the judge needs at least 32x32 pixels")
    if min(w, h) > _JUDGE_SIZE:
        k = _JUDGE_SIZE / min(w, h)
        image = image.resize((round(w * k), round(h * k)), Image.Resampling.BOX)
    return np.asarray(image.convert("RGB"), np.float32)


def _palette(colours):
    """(names, (K, 3) float32 RGB) of the colours the judge may name: the world's 8, plus new words asked for."""
    if colours is None:
        return _NAMES, _PALETTE
    unknown = [c for c in colours if c not in ALL_COLOURS]
    if unknown:
        raise ValueError(f"unknown colour(s) {unknown}; the colours are {', '.join(ALL_COLOURS)}")
    names = _NAMES + [c for c in NEW_COLOURS if c in colours]      # the old colours always, in their order
    return names, np.array([ALL_COLOURS[c] for c in names], np.float32)


def _name_colour(rgb, names=_NAMES, palette=_PALETTE):
    """Nearest palette colour name, or "unknown" when none is within _COLOUR_MATCH."""
    d = np.linalg.norm(palette - rgb, axis=-1)
    return names[int(d.argmin())] if d.min() <= _COLOUR_MATCH else "unknown"


def _draw(shape, box, window, sigma=0.0):
    """Coverage (h, w) in [0, 1] of `shape` filling `box` (x0, y0, x1, y1) in a window of size (h, w),
    anti-aliased and then blurred by a Gaussian of `sigma` pixels."""
    big = Image.new("L", (window[1] * _SUPERSAMPLE, window[0] * _SUPERSAMPLE), 0)
    x0, y0, x1, y1 = (v * _SUPERSAMPLE for v in box)
    points, _ = _shape_outline(shape)
    ImageDraw.Draw(big).polygon([(x0 + u * (x1 - x0), y0 + v * (y1 - y0)) for u, v in points], fill=255)
    cover = np.asarray(big.reduce(_SUPERSAMPLE), np.float32) / 255.0
    return ndimage.gaussian_filter(cover, sigma, mode="constant") if sigma > 0.05 else cover


@lru_cache(maxsize=None)
def _stencil_moments(shape):
    """The shape's area fraction of its box, centroid and variances in box units (w = h = 1).

    A shape filling a w x h box has area a*w*h, centroid (x0 + cx*w, y0 + cy*h) and variances vx*w^2,
    vy*h^2. Measured on a finely drawn stencil.
    """
    n = 256
    cover = _draw(shape, (0, 0, n, n), (n, n)).astype(np.float64)
    coords = (np.arange(n) + 0.5) / n
    mass = cover.sum()
    px, py = cover.sum(0) / mass, cover.sum(1) / mass              # marginals along x and y
    cx, cy = px @ coords, py @ coords
    return mass / n**2, cx, cy, px @ (coords - cx) ** 2, py @ (coords - cy) ** 2


def _fit_shape(shape, alpha, area, mx, my, var_x, var_y):
    """Best box and blur for `shape` to explain a blob's alpha; returns (fit, (w, h)).

    Blurring by a Gaussian of variance s keeps area and centroid and adds s to each variance; the
    pixel grid itself adds 1/12 (a pixel is a 1-wide box). So with s = sigma^2 + 1/12:
        var_x = vx*w^2 + s,   var_y = vy*h^2 + s,   area = a*w*h
    Eliminating w and h:  (var_x - s)(var_y - s) = K  with  K = area^2 vx vy / a^2,  a quadratic in s.
    """
    a, cx, cy, vx, vy = _stencil_moments(shape)
    K = area**2 * vx * vy / a**2
    s = ((var_x + var_y) - math.sqrt((var_x - var_y) ** 2 + 4 * K)) / 2      # the smaller root
    s = min(max(s, 1 / 12), min(var_x, var_y) - 0.25)                       # no negative blur, w, h > 0
    w, h = math.sqrt((var_x - s) / vx), math.sqrt((var_y - s) / vy)
    box = (mx - cx * w, my - cy * h, mx + (1 - cx) * w, my + (1 - cy) * h)
    fitted = _draw(shape, box, alpha.shape, math.sqrt(max(s - 1 / 12, 0.0)))
    fit = 1.0 - float(((alpha - fitted) ** 2).sum() / (alpha**2).sum())
    # The stencil was stretched to the blob's proportions; a square must still be about as wide as
    # tall, so the fit is scaled down by how far the proportions are from the shape's own.
    stretch = (w / h) / _shape_outline(shape)[1]
    return fit * min(stretch, 1 / stretch), (w, h)


def find_objects(image, colours=None):
    """What the judge sees: {"background": name, "objects": [one dict per blob]} (steps a-f above).

    colours: the new words (NEW_COLOURS) the judge may also name, e.g. ["pink"]; None = the 8 of COLOURS.
    """
    names, palette = _palette(colours)                                             # (K,), (K, 3)
    arr = _as_array(image)                                                           # (H, W, 3)
    H, W = arr.shape[:2]

    # a. Background: the palette colour most border pixels are nearest to; its exact shade is the
    #    median of all the image's pixels nearest to that palette colour.
    # |p - q|^2 = |p|^2 - 2 p.q + |q|^2; |p|^2 is the same for every q, so it drops out of the argmin.
    nearest = ((palette**2).sum(-1) - 2 * arr @ palette.T).argmin(-1)              # (H, W) palette index
    border = np.concatenate([nearest[0], nearest[-1], nearest[1:-1, 0], nearest[1:-1, -1]])
    bg_index = np.bincount(border, minlength=len(names)).argmax()
    bg_rgb = np.median(arr[nearest == bg_index], axis=0)                             # (3,)
    background = _name_colour(bg_rgb, names, palette)

    # b. Blobs (8-connected), found on a copy smoothed over ~1 pixel so that noise does not make blobs.
    #    A pixel is "object" when it is clearly off the background AND nearer another palette colour
    #    than the background's: the second rule cuts at the halfway point of a blurred edge, so the
    #    faint haze between two nearby objects does not join them.
    scale = min(H, W) / 64                                   # pixel distances below are for 64x64
    smooth = ndimage.gaussian_filter(arr, (scale, scale, 0))                         # (H, W, 3)
    off_background = np.linalg.norm(smooth - bg_rgb, axis=-1) > _FOREGROUND
    other_colour = ((palette**2).sum(-1) - 2 * smooth @ palette.T).argmin(-1) != bg_index
    labels, _ = ndimage.label(off_background & other_colour, structure=np.ones((3, 3)))
    dist = np.linalg.norm(arr - bg_rgb, axis=-1)                                     # (H, W)
    objects = []
    for k, blob in enumerate(ndimage.find_objects(labels), start=1):
        footprint = labels == k
        if footprint.sum() < _MIN_AREA * H * W:
            continue
        # c. Colour: the median of the blob's fifth farthest from the background (a blurred small
        #    object is pure only in its middle).
        d = dist[footprint]
        rgb = np.median(arr[footprint][d >= np.percentile(d, 80)], axis=0)          # (3,)
        direction = rgb - bg_rgb
        if float(direction @ direction) < _FOREGROUND**2:
            continue                                                                 # too faint to be an object
        # d. Coverage alpha = <p - bg, c - bg> / |c - bg|^2 on the blob grown by _GROW pixels (a blurred
        #    edge reaches that far), other blobs cut out. Left unclipped, pixel noise averages out.
        grow = max(2, round(_GROW * scale))
        region = ndimage.binary_dilation(footprint, np.ones((3, 3)), iterations=grow) & ((labels == 0) | footprint)
        y0, y1 = max(blob[0].start - grow, 0), min(blob[0].stop + grow, H)
        x0, x1 = max(blob[1].start - grow, 0), min(blob[1].stop + grow, W)
        alpha = ((arr[y0:y1, x0:x1] - bg_rgb) @ direction / float(direction @ direction)) * region[y0:y1, x0:x1]
        # e. Shape: area, centroid and variances of alpha (pixel centres at +0.5), then fit each stencil.
        area = float(alpha.sum())
        if area < _MIN_AREA * H * W:
            continue
        ys, xs = np.mgrid[0:y1 - y0, 0:x1 - x0] + 0.5
        mx, my = float((alpha * xs).sum() / area), float((alpha * ys).sum() / area)
        var_x = float((alpha * (xs - mx) ** 2).sum() / area)
        var_y = float((alpha * (ys - my) ** 2).sum() / area)
        fits = {shape: _fit_shape(shape, alpha, area, mx, my, var_x, var_y) for shape in SHAPES}
        scores = {shape: fit for shape, (fit, _) in fits.items()}
        best = max(scores, key=scores.get)
        # f. Size from the fitted box's larger side, position from the centroid's grid cell.
        extent = max(fits[best][1]) / min(H, W)
        cx, cy = (x0 + mx) / W, (y0 + my) / H
        cell = (min(max(int(cy * 3), 0), 2), min(max(int(cx * 3), 0), 2))
        objects.append({
            "colour": _name_colour(rgb, names, palette),
            "shape": best if scores[best] >= _SHAPE_MATCH else "unknown",
            "size": "large" if extent > _SIZE_THRESHOLD else "small",
            "position": next(name for name, rc in POSITIONS.items() if rc == cell),
            "rgb": tuple(round(float(v)) for v in rgb),
            "extent": float(extent),
            "centroid": (float(cx), float(cy)),
            "area": area,
            "shape_scores": scores,
        })
    return {"background": background, "objects": objects}


ATTRIBUTES = ("background", "colour", "shape", "size", "position", "count")


def judge(image, caption):
    """Score an image against its caption.

    Returns a dict with one entry per attribute — "background", "colour", "shape", "size", "position",
    "count" — each True, False, or None when the caption does not ask for it (no size word, no
    position); "overall" (every asked attribute True); "caption" (the parsed SceneSpec) and "found"
    (what find_objects saw). Colour, shape, size and position are checked on the objects matched to
    the caption's objects; "count" checks that the image holds exactly as many objects as asked for.
    """
    spec = parse_caption(caption) if isinstance(caption, str) else caption
    if not isinstance(spec, SceneSpec):
        raise TypeError(f"caption must be a string or a SceneSpec, got {type(caption).__name__}")
    # New words are opt-in: a caption without one is judged against the 8 old colours only, exactly as
    # before new words existed; "a pink circle" lets the judge name pink as well.
    asked = {o.colour for o in spec.objects} | {spec.background}
    found = find_objects(image, [c for c in NEW_COLOURS if c in asked] or None)
    wanted = [o for o in spec.objects for _ in range(o.count)]        # one entry per object asked for
    seen = found["objects"]

    # g. Match wanted to seen, maximising agreement; colour weighs most (it is the most reliable cue).
    def agreement(w, s):
        return (3 * (w.colour == s["colour"]) + 2 * (w.shape == s["shape"])
                + (w.size is not None and w.size == s["size"])
                + (w.position is not None and w.position == s["position"]))
    pairs = []
    if wanted and seen:
        gain = np.array([[agreement(w, s) for s in seen] for w in wanted], np.float32)
        rows, cols = linear_sum_assignment(-gain)
        pairs = [(wanted[r], seen[c]) for r, c in zip(rows, cols)]

    def check(attribute):
        asked = [(w, s) for w, s in pairs if getattr(w, attribute) is not None]
        if not any(getattr(w, attribute) is not None for w in wanted):
            return None                                               # the caption leaves it free
        return bool(asked) and all(getattr(w, attribute) == s[attribute] for w, s in asked)

    scores = {
        "background": None if spec.background is None else found["background"] == spec.background,
        "colour": check("colour"),
        "shape": check("shape"),
        "size": check("size"),
        "position": check("position"),
        "count": len(seen) == len(wanted),
    }
    scores["overall"] = all(v for v in scores.values() if v is not None)
    scores["caption"] = spec
    scores["found"] = found
    return scores


def accuracy(pairs):
    """Judge many (image, caption) pairs: {attribute: fraction judged True, ...}.

    Each attribute's fraction is over the images whose caption asks for it (nan if none does);
    "overall" is the fraction with everything right; "n" is the number of images.
    """
    pairs = list(pairs)
    if not pairs:
        raise ValueError("accuracy needs at least one (image, caption) pair")
    results = [judge(image, caption) for image, caption in pairs]
    out = {}
    for attribute in ATTRIBUTES + ("overall",):
        values = [r[attribute] for r in results if r[attribute] is not None]
        out[attribute] = float(np.mean(values)) if values else float("nan")
    out["n"] = len(results)
    return out
