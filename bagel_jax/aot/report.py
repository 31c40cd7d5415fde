"""The `bagel-aot` report: its JSON schema, the console and markdown tables, merging several reports."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Sequence


REPORT_KEYS = ("config", "stage", "topology", "topology_name", "num_slices", "devices", "device_kind",
               "compile_seconds", "global_batch_rows", "seq_len", "tokens_per_chip", "model", "memory_per_chip",
               "attention", "largest_tensors", "model_flops_per_step", "xla_cost_analysis_raw")
MEMORY_KEYS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
               "total_bytes", "hbm_bytes", "fraction_of_hbm", "fits_with_headroom")
ROOFLINE_KEYS = ("step_seconds_overlapped", "step_seconds_exposed", "mfu_estimate_overlapped",
                 "mfu_estimate_exposed", "limited_by", "assumptions")


def check_report(report: Dict[str, Any]) -> None:
  """Raises ValueError naming the first missing key of the documented JSON schema."""
  def need(d, keys, where):
    for k in keys:
      if k not in d:
        raise ValueError(f"bagel-aot report: missing {where}{k}")
  need(report, REPORT_KEYS, "")
  need(report["memory_per_chip"], MEMORY_KEYS, "memory_per_chip.")
  if "roofline" in report:
    need(report["roofline"], ROOFLINE_KEYS, "roofline.")
    need(report, ("compiled",), "")
    need(report["compiled"], ("flops_per_step", "bytes_per_chip", "recompute_ratio", "collective_bytes_per_chip"),
         "compiled.")
  if "inference" in report:
    need(report["inference"], ("denoise_step", "decode_step"), "inference.")


def summary_table(reports: Sequence[Dict[str, Any]]) -> str:
  head = (f"{'config':24s} {'variant':8s} {'topology':9s} {'tok/chip':>8s} {'GiB/chip':>8s} {'of HBM':>7s} "
          f"{'compile s':>9s} {'recompute':>9s} {'MFU ovl':>8s} {'MFU exp':>8s} {'limit':>11s}")
  lines = [head, "-" * len(head)]
  for r in reports:
    m = r["memory_per_chip"]
    rl = r.get("roofline", {})
    rc = r.get("compiled", {}).get("recompute_ratio", float("nan"))
    lines.append(f"{r['config']:24s} {r.get('model', {}).get('variant', '?'):8s} {r['topology']:9s} "
                 f"{r['tokens_per_chip']:8.0f} {m['total_bytes'] / 2 ** 30:8.2f} {m['fraction_of_hbm']:7.1%} "
                 f"{r['compile_seconds']:9.1f} {rc:9.2f} {rl.get('mfu_estimate_overlapped', float('nan')):8.1%} "
                 f"{rl.get('mfu_estimate_exposed', float('nan')):8.1%} {rl.get('limited_by', '-'):>11s}")
  return "\n".join(lines)


def markdown_table(reports: Sequence[Dict[str, Any]]) -> str:
  """The docs table: one line per report."""
  head = ("| config | variant | topology | mesh (data x fsdp), remat | tokens/chip | GiB/chip (args + temps) | "
          "of HBM | fits <= 85% | compile s | recompute | MFU est. (overlapped / exposed) | limited by |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in reports:
    m = r["memory_per_chip"]
    rl = r.get("roofline")
    rc = r.get("compiled", {}).get("recompute_ratio")
    model = r.get("model", {})
    mesh = model.get("mesh", {})
    layout = (f"{mesh.get('data', 1) * mesh.get('dcn_data', 1)} x {mesh.get('fsdp', '?')}, "
              f"{model.get('remat_policy', '?')}" + (f", CE chunk {model['ce_chunk_size']}"
                                                     if model.get("ce_chunk_size", 4096) != 4096 else ""))
    cells = [r["config"], model.get("variant", "?"), r["topology"], layout, f"{r['tokens_per_chip']:,.0f}",
             f"{m['total_bytes'] / 2 ** 30:.1f} ({m['argument_size_in_bytes'] / 2 ** 30:.1f} + "
             f"{m['temp_size_in_bytes'] / 2 ** 30:.1f})", f"{m['fraction_of_hbm']:.1%}",
             "yes" if m["fits_with_headroom"] else "no", f"{r['compile_seconds']:.0f}",
             f"{rc:.2f}" if rc is not None else "-",
             f"{rl['mfu_estimate_overlapped']:.1%} / {rl['mfu_estimate_exposed']:.1%}" if rl else "-",
             rl["limited_by"] if rl else "-"]
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
