"""Platform choice for the command-line tools, made before JAX is imported.

The dev install brings libtpu. Without a TPU, JAX still tries the TPU runtime first, and libtpu prints
initialisation errors ("could not determine TPU accelerator type", "unexpected worker hostname ...") before
falling back to the CPU. The CLIs call `use_cpu_if_no_accelerator()` first thing: on a machine with no TPU and
no GPU device files they default `JAX_PLATFORMS` to `cpu`. An explicit `JAX_PLATFORMS` (or the older
`JAX_PLATFORM_NAME`) is never overridden, and `bagel-aot` does not call it (it needs libtpu on a CPU host).
"""
from __future__ import annotations

import glob
import os
import sys
from typing import Iterable

# TPU VMs expose each chip as /dev/accel<N> (v2-v5e) or through VFIO as /dev/vfio/<N> (v5p, v6e); GPUs as
# /dev/nvidia<N> (CUDA) or /dev/kfd (ROCm).
ACCELERATOR_DEVICE_GLOBS = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd")


def accelerator_devices(patterns: Iterable[str] = ACCELERATOR_DEVICE_GLOBS, root: str = "") -> list:
  return sorted(p for pat in patterns for p in glob.glob(root + pat))


def use_cpu_if_no_accelerator(environ=None, root: str = "") -> bool:
  """Sets JAX_PLATFORMS=cpu when no accelerator device exists and the user chose no platform. Returns whether
  it did. Has no effect once JAX's backends are initialised (call it before importing jax)."""
  env = os.environ if environ is None else environ
  if env.get("JAX_PLATFORMS") or env.get("JAX_PLATFORM_NAME"):
    return False
  if accelerator_devices(root=root):
    return False
  env["JAX_PLATFORMS"] = "cpu"
  if environ is None and "jax" in sys.modules:  # imported already (e.g. by a caller): set it in its config too
    try:
      sys.modules["jax"].config.update("jax_platforms", "cpu")
    except Exception:  # pylint: disable=broad-except  # backends already initialised: nothing left to do
      pass
  return True
