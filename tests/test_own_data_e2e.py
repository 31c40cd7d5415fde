"""End to end on one's own data (issue #15), through the commands docs/data.md documents:

  folder of captioned images (drawn here with Pillow, not the synthetic renders)
  -> python -m bagel_jax.data.manifest            (manifest + held-out split)
  -> python -m bagel_jax.data.train_tokenizer     (subword tokenizer)
  -> bagel-train --config experiments/own_data/vae.py:manifest=...          (VAE: checkpoints, PSNR, grid)
  -> bagel-train --config experiments/own_data/t2i.py:manifest=...,vae=...,tokenizer=...   (tiny BAGEL)
  -> bagel-sample --checkpoint W --batch prompts.jsonl

and every artifact is checked. `test_own_data_end_to_end` runs the commands as subprocesses (slow: four JAX
start-ups and compiles); `test_own_data_in_process` is the default-run variant: the same steps in one process
at 16 px (a few VAE steps, with the VAE recipe's exact resume; one packed batch of the t2i config).
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from test_own_data import make_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cmd(name):
  exe = os.path.join(os.path.dirname(sys.executable), name)
  if os.path.exists(exe):
    return [exe]
  module = {"bagel-train": "bagel_jax.train.cli", "bagel-sample": "bagel_jax.inference.cli"}[name]
  return [sys.executable, "-c", f"import sys; from {module} import "
          f"{'main' if name == 'bagel-train' else 'sample_main'} as m; sys.exit(m())"]


def _run(cmd, cwd):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, f"{' '.join(map(str, cmd))}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
  return p.stdout + p.stderr


def _check_vae_workdir(w, steps):
  ev = json.load(open(os.path.join(w, "eval.json")))
  assert ev["step"] == steps and ev["heldout_images"] > 0
  assert ev["psnr_heldout"] > ev["psnr_heldout_of_grey"]  # better than a flat grey guess even this early
  assert Image.open(os.path.join(w, "recon_grid.png")).size[0] > 0
  assert os.path.isfile(os.path.join(w, "checkpoints", "vae_config.json"))
  rows = [json.loads(l) for l in open(os.path.join(w, "metrics.jsonl"))]
  assert rows[-1]["step"] == steps and all(np.isfinite(r["loss"]) for r in rows)
  return ev


@pytest.mark.slow
def test_own_data_end_to_end(tmp_path):
  data = tmp_path / "data"
  make_folder(data, 40)
  py = [sys.executable, "-m"]
  out = _run(py + ["bagel_jax.data.manifest", "captions", "--images", str(data / "images"), "--captions",
                   str(data / "captions.tsv"), "--out", str(data / "t2i.jsonl"), "--holdout", "8", "--check"], REPO)
  assert "wrote 32 records" in out and "wrote 8 records" in out
  out = _run(py + ["bagel_jax.data.train_tokenizer", "--manifest", str(data / "t2i.jsonl"), "--vocab-size", "320",
                   "--out", str(data / "tokenizer.json")], REPO)
  vocab = int(re.search(r"vocab (\d+) \(specials at ids 0-7\)", out).group(1))
  assert vocab <= 320  # BPE stops early once no pair is frequent enough to merge
  vae = tmp_path / "vae"
  _run(_cmd("bagel-train") + [f"--config={REPO}/experiments/own_data/vae.py:manifest={data / 't2i.jsonl'},"
                              f"heldout={data / 't2i_heldout.jsonl'},steps=30,log_every=10,image_size=32",
                              f"--workdir={vae}"], REPO)
  _check_vae_workdir(vae, 30)
  run = tmp_path / "t2i"
  out = _run(_cmd("bagel-train") + [
      f"--config={REPO}/experiments/own_data/t2i.py:manifest={data / 't2i.jsonl'},steps=4,log_every=2,"
      f"vae={vae},tokenizer={data / 'tokenizer.json'},batch_size=2,seq_len=128", f"--workdir={run}"], REPO)
  assert "32 records; first 32: 32 ok" in out and "tokenizer: HFTokenizer" in out and "<unk> rate 0.00%" in out
  assert "in 0 = out" not in out and "skipped 0" in out  # the per-log-step data line
  summary = json.load(open(run / "summary.json"))
  assert summary["final_step"] == 4 and np.isfinite(summary["loss"])
  assert os.path.isdir(run / "checkpoints" / "4")
  cfg = json.load(open(run / "config.json"))
  assert cfg["init"]["vae"] == str(vae) and cfg["data"]["tokenizer"] == str(data / "tokenizer.json")
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("\n".join(json.dumps(dict(prompt=p)) for p in
                               ["a red digit seven", "a red digit seven", "a blue digit two"]) + "\n")
  out = _run(_cmd("bagel-sample") + ["--checkpoint", str(run), "--batch", str(prompts), "--out-dir",
                                     str(tmp_path / "samples"), "--num-timesteps", "4"], REPO)
  assert f"step 4 (EMA weights)" in out and f"tokenizer {data / 'tokenizer.json'} (HFTokenizer, vocab {vocab})" in out
  imgs = [np.asarray(Image.open(tmp_path / "samples" / f"{i:05d}.png")) for i in range(3)]
  assert all(im.shape == (32, 32, 3) for im in imgs) and not np.array_equal(imgs[0], imgs[1])


def _small_folder(tmp_path):
  from bagel_jax.data import manifest, train_tokenizer
  data = tmp_path / "data"
  make_folder(data, 30)
  manifest.main(["captions", "--images", str(data / "images"), "--captions", str(data / "captions.tsv"),
                 "--out", str(data / "t2i.jsonl"), "--holdout", "6"])
  train_tokenizer.main(["--manifest", str(data / "t2i.jsonl"), "--vocab-size", "300",
                        "--out", str(data / "tokenizer.json")])
  return data, (f"manifest={data / 't2i.jsonl'},heldout={data / 't2i_heldout.jsonl'},image_size=16,batch_size=4,"
                "log_every=1,checkpoint_every=2")


def test_own_data_in_process(tmp_path, capsys):
  """The same path in one process, small: manifest, tokenizer, the VAE recipe through `vae_recipe.train` (2
  steps, then resumed to 3), `init.vae=<that workdir>` accepted and loaded, the t2i config's start-up scan and
  one packed batch with the trained tokenizer."""
  from bagel_jax.train import config as train_config, inputs
  from bagel_jax.train import vae_pretrain, vae_recipe
  from experiments.own_data import t2i, vae as vae_config
  data, arg = _small_folder(tmp_path)
  a = tmp_path / "vae"
  vae_recipe.train(vae_config.get_config(arg + ",steps=2"), str(a))
  vae_recipe.train(vae_config.get_config(arg + ",steps=3"), str(a))
  assert "vae: resumed from step 2" in capsys.readouterr().out
  _check_vae_workdir(a, 3)
  assert [r["step"] for r in map(json.loads, open(a / "metrics.jsonl"))] == [1, 2, 3]
  c = t2i.get_config(f"manifest={data / 't2i.jsonl'},steps=1,image_size=16,vae={a},"
                     f"tokenizer={data / 'tokenizer.json'},batch_size=2,seq_len=64,log_every=1")
  run = train_config.resolve(c, 1, 1)  # accepts init.vae=<path>
  it = inputs.make_input(run, run.spec, 0, 1)  # prints the start-up data report
  out = capsys.readouterr().out
  assert "24 records; first 24: 24 ok" in out and f"tokenizer: HFTokenizer {data / 'tokenizer.json'}" in out
  model_cfg = run.model
  vae = vae_pretrain.load_vae(str(a), model_cfg.vae)  # the latest step, log-variance pinned for the trainer
  z = model_cfg.vae.z_channels
  np.testing.assert_array_equal(np.asarray(vae["encoder"]["conv_out"]["bias"][z:]), vae_pretrain.PINNED_LOGVAR)
  batch = next(it)
  assert int(batch["num_documents"].sum()) > 0 and it.stats["skipped"] == 0
  it.close()
  c.init.vae = str(tmp_path / "nope")
  with pytest.raises(ValueError, match="init.vae=.*nope.*not one of"):
    train_config.resolve(c, 1, 1)


@pytest.mark.slow
def test_vae_recipe_resume_is_exact(tmp_path):
  from bagel_jax.train import vae_recipe
  from experiments.own_data import vae as vae_config
  _, arg = _small_folder(tmp_path)
  a, b = tmp_path / "a", tmp_path / "b"
  vae_recipe.train(vae_config.get_config(arg + ",steps=2"), str(a))
  vae_recipe.train(vae_config.get_config(arg + ",steps=4"), str(a))
  vae_recipe.train(vae_config.get_config(arg + ",steps=4"), str(b))
  ea, eb = _check_vae_workdir(a, 4), _check_vae_workdir(b, 4)
  assert ea["psnr_heldout"] == pytest.approx(eb["psnr_heldout"], abs=1e-5)
