"""The synthetic tasks -> records: `make_example(task, rng, image_size)` returns `{"kind", "texts", "images",
"meta"}` (the source format every builder in `data/samples.py` reads; images are uint8 arrays here, encoded
bytes when they come from files). Splits draw from disjoint seed streams (`record_rng(seed, split, task,
index)`), so the `test` split is held out."""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from bagel_jax.data.synthetic.captions import a_obj, caption, describe, story
from bagel_jax.data.synthetic.scenes import (COLORS, DIRECTIONS, NUMBERS, PLURALS, RELATIONS, SHAPES, WORD_BACKGROUND,
                                             WORDS, Obj, Scene, Word, is_free, place, relations, render,
                                             sample_attributes, sample_relation_scene, sample_scene, sample_size)

T2I_VARIANTS = ("single", "two", "counting", "position")
VQA_TYPES = ("count", "color", "shape", "relation")
EDIT_OPS = ("recolor", "move", "add", "remove")
TASKS = ("t2i", "caption", "vqa", "edit", "video", "next_frame", "words", "text", "think_t2i", "think_vqa",
         "reason_edit")  # append only: a task's index seeds its records (`record_rng`)
GEN_TASKS = ("t2i", "edit", "video", "next_frame", "words", "think_t2i", "reason_edit")
UND_TASKS = ("caption", "vqa", "text", "think_vqa")
EVAL_ONLY_TASKS = ("reason_edit",)  # held out of every training mixture: what they measure is generalisation


def t2i_scene(rng: np.random.Generator, variant: str) -> Scene:
  if variant == "single":
    return sample_scene(rng, sample_attributes(rng, 1))
  if variant == "two":
    (c1, s1), (c2, s2) = sample_attributes(rng, 2)
    while c2 == c1:  # colour attribution needs two colours
      c2 = list(COLORS)[int(rng.integers(len(COLORS)))]
    return sample_scene(rng, [(c1, s1), (c2, s2)])
  if variant == "counting":
    n = int(rng.integers(2, 5))
    (pair,) = sample_attributes(rng, 1)
    return sample_scene(rng, [pair] * n)
  if variant == "position":
    return sample_relation_scene(rng, RELATIONS[int(rng.integers(len(RELATIONS)))])
  raise ValueError(f"unknown T2I variant {variant!r}")


def vqa_pair(rng: np.random.Generator, qtype: str) -> Tuple[Scene, str, str]:
  """(scene, question, exact answer)."""
  if qtype == "count":
    # few colours/shapes so counts above one are common
    n = int(rng.integers(1, 5))
    colors = [list(COLORS)[int(i)] for i in rng.choice(len(COLORS), 2, replace=False)]
    shapes = [SHAPES[int(i)] for i in rng.choice(len(SHAPES), 2, replace=False)]
    attrs = [(colors[int(rng.integers(2))], shapes[int(rng.integers(2))]) for _ in range(n)]
    scene = sample_scene(rng, attrs)
    mode = int(rng.integers(3))
    if mode == 0:
      c = colors[int(rng.integers(2))]
      return scene, f"how many {c} objects are there ?", NUMBERS[sum(o.color == c for o in scene.objects)]
    if mode == 1:
      s = shapes[int(rng.integers(2))]
      return scene, f"how many {PLURALS[s]} are there ?", NUMBERS[sum(o.shape == s for o in scene.objects)]
    return scene, "how many objects are there ?", NUMBERS[len(scene.objects)]
  if qtype in ("color", "shape"):
    n = int(rng.integers(1, 4))
    attrs = sample_attributes(rng, n)
    if qtype == "color":
      # shapes must be unique so "the <shape>" names one object
      while len({s for _, s in attrs}) < n:
        attrs = sample_attributes(rng, n)
      scene = sample_scene(rng, attrs)
      o = scene.objects[int(rng.integers(n))]
      return scene, f"what color is the {o.shape} ?", o.color
    while len({c for c, _ in attrs}) < n:
      attrs = sample_attributes(rng, n)
    scene = sample_scene(rng, attrs)
    o = scene.objects[int(rng.integers(n))]
    return scene, f"what shape is the {o.color} object ?", o.shape
  if qtype == "relation":
    true_rel = RELATIONS[int(rng.integers(len(RELATIONS)))]
    scene = sample_relation_scene(rng, true_rel)
    a, b = scene.objects
    asked = true_rel if rng.random() < 0.5 else RELATIONS[int(rng.integers(len(RELATIONS)))]
    answer = "yes" if asked in relations(a, b) else "no"
    return scene, f"is the {a.color} {a.shape} {asked} the {b.color} {b.shape} ?", answer
  raise ValueError(f"unknown VQA type {qtype!r}")


