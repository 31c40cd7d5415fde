"""The synthetic data is checker-friendly: renders match their scenes exactly, texts state the ground truth,
edits change only the edited object, splits are disjoint, and the TFDS/ArrayRecord copy reads back through
`tfds.data_source` without TensorFlow."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from bagel_jax.data import synthetic as S

REPO = __file__.rsplit("/tests/", 1)[0]


def _pixels_of(img, labels, k):
  return img[labels == k]


def check_render(scene, size):
  """Every object pixel has its object's exact colour; every other pixel is background."""
  img, labels = S.render(scene, size), S.render_labels(scene, size)
  assert img.shape == (size, size, 3) and img.dtype == np.uint8
  for k, o in enumerate(scene.objects, start=1):
    px = _pixels_of(img, labels, k)
    assert len(px) >= 0.3 * (o.size * size) ** 2, (o, len(px))  # visible, not occluded
    assert np.all(px == S.COLORS[o.color]), o
    ys, xs = np.nonzero(labels == k)
    cx, cy = (xs.mean() + 0.5) / size, (ys.mean() + 0.5) / size
    assert abs(cx - o.center[0]) < 1.5 / size + 0.02 and abs(cy - o.center[1]) < 1.5 / size + 0.06, (o, cx, cy)
  if not scene.words:
    assert np.all(img[labels == 0] == scene.background)


@pytest.mark.parametrize("task", S.TASKS)
def test_records_render_their_scenes(task):
  src = S.SyntheticSource(task, "train", 1000, 32)
  for i in range(25):
    rec = src[i]
    assert set(rec) == {"kind", "texts", "images", "meta"} and all(isinstance(t, str) and t for t in rec["texts"])
    scenes = [S.Scene.from_dict(d) for d in rec["meta"]["scenes"]]
    json.dumps(rec["meta"])  # ground truth is JSON-serialisable
    if task == "text":
      assert not rec["images"]
      continue
    assert len(scenes) == len(rec["images"])
    for scene, im in zip(scenes, rec["images"]):
      np.testing.assert_array_equal(S.render(scene, 32), im)
      check_render(scene, 32)
      check_render(scene, 64)  # resolution-independent scene model


def test_captions_state_the_ground_truth():
  rng = np.random.default_rng(0)
  for variant in S.T2I_VARIANTS:
    for _ in range(30):
      scene = S.t2i_scene(rng, variant)
      cap = S.caption(scene, variant)
      objs = scene.objects
      if variant == "counting":
        assert cap.split()[0] == S.NUMBERS[len(objs)] and len({(o.color, o.shape) for o in objs}) == 1
      if variant == "position":
        rel = S.relations(objs[0], objs[1])
        assert len(rel) == 1 and rel.pop() in cap
      for o in objs:
        assert o.color in cap and (o.shape in cap or S.PLURALS[o.shape] in cap)


def test_vqa_answers_are_exact():
  rng = np.random.default_rng(1)
  for qtype in S.VQA_TYPES:
    for _ in range(40):
      scene, q, a = S.vqa_pair(rng, qtype)
      objs = scene.objects
      if q.startswith("how many objects"):
        assert a == S.NUMBERS[len(objs)]
      elif q.startswith("how many"):
        word = q.split()[2]
        n = sum(o.color == word for o in objs) if word in S.COLORS else sum(S.PLURALS[o.shape] == word for o in objs)
        assert a == S.NUMBERS[n]
      elif q.startswith("what color is the"):
        (o,) = [o for o in objs if o.shape == q.split()[4]]
        assert a == o.color
      elif q.startswith("what shape"):
        (o,) = [o for o in objs if o.color == q.split()[4]]
        assert a == o.shape
      else:
        a0, b0 = objs
        asked = next(r for r in S.RELATIONS if f" {r} the " in q)
        assert a == ("yes" if asked in S.relations(a0, b0) else "no")


@pytest.mark.parametrize("op,triple", [(op, S.edit_triple) for op in S.EDIT_OPS] +
                         [(op, S.reason_edit_triple) for op in S.REASON_EDIT_OPS])
