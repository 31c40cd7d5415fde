"""Own data (issue #15): the manifest helper, the subword tokenizer, the own-data experiment configs.

Images are drawn here with Pillow (digits in the default bitmap font on coloured backgrounds), not taken from
the synthetic renders."""
import json
import os

import numpy as np
import pytest
from PIL import Image, ImageDraw

from bagel_jax.data import manifest, tokenizer as tok_lib, train_tokenizer
from bagel_jax.train import config as train_config

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 70, 220), "yellow": (230, 210, 40)}
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def draw_digit(digit: int, color: str, size: int = 32, seed: int = 0) -> Image.Image:
  """A digit in the default font, scaled up, on a light background with a little jitter."""
  rng = np.random.default_rng(seed)
  small = Image.new("RGB", (8, 12), (245, 245, 240))
  ImageDraw.Draw(small).text((1, 0), str(digit), fill=COLORS[color])
  im = small.resize((size * 2 // 3, size), Image.NEAREST)
  canvas = Image.new("RGB", (size, size), (245, 245, 240))
  canvas.paste(im, (int(rng.integers(0, size // 3 + 1)), 0))
  return canvas


def make_folder(root, n=24, layout="captions"):
  """n captioned images: images/ + captions.tsv ('captions'), sidecar .txt ('sidecar') or classes/<label>/."""
  os.makedirs(root / "images", exist_ok=True)
  rows = []
  for i in range(n):
    d, c = i % 10, list(COLORS)[i % len(COLORS)]
    im = draw_digit(d, c, seed=i)
    if layout == "classes":
      os.makedirs(root / "classes" / DIGITS[d], exist_ok=True)
      im.save(root / "classes" / DIGITS[d] / f"{i:03d}.png")
      continue
    name = f"{i:03d}.png"
    im.save(root / "images" / name)
    cap = f"a {c} digit {DIGITS[d]}"
    rows.append(f"{name}\t{cap}")
    if layout == "sidecar":
      (root / "images" / f"{i:03d}.txt").write_text(cap + "\n")
  if layout == "captions":
    (root / "captions.tsv").write_text("file\tcaption\n" + "\n".join(rows) + "\n")


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_manifest_from_captions_file(tmp_path):
  make_folder(tmp_path)
  (tmp_path / "captions.tsv").write_text((tmp_path / "captions.tsv").read_text() + "missing.png\ta ghost\n"
                                         + "000.png\tthe first digit again\n")
  out = tmp_path / "data" / "t2i.jsonl"
  manifest.main(["captions", "--images", str(tmp_path / "images"), "--captions", str(tmp_path / "captions.tsv"),
                 "--out", str(out), "--holdout", "4"])
  recs, held = read_jsonl(out), read_jsonl(tmp_path / "data" / "t2i_heldout.jsonl")
  assert len(recs) + len(held) == 24 and len(held) == 4
  first = [r for r in recs + held if r["images"] == ["../images/000.png"]]
  assert first and first[0]["texts"] == ["a red digit zero", "the first digit again"]  # relative to the manifest
  assert all(r["kind"] == "t2i" and os.path.isfile(out.parent / r["images"][0]) for r in recs)


def test_manifest_from_sidecar_captions_with_check(tmp_path, capsys):
  make_folder(tmp_path, 6, layout="sidecar")
  (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG not really")
  (tmp_path / "images" / "broken.txt").write_text("a broken file\n")
  (tmp_path / "images" / "nocap.png").write_bytes((tmp_path / "images" / "000.png").read_bytes())
  manifest.main(["captions", "--images", str(tmp_path / "images"), "--out", str(tmp_path / "m.jsonl"), "--check"])
  recs = read_jsonl(tmp_path / "m.jsonl")
  assert len(recs) == 6 and recs[0] == dict(kind="t2i", texts=["a red digit zero"], images=["images/000.png"])
  out = capsys.readouterr().out
  assert "2 image(s) left out" in out and "broken.png: does not decode" in out and "nocap.png: no caption" in out


def test_manifest_from_class_folders_with_vqa(tmp_path):
  make_folder(tmp_path, 20, layout="classes")
  manifest.main(["classes", "--root", str(tmp_path / "classes"), "--template", "a handwritten {label}",
                 "--out", str(tmp_path / "t2i.jsonl"), "--vqa-out", str(tmp_path / "vqa.jsonl"),
                 "--question", "which digit is this?"])
  t2i, vqa = read_jsonl(tmp_path / "t2i.jsonl"), read_jsonl(tmp_path / "vqa.jsonl")
  assert len(t2i) == len(vqa) == 20
  assert t2i[0] == dict(kind="t2i", texts=["a handwritten eight"], images=["classes/eight/008.png"])
  assert vqa[0] == dict(kind="vqa", texts=["which digit is this?", "eight"], images=["classes/eight/008.png"])


def test_manifest_errors_are_clear(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no images found in class sub-folders"):
    manifest.make_manifests("classes", str(tmp_path / "m.jsonl"), root=str(tmp_path / "empty"))
  with pytest.raises(ValueError, match="must contain"):
    manifest.make_manifests("classes", str(tmp_path / "m.jsonl"), root=str(tmp_path), template="a photo")


def test_subword_tokenizer_trains_and_loads(tmp_path):
  make_folder(tmp_path, 40)
  manifest.main(["captions", "--images", str(tmp_path / "images"), "--captions", str(tmp_path / "captions.tsv"),
                 "--out", str(tmp_path / "m.jsonl")])
  train_tokenizer.main(["--manifest", str(tmp_path / "m.jsonl"), "--vocab-size", "300",
                        "--out", str(tmp_path / "tok.json")])
  tok = tok_lib.load_tokenizer(str(tmp_path / "tok.json"))
  assert isinstance(tok, tok_lib.HFTokenizer) and tok.vocab_size <= 300
  from bagel_jax.layout import LayoutConfig
  from bagel_jax.models.config import tiny
  assert tok.special == LayoutConfig.from_model_config(tiny()).special  # the tiny layout's fixed ids
  caption = "a yellow digit seven"
  ids = tok.encode(caption)
  assert tok.decode(ids) == caption
  word = tok_lib.WordTokenizer.load()
  assert len(ids) <= 6 < len(word.encode(caption))  # 'yellow'/'seven' are spelled by the synthetic vocabulary
  accented = tok.encode("un café crème")  # bytes it never saw as words: no <unk>, round-trips
  assert tok.unk not in accented and tok.decode(accented) == "un café crème"
  assert word.unk in word.encode("un café crème")
  with pytest.raises(ValueError, match="vocab-size"):
    train_tokenizer.train(["x"], 100, str(tmp_path / "t.json"))


def _own_config(tmp_path, file, arg):
  import importlib
  mod = importlib.import_module(f"experiments.own_data.{file}")
  return mod.get_config(arg)


def test_own_data_configs_parse_typed_args(tmp_path):
  make_folder(tmp_path, 20, layout="classes")
  manifest.main(["classes", "--root", str(tmp_path / "classes"), "--out", str(tmp_path / "t2i.jsonl"),
                 "--vqa-out", str(tmp_path / "vqa.jsonl")])
  c = _own_config(tmp_path, "t2i", f"manifest={tmp_path / 't2i.jsonl'},steps=7,image_size=32")
  assert c.train.steps == 7 and c.data.source == "pipeline" and c.init.vae == "synthetic"
  dc = train_config.data_config(c)
  assert [(s.name, s.group) for s in dc.sources] == [("t2i", "gen")]
  c = _own_config(tmp_path, "t2i_vqa", f"t2i={tmp_path / 't2i.jsonl'},vqa={tmp_path / 'vqa.jsonl'},gen_und=3")
  w = train_config.data_config(c).weights()
  assert w == {"t2i": 3.0, "vqa": 1.0}
  for bad, msg in ((f"manifest={tmp_path / 'nope.jsonl'}", "no such file"), ("", "manifest=PATH is required"),
                   (f"manifest={tmp_path / 't2i.jsonl'},image_size=30", "multiple of 8"),
                   (f"manifest={tmp_path / 't2i.jsonl'},steps=x", "expected int"),
                   (f"manifest={tmp_path / 't2i.jsonl'},vae=/no/such/vae", "VAE checkpoint")):
    with pytest.raises(ValueError, match=msg):
      _own_config(tmp_path, "t2i", bad)


def test_own_data_config_startup_report(tmp_path, capsys):
  from bagel_jax.train import config as train_config, inputs
  make_folder(tmp_path, 12)
  manifest.main(["captions", "--images", str(tmp_path / "images"), "--captions", str(tmp_path / "captions.tsv"),
                 "--out", str(tmp_path / "m.jsonl")])
  train_tokenizer.main(["--manifest", str(tmp_path / "m.jsonl"), "--vocab-size", "300",
                        "--out", str(tmp_path / "tok.json")])
  c = _own_config(tmp_path, "t2i", f"manifest={tmp_path / 'm.jsonl'},tokenizer={tmp_path / 'tok.json'}")
  run = train_config.resolve(c, 1, 1)
  inputs.make_input(run, run.spec, 0, 1).close()
  out = capsys.readouterr().out
  assert "t2i" in out and "12 records; first 12: 12 ok" in out
  assert f"tokenizer: HFTokenizer {tmp_path / 'tok.json'} (vocab 300" in out or "tokenizer: HFTokenizer" in out
  assert "<unk> rate 0.00%" in out


def test_tokenizer_larger_than_the_model_is_refused(tmp_path):
  from bagel_jax.train import config as train_config, inputs
  make_folder(tmp_path, 12)
  manifest.main(["captions", "--images", str(tmp_path / "images"), "--captions", str(tmp_path / "captions.tsv"),
                 "--out", str(tmp_path / "m.jsonl")])
  texts = [f"word{i} token{i * 7} other{i * 13}" for i in range(400)]
  train_tokenizer.train(texts, 1200, str(tmp_path / "big.json"), min_frequency=1)
  c = _own_config(tmp_path, "t2i", f"manifest={tmp_path / 'm.jsonl'},tokenizer={tmp_path / 'big.json'}")
  run = train_config.resolve(c, 1, 1)
  with pytest.raises(ValueError, match="more than the model's vocabulary of 512"):
    inputs.make_input(run, run.spec, 0, 1)



def test_init_vae_loads_a_converted_flux_ae_checkpoint(tmp_path):
  """`init.vae=<bagel-jax checkpoint>` (what `bagel-convert flux-ae --preset P` writes) loads its params['vae']
  with the log-variance pinned; another architecture's VAE is refused."""
  import dataclasses
  from bagel_jax import checkpoint as ckpt_lib
  from bagel_jax.inference import model as model_lib
  from bagel_jax.models.config import tiny
  from bagel_jax.train import vae_pretrain
  cfg = tiny()
  params = model_lib.random_params(cfg, seed=1)
  ckpt_lib.save_params(str(tmp_path / "flux"), params, cfg)
  got = vae_pretrain.load_vae(str(tmp_path / "flux"), cfg.vae)
  want = vae_pretrain.pin_logvar(params["vae"], cfg.vae)
  for a, b in zip(*(jax_leaves(t) for t in (got, want))):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="differs from the model's"):
    vae_pretrain.load_vae(str(tmp_path / "flux"), dataclasses.replace(cfg.vae, z_channels=cfg.vae.z_channels * 2))
  with pytest.raises(FileNotFoundError, match="not a VAE checkpoint"):
    vae_pretrain.load_vae(str(tmp_path), cfg.vae)


def jax_leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(tree)]
