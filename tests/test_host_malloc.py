"""The opt-in glibc malloc tuning (bagel_jax/host_malloc.py): step-sized buffers allocated by a worker thread
come from the heap, not from fresh mmaps (each one faulted in again every step); without the opt-in glibc's
defaults stay. Each case runs in a fresh interpreter (malloc settings are process-wide)."""
import os
import platform
import subprocess
import sys

import pytest

from bagel_jax import host_malloc

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc",
                                reason="glibc malloc only")

PROBE = r"""
import ctypes, sys
from bagel_jax import host_malloc
class MallInfo2(ctypes.Structure):
  _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                              "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
applied = host_malloc.tune_host_malloc()
import threading
mapped = []
def step():  # like XLA's dispatch thread: a step's temporaries, allocated from a non-main thread, then freed
  before = libc.mallinfo2().hblks
  bufs = [libc.malloc(8 << 20), libc.malloc(256 << 20)]  # one activation; one whole-step temp block
  mapped.append(libc.mallinfo2().hblks - before)
  for b in bufs:
    libc.free(ctypes.c_void_p(b))
for _ in range(2):
  t = threading.Thread(target=step); t.start(); t.join()
print(applied, sum(mapped))
"""


def _probe(env_value=None):
  env = {k: v for k, v in os.environ.items() if k != host_malloc.ENV}  # the caller's own setting aside
  if env_value is not None:
    env[host_malloc.ENV] = env_value
  out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                       env=env).stdout.split()
  return out[0] == "True", int(out[1])


def test_tuned_malloc_serves_step_buffers_from_the_heap():
  assert _probe("tuned") == (True, 0)


def test_default_keeps_glibc_defaults():
  applied, mapped = _probe()
  assert not applied and mapped >= 2  # glibc maps a fresh block for the step's temporaries, every step


def test_bad_setting_is_named():
  with pytest.raises(ValueError, match="BAGEL_HOST_MALLOC='fast'"):
    host_malloc.tune_host_malloc({host_malloc.ENV: "fast"})
