"""The measured own-data run: scikit-learn's bundled handwritten digits, through the documented commands.

  pip install scikit-learn        # only for this script: the images ship inside the package (no download)
  python -m experiments.own_data.digits --workdir workdirs/digits --out experiments/results/own_data

Data: `sklearn.datasets.load_digits()` (1,797 8x8 greyscale scans of handwritten digits, 10 classes, bundled
with scikit-learn, originally UCI "Optical Recognition of Handwritten Digits"), drawn black on white and
upscaled to 32 px, one folder per class; the caption of each image is "a handwritten digit <name>".
Stages (each a documented command, run as a subprocess; a stage whose output exists is skipped, so the script
resumes): the manifest helper with a 300-image held-out split, the subword tokenizer, the VAE recipe, the
tiny T2I model (`experiments/own_data/t2i.py`), `bagel-sample --batch` for N prompts per digit.

Judge: logistic regression on 8x8 area-averaged greyscale pixels, trained on the training split's originals.
It scores the held-out originals (the judge's own accuracy), the VAE's reconstructions of the held-out images
(the ceiling any generator decoded by this VAE can reach) and the generated samples, labelled by the digit their
prompt names. Writes REPORT.md, results.json, the reconstruction grid, a sample grid and the loss curves to
--out.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
from PIL import Image

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def digit_image(x8: np.ndarray, size: int) -> Image.Image:
  """8x8 values 0..16 (16 = ink) -> black-on-white RGB at size x size (bicubic, as a scan would be)."""
  g = (255.0 - np.asarray(x8, np.float64).reshape(8, 8) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
  return Image.fromarray(g).resize((size, size), Image.BICUBIC).convert("RGB")


def features(images: np.ndarray) -> np.ndarray:
  """[N, S, S, 3] uint8 -> [N, 64] judge features: greyscale ink (0..16), area-averaged to 8x8."""
  x = np.asarray(images, np.float64).mean(-1)
  n, s = x.shape[0], x.shape[1]
  x = x.reshape(n, 8, s // 8, 8, s // 8).mean((2, 4))
  return ((255.0 - x) * (16.0 / 255.0)).reshape(n, 64)


def write_folder(root: str, size: int) -> None:
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  d = load_digits()
  for i, (x, y) in enumerate(zip(d.data, d.target)):
    folder = os.path.join(root, NAMES[int(y)])
    os.makedirs(folder, exist_ok=True)
    digit_image(x, size).save(os.path.join(folder, f"{i:04d}.png"))


def run(cmd, log_path):
  t0 = time.time()
  print("$", " ".join(cmd), flush=True)
  with open(log_path, "a") as log:
    p = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  if p.returncode:
    raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}; see {log_path}")
  return time.time() - t0


def load_split(manifest: str, root: str):
  rows = [json.loads(l) for l in open(manifest)]
  base = os.path.dirname(os.path.abspath(manifest))
  imgs = np.stack([np.asarray(Image.open(os.path.join(base, r["images"][0])).convert("RGB")) for r in rows])
  labels = np.array([NAMES.index(r["texts"][0].split()[-1]) for r in rows])
  del root
  return imgs, labels


def grid(images, rows: int, path: str, scale: int = 2) -> None:
  images = list(images)
  cols = int(np.ceil(len(images) / rows))
  h, w = images[0].shape[:2]
  canvas = np.full((rows * h, cols * w, 3), 255, np.uint8)
  for k, im in enumerate(images):
    r, c = divmod(k, cols)
    canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] = im
  Image.fromarray(canvas).resize((cols * w * scale, rows * h * scale), Image.NEAREST).save(path)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", default="workdirs/digits")
  ap.add_argument("--out", default="experiments/results/own_data")
  ap.add_argument("--image-size", type=int, default=32)
  ap.add_argument("--vae-steps", type=int, default=1200)
  ap.add_argument("--t2i-steps", type=int, default=1500)
  ap.add_argument("--samples-per-digit", type=int, default=10)
  ap.add_argument("--num-timesteps", type=int, default=25)
  ap.add_argument("--cfg", type=float, default=4.0)
  args = ap.parse_args(argv)
  w = os.path.abspath(args.workdir)
  out = os.path.abspath(args.out)
  os.makedirs(w, exist_ok=True)
  os.makedirs(out, exist_ok=True)
  log = os.path.join(w, "log.txt")
  py = [sys.executable, "-m"]
  bin_dir = os.path.dirname(sys.executable)
  train_cmd = [os.path.join(bin_dir, "bagel-train")]
  sample_cmd = [os.path.join(bin_dir, "bagel-sample")]
  prev = os.path.join(out, "results.json")  # stage times of earlier invocations (stages that ran then)
  times = json.load(open(prev)).get("stage_seconds", {}) if os.path.exists(prev) else {}
  t_all = time.time()
  data = os.path.join(w, "data")
  if not os.path.exists(os.path.join(data, "t2i.jsonl")):
    write_folder(os.path.join(data, "classes"), args.image_size)
    times["manifest"] = run(py + ["bagel_jax.data.manifest", "classes", "--root", os.path.join(data, "classes"),
                                  "--template", "a handwritten digit {label}", "--out",
                                  os.path.join(data, "t2i.jsonl"), "--holdout", "300"], log)
  if not os.path.exists(os.path.join(data, "tokenizer.json")):
    times["tokenizer"] = run(py + ["bagel_jax.data.train_tokenizer", "--manifest", os.path.join(data, "t2i.jsonl"),
                                   "--vocab-size", "512", "--out", os.path.join(data, "tokenizer.json")], log)
  vae = os.path.join(w, "vae")
  if not os.path.exists(os.path.join(vae, "eval.json")) or \
      json.load(open(os.path.join(vae, "eval.json")))["step"] < args.vae_steps:
    times["vae"] = run(train_cmd + [
        f"--config={REPO}/experiments/own_data/vae.py:manifest={data}/t2i.jsonl,heldout={data}/t2i_heldout.jsonl,"
        f"steps={args.vae_steps},image_size={args.image_size},log_every=50,checkpoint_every=300",
        f"--workdir={vae}"], log)
  t2i = os.path.join(w, "t2i")
  if not os.path.exists(os.path.join(t2i, "summary.json")):
    times["t2i"] = run(train_cmd + [
        f"--config={REPO}/experiments/own_data/t2i.py:manifest={data}/t2i.jsonl,steps={args.t2i_steps},"
        f"image_size={args.image_size},vae={vae},tokenizer={data}/tokenizer.json,log_every=50,"
        f"checkpoint_every=500", f"--workdir={t2i}"], log)
  samples = os.path.join(w, "samples")
  if not os.path.exists(os.path.join(samples, "results.jsonl")):
    prompts = os.path.join(w, "prompts.jsonl")
    with open(prompts, "w") as f:
      for k in range(args.samples_per_digit):
        for d in NAMES:
          f.write(json.dumps(dict(prompt=f"a handwritten digit {d}")) + "\n")  # no seed: each its own
    times["sample"] = run(sample_cmd + ["--checkpoint", t2i, "--batch", prompts, "--out-dir", samples,
                                        "--num-timesteps", str(args.num_timesteps), "--cfg-text-scale",
                                        str(args.cfg), "--batch-size", "10"], log)
  # ---- judge ----
  from sklearn.linear_model import LogisticRegression  # pylint: disable=import-outside-toplevel
  from bagel_jax.models.config import get_preset  # pylint: disable=import-outside-toplevel
  from bagel_jax.train import vae_pretrain, vae_recipe  # pylint: disable=import-outside-toplevel
  tr_x, tr_y = load_split(os.path.join(data, "t2i.jsonl"), data)
  te_x, te_y = load_split(os.path.join(data, "t2i_heldout.jsonl"), data)
  judge = LogisticRegression(max_iter=5000, C=0.5).fit(features(tr_x), tr_y)
  acc_real = float((judge.predict(features(te_x)) == te_y).mean())
  cfg = get_preset("tiny").vae
  params = vae_pretrain.load_vae(vae, cfg)
  rec = vae_recipe.reconstruct(cfg, params, te_x.astype(np.float32) * (2 / 255.0) - 1.0)
  rec8 = np.clip((rec + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
  acc_rec = float((judge.predict(features(rec8)) == te_y).mean())
  psnr = vae_recipe.psnr(te_x.astype(np.float32) * (2 / 255.0) - 1.0, rec)
  rows = [json.loads(l) for l in open(os.path.join(samples, "results.jsonl"))]
  gen = np.stack([np.asarray(Image.open(os.path.join(samples, r["out"])).convert("RGB")) for r in rows])
  gen_y = np.array([NAMES.index(r["prompt"].split()[-1]) for r in rows])
  pred = judge.predict(features(gen))
  acc_gen = float((pred == gen_y).mean())
  per_digit = {NAMES[d]: float((pred[gen_y == d] == d).mean()) for d in range(10)}
  distinct = float(np.mean([len({im.tobytes() for im in gen[gen_y == d]}) for d in range(10)]))
  # memorisation check: distance (8x8 features) from each sample to its nearest training image, against the
  # same distance for held-out real images (which the model never saw)
  ftr = features(tr_x)

  def nn_dist(f):
    return np.sqrt(((f[:, None, :] - ftr[None]) ** 2).sum(-1)).min(1)

  nn_gen, nn_real = nn_dist(features(gen)), nn_dist(features(te_x))
  summary = json.load(open(os.path.join(t2i, "summary.json")))
  vae_eval = json.load(open(os.path.join(vae, "eval.json")))
  res = dict(data="sklearn.datasets.load_digits (bundled with scikit-learn)", train_images=int(len(tr_x)),
             heldout_images=int(len(te_x)), image_size=args.image_size, judge="logistic regression on 8x8 pixels",
             judge_accuracy_real=acc_real, judge_accuracy_vae_recon=acc_rec, vae_psnr_heldout=psnr,
             vae_psnr_heldout_eval_json=vae_eval["psnr_heldout"], vae_steps=args.vae_steps,
             t2i_steps=summary["final_step"], t2i_final_loss=summary.get("loss"), generator_accuracy=acc_gen,
             generator_over_ceiling=acc_gen / max(acc_rec, 1e-9), per_digit_accuracy=per_digit,
             distinct_samples_per_digit=distinct, nn_train_distance_samples_median=float(np.median(nn_gen)),
             nn_train_distance_heldout_real_median=float(np.median(nn_real)), samples=int(len(gen)), num_timesteps=args.num_timesteps,
             cfg_text_scale=args.cfg, stage_seconds=times, total_seconds_this_invocation=time.time() - t_all)
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(res, f, indent=1)
  pick = np.concatenate([np.flatnonzero(te_y == d)[:2] for d in range(10)])  # two held-out images per digit
  grid(np.concatenate([te_x[pick], rec8[pick]]), 2, os.path.join(out, "vae_recon_grid.png"), scale=3)
  shutil.copyfile(os.path.join(t2i, "loss_curves.png"), os.path.join(out, "t2i_loss_curves.png"))
  shutil.copyfile(os.path.join(vae, "loss_curves.png"), os.path.join(out, "vae_loss_curves.png"))
  order = np.argsort(gen_y, kind="stable")
  grid(gen[order], 10, os.path.join(out, "t2i_samples.png"))
  print(json.dumps(res, indent=1))


if __name__ == "__main__":
  main()
