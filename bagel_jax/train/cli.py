"""bagel-train: train (or resume) one experiment config into a workdir.

  bagel-train --config experiments/<file>.py[:<arg>] --workdir DIR [--config.<key>=<value> ...] [--start_over]

Examples:
  bagel-train --config experiments/bagel_7b/pretrain.py:model=tiny,steps=300 --workdir workdirs/pt
  bagel-train --config experiments/tiny/random_smoke.py:steps=20 --workdir /tmp/smoke --config.optim.lr=3e-4
  bagel-train --config experiments/tiny/vae.py --workdir workdirs/tiny_vae    # a VAE recipe (config.recipe="vae")

Flags:
  --config FILE[:ARG]   experiment config file; ARG is its typed comma list (e.g. model=tiny,steps=300; each
                        file's docstring lists its args)
  --config.KEY=VALUE    override any config field, e.g. --config.optim.lr=3e-4 --config.train.steps=500
  --workdir DIR         checkpoints (DIR/checkpoints), metrics.jsonl/csv, loss curves, summary.json
  --start_over          when every checkpoint in DIR is unreadable: set them aside and train from step 0
                        (without it the run refuses to start); metrics history is kept as metrics.previous-N

Rerunning the same command resumes from the newest readable checkpoint. The config file is loaded with
`ml_collections.config_flags` and locked, so a mistyped override fails naming the key. Multi-host:
`--config.distributed.initialize` calls `jax.distributed.initialize` first thing (argument-free on Cloud TPU
VMs, or with explicit coordinator/process flags, e.g. several local CPU processes with gloo). Errors that stop
a run (unreadable checkpoints, disk full, NaN) print one line and exit 1; bad flags exit 2.
"""
from __future__ import annotations

import difflib
import logging as std_logging
import os
import re
import sys
import threading

from absl import app, flags, logging
from ml_collections import config_flags

from bagel_jax import console
from bagel_jax.accelerators import use_cpu_if_no_accelerator
from bagel_jax.host_malloc import tune_host_malloc

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:arg].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (checkpoints, metrics, curves).")
_START_OVER = flags.DEFINE_bool("start_over", False, "If every checkpoint in --workdir is unreadable, set them "
                                "aside and start from step 0 (otherwise the run refuses to start).")

PROG = "bagel-train"
HELP_FLAGS = ("-h", "--help", "-help", "-?", "--helpshort", "--helpfull")


def initialize_distributed(dist) -> None:
  """Must run before any JAX computation or device query."""
  import jax  # pylint: disable=import-outside-toplevel
  if not dist.initialize:
    return
  if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
    jax.config.update("jax_cpu_collectives_implementation", dist.cpu_collectives)
  kw = {}
  if dist.coordinator:
    kw = dict(coordinator_address=dist.coordinator, num_processes=int(dist.num_processes),
              process_id=int(dist.process_id))
  jax.distributed.initialize(**kw)


def _fail(message: str, code: int):
  print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def _config_override_error(argv) -> str:
  """For `--config.a.b=v` whose key does not exist: which key, and the closest known keys at that level."""
  plain = [a for a in argv if not a.startswith("--config.")]
  saved = sys.argv
  try:  # config_flags applies the overrides (read from sys.argv) while parsing --config: load it without them
    sys.argv = plain
    flags.FLAGS.unparse_flags()
    flags.FLAGS(plain)
    cfg = flags.FLAGS["config"].value
    cfg.keys()
  except Exception:  # pylint: disable=broad-except
    return ""
  finally:
    sys.argv = saved
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config."):].split("=", 1)[0].split(".")
    node, where = cfg, "config"
    for key in path:
      if not hasattr(node, "keys"):
        return f"{arg.split('=', 1)[0]}: {where} is a {type(node).__name__} value, it has no key {key!r}"
      known = list(node.keys())
      if key not in known:
        close = difflib.get_close_matches(key, known, n=3, cutoff=0.4)
        hint = f"closest known: {', '.join(close)}" if close else f"known keys: {', '.join(sorted(known))}"
        return f"{arg.split('=', 1)[0]}: unknown config key {key!r} in {where} ({hint})"
      node, where = node[key], f"{where}.{key}"
  return ""


def parse_flags(argv):
  """absl flag parsing, but every bad flag is one line and exit code 2 (no traceback)."""
  try:
    rest = flags.FLAGS(argv)
    if flags.FLAGS["config"].value is not None:
      flags.FLAGS["config"].value.keys()  # a config file that failed to load reports only when first used
    return rest
  except Exception as e:  # pylint: disable=broad-except  # config files raise anything; all are usage errors
    msg = _config_override_error(argv)
    if not msg:
      root = e  # the config file's own error sits at the bottom of the chain absl and config_flags wrap it in
      while (root.__cause__ or root.__context__) is not None:
        root = root.__cause__ or root.__context__
      text = [l.strip() for l in str(root).strip().splitlines()] or [type(root).__name__]
      msg = text[-1] if isinstance(root, OSError) and root.errno is None else " ".join(text)
      if isinstance(root, OSError) and root.errno and root.filename:
        msg = f"--config {root.filename}: {os.strerror(root.errno)}"
      m = re.match(r"flag (--[\w.\-]+)=", str(e))  # absl: "flag --config.train.steps=abc: ..."
      if m and m.group(1) not in msg:
        value = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith(m.group(1) + "=")), "")
        msg = f"{m.group(1)}={value}: {msg}" if value else f"{m.group(1)}: {msg}"
    _fail(f"{msg}\nRun `{PROG} --help` for usage.", 2)


