"""Faults that stop a training run with one actionable message (the CLI prints it without a traceback).

Every class here means "the run stopped on purpose and said why": what failed, where, and what to do next.
"""
from __future__ import annotations

import errno as errno_lib
import os
import re
import shutil
from typing import Optional, Tuple


class TrainingFault(RuntimeError):
  """Base of the faults the CLI reports as one line (exit code 1)."""


class UnreadableCheckpointsError(TrainingFault):
  """Every checkpoint step in the workdir failed to restore; nothing was changed."""


class WriteFailedError(TrainingFault):
  """A checkpoint or metrics write failed (disk full, quota, permissions); the previous checkpoint is intact."""


_ERRNO_IN_TEXT = re.compile(r"(?:\[Errno |OS error |errno[ =:]*)(\d+)")


def find_os_error(exc: BaseException) -> Tuple[Optional[int], Optional[str]]:
  """(errno, filename) of the first OSError in `exc`'s cause/context chain or exception group, else an errno
  parsed from the text (TensorStore reports 'OS error 28: ...' inside a ValueError)."""
  seen = set()
  stack = [exc]
  texts = []
  while stack:
    e = stack.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno:
      return e.errno, e.filename
    texts.append(str(e))
    stack.extend(getattr(e, "exceptions", ()) or ())
    stack.extend([e.__cause__, e.__context__])
  for t in texts:
    m = _ERRNO_IN_TEXT.search(t)
    if m:
      return int(m.group(1)), None
    if "No space left on device" in t:
      return errno_lib.ENOSPC, None
  return None, None


def free_space(path: str) -> str:
  """'X MiB free of Y MiB' on the filesystem holding `path` (or its nearest existing parent)."""
  p = os.path.abspath(path)
  while p and not os.path.exists(p):
    parent = os.path.dirname(p)
    if parent == p:
      break
    p = parent
  try:
    u = shutil.disk_usage(p)
  except OSError:
    return "free space unknown"
  return f"{u.free / 2**20:.1f} MiB free of {u.total / 2**20:.1f} MiB"


def write_failed(what: str, path: str, exc: BaseException, resume_hint: str = "") -> WriteFailedError:
  """One line: what could not be written where, the errno, the free space, and what still holds."""
  code, filename = find_os_error(exc)
  where = filename or path
  if code is not None:
    reason = f"[Errno {code}] {os.strerror(code)}"
  else:
    reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
  msg = f"{what}: could not write {where}: {reason} ({free_space(path)})"
  if resume_hint:
    msg += f". {resume_hint}"
  err = WriteFailedError(msg)
  err.errno = code
  return err
