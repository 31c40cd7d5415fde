"""Own-data bad inputs (issue #15): every case is a counted skip or a bounded, explained error, never a crash
and never a hang.

- a manifest whose every line is skipped (repeated forever) stops with `DataHealthError` showing the reason
  histogram and a `file:line` example, in seconds (it used to spin at 100% CPU forever);
- more than `max_skip_fraction` of the records skipped stops the same way;
- invalid UTF-8, pathologically nested JSON and wrong field types are counted skips;
- each skip reason prints a one-line warning the first time it appears, naming `file:line`;
- one over-long record in the start-up scan is a counted `too_long`, not a refusal to start; when no record
  fits, start-up refuses naming the record;
- `--config.data.sources=...` overrides the source list of any stage config from the command line;
- `bagel-train` on a manifest with no usable record exits with the histogram instead of hanging.
"""
import json
import os
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest
from PIL import Image

from bagel_jax.data import packing, pipeline
from bagel_jax.data.config import DataConfig, SourceConfig
from bagel_jax.data.examples import batch_spec_for
from bagel_jax.layout import LayoutConfig
from bagel_jax.models.config import tiny
from bagel_jax.train import config as train_config

CFG = tiny()
LAYOUT = LayoutConfig.from_model_config(CFG)
SPEC = batch_spec_for(CFG, batch_size=2, seq_len=128, vit_capacity=48, latent_capacity=64, image_capacity=8,
                      pixel_images=6, pixel_size=32)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _image(path, seed=0):
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)


def _write_lines(path, lines):
  with open(path, "wb") as f:
    for line in lines:
      f.write((line if isinstance(line, bytes) else line.encode()) + b"\n")


def _good(i=0):
  return json.dumps(dict(kind="t2i", texts=[f"a picture number {i}"], images=["ok.png"]))


def test_all_lines_skipped_stops_with_histogram_not_a_hang(tmp_path):
  _write_lines(tmp_path / "m.jsonl", [json.dumps(dict(kind="t2i", texts=["a cat"], images=["missing.png"])),
                                      "{not json", json.dumps(dict(kind="t2i", texts=None, images=[]))])
  dc = DataConfig(sources=(SourceConfig("m", "jsonl", path=str(tmp_path / "m.jsonl")),), prefetch=0,
                  max_tries=300)  # num_epochs=0: repeated forever
  it = pipeline.make_pipeline(dc, SPEC, LAYOUT)
  t0 = time.time()
  with pytest.raises(packing.DataHealthError) as e:
    next(it)
  assert time.time() - t0 < 30
  msg = str(e.value)
  assert "no record yielded a usable sample in the last 300 tries" in msg
  for reason in ("missing_file", "bad_json", "bad_field"):
    assert reason in msg
  assert "m.jsonl:1" in msg and "m.jsonl:2" in msg and "m.jsonl:3" in msg  # file:line of each reason's example
  assert "100 (33%)" in msg  # the histogram: 300 tries over 3 lines


def test_skip_share_over_the_limit_stops(tmp_path):
  _image(tmp_path / "ok.png")
  lines = []
  for i in range(40):
    lines.append(_good(i))
    lines += ["{broken"] * 3  # 75% of the records are bad, but a usable one comes every 4 tries
  _write_lines(tmp_path / "m.jsonl", lines)
  dc = DataConfig(sources=(SourceConfig("m", "jsonl", path=str(tmp_path / "m.jsonl")),), prefetch=0,
                  max_skip_fraction=0.5, skip_check_after=100, shuffle=False)
  it = pipeline.make_pipeline(dc, SPEC, LAYOUT)
  with pytest.raises(packing.DataHealthError, match=r"(?s)75% of the records were skipped.*bad_json"):
    for _ in range(100):
      next(it)
  # the same data under a looser limit trains (every 4th record is usable)
  ok = pipeline.make_pipeline(dc.replace(max_skip_fraction=0.9), SPEC, LAYOUT)
  for _ in range(3):
    next(ok)
  assert ok.stats["samples_out"] > 0