class _ConsoleFilter:
  """Keeps third-party tracebacks off the console. A failed async save makes Orbax's and asyncio's background
  threads log one traceback per array (hundreds); the run reports the failure itself in one line. Those
  records go to `<workdir>/train.log` instead."""

  def filter(self, record) -> bool:
    if record.exc_info:  # ours included: the console gets the one-line message, train.log the traceback
      return False
    ours = record.name.startswith("bagel_jax")
    return ours or not (record.name == "asyncio" or record.levelno >= std_logging.ERROR)


class _QuietFileHandler(std_logging.FileHandler):
  def handleError(self, record):  # a full disk must not print logging's own tracebacks either
    pass


def _route_background_errors(workdir: str) -> str:
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(os.path.abspath(workdir), "train.log")
  handler = _QuietFileHandler(path, delay=True)
  handler.setLevel(std_logging.WARNING)
  handler.setFormatter(std_logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
  std_logging.getLogger().addHandler(handler)
  console.add_handler(handler)  # the package's own warnings too
  logging.get_absl_handler().addFilter(_ConsoleFilter())
  console.add_console_filter(_ConsoleFilter().filter)
  # TensorStore completes failed writes on its own threads and prints their Python errors ("Event loop is
  # closed", one per array) through sys.excepthook / sys.unraisablehook: file them too. The main thread's own
  # errors still print.
  background = std_logging.getLogger("bagel_jax.train.background")
  background.propagate = False
  background.addHandler(handler)
  main_hook = sys.excepthook

  def hook(kind, value, tb):
    late = isinstance(value, RuntimeError) and "Event loop is closed" in str(value)  # a write ended after close
    if threading.current_thread() is threading.main_thread() and not late:
      main_hook(kind, value, tb)
    else:
      background.error("error on a background thread", exc_info=(kind, value, tb))
  sys.excepthook = hook
  main_unraisable = sys.unraisablehook

  def unraisable(u):  # TensorStore reports callbacks that failed after Orbax closed its loop as "unraisable"
    if isinstance(u.exc_value, RuntimeError) and "Event loop is closed" in str(u.exc_value):
      background.error("error after a failed save: %s", u.err_msg or "",
                       exc_info=(u.exc_type, u.exc_value, u.exc_traceback))
    else:
      main_unraisable(u)
  sys.unraisablehook = unraisable

  def thread_hook(args):  # an Orbax/TensorStore worker thread that dies on the failed write
    background.error("thread %s died", getattr(args.thread, "name", "?"),
                     exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
  threading.excepthook = thread_hook
  return path


def _main(argv):
  del argv
  config = _CONFIG.value
  if config is None or not _WORKDIR.value:
    _fail(f"--config and --workdir are required. Run `{PROG} --help` for usage.", 2)
  if not any(a.startswith(("--verbosity", "-v=")) for a in sys.argv):
    logging.set_verbosity(logging.WARNING)  # Orbax logs every rename at INFO; ours goes through bagel_jax.console
  initialize_distributed(config.distributed)
  # imported after jax.distributed.initialize: their module-level JAX work must not start the backend first
  from bagel_jax.train import errors, trainer, vae_recipe  # pylint: disable=import-outside-toplevel
  recipes = {"bagel": lambda c, w: trainer.train(c, w, start_over=_START_OVER.value), "vae": vae_recipe.train}
  recipe = config.get("recipe", "bagel")  # experiments/{tiny,own_data}/vae.py: the VAE's own loop
  if recipe not in recipes:
    _fail(f"config.recipe={recipe!r} is not one of {sorted(recipes)}", 2)
  log_path = _route_background_errors(_WORKDIR.value)
  try:
    recipes[recipe](config, _WORKDIR.value)
  except errors.TrainingFault as e:
    more = f" (details: {log_path})" if os.path.exists(log_path) and os.path.getsize(log_path) else ""
    _fail(f"{e}{more}", 1)


def main(argv=None):
  use_cpu_if_no_accelerator()  # before JAX picks a backend: no libtpu noise on CPU-only machines
  tune_host_malloc()  # only with BAGEL_HOST_MALLOC=tuned (opt-in: bagel_jax/host_malloc.py)
  argv = list(argv or sys.argv)
  if any(a in HELP_FLAGS for a in argv[1:]):
    try:
      print(__doc__.strip(), flush=True)
    except BrokenPipeError:  # `bagel-train --help | head`
      pass
    sys.exit(0)
  app.run(_main, argv=argv, flags_parser=parse_flags)


if __name__ == "__main__":
  main()
