"""Fault injection on the tiny pre-training recipe: does a run always finish, with the parameters it would have
had without the fault?

Runs `bagel-train --config experiments/bagel_7b/pretrain.py:model=tiny,steps=N` as a user would (separate
processes, relaunching the same command after each fault) through:

  kill during a save   SIGKILL right after an async checkpoint save started (still in flight)
  corrupt newest step  SIGKILL after a save landed, then the newest step's parameter data truncated
  NaN                  the parameters turned NaN after one step (a transient blow-up); relaunch without it
  disk full            the workdir on a small tmpfs this script mounts (root only) and fills, freed after the
                       failure

and prints a table: fault -> what happened -> steps lost -> final params identical to an uninterrupted run.
"Steps lost" = the furthest step trained before the fault minus the step the relaunch resumed from.

  python benchmarks/faults.py --steps 12 --every 4 --out benchmarks/results/faults.json

The frozen VAE is the random one (`--config.init.vae=random`), so no 9-minute VAE pretraining is needed;
everything else is the recipe (synthetic data through the Grain pipeline, MoT, Orbax async checkpoints).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "experiments", "bagel_7b", "pretrain.py")


def run_train(workdir: str, steps: int, every: int, *extra: str) -> Dict:
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.setdefault("JAX_PLATFORMS", "cpu")
  cmd = [sys.executable, "-m", "bagel_jax.train.cli", f"--config={CONFIG}:model=tiny,steps={steps}",
         f"--workdir={workdir}", "--config.init.vae=random", f"--config.train.checkpoint_every={every}",
         "--config.train.log_every=1", "--config.train.plot_every=0", *extra]
  t = time.time()
  r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, check=False)
  reached = [int(m) for m in re.findall(r"^step (\d+)/", r.stdout, re.M)]
  resumed = re.findall(r"resumed from step (\d+)", r.stdout)
  errors = [l for l in r.stderr.splitlines() if l.startswith("bagel-train: error:")]
  return dict(cmd=" ".join(cmd[3:]), rc=r.returncode, seconds=round(time.time() - t, 1),
              reached=max(reached) if reached else None, resumed=int(resumed[0]) if resumed else None,
              error=errors[-1] if errors else None, tracebacks=r.stderr.count("Traceback"),
              warnings=[l for l in r.stdout.splitlines() if l.startswith("WARNING")],
              stderr_tail=r.stderr[-1500:] if r.returncode not in (0, 1, -9) else "")


def final_params(workdir: str, step: int):
  from bagel_jax import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  return ckpt_lib.load_params(os.path.join(workdir, "checkpoints"), step=step)[0]


def identical(a, b) -> bool:
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def steps_on_disk(workdir: str) -> List[int]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def scenario(name: str, runs: List[Dict], what: str, workdir: str, steps: int, reference) -> Dict:
  final = runs[-1]
  finished = final["rc"] == 0 and steps in steps_on_disk(workdir)
  lost = None
  if runs[0]["reached"] is not None and final["resumed"] is not None:
    lost = runs[0]["reached"] - final["resumed"]
  same = finished and identical(final_params(workdir, steps), reference)
  return dict(fault=name, what_happened=what, finished=finished, steps_lost=lost,
              final_params_identical=bool(same), runs=runs)


def mount_tmpfs(path: str, size_kib: int) -> Optional[str]:
  """None if mounted, else the reason it could not be."""
  if os.geteuid() != 0:
    return "not root: cannot mount a tmpfs"
  os.makedirs(path, exist_ok=True)
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", path], capture_output=True,
                     text=True, check=False)
  return None if r.returncode == 0 else f"mount failed: {r.stderr.strip()}"


def du_kib(path: str) -> int:
  return sum(os.path.getsize(f) for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
             if os.path.isfile(f)) // 1024 + 1


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--steps", type=int, default=12)
  ap.add_argument("--every", type=int, default=4, help="checkpoint every this many steps")
  ap.add_argument("--workdir", default="/tmp/bagel_faults")
  ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "faults.json"))
  args = ap.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  n, k = args.steps, args.every
  assert n >= 3 * k, "--steps must allow at least three checkpoints"
  root = os.path.abspath(args.workdir)
  shutil.rmtree(root, ignore_errors=True)
  os.makedirs(root)
  rows = []

  base = os.path.join(root, "uninterrupted")
  r0 = run_train(base, n, k)
  assert r0["rc"] == 0, r0
  reference = final_params(base, n)
  print(f"uninterrupted: {n} steps in {r0['seconds']} s", flush=True)

  # 1. SIGKILL while the async save of step 2k is in flight.
  w = os.path.join(root, "kill_in_save")
  a = run_train(w, n, k, f"--config.train.debug_kill_in_save_at_step={2 * k}")
  on_disk = steps_on_disk(w)
  b = run_train(w, n, k)
  rows.append(scenario("kill -9 during an async save", [a, b],
                       f"killed (rc {a['rc']}) right after the step-{2 * k} save started; steps on disk after the "
                       f"kill: {on_disk}; relaunch resumed from step {b['resumed']} and finished", w, n, reference))
  print(rows[-1]["what_happened"], flush=True)

  # 2. Newest step unreadable: its parameter data truncated after the run died.
  w = os.path.join(root, "corrupt_newest")
  a = run_train(w, n, k, f"--config.train.debug_kill_at_step={2 * k + k // 2}")
  newest = max(steps_on_disk(w))
  data = [f for f in glob.glob(os.path.join(w, "checkpoints", str(newest), "params", "**", "d", "*"), recursive=True)]
  victim = max(data, key=os.path.getsize)
  with open(victim, "r+b") as f:
    f.truncate(os.path.getsize(victim) // 2)
  b = run_train(w, n, k)
  aside = [os.path.relpath(p, w) for p in glob.glob(os.path.join(w, "checkpoints", "set_aside", "*"))]
  rows.append(scenario("newest checkpoint truncated", [a, b],
                       f"step {newest}'s largest params file cut to half; relaunch set it aside as {aside}, resumed "
                       f"from step {b['resumed']} and finished", w, n, reference))
  print(rows[-1]["what_happened"], flush=True)

  # 3. NaN: the parameters blow up after step k + 2 (transient); the relaunch runs without the injection.
  w = os.path.join(root, "nan")
  a = run_train(w, n, k, f"--config.train.debug_nan_at_step={k + 2}")
  on_disk = steps_on_disk(w)
  b = run_train(w, n, k)
  rows.append(scenario("NaN parameters", [a, b],
                       f"params NaN after step {k + 2}: halted (rc {a['rc']}) with \"{(a['error'] or '')[:160]}...\"; "
                       f"steps on disk after the halt: {on_disk}; "
                       f"relaunch resumed from step {b['resumed']} and finished", w, n, reference))
  print(rows[-1]["what_happened"], flush=True)

  # 4. Disk full during the async save of step 2k (a tmpfs with room for one and a half checkpoints more).
  w_root = os.path.join(root, "disk")
  ckpt_kib = du_kib(os.path.join(base, "checkpoints", str(k)))
  size_kib = ckpt_kib * 6 + 16 * 1024
  reason = mount_tmpfs(w_root, size_kib)
  if reason:
    rows.append(dict(fault="disk full during an async save", skipped=reason))
  else:
    try:
      w = os.path.join(w_root, "w")
      os.makedirs(w)
      filler = os.path.join(w_root, "filler")
      st = os.statvfs(w_root)
      free_kib = st.f_bavail * st.f_frsize // 1024
      with open(filler, "wb") as f:
        f.write(b"\0" * (max(0, free_kib - (3 * ckpt_kib) // 2 - 2048) * 1024))  # logs, metrics + 1.5 ckpts
      a = run_train(w, n, k)
      on_disk = steps_on_disk(w)
      os.remove(filler)
      b = run_train(w, n, k)
      torn = False
      try:
        from bagel_jax.train import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
        metrics_lib.read_jsonl(os.path.join(w, "metrics.jsonl"))
      except ValueError:
        torn = True
      rows.append(scenario("disk full during an async save", [a, b],
                           f"tmpfs of {size_kib // 1024} MiB, filled: stopped (rc {a['rc']}, {a['tracebacks']} "
                           f"tracebacks) with one line \"{a['error']}\"; steps on disk {on_disk}; metrics.jsonl "
                           f"{'torn' if torn else 'whole'}; space freed, relaunch resumed from step {b['resumed']} "
                           f"and finished", w, n, reference))
      print(rows[-1]["what_happened"], flush=True)
    finally:
      subprocess.run(["umount", "-l", w_root], check=False)

  result = dict(
      recipe=f"experiments/bagel_7b/pretrain.py:model=tiny,steps={n} --config.init.vae=random "
             f"--config.train.checkpoint_every={k} (async Orbax saves, synthetic data through Grain), CPU",
      uninterrupted_seconds=r0["seconds"], scenarios=rows)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print()
  print(f"{'fault':34} {'finished':9} {'steps lost':11} {'final params identical':23} what happened")
  for r in rows:
    if "skipped" in r:
      print(f"{r['fault']:34} skipped: {r['skipped']}")
      continue
    print(f"{r['fault']:34} {'yes' if r['finished'] else 'NO':9} {str(r['steps_lost']):11} "
          f"{'yes' if r['final_params_identical'] else 'NO':23} {r['what_happened']}")
  print(f"\nwritten {args.out}")
  shutil.rmtree(root, ignore_errors=True)
  return 0 if all(r.get("final_params_identical", True) for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
