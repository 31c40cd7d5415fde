"""Bad data: a manifest with a missing file, a truncated JPEG, an over-long sample, an empty caption and a wrong
field type (JSONL, Parquet and WebDataset tar). The pipeline runs to the end, the counters name each reason, and
nothing else is dropped: count in = count out + skipped."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from bagel_jax import batch as batch_lib
from bagel_jax.data import pipeline, synthetic
from bagel_jax.data.config import DataConfig, SourceConfig
from bagel_jax.data.examples import batch_spec_for
from bagel_jax.layout import LayoutConfig
from bagel_jax.models.config import tiny

CFG = tiny()
LAYOUT = LayoutConfig.from_model_config(CFG)
SPEC = batch_spec_for(CFG, batch_size=2, seq_len=128, vit_capacity=48, latent_capacity=64, image_capacity=8,
                      pixel_images=6, pixel_size=32)
REASONS = {"missing_file": 1, "decode_error": 1, "too_long": 1, "empty_text": 1, "bad_field": 1}


def _png(img, path):
  Image.fromarray(img).save(path, format="PNG")


def _jpeg_bytes(img):
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="JPEG", quality=95)
  return buf.getvalue()


def make_records(tmp_path):
  """(records with image file names, number of good records); files written under tmp_path."""
  rng = np.random.default_rng(0)
  recs = []
  for i, task in enumerate(["t2i", "vqa", "edit", "caption", "t2i", "vqa"]):
    r = synthetic.make_example(task, rng, 32)
    names = []
    for k, im in enumerate(r["images"]):
      names.append(f"good{i}_{k}.png")
      _png(im, tmp_path / names[-1])
    recs.append(dict(kind=r["kind"], texts=r["texts"], images=names))
  img = synthetic.render(synthetic.t2i_scene(rng, "single"), 32)
  good = len(recs)
  recs.append(dict(kind="t2i", texts=["a red circle"], images=["does_not_exist.png"]))   # missing file
  data = _jpeg_bytes(img)
  (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
  recs.append(dict(kind="t2i", texts=["a red circle"], images=["truncated.jpg"]))         # truncated JPEG
  _png(img, tmp_path / "ok.png")
  recs.append(dict(kind="text", texts=[" ".join(["red"] * 400)], images=[]))                # longer than a row
  recs.append(dict(kind="t2i", texts=[""], images=["ok.png"]))                            # empty caption
  recs.append(dict(kind="t2i", texts=None, images=["ok.png"]))                            # wrong field type
  return recs, good


def run_to_end(src: SourceConfig):
  dc = DataConfig(sources=(src,), num_epochs=1, shuffle=True, validate=True, prefetch=0)
  it = pipeline.make_pipeline(dc, SPEC, LAYOUT, seed=0)
  n = 0
  for b in it:
    batch_lib.validate(b, SPEC)
    n += int(b["num_documents"].sum())
  return it, n


def check(it, n_docs, good, total, missing="does_not_exist.png", truncated="truncated.jpg"):
  s = it.stats
  got = {k.split("/", 1)[1]: int(v) for k, v in s.items() if k.startswith("skipped/")}
  assert got == REASONS, (got, it.examples)
  assert s["samples_in"] == total == s["samples_out"] + s["skipped"] and s["buffered"] == 0
  assert s["samples_out"] == good == n_docs  # every good record made it into a batch
  for reason in REASONS:  # each counter comes with an example naming where
    assert it.examples[reason]
  assert missing in it.examples["missing_file"]
  assert truncated in it.examples["decode_error"]
  assert "stats" not in it.stats_line() and "decode_error 1" in it.stats_line()


def test_jsonl_manifest(tmp_path):
  recs, good = make_records(tmp_path)
  path = tmp_path / "manifest.jsonl"
  with open(path, "w") as f:
    for r in recs:
      f.write(json.dumps(r) + "\n")
  it, n = run_to_end(SourceConfig("m", "jsonl", path=str(path)))
  check(it, n, good, len(recs))


def test_jsonl_bad_json_line_and_wrong_types(tmp_path):
  recs, _ = make_records(tmp_path)
  path = tmp_path / "m.jsonl"
  with open(path, "w") as f:
    f.write(json.dumps(recs[0]) + "\n{not json\n")
    f.write(json.dumps(dict(kind="t2i", texts="a red circle", images=["ok.png"])) + "\n")
    f.write(json.dumps(dict(kind="t2i", texts=["a red circle"], images=[7])) + "\n")
    f.write(json.dumps(dict(kind="painting", texts=["x"], images=[])) + "\n")
  dc = DataConfig(sources=(SourceConfig("m", "jsonl", path=str(path)),), num_epochs=1, prefetch=0)
  it = pipeline.make_pipeline(dc, SPEC, LAYOUT)
  list(it)
  s = it.stats
  assert (s["skipped/bad_json"], s["skipped/bad_field"], s["skipped/unknown_kind"]) == (1, 2, 1)
  assert s["samples_out"] == 1 and s["samples_in"] == 5


def test_parquet_manifest(tmp_path):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq
  recs, good = make_records(tmp_path)
  table = pa.table({"kind": [r["kind"] for r in recs], "texts": [r["texts"] for r in recs],
                    "images": [r["images"] for r in recs]})
  pq.write_table(table, tmp_path / "m.parquet", row_group_size=4)
  it, n = run_to_end(SourceConfig("m", "parquet", path=str(tmp_path / "m.parquet")))
  check(it, n, good, len(recs))


def test_webdataset_tar(tmp_path):
  recs, good = make_records(tmp_path)
  path = tmp_path / "shard-000.tar"
  with tarfile.open(path, "w") as tar:
    for i, r in enumerate(recs):
      key = f"{i:04d}"
      members = []
      for k, name in enumerate(r["images"] or []):
        if os.path.exists(tmp_path / name):
          suffix = f"{k}.{name.rsplit('.', 1)[1]}"
          tar.add(tmp_path / name, arcname=f"{key}.{suffix}")
          members.append(suffix)
        else:
          members.append(f"{k}.png")  # named in the record, absent from the shard
      data = json.dumps(dict(r, images=members)).encode()
      info = tarfile.TarInfo(f"{key}.json")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  it, n = run_to_end(SourceConfig("m", "tar", path=str(tmp_path / "shard-*.tar")))
  check(it, n, good, len(recs), missing="shard-000.tar:0006.0.png", truncated="shard-000.tar:0007.0.jpg")