def edit_triple(rng: np.random.Generator, op: str) -> Tuple[Scene, Scene, str, dict]:
  """(source, exact target, instruction, op record) for recolor/move/add/remove."""
  for _ in range(100):
    n = int(rng.integers(2 if op == "remove" else 1, 4 if op != "add" else 3))
    src = sample_scene(rng, sample_attributes(rng, n))
    objs = list(src.objects)
    i = int(rng.integers(n))
    o = objs[i]
    if op == "recolor":
      c2 = list(COLORS)[int(rng.integers(len(COLORS)))]
      if c2 == o.color or any(p.color == c2 and p.shape == o.shape for p in objs):
        continue
      objs[i] = dataclasses.replace(o, color=c2)
      return src, src.replace(objects=tuple(objs)), f"make the {o.color} {o.shape} {c2}", \
          dict(op=op, index=i, color=c2)
    if op == "move":
      d = list(DIRECTIONS)[int(rng.integers(4))]
      dx, dy = DIRECTIONS[d]
      c = (o.center[0] + 0.3 * dx, o.center[1] + 0.3 * dy)
      if not is_free(c, o.size, objs[:i] + objs[i + 1:]):
        continue
      objs[i] = dataclasses.replace(o, center=c)
      return src, src.replace(objects=tuple(objs)), f"move the {o.color} {o.shape} {d}", \
          dict(op=op, index=i, direction=d)
    if op == "add":
      (pair,) = sample_attributes(rng, 1)
      if any((p.color, p.shape) == pair for p in objs):
        continue
      s = sample_size(rng)
      c = place(rng, s, objs)
      if c is None:
        continue
      new = Obj(pair[1], pair[0], c, s)
      return src, src.replace(objects=tuple(objs) + (new,)), f"add {a_obj(*pair)}", \
          dict(op=op, index=len(objs))
    if op == "remove":
      return src, src.replace(objects=tuple(objs[:i] + objs[i + 1:])), f"remove the {o.color} {o.shape}", \
          dict(op=op, index=i)
    raise ValueError(f"unknown edit op {op!r}")
  raise RuntimeError(f"could not sample a valid {op!r} edit")


REASON_EDIT_OPS = ("recolor", "move", "remove")


def reason_edit_triple(rng: np.random.Generator, op: str) -> Tuple[Scene, Scene, str, dict]:
  """An edit whose object is named only by where it is relative to another ("make the object left of the blue
  square green"): resolving the reference is the VQA relation skill, applying the edit the editing skill. The
  training tasks never phrase an edit this way, so this is the synthetic stand-in for reasoning-based editing
  (IntelligentBench), the capability the paper sees emerge last. Same op record as `edit_triple`."""
  for _ in range(100):
    rel = RELATIONS[int(rng.integers(len(RELATIONS)))]
    src = sample_relation_scene(rng, rel)
    a, b = src.objects  # `rel` holds for a relative to b, and only a is "the object <rel> the <b>"
    ref = f"the object {rel} the {b.color} {b.shape}"
    if op == "recolor":
      c2 = list(COLORS)[int(rng.integers(len(COLORS)))]
      if c2 == a.color or (c2 == b.color and a.shape == b.shape):
        continue
      return src, src.replace(objects=(dataclasses.replace(a, color=c2), b)), f"make {ref} {c2}", \
          dict(op=op, index=0, color=c2)
    if op == "move":
      d = list(DIRECTIONS)[int(rng.integers(4))]
      dx, dy = DIRECTIONS[d]
      c = (a.center[0] + 0.3 * dx, a.center[1] + 0.3 * dy)
      if not is_free(c, a.size, [b]):
        continue
      return src, src.replace(objects=(dataclasses.replace(a, center=c), b)), f"move {ref} {d}", \
          dict(op=op, index=0, direction=d)
    if op == "remove":
      return src, src.replace(objects=(b,)), f"remove {ref}", dict(op=op, index=0)
    raise ValueError(f"unknown reasoning edit op {op!r}; choose one of {REASON_EDIT_OPS}")
  raise RuntimeError(f"could not sample a valid reasoning {op!r} edit")


def motion(rng: np.random.Generator, num_frames: int) -> Tuple[List[Scene], str, dict]:
  """One object moving at constant velocity (per frame) in one of four directions; frames stay inside."""
  (color, shape), = sample_attributes(rng, 1)
  d = list(DIRECTIONS)[int(rng.integers(4))]
  dx, dy = DIRECTIONS[d]
  s = sample_size(rng)
  speed = (1 - s - 0.08) / max(num_frames - 1, 1)
  speed = float(rng.uniform(0.6, 1.0)) * min(speed, 0.2)
  span = speed * (num_frames - 1)
  lo, hi = s / 2 + 0.03, 1 - s / 2 - 0.03
  along = float(rng.uniform(lo, hi - span))
  if dx < 0 or dy < 0:
    along = hi - (along - lo)  # start on the far side when moving left/up
  across = float(rng.uniform(lo, hi))
  scenes = []
  for t in range(num_frames):
    p = along + (dx + dy) * speed * t
    c = (p, across) if dx else (across, p)
    scenes.append(Scene((Obj(shape, color, c, s),)))
  return scenes, f"{a_obj(color, shape)} moves {d}", dict(direction=d, velocity=(dx * speed, dy * speed))


