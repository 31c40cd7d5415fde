"""Regenerates benchmarks/results/aot_7b.json: every AOT compile the README and docs/tpu_aot.md quote, one
`bagel-aot` subprocess each (they queue on the libtpu lock), merged by `bagel-aot --collect`.

  python benchmarks/aot_7b.py                    # all rows (~30 min on a 2-core host)
  python benchmarks/aot_7b.py --only pt_v5p256   # one row, merged with this machine's earlier reports
  python benchmarks/aot_7b.py --collect_only     # re-merge the reports under results/aot_7b/ (a local cache)

Every row compiles at XLA effort O0 (`bagel-aot --effort`, libtpu.CHECK_EFFORT) except
pt_v5p256_default_effort. Each report carries what was compiled and how long it took on this host (`host`:
compile wall and CPU seconds, peak resident memory), per-chip memory (measured by the compiler), executed FLOPs
counted from the compiled program and the MFU range (estimates; see docs/tpu_aot.md).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PT = "experiments/bagel_7b/pretrain.py"

# name -> (config file:arg, extra bagel-aot flags)
RUNS = {
    "pt_v5p256": (f"{PT}:variant=mot,topology=v5p-256", ["--inference"]),
    # the same step at the compiler's default effort (what a launch compiles): the check that the O0 rows'
    # memory and FLOPs are those of the real program, and the compile time O0 saves
    "pt_v5p256_default_effort": (f"{PT}:variant=mot,topology=v5p-256", ["--effort=default"]),
    "ct_v5p256": ("experiments/bagel_7b/continued.py:variant=mot,topology=v5p-256", []),
    "pt_v6e256_offload": (f"{PT}:variant=mot,topology=v6e-256,remat=offload_layer_inputs", []),
    "pt_v6e256_in_hbm": (f"{PT}:variant=mot,topology=v6e-256", []),
    "abl_mot_v6e256": ("experiments/ablation/mot.py:size=1.5b,topology=v6e-256", []),
    "abl_dense_v6e256": ("experiments/ablation/dense.py:size=1.5b,topology=v6e-256", []),
    "abl_moe_v6e256": ("experiments/ablation/moe.py:size=1.5b,topology=v6e-256", []),
    "abl_moe_topk_v6e256": ("experiments/ablation/moe_topk.py:size=1.5b,topology=v6e-256", []),
    "align_v5p256": ("experiments/bagel_7b/align.py:variant=mot,topology=v5p-256", []),
    "sft_v5p256": ("experiments/bagel_7b/sft.py:variant=mot,topology=v5p-256", []),
    "ct_v6e256": ("experiments/bagel_7b/continued.py:variant=mot,topology=v6e-256", []),
    "ct_v6e256_in_hbm": ("experiments/bagel_7b/continued.py:variant=mot,topology=v6e-256,remat=nothing_saveable", []),
    # the longest row per chip that was compiled: every per-row capacity scaled with the row (tokens=...)
    "pt_v5p256_131k": (f"{PT}:variant=mot,topology=v5p-256,tokens=131072", []),
}


def run_one(name: str, spec, flags, out_dir: str) -> str:
  out = os.path.join(out_dir, f"{name}.json")
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # libtpu must load
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  cmd = [sys.executable, "-m", "bagel_jax.aot", "--config", spec, "--out", out, *flags]
  print("+", " ".join(cmd), flush=True)
  r = subprocess.run(cmd, cwd=REPO, env=env, check=False)
  if r.returncode:
    raise SystemExit(f"{name}: bagel-aot failed (rc {r.returncode})")
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--only", default="", help="comma list of run names (default: all): " + ", ".join(RUNS))
  ap.add_argument("--reports", default=os.path.join(HERE, "results", "aot_7b"),
                  help="folder of the per-run reports")
  ap.add_argument("--out", default=os.path.join(HERE, "results", "aot_7b.json"))
  ap.add_argument("--collect_only", action="store_true", help="merge the existing reports, compile nothing")
  args = ap.parse_args(argv)
  os.makedirs(args.reports, exist_ok=True)
  names = [n for n in args.only.split(",") if n] or list(RUNS)
  unknown = sorted(set(names) - set(RUNS))
  if unknown:
    raise SystemExit(f"unknown runs {unknown}; known: {sorted(RUNS)}")
  for name in names if not args.collect_only else ():
    run_one(name, *RUNS[name], args.reports)
  paths = [os.path.join(args.reports, f"{n}.json") for n in RUNS if os.path.exists(os.path.join(args.reports,
                                                                                                 f"{n}.json"))]
  cmd = [sys.executable, "-m", "bagel_jax.aot", f"--collect={','.join(paths)}", "--out", args.out]
  subprocess.run(cmd, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), check=True)
  with open(args.out) as f:
    doc = json.load(f)
  by_source = {r["source"][:-len(".json")]: r for r in doc["reports"]}
  if "pt_v5p256" in by_source and "pt_v5p256_131k" in by_source:
    doc["max_tokens_per_chip_v5p"] = max_tokens_estimate(by_source["pt_v5p256"], by_source["pt_v5p256_131k"])
    with open(args.out, "w") as f:
      json.dump(doc, f, indent=1)
  return doc


def max_tokens_estimate(a, b, budget: float = 0.85):
  """Tokens per chip at which the PT step reaches `budget` of HBM, on the line through two compiled row
  lengths (memory grows linearly with the row under remat: no [L, L] term). An estimate between/beyond
  compiled points, labelled as such."""
  ta, tb = a["tokens_per_chip"], b["tokens_per_chip"]
  ma, mb = a["memory_per_chip"]["total_bytes"], b["memory_per_chip"]["total_bytes"]
  slope = (mb - ma) / (tb - ta)
  hbm = a["memory_per_chip"]["hbm_bytes"]
  return dict(tokens=int(ta + (budget * hbm - ma) / slope), budget_fraction=budget,
              gib_per_1k_tokens=slope * 1024 / 2 ** 30, from_reports=[a["source"], b["source"]],
              note="ESTIMATE: linear in tokens per chip through the two compiled points")


if __name__ == "__main__":
  main()
