"""A tiny training workdir for the `bagel-serve` tests and the load check: two Orbax steps (100: raw weights only,
200: raw + EMA, as the trainer keeps them), metrics.jsonl with tokens seen, the loss-curves PNG, an eval
scores.json and a source image; plus a few bad inputs (a non-image named .png, a huge image)."""
from __future__ import annotations

import json
import os

import numpy as np
import orbax.checkpoint as ocp
from PIL import Image

from bagel_jax import checkpoint as ckpt_lib
from bagel_jax.data import synthetic as S
from bagel_jax.inference import model as model_lib
from bagel_jax.models import config as config_lib

CFG = config_lib.tiny("mot")
STEPS = (100, 200)
TOKENS_PER_STEP = 4096


def make_workdir(d: str) -> str:
  """Writes the workdir under `d` (created) and returns it."""
  os.makedirs(d, exist_ok=True)
  ckpt = os.path.join(d, "checkpoints")
  ckpt_lib.save_params(ckpt, model_lib.random_params(CFG, seed=4), CFG, step=STEPS[0])
  with ocp.CheckpointManager(ckpt, item_names=("params", "ema")) as mngr:
    mngr.save(STEPS[1], args=ocp.args.Composite(params=ocp.args.StandardSave(model_lib.random_params(CFG, seed=5)),
                                                ema=ocp.args.StandardSave(model_lib.random_params(CFG, seed=6))))
    mngr.wait_until_finished()
  rows = []
  for step in range(10, STEPS[1] + 1, 10):
    ce, mse = 6.0 * np.exp(-step / 80) + 1.0, 0.9 * np.exp(-step / 120) + 0.2
    rows.append(dict(step=step, loss=ce * 0.25 + mse, ce_avg=ce, mse_avg=mse, lr=1e-4,
                     tokens_seen=float(step * TOKENS_PER_STEP)))
  metrics = os.path.join(d, "metrics.jsonl")
  with open(metrics, "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in rows))
  from bagel_jax.train import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
  metrics_lib.plot_curves(metrics, os.path.join(d, "loss_curves.png"))
  with open(metrics, "a") as f:
    f.write('{"step": 201, "loss": 1.')  # a line a running trainer is still writing
  ev = os.path.join(d, "eval", f"step_{STEPS[1]}")
  os.makedirs(ev, exist_ok=True)
  with open(os.path.join(ev, "scores.json"), "w") as f:
    json.dump(dict(checkpoint=ckpt, step=STEPS[1], weights="ema",
                   scores=dict(t2i=0.125, vqa=0.375, edit=0.0, next_frame=0.0)), f)
  Image.fromarray(S.render(S.Scene((S.Obj("square", "blue", (0.5, 0.5), 0.3),)), 32)).save(
      os.path.join(d, "src.png"))
  return d


def write_bad_inputs(d: str) -> dict:
  """{"not_image": a text file named .png, "huge": a 7000x6000 PNG (42 MP, small on disk), "tiny": 4x4 px}."""
  os.makedirs(d, exist_ok=True)
  out = dict(not_image=os.path.join(d, "notes.png"), huge=os.path.join(d, "huge.png"),
             tiny=os.path.join(d, "tiny.png"))
  with open(out["not_image"], "w") as f:
    f.write("this is a text file, not a picture\n")
  Image.new("1", (7000, 6000)).save(out["huge"])
  Image.new("RGB", (4, 4), (200, 10, 10)).save(out["tiny"])
  return out
