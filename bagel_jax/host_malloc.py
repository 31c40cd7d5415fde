"""glibc malloc settings that keep XLA's CPU step buffers mapped between steps.

XLA's CPU runtime allocates each execution's temporaries as one large block (1.1 GB for the official-small
training step) from whichever thread dispatches it. glibc serves such a block from a fresh mmap (a thread's
own arena cannot grow past 64 MiB, and that fallback mmaps whatever M_MMAP_MAX says) and unmaps it on free, so
every step faulted in, zeroed and memcg-charged all of it again: 275k page faults per official-small step,
~10% of its CPU time in the kernel, ~20% for the tiny demo step. With one arena, no mmapped chunks and no
trimming, the block is reused from the heap: zero faults per step (benchmarks/host_malloc.py measures it).
The cost: the process keeps its peak heap mapped, and all threads share one malloc lock.

Measured (benchmarks/results/host_malloc.json): the faults and the kernel time go, the wall time does not
(official-small 0.99x) and the tiny demo step gets slower (0.69x: its data threads and XLA's then contend for
the one malloc lock). So it is opt-in: `bagel-train` applies it when `BAGEL_HOST_MALLOC=tuned`; other
programs call `tune_host_malloc()` before JAX starts its threads. On a libc without `mallopt` (musl, macOS)
it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Mapping, Optional

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -3, -4, -8
TUNED = {M_ARENA_MAX: 1,            # every thread allocates from the main (sbrk) heap
         M_MMAP_MAX: 0,             # ... and never through a chunk of its own mmap
         M_MMAP_THRESHOLD: 32 << 20,  # (glibc's 64-bit maximum; moot with M_MMAP_MAX=0)
         M_TRIM_THRESHOLD: -1,      # (size_t)-1: never hand the freed heap top back to the kernel
         M_TOP_PAD: 64 << 20}       # grow the heap 64 MiB at a time
ENV = "BAGEL_HOST_MALLOC"


def _libc():
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return libc if hasattr(libc, "mallopt") else None
  except OSError:
    return None


def set_malloc_params(params: Mapping[int, int]) -> bool:
  """Applies `params` ({mallopt parameter: value}); False where this libc has no mallopt or refuses one."""
  libc = _libc()
  if libc is None:
    return False
  return all(libc.mallopt(ctypes.c_int(k), ctypes.c_int(v)) == 1 for k, v in params.items())


def tune_host_malloc(environ: Optional[Mapping[str, str]] = None) -> bool:
  """Applies `TUNED` if `BAGEL_HOST_MALLOC=tuned`. Returns whether it did. Call it before importing JAX."""
  env = os.environ if environ is None else environ
  choice = env.get(ENV, "default")
  if choice not in ("tuned", "default"):
    raise ValueError(f"{ENV}={choice!r}: choose 'default' (glibc's own settings, the default) or 'tuned'")
  return choice == "tuned" and set_malloc_params(TUNED)
