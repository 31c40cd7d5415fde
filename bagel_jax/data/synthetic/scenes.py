"""The synthetic scene model: coloured shapes (and rendered words) on a grey field, rendered and sampled.

- `Obj(shape, color, center, size)`: shape in `SHAPES`, colour one of the 10 GenEval colours `COLORS`, centre
  (x, y) and bounding-box side `size` as fractions of the image side (y grows downwards).
- `Word(text, color, center, height)`: a rendered word (Pillow's bundled FreeType font).
- `Scene(objects, words, background)`; `render(scene, size) -> uint8 [size, size, 3]`, `render_labels` gives
  the per-pixel object index (0 = background) for masks, `relations(a, b)` GenEval's position rule.
- `sample_scene` / `sample_relation_scene`: non-overlapping objects drawn from a seeded numpy Generator.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import math
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SHAPES = ("circle", "square", "triangle", "star", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses"}
# The 10 GenEval colours, saturated and far apart so a nearest-colour checker is exact on clean renders.
COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 20, 20), "orange": (255, 140, 0), "yellow": (250, 230, 20), "green": (20, 160, 40),
    "blue": (20, 60, 230), "purple": (130, 30, 180), "pink": (255, 130, 200), "brown": (120, 70, 20),
    "black": (0, 0, 0), "white": (255, 255, 255)}
BACKGROUND = (128, 128, 128)  # mid grey: distinct from all 10 colours, black and white included
WORD_BACKGROUND = (255, 255, 255)
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")
RELATIONS = ("left of", "right of", "above", "below")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
# Short words for the text-rendering task (<= 5 letters so they fit 32 px); all are in the synthetic vocabulary.
WORDS = ("hello", "bagel", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "car", "bus", "boat", "house",
         "apple", "cake", "milk", "tea", "book", "pen", "cup", "hat", "shoe", "door", "star", "ball", "game",
         "play", "jump", "run", "sing", "red", "blue", "green", "love", "home", "rain", "snow", "wind", "fire",
         "water", "stone", "sky", "sea", "map", "key", "box", "yes", "no", "stop", "go", "open", "jax", "tpu",
         "data", "code", "math", "art", "news", "time", "zoo")
POSITION_THRESHOLD = 0.1  # GenEval evaluate_images.py


# ----------------------------------------------------------------------------------------------------------
# Scene model and rendering.
# ----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Obj:
  shape: str
  color: str
  center: Tuple[float, float]  # (x, y) in [0, 1], y down
  size: float                  # bounding-box side as a fraction of the image side

  def __post_init__(self):
    if self.shape not in SHAPES:
      raise ValueError(f"Obj.shape={self.shape!r} is not one of {SHAPES}")
    if self.color not in COLORS:
      raise ValueError(f"Obj.color={self.color!r} is not one of {tuple(COLORS)}")

  @property
  def name(self) -> str:
    return f"{self.color} {self.shape}"

  def box(self) -> Tuple[float, float, float, float]:
    h = self.size / 2
    return (self.center[0] - h, self.center[1] - h, self.center[0] + h, self.center[1] + h)


@dataclasses.dataclass(frozen=True)
class Word:
  text: str
  color: str
  center: Tuple[float, float]
  height: float  # font size as a fraction of the image side


@dataclasses.dataclass(frozen=True)
class Scene:
  objects: Tuple[Obj, ...] = ()
  words: Tuple[Word, ...] = ()
  background: Tuple[int, int, int] = BACKGROUND

  def to_dict(self) -> dict:
    return dict(objects=[dict(shape=o.shape, color=o.color, center=list(o.center), size=o.size) for o in self.objects],
                words=[dict(text=w.text, color=w.color, center=list(w.center), height=w.height) for w in self.words],
                background=list(self.background))

  @classmethod
  def from_dict(cls, d: dict) -> "Scene":
    objs = tuple(Obj(o["shape"], o["color"], tuple(o["center"]), float(o["size"])) for o in d.get("objects", ()))
    words = tuple(Word(w["text"], w["color"], tuple(w["center"]), float(w["height"])) for w in d.get("words", ()))
    return cls(objs, words, tuple(d.get("background", BACKGROUND)))

  def replace(self, **kw) -> "Scene":
    return dataclasses.replace(self, **kw)


def _shape_polygon(shape: str, cx: float, cy: float, half: float) -> List[Tuple[float, float]]:
  if shape == "triangle":
    return [(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
  if shape == "star":
    pts = []
    for k in range(10):
      r = half if k % 2 == 0 else half * 0.5
      a = -math.pi / 2 + k * math.pi / 5
      pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return pts
  if shape == "cross":
    t = half / 3  # arm half-thickness: arms are 2/3 of the half-side wide
    return [(cx - t, cy - half), (cx + t, cy - half), (cx + t, cy - t), (cx + half, cy - t), (cx + half, cy + t),
            (cx + t, cy + t), (cx + t, cy + half), (cx - t, cy + half), (cx - t, cy + t), (cx - half, cy + t),
            (cx - half, cy - t), (cx - t, cy - t)]
  raise ValueError(f"no polygon for shape {shape!r}")


def _draw_obj(draw: ImageDraw.ImageDraw, o: Obj, size: int, fill):
  cx, cy = o.center[0] * size, o.center[1] * size
  half = o.size * size / 2
  # Integer-aligned boxes: the same scene renders identically at a given size (no anti-aliasing).
  x0, y0, x1, y1 = round(cx - half), round(cy - half), round(cx + half) - 1, round(cy + half) - 1
  if o.shape == "circle":
    draw.ellipse((x0, y0, x1, y1), fill=fill)
  elif o.shape == "square":
    draw.rectangle((x0, y0, x1, y1), fill=fill)
  else:
    draw.polygon(_shape_polygon(o.shape, (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2), fill=fill)


@functools.lru_cache(maxsize=64)
def _font(px: int):
  return ImageFont.load_default(size=max(6, int(px)))


@functools.lru_cache(maxsize=4096)
def _word_mask(text: str, px: int, size: int) -> np.ndarray:
  """Ink mask of `text` (1-bit glyphs, no anti-aliasing) at the largest font size <= px whose *measured* ink
  fits 85% of the image width (Pillow's text bbox is not the 1-bit ink extent)."""
  while True:
    font = _font(px)
    canvas = Image.new("1", (4 * size, 2 * size), 0)
    d = ImageDraw.Draw(canvas)
    d.fontmode = "1"
    d.text((size // 2, size // 2), text, font=font, fill=1)
    ink = np.asarray(canvas, bool)
    ys, xs = np.nonzero(ink)
    if not len(xs):
      raise ValueError(f"word {text!r} renders no pixels at font size {px}")
    mask = ink[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    if (mask.shape[1] <= 0.85 * size and mask.shape[0] <= 0.85 * size) or px <= 6:
      return mask
    px -= 1


def _draw_word(img: np.ndarray, w: Word, size: int, fill):
  mask = _word_mask(w.text, int(w.height * size), size)
  h, wd = mask.shape
  y0 = int(round(w.center[1] * size - h / 2))
  x0 = int(round(w.center[0] * size - wd / 2))
  ys, xs = slice(max(y0, 0), min(y0 + h, size)), slice(max(x0, 0), min(x0 + wd, size))
  m = mask[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
  img[ys, xs][m] = fill


def render(scene: Scene, size: int) -> np.ndarray:
  """The scene as uint8 [size, size, 3]: flat background, objects in order, then words; no anti-aliasing, so
  every object pixel has exactly its colour."""
  img = Image.new("RGB", (size, size), tuple(scene.background))
  draw = ImageDraw.Draw(img)
  for o in scene.objects:
    _draw_obj(draw, o, size, COLORS[o.color])
  out = np.array(img, np.uint8)
  for w in scene.words:
    _draw_word(out, w, size, COLORS[w.color])
  return out


def render_labels(scene: Scene, size: int) -> np.ndarray:
  """int32 [size, size]: 1 + index of the object covering each pixel (later objects on top), 0 = background."""
  img = Image.new("I", (size, size), 0)
  draw = ImageDraw.Draw(img)
  for i, o in enumerate(scene.objects):
    _draw_obj(draw, o, size, i + 1)
  return np.asarray(img, np.int32)


def relations(a: Obj, b: Obj) -> set:
  """GenEval's rule for where `a` is relative to `b` (see `relative_position`), with square object sizes."""
  return relative_position(a.center, (a.size, a.size), b.center, (b.size, b.size))


def relative_position(center_a, dims_a, center_b, dims_b) -> set:
  """GenEval's position rule: the centre offset shrunk by 0.1 x (sum of sizes), then normalised; 'left of'
  if dx < -0.5 (likewise right of / above / below). Shared by the data's ground truth and the checker."""
  offset = np.asarray(center_a, np.float64) - np.asarray(center_b, np.float64)
  dims = np.asarray(dims_a, np.float64) + np.asarray(dims_b, np.float64)
  revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * dims, 0) * np.sign(offset)
  if np.all(np.abs(revised) < 1e-3):
    return set()
  dx, dy = revised / np.linalg.norm(offset)
  out = set()
  if dx < -0.5:
    out.add("left of")
  if dx > 0.5:
    out.add("right of")
  if dy < -0.5:
    out.add("above")
  if dy > 0.5:
    out.add("below")
  return out


def encode_png(img: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.asarray(img, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------
# Scene sampling.
# ----------------------------------------------------------------------------------------------------------

SIZE_RANGE = (0.26, 0.34)
GAP = 0.04  # minimum free space between two objects' boxes


def is_free(center, size, placed: Sequence[Obj], gap: float = GAP) -> bool:
  h = size / 2
  if center[0] - h < 0.02 or center[1] - h < 0.02 or center[0] + h > 0.98 or center[1] + h > 0.98:
    return False
  for o in placed:
    lim = (size + o.size) / 2 + gap
    if abs(center[0] - o.center[0]) < lim and abs(center[1] - o.center[1]) < lim:
      return False
  return True


def place(rng: np.random.Generator, size: float, placed: Sequence[Obj], tries: int = 200):
  h = size / 2 + 0.02
  for _ in range(tries):
    c = (float(rng.uniform(h, 1 - h)), float(rng.uniform(h, 1 - h)))
    if is_free(c, size, placed):
      return c
  return None


def sample_size(rng) -> float:
  return float(rng.uniform(*SIZE_RANGE))


def sample_attributes(rng: np.random.Generator, n: int, unique: bool = True) -> List[Tuple[str, str]]:
  """n (colour, shape) pairs; with `unique`, no pair repeats (so 'the red circle' names one object)."""
  colors, out = list(COLORS), []
  while len(out) < n:
    pair = (colors[int(rng.integers(len(colors)))], SHAPES[int(rng.integers(len(SHAPES)))])
    if not unique or pair not in out:
      out.append(pair)
  return out


def sample_scene(rng: np.random.Generator, attrs: Sequence[Tuple[str, str]]) -> Scene:
  """Non-overlapping objects with the given (colour, shape) pairs at random positions and sizes."""
  for _ in range(50):
    placed: List[Obj] = []
    for color, shape in attrs:
      s = sample_size(rng)
      c = place(rng, s, placed)
      if c is None:
        break
      placed.append(Obj(shape, color, c, s))
    if len(placed) == len(attrs):
      return Scene(tuple(placed))
  raise RuntimeError(f"could not place {len(attrs)} objects without overlap")


def sample_relation_scene(rng: np.random.Generator, rel: str, attrs=None) -> Scene:
  """Two objects where exactly `rel` holds for object 0 relative to object 1 (GenEval rule)."""
  attrs = attrs or sample_attributes(rng, 2)
  for _ in range(200):
    sa, sb = sample_size(rng), sample_size(rng)
    lo, hi = float(rng.uniform(0.2, 0.32)), float(rng.uniform(0.68, 0.8))
    other = float(rng.uniform(0.3, 0.7))
    jitter = float(rng.uniform(-0.06, 0.06))
    first, second = {"left of": (lo, hi), "right of": (hi, lo), "above": (lo, hi), "below": (hi, lo)}[rel]
    if rel in ("left of", "right of"):
      ca, cb = (first, other), (second, other + jitter)
    else:
      ca, cb = (other, first), (other + jitter, second)
    a, b = Obj(attrs[0][1], attrs[0][0], ca, sa), Obj(attrs[1][1], attrs[1][0], cb, sb)
    if is_free(ca, sa, []) and is_free(cb, sb, [a]) and relations(a, b) == {rel}:
      return Scene((a, b))
  raise RuntimeError(f"could not sample a scene with relation {rel!r}")
