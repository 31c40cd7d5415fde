"""Every chip fact the project uses, in one place: generations, slice names and shapes, peak FLOP/s, HBM size
and bandwidth, ICI bandwidth. Read by the experiment configs (rows per slice), the XLA flags (generation of a
topology name), the training logger (MFU) and the AOT tool (roofline, fits-in-HBM).

Pure Python (no JAX): safe to import anywhere, including before a backend is chosen.

Slice names: v4 and v5p names count TensorCores (two per megacore chip: v5p-256 is 128 chips, a 4x4x8 torus);
v5e and v6e names count chips (v6e-256 is a 16x16 torus). 'v5p:4x4x8'-style names (what libtpu's
`get_topology_desc` takes) pass through.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Dict, Tuple


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation's per-chip figures (Google Cloud spec sheets; reference §6.4, guide C1).

  `ici_bw` is the bidirectional bandwidth of all of a chip's links together; a ring collective moves its bytes
  in one direction, so the AOT roofline times collectives at half of it."""
  generation: str
  device_kinds: Tuple[str, ...]  # `jax.Device.device_kind` prefixes of this generation
  peak_flops: float  # dense bf16 FLOP/s
  hbm_bytes: int
  hbm_bw: float  # bytes/s
  ici_bw: float  # bytes/s
  megacore: bool  # two TensorCores per chip, counted separately in slice names
  torus_dims: int  # 3 (v4, v5p) or 2 (v5e, v6e)


CHIPS: Dict[str, Chip] = {
    "v5p": Chip("v5p", ("TPU v5p", "TPU v5"), 459e12, 95 * 2 ** 30, 2765e9, 1200e9, True, 3),
    "v6e": Chip("v6e", ("TPU v6e", "TPU v6 lite"), 918e12, 32 * 2 ** 30, 1638e9, 800e9, False, 2),
    "v5e": Chip("v5e", ("TPU v5e", "TPU v5 lite"), 197e12, 16 * 2 ** 30, 819e9, 400e9, False, 2),
    "v4": Chip("v4", ("TPU v4",), 275e12, 32 * 2 ** 30, 1200e9, 540e9, True, 3),
}

# Dense bf16 peak of accelerators that are not TPUs (NVIDIA spec sheets, dense, no sparsity): MFU in the logs.
OTHER_PEAK_FLOPS = {"NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA H800": 989e12, "NVIDIA A100": 312e12}

# Chips -> slice shape for the torus dimensions of each generation.
SLICE_SHAPES = {
    3: {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8", 512: "8x8x8"},
    2: {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
}


def generation(topology: str) -> str:
  """'v5p-256' / 'v5p:4x4x4' / 'v5litepod-16' / 'v5:4x4x4' -> 'v5p' / 'v5e'."""
  t = topology.lower().replace("litepod", "e").replace("v5lite", "v5e")
  for g in ("v5p", "v5e", "v6e", "v4"):
    if t.startswith(g):
      return g
  if t.startswith("v5:") or t.startswith("v5-"):
    return "v5p"
  raise ValueError(f"unknown TPU generation in topology {topology!r}; known: {sorted(CHIPS)}")


def parse(topology: str) -> Tuple[str, str, int]:
  """'v5p-256' -> ('v5p', 'v5p:4x4x8', 128); 'v6e-16' -> ('v6e', 'v6e:4x4', 16); 'v5p:2x2x1' passes."""
  if ":" in topology:
    gen = generation(topology)
    dims = topology.split(":", 1)[1]
    if not re.fullmatch(r"\d+(x\d+)+", dims):
      raise ValueError(f"topology {topology!r}: expected a shape like v5p:4x4x8")
    return gen, f"{gen}:{dims}", math.prod(int(x) for x in dims.split("x"))
  m = re.fullmatch(r"(v5p|v6e|v5e|v5litepod|v4)-(\d+)", topology)
  if not m:
    raise ValueError(f"topology {topology!r}: expected e.g. v5p-256, v6e-256, v5e-16 or v5p:4x4x4")
  chip = CHIPS[generation(m.group(1))]
  n = int(m.group(2))
  chips = n // 2 if chip.megacore else n
  shapes = SLICE_SHAPES[chip.torus_dims]
  if chips not in shapes or (chip.megacore and n % 2):
    raise ValueError(f"topology {topology}: no known slice shape for {chips} chips")
  return chip.generation, f"{chip.generation}:{shapes[chips]}", chips


def chip_count(topology: str) -> int:
  """Chips of a slice name ('v5p-256' -> 128)."""
  return parse(topology)[2]


def chip(topology: str) -> Chip:
  return CHIPS[generation(topology)]


def peak_flops(device_kind: str) -> float:
  """Dense bf16 peak of a `jax.Device.device_kind` (longest matching prefix); 0.0 when unknown (CPU: no MFU)."""
  table = dict(OTHER_PEAK_FLOPS)
  for c in CHIPS.values():
    table.update({k: c.peak_flops for k in c.device_kinds})
  best = max((k for k in table if device_kind.startswith(k)), key=len, default="")
  return table.get(best, 0.0)