def test_invalid_utf8_deep_nesting_and_wrong_types_are_counted_skips(tmp_path):
  _image(tmp_path / "ok.png")
  lines = [_good(0),
           b'{"kind": "t2i", "texts": ["caf\xe9 au lait"], "images": ["ok.png"]}',  # Latin-1, not UTF-8
           "[" * 100_000 + "]" * 100_000,                                          # nested past the parser's limit
           json.dumps(dict(kind=7, texts=["x"], images=["ok.png"])),               # kind not a string
           json.dumps(dict(kind="t2i", texts=[["nested"]], images=["ok.png"])),    # a text that is a list
           json.dumps(dict(kind="t2i", texts=["x"], images={"a": 1})),             # images not a list
           json.dumps(dict(kind="vqa", texts=["q", 5], images=["ok.png"])),        # an answer that is a number
           json.dumps(dict(kind="interleave", texts=["x"], images=[], plan=[{"type": "text"}])),  # plan w/o index
           json.dumps([1, 2, 3]),                                                  # not an object
           json.dumps("just a string"),
           _good(1)]
  _write_lines(tmp_path / "m.jsonl", lines)
  dc = DataConfig(sources=(SourceConfig("m", "jsonl", path=str(tmp_path / "m.jsonl")),), num_epochs=1,
                  prefetch=0, validate=True)
  it = pipeline.make_pipeline(dc, SPEC, LAYOUT)
  list(it)
  s = it.stats
  assert s["samples_in"] == len(lines) and s["samples_out"] == 2
  assert s["skipped/bad_utf8"] == 1 and s["skipped/bad_json"] == 1
  assert s["skipped/bad_field"] == len(lines) - 4, it.examples
  assert "m.jsonl:2" in it.examples["bad_utf8"] and "m.jsonl:3" in it.examples["bad_json"]


def test_first_skip_of_each_reason_warns_once_with_file_line(tmp_path, capsys):
  _image(tmp_path / "ok.png")
  _write_lines(tmp_path / "m.jsonl", [_good(0), "{bad", "{bad", _good(1),
                                      json.dumps(dict(kind="t2i", texts=["x"], images=["gone.png"])), _good(2)])
  dc = DataConfig(sources=(SourceConfig("m", "jsonl", path=str(tmp_path / "m.jsonl")),), num_epochs=3,
                  prefetch=0, shuffle=False, max_buffer=2)
  it = pipeline.make_pipeline(dc, SPEC, LAYOUT)
  list(it)
  err = capsys.readouterr().err
  warnings = [l for l in err.splitlines() if l.startswith("WARNING: data: first record skipped")]
  assert len(warnings) == 2, err  # bad_json and missing_file, once each although each recurs every epoch
  assert any("bad_json" in w and "m.jsonl:2" in w for w in warnings)
  assert any("missing_file" in w and "gone.png" in w for w in warnings)
  assert it.stats["skipped/bad_json"] == 6
  assert "bad_json 6" in it.stats_line()


# ------------------------------------------------------------------------------------------------------------
# Start-up scan (through the trainer's config path).
# ------------------------------------------------------------------------------------------------------------

def _config(manifest, seq_len=128):
  from experiments import common
  c = common.tiny_cpu(common.base_config(), batch_size=2, seq_len=seq_len)
  c.data = ml_collections.ConfigDict(dict(source="pipeline", seed=0, image_size=32, sources=(
      dict(name="mine", type="jsonl", path=str(manifest)),)))
  return c


def _start(c):
  """What `bagel-train` does with the data before the first step: resolve the config, open the sources once
  (the start-up scan and its checks), build the pipeline."""
  from bagel_jax.train import config as train_config, inputs
  run = train_config.resolve(c, 1, 1)
  inputs.make_input(run, run.spec, 0, 1).close()


def test_one_overlong_record_is_a_counted_skip_not_a_refusal(tmp_path, capsys):
  _image(tmp_path / "ok.png")
  long = json.dumps(dict(kind="text", texts=[" ".join(["word"] * 400)], images=[]))
  _write_lines(tmp_path / "m.jsonl", [_good(0), long, _good(1)])
  c = _config(tmp_path / "m.jsonl")
  _start(c)  # starts
  out = capsys.readouterr().out
  assert "mine" in out and "3 records" in out and "2 ok" in out and "too_long 1" in out and "m.jsonl:2" in out
  assert "tokenizer: WordTokenizer" in out and "<unk> rate" in out
  run = train_config.resolve(c, 1, 1)
  found = pipeline.scan_sources(run.data, run.spec, LayoutConfig.from_model_config(run.model))
  assert 0 < found.need["tokens"] <= 128 and found.sources[0].skipped == {"too_long": 1}


