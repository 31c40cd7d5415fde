"""Checkpoint layout shared by the trainer, the converters and the samplers.

A checkpoint directory is an Orbax `CheckpointManager` root: `<dir>/<step>/` holds the items `params` (the
model parameter tree, always present), and, for training checkpoints, `opt_state`, `ema`, `train` (step, rng)
and `data_iter` (Grain iterator state). `<dir>/model_config.json` stores the `BagelConfig`, so a checkpoint
restores without knowing which preset made it, and restoring into a different architecture fails loudly.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional, Tuple

import orbax.checkpoint as ocp

from bagel_jax.models import config as config_lib
from bagel_jax.models.bagel import abstract_params

MODEL_CONFIG = "model_config.json"


def write_model_config(directory: str, config: config_lib.BagelConfig, only_if_changed: bool = False) -> None:
  """Atomic (temporary file + rename). `only_if_changed`: no write when the file already holds this config (a
  resumed run on a full disk must not fail before it even looks at its checkpoints)."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, MODEL_CONFIG)
  text = json.dumps(config_lib.to_dict(config), indent=1)
  if only_if_changed and os.path.exists(path):
    with open(path) as f:
      if f.read() == text:
        return
  tmp = path + ".tmp"
  try:
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def read_model_config(directory: str) -> config_lib.BagelConfig:
  path = os.path.join(directory, MODEL_CONFIG)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{directory} is not a bagel-jax checkpoint: {MODEL_CONFIG} is missing")
  with open(path) as f:
    return config_lib.from_dict(json.load(f))


def check_compatible(saved: config_lib.BagelConfig, wanted: config_lib.BagelConfig, directory: str) -> None:
  a, b = config_lib.architecture(saved), config_lib.architecture(wanted)
  if a != b:
    diff = sorted(_diff(a, b))
    raise ValueError(f"checkpoint {directory} was written for a different model config; differing fields: "
                     f"{diff[:8]}")


def _diff(a, b, prefix=""):
  for k in set(a) | set(b):
    va, vb = a.get(k), b.get(k)
    if isinstance(va, dict) and isinstance(vb, dict):
      yield from _diff(va, vb, f"{prefix}{k}.")
    elif va != vb:
      yield f"{prefix}{k}: {va!r} != {vb!r}"


def save_params(directory: str, params: Any, config: config_lib.BagelConfig, step: int = 0) -> None:
  """A params-only checkpoint (what the converters write)."""
  directory = os.path.abspath(directory)
  write_model_config(directory, config)
  with ocp.CheckpointManager(directory, item_names=("params",)) as mngr:
    mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
    mngr.wait_until_finished()


def load_params(directory: str, config: Optional[config_lib.BagelConfig] = None, step: Optional[int] = None,
                abstract: Any = None, item: str = "params") -> Tuple[Any, config_lib.BagelConfig, int]:
  """Restores the parameter tree (or the EMA tree with item='ema') of the latest (or given) step.

  `abstract` (a tree of `jax.ShapeDtypeStruct` with shardings) restores straight onto a mesh."""
  directory = os.path.abspath(directory)
  saved = read_model_config(directory)
  if config is not None:
    check_compatible(saved, config, directory)
  with ocp.CheckpointManager(directory) as mngr:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint steps under {directory}")
    if abstract is None:
      abstract = abstract_params(config or saved)
    restored = mngr.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(abstract)}))
  return restored[item], (config or saved), step
