"""`bagel-eval`: score one checkpoint on every judge-free suite; writes `scores.json` and a PNG grid of samples.

    bagel-eval --checkpoint workdirs/tiny [--out DIR] [--num-samples 4] [--num-timesteps 12] [--step N]

Python: `evaluate(checkpoint_dir, out_dir, num_samples=4, num_timesteps=12) -> dict` (the README demo calls it
after the tiny training run). The checkpoint may be a run's workdir (its `config.json` supplies image size,
tokenizer and data seed) or a checkpoint directory.

scores.json (also the returned dict): `scores` = one headline number per suite (t2i GenEval-style overall,
vqa accuracy, edit instruction-satisfied rate, next-frame hit rate); `suites` = every metric per suite (the six
GenEval tasks, VQA chance level and per-type accuracy, edit preservation error and per-op rates, next-frame
centre/pixel errors, and `vae_ceiling`: the T2I score of ground truth passed through the model's own VAE, the
best any latent generator could reach with it); `samples` = per prompt result and the checker's reason;
`settings`, `step`, `weights` (ema or params), `seconds`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import textwrap
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from bagel_jax.accelerators import use_cpu_if_no_accelerator
from bagel_jax.eval import suites as suites_lib
from bagel_jax.inference import model as model_lib

SCORES_JSON = "scores.json"
GRID_PNG = "samples.png"


def evaluate_model(model: model_lib.LoadedModel, out_dir: Optional[str], settings: suites_lib.EvalSettings,
                   suites: Sequence[str] = suites_lib.SUITES, vae_ceiling: bool = True,
                   grid: bool = True, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
  """Runs the suites on a loaded model; writes scores.json (+ samples.png) under `out_dir` when given."""
  unknown = sorted(set(suites) - set(suites_lib.ALL_SUITES))
  if unknown:
    raise ValueError(f"unknown eval suites {unknown}; choose from {suites_lib.ALL_SUITES}")
  if settings.num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {settings.num_samples}")
  t0 = time.time()
  capacity = suites_lib.capacity_for(model, settings)
  results: Dict[str, Any] = {}
  timings = {}
  for name in suites:
    t = time.time()
    results[name] = suites_lib.SUITE_FNS[name](model, settings, capacity)
    timings[name] = round(time.time() - t, 2)
  if vae_ceiling:
    t = time.time()
    results["vae_ceiling"] = suites_lib.eval_vae_ceiling(model, settings)
    timings["vae_ceiling"] = round(time.time() - t, 2)
  report = dict(
      checkpoint=model.checkpoint_dir, step=model.step, weights=model.item,
      scores=suites_lib.headline(results),
      suites={k: v["scores"] for k, v in results.items()},
      settings=dataclasses.asdict(settings), image_size=int(model.gen_size[0]), kv_capacity=capacity,
      seconds=dict(timings, total=round(time.time() - t0, 2)),
      samples=[_jsonable(x) for k in suites for x in results[k]["samples"]])
  if extra:
    report.update(extra)
  if out_dir:
    report["out_dir"] = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, SCORES_JSON), "w") as f:
      json.dump(report, f, indent=1)
    if grid:
      write_grid([x for k in suites for x in results[k]["samples"]], os.path.join(out_dir, GRID_PNG),
                 title=f"step {model.step} ({model.item})")
  return report


def evaluate(checkpoint_dir: str, out_dir: Optional[str] = None, *, num_samples: int = 4, num_timesteps: int = 12,
             step: Optional[int] = None, use_ema: bool = True, suites: Sequence[str] = suites_lib.SUITES,
             vae_ceiling: bool = True, progress: bool = False, **settings) -> Dict[str, Any]:
  """Loads `checkpoint_dir` (a run workdir or checkpoint dir), scores it, writes `<out_dir>/scores.json` and
  `<out_dir>/samples.png` (out_dir defaults to `<run workdir>/eval/step_<N>`). Extra keyword arguments are
  `EvalSettings` fields (cfg_text_scale, timestep_shift, batch_size, seed, ...)."""
  model = model_lib.load_model(checkpoint_dir, step=step, use_ema=use_ema)
  data = ((model.run_config or {}).get("data") or {}) if isinstance(model.run_config, dict) else {}
  settings.setdefault("data_seed", int(data.get("seed", 0) or 0))
  settings.setdefault("num_frames", int(data.get("num_frames", 4) or 4))
  s = suites_lib.EvalSettings(num_samples=num_samples, num_timesteps=num_timesteps, progress=progress, **settings)
  if out_dir is None:
    out_dir = default_out_dir(model.checkpoint_dir, f"step_{model.step}")
  return evaluate_model(model, out_dir, s, suites, vae_ceiling)


def default_out_dir(checkpoint_dir: str, name: str) -> str:
  """`<run workdir>/eval/<name>`: beside the Orbax root (the trainer's `<workdir>/checkpoints`), not inside it."""
  return os.path.join(os.path.dirname(os.path.abspath(checkpoint_dir)), "eval", name)


# ----------------------------------------------------------------------------------------------------------
# Output.
# ----------------------------------------------------------------------------------------------------------

def _jsonable(sample: Dict[str, Any]) -> Dict[str, Any]:
  return {k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in sample.items()
          if not isinstance(v, np.ndarray)}


def write_grid(samples: List[Dict[str, Any]], path: str, scale: int = 3, per_row: int = 6,
               title: str = "") -> str:
  """A PNG of the samples: one cell per sample (input | output for edits and next frames), upscaled, with the
  prompt (and the answer for VQA) underneath, framed green when correct and red when not."""
  if not samples:
    raise ValueError("write_grid: no samples")
  font = ImageFont.load_default(size=11)
  side = samples[0]["image"].shape[0] * scale
  cell_w = 2 * side + 6
  text_h = 44
  cell_h = side + text_h + 6
  rows = -(-len(samples) // per_row)
  head = 18 if title else 0
  canvas = Image.new("RGB", (per_row * cell_w, rows * cell_h + head), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  if title:
    draw.text((4, 2), title, fill=(0, 0, 0), font=font)
  for i, s in enumerate(samples):
    x, y = (i % per_row) * cell_w, (i // per_row) * cell_h + head
    color = (30, 160, 60) if s.get("correct") else (200, 40, 40)
    draw.rectangle((x + 1, y + 1, x + cell_w - 2, y + side + 4), outline=color, width=2)
    imgs = [s["source"], s["image"]] if "source" in s else [s["image"]]
    for j, im in enumerate(imgs):
      big = Image.fromarray(np.asarray(im, np.uint8)).resize((side, side), Image.NEAREST)
      canvas.paste(big, (x + 3 + j * side, y + 3))
    label = f"[{s['suite']}/{s['task']}] {s['prompt']}"
    if s["suite"] == "vqa":
      label += f" -> {s.get('answer', '')!r} (truth {s.get('truth', '')})"
    lines = textwrap.wrap(label, width=max(12, cell_w // 6))[:3]
    draw.multiline_text((x + 3, y + side + 6), "\n".join(lines), fill=(0, 0, 0), font=font, spacing=1)
  canvas.save(path)
  return path


# ----------------------------------------------------------------------------------------------------------
# CLI.
# ----------------------------------------------------------------------------------------------------------

def main(argv=None):
  use_cpu_if_no_accelerator()  # before JAX picks a backend: no libtpu noise on CPU-only machines
  ap = argparse.ArgumentParser(prog="bagel-eval", description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--checkpoint", required=True, help="run workdir or checkpoint directory")
  ap.add_argument("--out", default=None, help="output directory (default <run workdir>/eval/step_<N>)")
  ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  ap.add_argument("--raw", action="store_true", help="evaluate the raw weights instead of the EMA")
  ap.add_argument("--num-samples", type=int, default=4, help="prompts per task")
  ap.add_argument("--num-timesteps", type=int, default=12)
  ap.add_argument("--timestep-shift", type=float, default=3.0)
  ap.add_argument("--cfg-text-scale", type=float, default=4.0)
  ap.add_argument("--cfg-img-scale", type=float, default=1.5)
  ap.add_argument("--batch-size", type=int, default=0, help="requests per batch (default num-samples)")
  ap.add_argument("--suites", default=",".join(suites_lib.SUITES))
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--no-vae-ceiling", action="store_true")
  ap.add_argument("--progress", action="store_true", help="progress bar over denoising steps")
  args = ap.parse_args(argv)
  try:
    report = evaluate(args.checkpoint, args.out, num_samples=args.num_samples, num_timesteps=args.num_timesteps,
                      step=args.step, use_ema=not args.raw, suites=[s for s in args.suites.split(",") if s],
                      vae_ceiling=not args.no_vae_ceiling, progress=args.progress,
                      timestep_shift=args.timestep_shift, cfg_text_scale=args.cfg_text_scale,
                      cfg_img_scale=args.cfg_img_scale, batch_size=args.batch_size, seed=args.seed)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"bagel-eval: error: {e}") from None
  out = report["out_dir"]
  print(json.dumps(dict(step=report["step"], scores=report["scores"], suites=report["suites"]), indent=1))
  print(f"wrote {os.path.join(out, SCORES_JSON)} and {os.path.join(out, GRID_PNG)}")


if __name__ == "__main__":
  main()