def test_no_record_fits_refuses_naming_it(tmp_path):
  _write_lines(tmp_path / "m.jsonl", [json.dumps(dict(kind="text", texts=[" ".join(["word"] * n)], images=[]))
                                      for n in (400, 300)])
  c = _config(tmp_path / "m.jsonl")
  with pytest.raises(ValueError, match=r"no scanned record fits one row.*m\.jsonl:2, needs tokens 3\d\d>128"):
    _start(c)


def test_source_with_no_usable_record_refuses_at_start(tmp_path):
  _write_lines(tmp_path / "m.jsonl", ["{bad"] * 5)
  c = _config(tmp_path / "m.jsonl")
  with pytest.raises(ValueError, match=r"(?s)no usable record.*\['mine'\].*bad_json 5.*m\.jsonl:1"):
    _start(c)


# ------------------------------------------------------------------------------------------------------------
# --config.data.sources from the command line.
# ------------------------------------------------------------------------------------------------------------

def _parse(config_arg, *overrides):
  from absl import flags
  from ml_collections import config_flags
  argv = ["prog", f"--config={config_arg}", *overrides]
  fv = flags.FlagValues()  # as bagel-train parses them (overrides are found in argv)
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
  fv(argv)
  return holder.value


@pytest.mark.parametrize("config_file", ["experiments/bagel_7b/pretrain.py:model=tiny",
                                         "experiments/bagel_7b/sft.py",
                                         "experiments/ablation/mot.py",
                                         "experiments/ablation/mot.py:size=1.5b"])
def test_sources_override_from_the_command_line(tmp_path, config_file):
  _image(tmp_path / "ok.png")
  _write_lines(tmp_path / "cats.jsonl", [_good(0)])
  _write_lines(tmp_path / "qa.jsonl", [json.dumps(dict(kind="vqa", texts=["q?", "a"], images=["ok.png"]))])
  path = os.path.join(REPO, config_file)
  # the short form: paths (type from the extension, name from the stem, group from the first record's kind)
  c = _parse(path, f"--config.data.sources=({str(tmp_path / 'cats.jsonl')!r}, {str(tmp_path / 'qa.jsonl')!r})")
  dc = train_config.data_config(c)
  assert [(s.name, s.type, s.group) for s in dc.sources] == [("cats", "jsonl", "gen"), ("qa", "jsonl", "und")]
  # the full form: SourceConfig fields
  c = _parse(path, "--config.data.sources=[{'name': 'mine', 'type': 'jsonl', 'path': '%s', 'weight': 2.0}]"
             % (tmp_path / "cats.jsonl"))
  dc = train_config.data_config(c)
  assert [(s.name, s.weight) for s in dc.sources] == [("mine", 2.0)]


def test_sources_override_rejects_what_it_cannot_read(tmp_path):
  with pytest.raises(ValueError, match="cannot tell the source type"):
    DataConfig.from_config(dict(sources=("data/manifest.txt",)))
  dc = DataConfig.from_config(dict(sources=("parquet:/d/x.pq", "tar:/d/shard-*.tar")))
  assert [(s.type, s.path) for s in dc.sources] == [("parquet", "/d/x.pq"), ("tar", "/d/shard-*.tar")]


def test_bagel_train_on_unusable_manifest_exits_with_histogram(tmp_path):
  _write_lines(tmp_path / "m.jsonl", [json.dumps(dict(kind="t2i", texts=["a cat"], images=["missing.png"]))] * 3)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "bagel_jax.train.cli",
         f"--config={REPO}/experiments/bagel_7b/pretrain.py:model=tiny,steps=2",
         f"--workdir={tmp_path / 'w'}", f"--config.data.sources=({str(tmp_path / 'm.jsonl')!r},)",
         "--config.data.gen_und=0.0"]
  p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
  assert p.returncode != 0
  assert "no usable record" in p.stderr and "missing_file 3" in p.stderr and "m.jsonl:1" in p.stderr, p.stderr[-3000:]
