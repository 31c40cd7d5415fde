"""The `bagel-aot` report: its JSON schema, the console and markdown tables, merging several reports."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Sequence, Tuple


REPORT_KEYS = ("config", "stage", "topology", "topology_name", "num_slices", "devices", "device_kind",
               "compile_seconds", "compiler_effort", "host", "global_batch_rows", "seq_len", "tokens_per_chip",
               "model", "memory_per_chip", "attention", "largest_tensors", "model_flops_per_step",
               "xla_cost_analysis_raw", "compiled", "roofline")
MEMORY_KEYS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
               "total_bytes", "hbm_bytes", "fraction_of_hbm", "fits_with_headroom")
COMPILED_KEYS = ("flops_per_step", "matmul_flops_per_chip", "kernel_flops_per_chip", "bytes_per_chip",
                 "recompute_ratio", "collective_bytes_per_chip", "loops", "check_against_xla")
ROOFLINE_KEYS = ("step_seconds_overlapped", "step_seconds_exposed", "mfu_upper_bound_compute_only",
                 "mfu_estimate_overlapped", "mfu_estimate_exposed", "limited_by", "efficiencies", "assumptions")


def check_report(report: Dict[str, Any]) -> None:
  """Raises ValueError naming the first missing key of the documented JSON schema."""
  def need(d, keys, where):
    for k in keys:
      if k not in d:
        raise ValueError(f"bagel-aot report: missing {where}{k}")
  need(report, REPORT_KEYS, "")
  need(report["memory_per_chip"], MEMORY_KEYS, "memory_per_chip.")
  need(report["compiled"], COMPILED_KEYS, "compiled.")
  need(report["roofline"], ROOFLINE_KEYS, "roofline.")
  if "inference" in report:
    need(report["inference"], ("denoise_step", "decode_step"), "inference.")


def _mfu(rl) -> Tuple[str, str]:
  return (f"{rl['mfu_upper_bound_compute_only']:.1%}",
          f"{rl['mfu_estimate_exposed']:.1%}-{rl['mfu_estimate_overlapped']:.1%}")


def summary_table(reports: Sequence[Dict[str, Any]]) -> str:
  head = (f"{'config':22s} {'variant':7s} {'topology':9s} {'tok/chip':>8s} {'GiB/chip':>8s} {'of HBM':>7s} "
          f"{'compile s':>9s} {'RSS GiB':>7s} {'exec/model':>10s} {'MFU bound':>9s} {'MFU est.':>12s} "
          f"{'limit':>15s}")
  lines = [head, "-" * len(head)]
  for r in reports:
    m, rl = r["memory_per_chip"], r["roofline"]
    bound, est = _mfu(rl)
    lines.append(f"{r['config']:22s} {r['model']['variant']:7s} {r['topology']:9s} {r['tokens_per_chip']:8.0f} "
                 f"{m['total_bytes'] / 2 ** 30:8.2f} {m['fraction_of_hbm']:7.1%} {r['compile_seconds']:9.1f} "
                 f"{r['host']['peak_rss_bytes'] / 2 ** 30:7.2f} {r['compiled']['recompute_ratio']:10.3f} "
                 f"{bound:>9s} {est:>12s} {rl['limited_by']:>15s}")
  return "\n".join(lines)


def markdown_table(reports: Sequence[Dict[str, Any]]) -> str:
  """The docs table: one line per report."""
  head = ("| config | variant | topology | mesh (data x fsdp), remat | tokens/chip | GiB/chip (args + temps) | "
          "of HBM | fits <= 85% | compile s (host RAM GiB), XLA effort | executed / model FLOPs | "
          "MFU bound, compute only | "
          "MFU estimate (exposed-overlapped) | limited by |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in reports:
    m, rl, model = r["memory_per_chip"], r["roofline"], r["model"]
    mesh = model.get("mesh", {})
    layout = (f"{mesh.get('data', 1) * mesh.get('dcn_data', 1)} x {mesh.get('fsdp', '?')}, "
              f"{model.get('remat_policy', '?')}" + (f", CE chunk {model['ce_chunk_size']}"
                                                     if model.get("ce_chunk_size", 4096) != 4096 else ""))
    bound, est = _mfu(rl)
    cells = [r["config"], model["variant"], r["topology"], layout, f"{r['tokens_per_chip']:,.0f}",
             f"{m['total_bytes'] / 2 ** 30:.1f} ({m['argument_size_in_bytes'] / 2 ** 30:.1f} + "
             f"{m['temp_size_in_bytes'] / 2 ** 30:.1f})", f"{m['fraction_of_hbm']:.1%}",
             "yes" if m["fits_with_headroom"] else "no",
             f"{r['compile_seconds']:.0f} ({r['host']['peak_rss_bytes'] / 2 ** 30:.1f}), {r['compiler_effort']}",
             f"{r['compiled']['recompute_ratio']:.3f}", bound, est, rl["limited_by"]]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def collect(paths: Sequence[str]) -> Dict[str, Any]:
  """Several bagel-aot reports -> one document {reports: [...], table: markdown}."""
  reports = []
  for p in paths:
    with open(p) as f:
      r = json.load(f)
    check_report(r)
    r["source"] = os.path.basename(p)
    reports.append(r)
  return dict(reports=reports, table_markdown=markdown_table(reports))