def test_edits_change_only_the_edited_object(op, triple):
  rng = np.random.default_rng(2)
  for _ in range(20):
    src, tgt, instr, rec = triple(rng, op)
    a, b = S.render(src, 32), S.render(tgt, 32)
    la, lb = S.render_labels(src, 32), S.render_labels(tgt, 32)
    i = rec["index"]
    if op == "add":
      edited = lb == len(tgt.objects)
    elif op == "remove":
      edited = la == i + 1
    else:
      edited = (la == i + 1) | (lb == i + 1)
    assert np.any(a != b)
    np.testing.assert_array_equal(a[~edited], b[~edited])  # preservation outside the edited object's mask
    if op == "recolor":
      assert tgt.objects[i].color == rec["color"] and rec["color"] in instr
    if op == "move":
      d = np.subtract(tgt.objects[i].center, src.objects[i].center)
      assert np.allclose(d, np.multiply(S.DIRECTIONS[rec["direction"]], 0.3))


def test_reasoning_edits_name_the_object_only_by_its_relation():
  rng = np.random.default_rng(5)
  for _ in range(40):
    op = S.REASON_EDIT_OPS[int(rng.integers(len(S.REASON_EDIT_OPS)))]
    src, tgt, instr, rec = S.reason_edit_triple(rng, op)
    a, b = src.objects
    rel = next(r for r in S.RELATIONS if f"the object {r} the {b.color} {b.shape}" in instr)
    assert rec["index"] == 0 and rel in S.relations(a, b) and rel not in S.relations(b, a)
    assert f"{a.color} {a.shape}" not in instr  # the edited object is never named by its attributes


def test_motion_is_constant_velocity_and_inside():
  rng = np.random.default_rng(3)
  for _ in range(30):
    scenes, cap, rec = S.motion(rng, 4)
    c = np.array([s.objects[0].center for s in scenes])
    np.testing.assert_allclose(np.diff(c, axis=0), np.tile(rec["velocity"], (3, 1)), atol=1e-9)
    for s in scenes:
      check_render(s, 32)
    assert rec["direction"] in cap


def test_words_are_rendered_and_legible():
  rng = np.random.default_rng(4)
  seen = set()
  for _ in range(20):
    scene = S.word_scene(rng)
    img = S.render(scene, 32)
    dark = np.all(img == 0, axis=-1)
    assert dark.sum() > 10 and not dark[:, 0].any() and not dark[:, -1].any()  # drawn, not clipped
    seen.add(scene.words[0].text)
  # different words give different renders (a template matcher can tell them apart)
  assert len({S.render(S.word_scene(rng, w), 32).tobytes() for w in S.WORDS}) == len(S.WORDS)
  assert len(seen) > 10


def test_deterministic_and_splits_disjoint():
  a = S.SyntheticSource("t2i", "train", 100, 32, seed=0)
  b = S.SyntheticSource("t2i", "train", 100, 32, seed=0)
  t = S.SyntheticSource("t2i", "test", 100, 32, seed=0)
  for i in range(20):
    assert a[i]["meta"] == b[i]["meta"]
  train = {json.dumps(a[i]["meta"]["scenes"]) for i in range(100)}
  test = {json.dumps(t[i]["meta"]["scenes"]) for i in range(100)}
  assert not train & test
  with pytest.raises(ValueError, match="split"):
    S.SyntheticSource("t2i", "valid")
  with pytest.raises(IndexError):
    a[100]


def test_tfds_arrayrecord_roundtrip_without_tensorflow(tmp_path):
  """Write the builder's 'small' config to tmp_path and read it back with tfds.data_source in a fresh process
  that must never import TensorFlow."""
  code = f"""
import sys, json, io, numpy as np
from PIL import Image
from bagel_jax.data import synthetic as S
import tensorflow_datasets as tfds
b = S.tfds_builder({str(tmp_path)!r}, "small")
b.download_and_prepare()
ds = tfds.data_source("bagel_synthetic/small", split="test", data_dir={str(tmp_path)!r})
assert len(ds) == 16 * len(S.TASKS), len(ds)
r = ds[3]
idx = {{k: 0 for k in S.TASKS}}
meta = json.loads(r["meta"])
ref = S.SyntheticSource(meta["task"], "test", 16, 32)
match = [i for i in range(16) if ref[i]["meta"] == meta]
assert match, "record not found in its source"
im = np.asarray(Image.open(io.BytesIO(r["images"][0])).convert("RGB")) if r["images"] else None
if im is not None:
  np.testing.assert_array_equal(im, ref[match[0]]["images"][0])
print(json.dumps(dict(tf="tensorflow" in sys.modules, n=len(ds), kind=r["kind"].decode())))
"""
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
                     env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out["tf"] is False and out["n"] == 16 * len(S.TASKS)


def test_png_roundtrip():
  img = S.render(S.t2i_scene(np.random.default_rng(0), "two"), 32)
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(S.encode_png(img)))), img)
