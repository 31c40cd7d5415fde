"""`bagel-train --config experiments/<file>.py:<arg> --workdir DIR [--config.key=value ...]`.

The config file is loaded with `ml_collections.config_flags` and locked, so a mistyped override fails naming the
key. Multi-host: `--config.distributed.initialize` calls `jax.distributed.initialize` first thing (argument-free
on Cloud TPU VMs, or with explicit coordinator/process flags, e.g. several local CPU processes with gloo).
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:arg].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (checkpoints, metrics, curves).")


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


def _main(argv):
  del argv
  config = _CONFIG.value
  if config is None or not _WORKDIR.value:
    raise app.UsageError("--config and --workdir are required")
  if not any(a.startswith(("--verbosity", "-v=")) for a in sys.argv):
    logging.set_verbosity(logging.WARNING)  # Orbax logs every rename at INFO; our own progress is printed
  initialize_distributed(config.distributed)
  from bagel_jax.train import trainer  # pylint: disable=import-outside-toplevel
  trainer.train(config, _WORKDIR.value)


def main(argv=None):
  app.run(_main, argv=argv or sys.argv)


if __name__ == "__main__":
  main()
