"""libtpu on a CPU host: the machine-wide lock, the devices of a TPU topology, the compiler flags it accepts.

Only one process may load libtpu at a time, so every AOT compile (the `bagel-aot` CLI, the AOT tests) holds
`libtpu_lock()`, a flock on /tmp/bagel_jax_libtpu.lock: concurrent runs queue instead of failing.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import tempfile
from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies

from bagel_jax.parallel import topology as topology_lib
from bagel_jax.parallel import xla_flags

LIBTPU_LOCK = os.path.join(tempfile.gettempdir(), "bagel_jax_libtpu.lock")
_LOCK_ENV = "BAGEL_LIBTPU_LOCK_HELD"


@contextlib.contextmanager
def libtpu_lock():
  """Holds the repository's libtpu file lock (re-entrant across a parent that already holds it)."""
  if os.environ.get(_LOCK_ENV):
    yield
    return
  with open(LIBTPU_LOCK, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    os.environ[_LOCK_ENV] = "1"
    try:
      yield
    finally:
      os.environ.pop(_LOCK_ENV, None)
      fcntl.flock(f, fcntl.LOCK_UN)


def topology_devices(topology: str, num_slices: int = 1):
  """The devices of a TPU slice (no TPU needed): libtpu's topology description, megacore chips on v4/v5p."""
  gen, name, _ = topology_lib.parse(topology)
  kw = dict(chip_config_name="megacore") if topology_lib.CHIPS[gen].megacore else {}
  if num_slices > 1:
    kw["num_slices"] = num_slices
  return topologies.get_topology_desc(platform="tpu", topology_name=name, **kw).devices


@functools.lru_cache(maxsize=None)
def _probe_compiler_options(topology: str) -> Tuple[Tuple[Tuple[str, str], ...], Tuple[str, ...]]:
  """The overlap flags of `xla_flags` that this libtpu accepts (each probed on a trivial program), and the
  rejected ones (a flag XLA does not know fails the whole compile)."""
  devices = topology_devices(topology)
  mesh = jax.sharding.Mesh(np.asarray(devices[:1]), ("x",))
  x = jax.ShapeDtypeStruct((128, 128), jnp.float32,
                           sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  lowered = jax.jit(lambda a: a @ a).lower(x)
  ok, bad = [], []
  for k, v in xla_flags.compiler_options(topology).items():
    try:
      lowered.compile(compiler_options={k: v})
      ok.append((k, v))
    except Exception as e:  # pylint: disable=broad-except
      if "compile option" not in str(e):
        raise
      bad.append(k)
  return tuple(ok), tuple(bad)


# XLA's optimisation effort (openxla.org/xla/effort_levels): O0 = fastest compile, slowest runtime; "default"
# leaves the compiler's own level (what a training launch compiles). AOT checks compile at CHECK_EFFORT: on the
# 7B PT step (v5p-256) O0 compiles in 81 s / 4.4 GiB RSS instead of 320 s / 8.5 GiB, per-chip
# memory 0.5% higher, the same executed FLOPs (docs/tpu_aot.md); the runtime schedule is not what it checks.
EFFORTS = ("O0", "O1", "O2", "O3", "default")
CHECK_EFFORT = "O0"


def compiler_options(topology: str, effort: str = "default") -> Dict[str, str]:
  """The flags `tpu/launch.sh` exports as LIBTPU_INIT_ARGS, less those this libtpu rejects, at XLA
  optimisation `effort` (one of EFFORTS)."""
  if effort not in EFFORTS:
    raise ValueError(f"effort={effort!r}: expected one of {EFFORTS}")
  options = dict(_probe_compiler_options(topology)[0])
  if effort != "default":
    options["xla_optimization_level"] = f"EFFORT_{effort}"
  return options


def rejected_compiler_options(topology: str) -> Tuple[str, ...]:
  return _probe_compiler_options(topology)[1]
