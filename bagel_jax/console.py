"""Status output, one convention for the whole package: the standard `logging` module.

Every module that reports status takes `log = console.logger(__name__)` and writes `log.info(...)` for progress
and what happened (resumed from step N, the data report), `log.warning(...)` for what a user should look at.
The "bagel_jax" logger prints them itself: INFO lines as bare messages on stdout, warnings and errors as
"WARNING: message" on stderr, both to the stream current at the time of the call (so pytest's capture and
notebooks see them), whatever the CLI's absl verbosity. `print` is kept for what a command exists to output:
its result (JSON, a written path), `--help`, a REPL's answers, a CLI's one-line error.
"""
from __future__ import annotations

import logging
import sys

ROOT = "bagel_jax"


class _CurrentStream(logging.Handler):
  """Writes each record to sys.stdout or sys.stderr as they are at emit time."""

  def __init__(self, err: bool):
    super().__init__()
    self.err = err

  def emit(self, record):
    try:
      stream = sys.stderr if self.err else sys.stdout
      stream.write(self.format(record) + "\n")
      stream.flush()
    except Exception:  # pylint: disable=broad-except
      self.handleError(record)


class _Warnings(logging.Formatter):
  def format(self, record):
    text = f"{record.levelname}: {record.getMessage()}"
    if record.exc_info:
      text += "\n" + self.formatException(record.exc_info)
    return text


def _install() -> logging.Logger:
  root = logging.getLogger(ROOT)
  if getattr(root, "_bagel_console", False):
    return root
  out, err = _CurrentStream(err=False), _CurrentStream(err=True)
  out.addFilter(lambda r: r.levelno < logging.WARNING)
  out.setFormatter(logging.Formatter("%(message)s"))
  err.setLevel(logging.WARNING)
  err.setFormatter(_Warnings())
  root.addHandler(out)
  root.addHandler(err)
  root.setLevel(logging.INFO)
  root.propagate = False  # printed here once, not again by absl's root handler
  root._bagel_console = True  # pylint: disable=protected-access
  return root


def logger(name: str) -> logging.Logger:
  """The logger of module `name` (a `bagel_jax.*` module name) under the console handlers."""
  _install()
  return logging.getLogger(name if name.startswith(ROOT) else f"{ROOT}.{name}")


def add_handler(handler: logging.Handler) -> None:
  """Also sends the package's records to `handler` (bagel-train's train.log)."""
  _install().addHandler(handler)


def add_console_filter(fn) -> None:
  """`fn(record) -> bool` decides which records the console prints (bagel-train keeps tracebacks off it)."""
  for h in _install().handlers:
    if isinstance(h, _CurrentStream):
      h.addFilter(fn)