def word_scene(rng: np.random.Generator, word: Optional[str] = None) -> Scene:
  word = word or WORDS[int(rng.integers(len(WORDS)))]
  return Scene(words=(Word(word, "black", (0.5, 0.5), 0.38),), background=WORD_BACKGROUND)


def check_t2i_variants(variants: Sequence[str], where: str) -> Tuple[str, ...]:
  """`variants` as a tuple, each one of `T2I_VARIANTS` (ValueError naming `where` otherwise)."""
  variants = tuple(variants)
  bad = [v for v in variants if v not in T2I_VARIANTS]
  if bad or not variants:
    raise ValueError(f"{where}: t2i variants {list(variants)} must be a non-empty subset of {T2I_VARIANTS}")
  return variants


def make_example(task: str, rng: np.random.Generator, image_size: int = 32, num_frames: int = 4,
                 t2i_variants: Sequence[str] = T2I_VARIANTS) -> Dict[str, Any]:
  """One record of `task`: {"kind", "texts", "images" (uint8 arrays), "meta" (JSON ground truth)}.
  `t2i_variants`: the scene kinds the t2i/caption/think_t2i tasks draw from (the demo trains on single
  objects only)."""
  if task in ("t2i", "caption", "think_t2i"):
    variant = t2i_variants[int(rng.integers(len(t2i_variants)))]
    scene = t2i_scene(rng, variant)
    cap = caption(scene, variant)
    meta = dict(task=task, variant=variant, caption=cap, scenes=[scene.to_dict()])
    img = render(scene, image_size)
    if task == "t2i":
      return dict(kind="t2i", texts=[cap], images=[img], meta=meta)
    if task == "caption":
      return dict(kind="caption", texts=[cap], images=[img], meta=meta)
    think = f"<think> {describe(scene)} </think>"
    return dict(kind="think_t2i", texts=[cap, think], images=[img], meta=dict(meta, think=think))
  if task in ("vqa", "think_vqa"):
    qtype = VQA_TYPES[int(rng.integers(len(VQA_TYPES)))]
    scene, q, a = vqa_pair(rng, qtype)
    meta = dict(task=task, qtype=qtype, question=q, answer=a, scenes=[scene.to_dict()])
    img = render(scene, image_size)
    if task == "vqa":
      return dict(kind="vqa", texts=[q, a], images=[img], meta=meta)
    return dict(kind="think_vqa", texts=[q, f"<think> i see {describe(scene)} </think> {a}"], images=[img],
                meta=meta)
  if task in ("edit", "reason_edit"):
    ops, triple = (EDIT_OPS, edit_triple) if task == "edit" else (REASON_EDIT_OPS, reason_edit_triple)
    src, tgt, instr, rec = triple(rng, ops[int(rng.integers(len(ops)))])
    return dict(kind="edit", texts=[instr], images=[render(src, image_size), render(tgt, image_size)],
                meta=dict(task=task, instruction=instr, edit=rec, scenes=[src.to_dict(), tgt.to_dict()]))
  if task in ("video", "next_frame"):
    scenes, cap, rec = motion(rng, num_frames)
    text = cap if task == "video" else f"next frame : {cap}"
    return dict(kind=task, texts=[text], images=[render(s, image_size) for s in scenes],
                meta=dict(task=task, caption=text, motion=rec, scenes=[s.to_dict() for s in scenes]))
  if task == "words":
    scene = word_scene(rng)
    cap = f"the word {scene.words[0].text}"
    return dict(kind="t2i", texts=[cap], images=[render(scene, image_size)],
                meta=dict(task=task, caption=cap, word=scene.words[0].text, scenes=[scene.to_dict()]))
  if task == "text":
    n = int(rng.integers(1, 4))
    scene = sample_scene(rng, sample_attributes(rng, n)) if n < 2 else sample_relation_scene(
        rng, RELATIONS[int(rng.integers(4))])
    return dict(kind="text", texts=[story(scene)], images=[], meta=dict(task=task, scenes=[scene.to_dict()]))
  raise ValueError(f"unknown synthetic task {task!r}; choose one of {TASKS}")


SPLITS = {"train": 0, "test": 1}


def record_rng(seed: int, split: str, task: str, index: int) -> np.random.Generator:
  """Independent stream per (seed, split, task, index): train and test never share a seed."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; choose one of {tuple(SPLITS)}")
  return np.random.default_rng([int(seed), SPLITS[split], TASKS.index(task), int(index)])


def json_meta(record: Dict[str, Any]) -> Dict[str, Any]:
  """The record with `meta` as a JSON string (the on-disk form)."""
  return dict(record, meta=json.dumps(record["meta"], sort_keys=True))
