"""What the glibc malloc tuning (bagel_jax/host_malloc.py) buys on CPU training steps.

Fresh processes alternating glibc's untouched defaults and the tuned settings, `--reps` of each, time the
median step of:
1. `official_small`: forward + loss + backward on the official-small model and row (benchmarks/train_step.py);
2. `tiny_pt`: the demo's full training step (tiny preset, PT recipe of experiments/bagel_7b/pretrain.py, AdamW,
   VAE encode inside the step; a random VAE, which costs the same as the pretrained one).
Each row also reports the process's system-CPU share (page faults and zeroing are system time).

  python benchmarks/host_malloc.py [--steps 10] [--reps 2] [--only official_small|tiny_pt]

Writes benchmarks/results/host_malloc.json. Ratios are measured in one run; absolute CPU times depend on the
machine and its load.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from bagel_jax import host_malloc  # noqa: E402  pylint: disable=wrong-import-position

# "glibc default" leaves malloc untouched: any mallopt call, even one restating a default, turns off glibc's
# dynamic mmap threshold, so each setting is measured in its own fresh process.
SETTINGS = ("glibc default", "tuned")


def official_small_step():
  """(step fn, tokens per step) of the official-small forward + loss + backward."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from benchmarks import train_step  # pylint: disable=import-outside-toplevel
  from bagel_jax.models import bagel as bagel_lib, config as config_lib  # pylint: disable=import-outside-toplevel
  c = config_lib.official_small("mot", attention_impl="auto", **train_step.LAYOUTS["unrolled"])
  batch_np, _ = train_step.official_small_row(c)
  batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
  params = bagel_lib.init_params(c, jax.random.key(0))
  vae = params.pop("vae")
  grad = jax.jit(jax.grad(lambda p, b, r: bagel_lib.loss_fn(dict(p, vae=vae), b, r, c)[0]))
  args = (params, batch, jax.random.key(1))
  return (lambda: grad(*args)), int((batch_np["modality"] != 3).sum())


def tiny_pt_step():
  """(step fn, tokens per step) of the demo's training step, fed from its own Grain pipeline."""
  from bagel_jax.train import config as train_config, inputs, trainer  # pylint: disable=import-outside-toplevel
  c = train_config.load_config(os.path.join(REPO, "experiments", "bagel_7b", "pretrain.py") + ":model=tiny")
  c.init.vae = "random"
  setup = trainer.make_setup(c)
  it = inputs.make_input(setup.run, setup.local_spec, 0, 1)
  batches = [next(it) for _ in range(8)]
  box = [trainer.create_state(setup, trainer.initial_params(setup)), 0]

  def step():
    box[0], m = setup.step_fn(box[0], batches[box[1] % len(batches)])
    box[1] += 1
    return m
  tokens = int(sum((b["modality"] != 3).sum() for b in batches) / len(batches))
  return step, tokens


def timed(fn, steps):
  import jax  # pylint: disable=import-outside-toplevel
  times = []
  r0, t_all = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t_all
  sys_s, user_s = r1.ru_stime - r0.ru_stime, r1.ru_utime - r0.ru_utime
  return dict(median_s=sorted(times)[len(times) // 2], sys_share=sys_s / max(sys_s + user_s, 1e-9),
              cpu_per_wall=(sys_s + user_s) / wall, minor_faults_per_step=(r1.ru_minflt - r0.ru_minflt) / steps)


def child(name, setting, steps):
  """One fresh process: apply `setting`, compile, warm up, time. Prints one JSON line."""
  import jax  # pylint: disable=import-outside-toplevel
  if setting == "tuned":
    assert host_malloc.set_malloc_params(host_malloc.TUNED), "mallopt refused a setting"
  fn, tokens = MAKERS[name]()
  for _ in range(3):  # compile + warm-up (the heap settles)
    jax.block_until_ready(fn())
  print(json.dumps(dict(timed(fn, steps), tokens_per_step=tokens)))


def measure(name, steps, reps):
  runs = {k: [] for k in SETTINGS}
  for rep in range(reps):
    for setting in SETTINGS:  # alternated, so slow drifts in machine load hit both
      out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", name, "--setting", setting,
                            "--steps", str(steps)], capture_output=True, text=True, check=True).stdout
      r = json.loads(out.strip().splitlines()[-1])
      runs[setting].append(r)
      print(f"{name:15s} rep {rep}  {setting:14s} {r['median_s'] * 1e3:8.1f} ms  sys {r['sys_share']:5.1%}  "
            f"minor faults/step {r['minor_faults_per_step']:9.0f}", flush=True)
  best = {k: min(v, key=lambda r: r["median_s"]) for k, v in runs.items()}
  tokens = runs["tuned"][0]["tokens_per_step"]
  return dict(tokens_per_step=tokens, runs=runs,
              speedup=best["glibc default"]["median_s"] / best["tuned"]["median_s"],
              tokens_per_s={k: tokens / v["median_s"] for k, v in best.items()})


MAKERS = {"official_small": official_small_step, "tiny_pt": tiny_pt_step}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--reps", type=int, default=2)
  ap.add_argument("--only", choices=tuple(MAKERS), default=None)
  ap.add_argument("--child", choices=tuple(MAKERS), help=argparse.SUPPRESS)
  ap.add_argument("--setting", choices=SETTINGS, help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    return child(args.child, args.setting, args.steps)
  if host_malloc._libc() is None:  # pylint: disable=protected-access
    sys.exit("host_malloc: this libc has no mallopt; nothing to measure")
  rows = {name: measure(name, args.steps, args.reps) for name in MAKERS if args.only in (None, name)}
  print(f"\n{'step':15s} {'glibc default':>14s} {'tuned':>10s} {'speedup':>8s}")
  for name, r in rows.items():
    t = r["tokens_per_s"]
    print(f"{name:15s} {t['glibc default']:10,.0f} tok/s {t['tuned']:6,.0f} tok/s {r['speedup']:7.2f}x")
  path = os.path.join(HERE, "results", "host_malloc.json")
  old = json.load(open(path)) if os.path.exists(path) else {}
  old.update(rows)
  old["host"] = dict(machine=platform.machine(), cpus=os.cpu_count(), libc=" ".join(platform.libc_ver()),
                     tuned={str(p): v for p, v in host_malloc.TUNED.items()})
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(old, f, indent=1)


if __name__ == "__main__":
  main()
