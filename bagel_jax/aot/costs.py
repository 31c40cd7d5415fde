"""What a compiled TPU executable says about itself (per-chip memory, XLA's cost analysis, the kernels in it)
and the time model the report builds on the loop-aware counts of `hlo`."""
from __future__ import annotations

import dataclasses
from typing import Dict

# Per-chip link traffic of a ring collective of N bytes (N = the full, unsharded buffer), in units of N:
# all-gather and reduce-scatter move N (n-1)/n ~ N, all-reduce 2 N, permutes and all-to-all ~N.
_TRAFFIC = {"all-gather": 1.0, "reduce-scatter": 1.0, "all-reduce": 2.0, "all-to-all": 1.0,
            "collective-permute": 1.0}
KERNELS = ("bagel_flash_fwd", "bagel_flash_dq", "bagel_flash_dkv")


def collective_traffic(coll: Dict[str, float]) -> float:
  """Per-chip link bytes of collectives given as {kind: full-buffer bytes}."""
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


@dataclasses.dataclass(frozen=True)
class Rates:
  """The time model of the step estimate: per-chip peaks and the efficiencies charged to each kind of work.

  Stated assumptions, not measurements: XLA's own matmuls at the MXU peak; the Pallas attention kernels at
  `kernel_efficiency` of it (per 512 x 512 tile they run two matmuls plus the softmax on the VPU/EUP);
  elementwise work on the VPU at `vpu_fraction` of the MXU peak (v5p: 4 VALUs x 8 x 128 lanes x 2 TensorCores
  x 1.75 GHz ~ 1.4e13 op/s, 1/32 of 459e12; the same ratio is assumed for the other generations),
  transcendentals at a quarter of that; the MoT gathers and scatters at `gather_efficiency` of the HBM
  bandwidth; collectives at half the chip's bidirectional ICI bandwidth (a ring moves its bytes one way)."""
  peak_flops: float
  hbm_bw: float
  ici_bw: float
  kernel_efficiency: float = 0.5
  vpu_fraction: float = 1 / 32
  gather_efficiency: float = 0.5

  @classmethod
  def for_chip(cls, chip, **kw) -> "Rates":
    return cls(chip.peak_flops, chip.hbm_bw, chip.ici_bw, **kw)

  def assumptions(self) -> Dict[str, float]:
    return dict(xla_matmul_efficiency=1.0, kernel_efficiency=self.kernel_efficiency,
                vpu_ops_per_s=self.peak_flops * self.vpu_fraction,
                transcendentals_per_s=self.peak_flops * self.vpu_fraction / 4,
                gather_scatter_efficiency=self.gather_efficiency, ici_bytes_per_s=self.ici_bw / 2)

  def op_seconds(self, c: Dict[str, float]) -> Dict[str, float]:
    """Seconds of one top-level op (a fusion with what it fuses, a kernel, a copy):
    - `t_bound`: its MXU and kernel FLOPs at the MXU peak and nothing else (the compute-only bound);
    - `t_roofline`: max(those FLOPs at peak, its HBM bytes at full bandwidth);
    - `t_estimate`: max over the units that overlap inside one op (VLIW: MXU, VPU, EUP, DMA) of their times
      at the stated efficiencies; ops run one after another."""
    mxu = c.get("mxu_flops", 0.0) / self.peak_flops
    kernel = c.get("kernel_flops", 0.0) / self.peak_flops
    vpu_rate = self.peak_flops * self.vpu_fraction
    gather = c.get("gather_bytes", 0.0)
    hbm = c.get("hbm_bytes", 0.0)
    mem = max(0.0, hbm - gather) / self.hbm_bw + gather / (self.hbm_bw * self.gather_efficiency)
    return dict(t_bound=mxu + kernel, t_roofline=max(mxu + kernel, hbm / self.hbm_bw),
                t_estimate=max(mxu + kernel / self.kernel_efficiency, c.get("vpu_flops", 0.0) / vpu_rate,
                               c.get("transcendentals", 0.0) / (vpu_rate / 4), mem))

  def collective_seconds(self, c: Dict[str, float]) -> float:
    """`c`: hlo costs (with 'collective/<kind>' bytes)."""
    coll = {k.split("/", 1)[1]: v for k, v in c.items() if k.startswith("collective/")}
    return collective_traffic(coll) / (self.ici_bw / 2)
