"""LIBTPU / XLA flags for compute-collective overlap: the one place both `tpu/launch.sh` (LIBTPU_INIT_ARGS on
the workers) and the AOT compiler (`compiler_options`) read, so compile-time and run-time flags never diverge.

Sets follow MaxText's curated flags for FSDP-style training (async collective fusion, overlapping all-gathers
and reduce-scatters with compute, data-parallel all-reduce optimisations).

  python -m bagel_jax.parallel.xla_flags v5p    # prints the LIBTPU_INIT_ARGS string
"""
from __future__ import annotations

import sys
from typing import Dict

from bagel_jax.parallel.topology import generation

_OVERLAP = {
    "xla_tpu_enable_async_collective_fusion": "true",
    "xla_tpu_enable_async_collective_fusion_fuse_all_gather": "true",
    "xla_tpu_enable_async_collective_fusion_multiple_steps": "true",
    "xla_tpu_overlap_compute_collective_tc": "true",
    "xla_enable_async_all_gather": "true",
    "xla_enable_async_reduce_scatter": "true",
    "xla_tpu_enable_data_parallel_all_reduce_opt": "true",
    "xla_tpu_data_parallel_opt_different_sized_ops": "true",
}

FLAGS: Dict[str, Dict[str, str]] = {
    "v4": dict(_OVERLAP),
    "v5e": dict(_OVERLAP, xla_tpu_scoped_vmem_limit_kib="65536"),
    "v5p": dict(_OVERLAP, xla_tpu_scoped_vmem_limit_kib="65536"),
    "v6e": dict(_OVERLAP, xla_tpu_scoped_vmem_limit_kib="65536"),
}


def compiler_options(topology: str) -> Dict[str, str]:
  return dict(FLAGS[generation(topology)])


def libtpu_init_args(topology: str) -> str:
  return " ".join(f"--{k}={v}" for k, v in compiler_options(topology).items())


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit("usage: python -m bagel_jax.parallel.xla_flags <topology, e.g. v5p-256>")
  print(libtpu_init_args(sys.argv[1]))
