"""Text templates of the synthetic tasks. One fixed template per task variant keeps the data learnable by a
tiny model."""
from __future__ import annotations

from bagel_jax.data.synthetic.scenes import NUMBERS, PLURALS, Scene, relations

def a_obj(color: str, shape: str) -> str:
  return f"a {color} {shape}"


def count_phrase(n: int, color: str, shape: str) -> str:
  return a_obj(color, shape) if n == 1 else f"{NUMBERS[n]} {color} {PLURALS[shape]}"


def caption(scene: Scene, variant: str) -> str:
  """T2I caption of a scene made by `t2i_scene(variant)`."""
  o = scene.objects
  if variant == "single":
    return a_obj(o[0].color, o[0].shape)
  if variant == "two":
    return f"{a_obj(o[0].color, o[0].shape)} and {a_obj(o[1].color, o[1].shape)}"
  if variant == "counting":
    return count_phrase(len(o), o[0].color, o[0].shape)
  if variant == "position":
    (rel,) = relations(o[0], o[1])
    return f"{a_obj(o[0].color, o[0].shape)} {rel} {a_obj(o[1].color, o[1].shape)}"
  raise ValueError(f"unknown caption variant {variant!r}")


def h_pos(x: float) -> str:
  return "left" if x < 0.4 else ("right" if x > 0.6 else "center")


def v_pos(y: float) -> str:
  return "top" if y < 0.4 else ("bottom" if y > 0.6 else "middle")


def describe(scene: Scene) -> str:
  """Objects left to right with coarse positions: the 'plan' of think-mode samples."""
  parts = [f"{a_obj(o.color, o.shape)} at {v_pos(o.center[1])} {h_pos(o.center[0])}"
           for o in sorted(scene.objects, key=lambda o: o.center[0])]
  return " , ".join(parts)


def story(scene: Scene) -> str:
  """Text-only sample: facts about a scene, including one relation when there are two objects."""
  sents = [f"there is {a_obj(o.color, o.shape)} ." for o in scene.objects]
  if len(scene.objects) >= 2:
    rel = sorted(relations(scene.objects[0], scene.objects[1]))
    if rel:
      a, b = scene.objects[0], scene.objects[1]
      sents.append(f"the {a.color} {a.shape} is {rel[0]} the {b.color} {b.shape} .")
  return " ".join(sents)
