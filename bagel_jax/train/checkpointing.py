"""Training checkpoints: one Orbax `CheckpointManager` step holds params, optimizer state, EMA, the step
counter and the data iterator's state, so a restore resumes exactly where the run stopped.

- Async saves, keep the last N plus every K-th step.
- Restore targets abstract arrays carrying the *current* mesh's shardings, so a checkpoint written on mesh A
  restores onto mesh B (Orbax reshards).
- A latest checkpoint that fails to restore (truncated or corrupt files) is skipped with a warning and the
  previous one restored; Orbax itself never exposes a step whose save did not finish.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional, Tuple

import grain
import jax
import orbax.checkpoint as ocp

from bagel_jax import checkpoint as ckpt_lib
from bagel_jax.models.config import BagelConfig

log = logging.getLogger(__name__)

ITEMS = ("params", "opt_state", "ema", "train", "data_iter")


class Checkpointer:

  def __init__(self, directory: str, model_cfg: BagelConfig, *, keep: int = 3, keep_period: Optional[int] = None,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    if jax.process_index() == 0:
      ckpt_lib.write_model_config(self.directory, model_cfg)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_period or None,
                                           enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, state, data_iter, *, force: bool = False) -> bool:
    step = int(jax.device_get(state.step))
    args = dict(params=ocp.args.StandardSave(state.params), opt_state=ocp.args.StandardSave(state.opt_state),
                train=ocp.args.JsonSave({"step": step}))
    if state.ema is not None:
      args["ema"] = ocp.args.StandardSave(state.ema)
    if data_iter is not None:
      args["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

  def wait(self):
    self.manager.wait_until_finished()

  def reached_preemption(self, step: int) -> bool:
    try:
      return bool(self.manager.reached_preemption(step))
    except Exception:  # pylint: disable=broad-except  # no preemption service (CPU, single process)
      return False

  def restore(self, abstract_state, data_iter) -> Tuple[Optional[Any], Optional[int]]:
    """Restores the newest readable step into `abstract_state`'s shapes and shardings; (None, None) if the
    directory holds no checkpoint. Falls back to older steps when the newest is unreadable."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    for i, step in enumerate(steps):
      args = dict(params=ocp.args.StandardRestore(abstract_state.params),
                  opt_state=ocp.args.StandardRestore(abstract_state.opt_state), train=ocp.args.JsonRestore())
      if abstract_state.ema is not None:
        args["ema"] = ocp.args.StandardRestore(abstract_state.ema)
      if data_iter is not None:
        args["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
      except Exception as e:  # pylint: disable=broad-except
        older = steps[i + 1] if i + 1 < len(steps) else None
        log.warning("checkpoint step %d in %s could not be restored (%s: %s); falling back to %s", step,
                    self.directory, type(e).__name__, str(e).splitlines()[0][:200],
                    f"step {older}" if older is not None else "a fresh start")
        print(f"WARNING: checkpoint step {step} unreadable ({type(e).__name__}); "
              f"{'trying step ' + str(older) if older is not None else 'starting fresh'}", flush=True)
        continue
      if int(restored["train"]["step"]) != step:
        raise ValueError(f"checkpoint {self.directory}/{step}: stored step {restored['train']['step']} != {step}")
      state = abstract_state.replace(step=jax.numpy.asarray(step, jax.numpy.int32), params=restored["params"],
                                     opt_state=restored["opt_state"],
                                     ema=restored["ema"] if abstract_state.ema is not None else None)
      return state, step
    return None, None

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
