"""Sweep runner: a config (or several) over grid values and seeds, locally in sequence or as TPU jobs, then the
curves and REPORT.md of the experiment.

  python -m experiments.run --configs experiments/ablation/{dense,moe,mot,moe_topk}.py --seeds 0,1,2
  python -m experiments.run --configs experiments/data_ratio/gen_und.py --grid gen=1,2,3,4 --seeds 0,1,2
  python -m experiments.run --configs experiments/lr_sweep/lr.py --grid lr_index=0,3,6 --arg ce_weight=1.0
  # On a pod: one job per run through tpu/launch.sh (add --dry-run to print the gcloud commands).
  python -m experiments.run --configs experiments/ablation/mot.py --arg size=1.5b --tpu-name abl \
      --accelerator v6e-256 --workdir-root gs://BUCKET/ablation --dry-run

Local runs are resumable: a run whose workdir already holds its final step is skipped, a partial one resumes
from its last checkpoint. Results go to experiments/results/<experiment>/ (curves.png/csv, summary.json,
REPORT.md); run workdirs to --workdir-root (default workdirs/<experiment>).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Dict, List, Mapping, Sequence, Tuple

from bagel_jax.accelerators import use_cpu_if_no_accelerator
from experiments import report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(path: str, arg: str):
  """The experiment file at `path` with its arg, loaded as `bagel-train --config` loads it."""
  # imported here, after main() chose the JAX platform (use_cpu_if_no_accelerator): the loader imports JAX
  from bagel_jax.train import config as train_config  # pylint: disable=import-outside-toplevel
  return train_config.load_config(f"{path}:{arg}" if arg else path)


def parse_grid(items: Sequence[str]) -> List[Tuple[str, List[str]]]:
  out = []
  for item in items:
    key, eq, values = item.partition("=")
    if not eq or not values:
      raise ValueError(f"--grid {item!r}: expected key=v1,v2,...")
    out.append((key, values.split(",")))
  return out


def plan(configs: Sequence[str], grid, seeds: Sequence[int], base_arg: str) -> List[Dict]:
  """Every (config, grid point, seed) run with its label, arg string and relative workdir."""
  runs = []
  keys = [k for k, _ in grid]
  for path in configs:
    stem = os.path.splitext(os.path.basename(path))[0]
    for values in itertools.product(*[v for _, v in grid]) if grid else [()]:
      point = ",".join(f"{k}={v}" for k, v in zip(keys, values))
      label = stem if not values else (stem + "_" + "_".join(f"{k}{v}" for k, v in zip(keys, values))
                                       if len(configs) > 1 else "_".join(f"{k}{v}" for k, v in zip(keys, values)))
      for seed in seeds:
        arg = ",".join(x for x in (base_arg, point, f"seed={seed}") if x)
        runs.append(dict(config=path, label=label, seed=seed, arg=arg, workdir=os.path.join(label, f"seed{seed}")))
  return runs


def _done(workdir: str, steps: int) -> bool:
  path = os.path.join(workdir, "summary.json")
  if not os.path.exists(path):
    return False
  with open(path) as f:
    return int(json.load(f).get("final_step", -1)) >= steps


def run_local(runs: Sequence[Dict], root: str, steps: int) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  from bagel_jax.train import trainer  # pylint: disable=import-outside-toplevel
  # Seeds and most variants of a sweep compile the same step: reuse it across runs (and re-invocations).
  jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.join(root, ".jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  for i, r in enumerate(runs):
    c = load_config(r["config"], r["arg"])
    if steps:
      c.train.steps = c.optim.total_steps = steps
      c.train.checkpoint_every = max(1, steps // 2)
      c.optim.warmup_steps = min(c.optim.warmup_steps, steps // 10)
    wd = os.path.join(root, r["workdir"])
    if _done(wd, int(c.train.steps)):
      print(f"[{i + 1}/{len(runs)}] {r['label']} seed {r['seed']}: done, skipped", flush=True)
      continue
    print(f"[{i + 1}/{len(runs)}] {r['label']} seed {r['seed']}: training {c.train.steps} steps -> {wd}",
          flush=True)
    t0 = time.time()
    trainer.train(c, wd)
    print(f"[{i + 1}/{len(runs)}] {r['label']} seed {r['seed']}: {time.time() - t0:.0f}s", flush=True)


def tpu_commands(runs: Sequence[Dict], root: str, name: str, accelerator: str, steps: int) -> List[List[str]]:
  """One `tpu/launch.sh` per run: the slice runs them one after another (each a full-pod job)."""
  cmds = []
  for r in runs:
    rel = os.path.relpath(r["config"], REPO)
    train = ["--config", f"{rel}:{r['arg']}", "--workdir", f"{root.rstrip('/')}/{r['workdir']}"]
    if steps:
      train += [f"--config.train.steps={steps}", f"--config.optim.total_steps={steps}"]
    cmds.append(["bash", os.path.join(REPO, "tpu", "launch.sh"), "--name", name, "--accelerator", accelerator,
                 "--", *train])
  return cmds


# The paper's claims (../shared/docs/paper_results.md §2.1-2.3) as checks on the measured summary.
def _ablation_claims(s):
  claim = ("Paper (Fig. 3): at equal FLOPs MoT converges fastest and reaches the lowest generation MSE; CE is "
           "noisier but MoT 'still maintains the best performance in general'. No numeric gap is given; the "
           "paper does not say whether MoE beats Dense.")
  v = []
  for other in ("dense", "moe", "moe_topk"):
    if other in s["final"] and "mot" in s["final"]:
      ok, d = report.significant_less(s, "mot", other, "mse")
      v.append((f"MSE(mot) < MSE({other})", ok, d))
      ok, d = report.significant_less(s, "mot", other, "ce")
      v.append((f"CE(mot) < CE({other})", ok, d))
  return claim, v


def _data_ratio_claims(s):
  claim = ("Paper (Fig. 5): more generation data (1g1u -> 4g1u) lowers MSE steadily (0.4 % absolute); CE shows "
           "no consistent pattern.")
  labels = sorted(s["final"], key=lambda lab: float(lab.split("gen")[-1].split("_")[0]))
  v = []
  for a, b in zip(labels[1:], labels[:-1]):
    ok, d = report.significant_less(s, a, b, "mse")
    v.append((f"MSE({a}) < MSE({b})", ok, d))
  return claim, v


def _lr_claims(s):
  claim = ("Paper (Fig. 6, gen:und 1:1, CE:MSE 1:1): a larger LR makes MSE converge faster, a smaller LR helps "
           "CE; hence separate loss weights CE:MSE = 0.25:1.")
  labels = sorted(s["final"], key=lambda lab: int(lab.split("lr_index")[-1].split("_")[0]))
  lo, hi = labels[0], labels[-1]
  ok1, d1 = report.significant_less(s, hi, lo, "mse")
  ok2, d2 = report.significant_less(s, lo, hi, "ce")
  return claim, [(f"MSE({hi}) < MSE({lo}) (larger LR, lower MSE)", ok1, d1),
                 (f"CE({lo}) < CE({hi}) (smaller LR, lower CE)", ok2, d2)]


CLAIMS = {"ablation": (_ablation_claims, "mot"), "data_ratio": (_data_ratio_claims, None),
          "lr_sweep": (_lr_claims, None)}


def collect(runs: Sequence[Dict], root: str) -> Dict[str, List[Mapping]]:
  groups: Dict[str, List[Mapping]] = {}
  missing = []
  for r in runs:
    wd = os.path.join(root, r["workdir"])
    if not os.path.exists(os.path.join(wd, "metrics.jsonl")):
      missing.append(wd)
      continue
    groups.setdefault(r["label"], []).append(report.read_run(wd))
  if missing:
    print(f"warning: {len(missing)} runs have no metrics yet: {missing}", file=sys.stderr)
  return groups


def make_report(experiment: str, runs, root: str, out_dir: str, setup: str, steps: int,
                vae_init: str = "synthetic") -> str:
  groups = collect(runs, root)
  if not groups:
    raise SystemExit(f"no finished runs under {root}")
  os.makedirs(out_dir, exist_ok=True)
  check, ref = CLAIMS.get(experiment, (None, None))
  summary = report.summarize(groups, reference=ref)
  report.plot(groups, os.path.join(out_dir, "curves.png"), f"{experiment}: {setup.split(', model')[0]}")
  report.write_curves_csv(groups, os.path.join(out_dir, "curves.csv"))
  with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump(dict(summary, runs=[dict(r) for r in runs]), f, indent=1)
  claim, verdicts = check(summary) if check else ("(no paper claim registered)", [])
  if steps < 1000:
    claim += (f"\n\nCaveat: these are short CPU runs ({steps} steps of a tiny model, far from converged). The paper's "
              "curves span 10K-16K steps at 1.5B; a late-training effect (e.g. CE preferring a smaller LR) can be "
              "masked here by faster early convergence, and small differences need more seeds or steps. The tiny models "
              "start from random weights (the paper starts from Qwen2.5). " + (
                  "Their frozen VAE is randomly initialised, so MSE is measured in a random (but fixed) latent "
                  "space." if vae_init == "random" else "Their frozen VAE is a tiny AE pretrained on the synthetic "
                  "renders (init.vae=synthetic), standing in for FLUX's."))
  return report.write_report(out_dir, experiment, summary, claim, verdicts, setup)


def main(argv=None) -> int:
  use_cpu_if_no_accelerator()  # before JAX picks a backend: no libtpu noise on CPU-only machines
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--configs", nargs="+", required=True, help="experiment config files")
  ap.add_argument("--grid", nargs="*", default=[], help="key=v1,v2 (config arg values to sweep)")
  ap.add_argument("--arg", default="size=tiny", help="config arg shared by every run")
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--steps", type=int, default=0, help="override the config's steps (0 = config)")
  ap.add_argument("--experiment", default="", help="name (default: the configs' folder, e.g. ablation)")
  ap.add_argument("--workdir-root", default="", help="default workdirs/<experiment>")
  ap.add_argument("--results", default="", help="default experiments/results/<experiment>")
  ap.add_argument("--report-only", action="store_true", help="only collect finished runs and report")
  ap.add_argument("--tpu-name", default="", help="run each job on this TPU slice via tpu/launch.sh")
  ap.add_argument("--accelerator", default="v6e-256")
  ap.add_argument("--dry-run", action="store_true", help="with --tpu-name: print the commands only")
  a = ap.parse_args(argv)

  experiment = a.experiment or os.path.basename(os.path.dirname(os.path.abspath(a.configs[0])))
  seeds = [int(s) for s in a.seeds.split(",") if s != ""]
  runs = plan(a.configs, parse_grid(a.grid), seeds, a.arg)
  root = a.workdir_root or os.path.join("workdirs", experiment)
  out_dir = a.results or os.path.join(REPO, "experiments", "results", experiment)
  print(f"{experiment}: {len(runs)} runs ({len(set(r['label'] for r in runs))} variants x {len(seeds)} seeds)")

  if a.tpu_name:
    for cmd in tpu_commands(runs, root, a.tpu_name, a.accelerator, a.steps):
      if a.dry_run:
        cmd = cmd[:2] + ["--dry-run"] + cmd[2:]
      print("+ " + " ".join(shlex.quote(x) for x in cmd), flush=True)
      subprocess.run(cmd, check=True)
    return 0
  if not a.report_only:
    run_local(runs, root, a.steps)
  c = load_config(runs[0]["config"], runs[0]["arg"])
  steps = a.steps or int(c.train.steps)
  grid = "; ".join(a.grid) if a.grid else "configs " + ", ".join(os.path.basename(x) for x in a.configs)
  setup = (f"{len(seeds)} seeds x {len(set(r['label'] for r in runs))} variants ({grid}), {steps} steps each, "
           f"model preset `{c.model.preset}`, batch {c.batch.batch_size} x {c.batch.seq_len} tokens, "
           f"lr {c.optim.lr:g}, CE:MSE {c.loss.ce_weight:g}:{c.loss.mse_weight:g}, data `{c.data.source}` "
           f"(gen:und {c.data.get('gen_und', 0):g} unless swept).\n\nReproduce: `python -m experiments.run "
           f"{' '.join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]) if x != '--report-only')}`")
  path = make_report(experiment, runs, root, out_dir, setup, steps, vae_init=str(c.init.vae))
  print(f"report: {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
