"""Training-step throughput of the `small` preset (L=2,048) on this CPU, dense vs MoT, and the MFU the same step
would reach on a TPU topology according to the AOT roofline (bagel_jax/parallel/aot.py).

  python benchmarks/train_step.py [--steps 5] [--topology v5p:2x2x1] [--no_aot]

Writes benchmarks/results/train_step.json. CPU figures are for comparing variants in one run (ratios), not
absolute speed claims; the TPU figure is an estimate from compiled cost analysis, labelled as such.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)


def small_config(variant: str, seq: int = 2048):
  from experiments.tiny import random_smoke  # pylint: disable=import-outside-toplevel
  c = random_smoke.get_config(f"variant={variant},batch=1,seq={seq},steps=10")
  c.model.preset = "small"
  # NU + NL = 1.11 L as in the 7B recipe (experiments/common.seven_b_batch): MoT experts then run their
  # matmuls over 1.11x the row's tokens, not the 1.5x of an und buffer as long as the row.
  c.batch.update(dict(vit_capacity=seq // 4, latent_capacity=seq // 2, image_capacity=64,
                      und_capacity=seq - seq // 2 + seq // 9))
  c.train.tensorboard = False
  return c


def cpu_throughput(variant: str, steps: int):
  import jax  # pylint: disable=import-outside-toplevel
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from bagel_jax.data import examples  # pylint: disable=import-outside-toplevel
  from bagel_jax.train import inputs, trainer  # pylint: disable=import-outside-toplevel
  c = small_config(variant)
  s = trainer.make_setup(c)
  state = trainer.create_state(s)
  # A dense row: every sample kind, images up to 4x4 tokens, until 2,048 tokens are nearly full.
  batch_np = examples.random_batch(s.model_cfg, s.spec, seed=0)
  tokens = int((batch_np["modality"] != 3).sum())
  batch = inputs.to_global(batch_np, s.mesh)
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    t0 = time.time()
    state, m = s.step_fn(state, batch)
    jax.block_until_ready(m)
    compile_s = time.time() - t0
    times = []
    for _ in range(steps):
      t0 = time.time()
      state, m = s.step_fn(state, batch)
      jax.block_until_ready(m)
      times.append(time.time() - t0)
  step = sorted(times)[len(times) // 2]
  return dict(variant=variant, tokens_per_step=tokens, fill=tokens / s.spec.seq_len, median_step_s=step,
              tokens_per_s=tokens / step, first_step_incl_compile_s=compile_s, loss=float(m["loss"]),
              params=sum(int(x.size) for x in jax.tree.leaves(state.params)))


def tpu_estimate(variant: str, topology: str):
  """Run in a subprocess: libtpu must not be loaded by the CPU benchmark process (and takes the shared
  libtpu lock, so it queues behind any other AOT job). One row per chip: per-chip work equals the CPU row's."""
  code = (f"import json,sys; sys.path.insert(0,{REPO!r}); from benchmarks.train_step import small_config; "
          f"from bagel_jax.parallel import aot; c=small_config({variant!r}); c.model.dtype='bfloat16'; "
          f"c.batch.batch_size=aot.topology_name({topology!r})[2]\n"
          f"with aot.libtpu_lock(): r=aot.analyse(c,{topology!r})\nprint(json.dumps(dict(memory=r['memory_per_chip'], "
          f"roofline=r['roofline'], compiled=dict(recompute_ratio=r['compiled']['recompute_ratio']), "
          f"model_flops=r['model_flops_per_step'], device_kind=r['device_kind'])))")
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  env["PYTHONPATH"] = REPO
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=3000)
  if r.returncode:
    return dict(error=r.stderr[-2000:])
  return json.loads(r.stdout.strip().splitlines()[-1])


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--topology", default="v5p:2x2x1")
  ap.add_argument("--no_aot", action="store_true")
  ap.add_argument("--aot_only", action="store_true", help="keep the CPU rows of the existing results file")
  args = ap.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  path = os.path.join(HERE, "results", "train_step.json")
  if args.aot_only:
    with open(path) as f:
      result = json.load(f)
    rows = result["cpu"]
  else:
    rows = [cpu_throughput(v, args.steps) for v in ("dense", "mot")]
    result = dict(host=dict(machine=platform.machine(), cpus=os.cpu_count()), preset="small", seq_len=2048,
                  cpu=rows, mot_over_dense_step_time=rows[1]["median_step_s"] / rows[0]["median_step_s"])
  if not args.no_aot:
    result["tpu_aot_estimate"] = {v: tpu_estimate(v, args.topology) for v in ("dense", "mot")}
    result["tpu_aot_estimate"]["topology"] = args.topology
  print(f"{'variant':8s} {'params':>12s} {'tok/step':>9s} {'step s':>8s} {'tok/s':>8s} {'TPU MFU est.':>13s}")
  for r in rows:
    est = result.get("tpu_aot_estimate", {}).get(r["variant"], {}).get("roofline", {})
    mfu = est.get("mfu_estimate_overlapped", float("nan"))
    print(f"{r['variant']:8s} {r['params']:12,d} {r['tokens_per_step']:9d} {r['median_step_s']:8.2f} "
          f"{r['tokens_per_s']:8.0f} {mfu:13.1%}")
  print(f"MoT / dense step time on this CPU: {result['mot_over_dense_step_time']:.2f}x (same active FLOPs)")
  os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=1, default=float)


if __name__ == "__main__":
  main()
