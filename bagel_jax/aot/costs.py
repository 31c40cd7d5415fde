"""What a compiled TPU executable says about itself: per-chip memory, XLA's cost analysis, the collectives in
its HLO, and the roofline arithmetic the report builds on them."""
from __future__ import annotations

import re
from typing import Dict

import numpy as np

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%[\w.-]+\s*=\s*(\([^=]*?\)|\S+)\s+(all-gather|reduce-scatter|all-reduce|"
                    r"all-to-all|collective-permute)(-start)?\(")
_SHAPE = re.compile(r"(pred|s8|u8|s16|u16|bf16|f16|s32|u32|f32|s64|u64|f64)\[([0-9,]*)\]")
_BYTES = dict(pred=1, s8=1, u8=1, s16=2, u16=2, bf16=2, f16=2, s32=4, u32=4, f32=4, s64=8, u64=8, f64=8)
# Per-chip link traffic of a ring collective of N bytes (N = the full, unsharded buffer), in units of N:
# all-gather and reduce-scatter move N (n-1)/n ~ N, all-reduce 2 N, permutes and all-to-all ~N.
_TRAFFIC = {"all-gather": 1.0, "reduce-scatter": 1.0, "all-reduce": 2.0, "all-to-all": 1.0,
            "collective-permute": 1.0}
KERNELS = ("bagel_flash_fwd", "bagel_flash_dq", "bagel_flash_dkv")


def collective_bytes(hlo_text: str) -> Dict[str, float]:
  """Bytes of the collectives in a compiled HLO module, by kind: the full (gathered / pre-scatter) buffer of
  each. TPU's reduce-scatter fusions wrap an all-reduce in an `all-reduce-scatter*` computation; those count as
  reduce-scatter. Loop bodies count once (use unrolled programs)."""
  out: Dict[str, float] = {}
  computation = ""
  for line in hlo_text.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{"):
      computation = line.split()[0] if not line.startswith("ENTRY") else "ENTRY"
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    kind = m.group(2)
    if kind == "all-reduce" and "all-reduce-scatter" in computation:
      kind = "reduce-scatter"
    shapes = _SHAPE.findall(m.group(1))
    if not shapes:
      continue
    if m.group(3):  # async start: (operands..., results...): count the results half
      shapes = shapes[len(shapes) // 2:]
    n = sum(int(np.prod([int(d) for d in dims.split(",") if d])) * _BYTES[dt] for dt, dims in shapes)
    out[kind] = out.get(kind, 0.0) + float(n)
  return out


def collective_traffic(coll: Dict[str, float]) -> float:
  return sum(_TRAFFIC.get(k, 1.0) * v for k, v in coll.items())


def memory(compiled) -> Dict[str, float]:
  """`memory_analysis()` of an executable: the per-chip budget the pod will allocate."""
  m = compiled.memory_analysis()
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes")
  out = {f: float(getattr(m, f, 0) or 0) for f in fields}
  out["total_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"] - out["alias_size_in_bytes"]
                        + out["temp_size_in_bytes"] + out["generated_code_size_in_bytes"])
  # Host memory the program uses (activations offloaded by the "offload_layer_inputs" remat policy): not HBM.
  out["host_temp_size_in_bytes"] = float(getattr(m, "host_temp_size_in_bytes", 0) or 0)
  return out


def cost(compiled) -> Dict[str, float]:
  """XLA's `cost_analysis()`: loop bodies counted once, Pallas kernels through their `cost_estimate`."""
  c = compiled.cost_analysis()
  if isinstance(c, (list, tuple)):
    c = c[0] if c else {}
  return dict(flops=float(c.get("flops", 0.0)), bytes=float(c.get("bytes accessed", 0.0)),
              optimal_seconds=float(c.get("optimal_seconds", float("nan"))))


def kernels(hlo_text: str) -> list:
  """The project's Pallas attention kernels present in a compiled program."""
  return sorted({k for k in KERNELS if k in hlo_text})


def is_oom(e: Exception) -> bool:
  msg = str(e).lower()
  return "resource_exhausted" in msg or "ran out of memory" in msg or "out of memory" in msg


def segments_roofline(segments, chip) -> Dict[str, float]:
  """segments: {name: (costs dict with flops/bytes/traffic per chip, multiplicity)}; chip: a topology.Chip."""
  compute = sum(max(seg["flops"] * n / chip.peak_flops, seg["bytes"] * n / chip.hbm_bw)
                for seg, n in segments.values())
  serial = sum(seg["flops"] * n / chip.peak_flops + seg["bytes"] * n / chip.hbm_bw for seg, n in segments.values())
  flops_t = sum(seg["flops"] * n for seg, n in segments.values()) / chip.peak_flops
  bytes_t = sum(seg["bytes"] * n for seg, n in segments.values()) / chip.hbm_bw
  comm = sum(seg["traffic"] * n for seg, n in segments.values()) / (chip.ici_bw / 2)
  return dict(compute_seconds=compute, compute_seconds_serial=serial, flops_seconds=flops_t,
              hbm_seconds=bytes_t, collective_seconds=comm)
