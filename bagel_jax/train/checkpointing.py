"""Training checkpoints: one Orbax `CheckpointManager` step holds params, optimizer state, EMA, the step
counter and the data iterator's state, so a restore resumes exactly where the run stopped.

- Async saves, keep the last N plus every K-th step.
- Restore targets abstract arrays carrying the *current* mesh's shardings, so a checkpoint written on mesh A
  restores onto mesh B (Orbax reshards).
- A step that fails to restore (truncated, deleted or overwritten files, a missing item) is moved aside to
  `<dir>/set_aside/step_<N>.unreadable-<Error>/` with a `WHY.txt`, never deleted, and the newest readable step
  is restored: the run then re-saves that step number normally and finishes. Orbax itself never exposes a
  step whose save did not finish (those stay `*.orbax-checkpoint-tmp-*` directories).
- If every step is unreadable the restore refuses (`UnreadableCheckpointsError`, naming the directory and the
  steps) unless `start_over=True`: then the steps are set aside and the run starts from step 0.
- A failed restore never leaves state behind: the data iterator is put back where it was before each attempt.
- A failed write (disk full, quota) of an async save surfaces at the next step as one `WriteFailedError`
  (path, errno, free space); the previous step stays the resume point.
"""
from __future__ import annotations

import datetime
import os
import traceback
from typing import Any, List, Optional, Tuple

import grain
import jax
import orbax.checkpoint as ocp

from bagel_jax import console
from bagel_jax import checkpoint as ckpt_lib
from bagel_jax.models.config import BagelConfig
from bagel_jax.train.errors import UnreadableCheckpointsError, write_failed

log = console.logger(__name__)

ITEMS = ("params", "opt_state", "ema", "train", "data_iter")
SET_ASIDE = "set_aside"


class Checkpointer:

  def __init__(self, directory: str, model_cfg: BagelConfig, *, keep: int = 3, keep_period: Optional[int] = None,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    if jax.process_index() == 0:
      try:
        ckpt_lib.write_model_config(self.directory, model_cfg, only_if_changed=True)
      except OSError as e:
        raise write_failed("checkpoint directory", self.directory, e, "Free space, then rerun") from e
    # cleanup_tmp_directories: a save that never finished (killed, disk full) leaves only a
    # `<step>.orbax-checkpoint-tmp*` directory, never a step; it is removed when the next run starts.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_period or None,
                                           enable_async_checkpointing=async_save, create=True,
                                           cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)
    self._in_flight: Optional[int] = None  # step of the async save not yet waited for

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, state, data_iter, *, force: bool = False) -> bool:
    step = int(jax.device_get(state.step))
    # opt_state through the PyTree handler on both sides: its restore is partial (see `restore`)
    args = dict(params=ocp.args.StandardSave(state.params), opt_state=ocp.args.PyTreeSave(state.opt_state),
                train=ocp.args.JsonSave({"step": step}))
    if state.ema is not None:
      args["ema"] = ocp.args.StandardSave(state.ema)
    if data_iter is not None:
      args["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    self.wait()  # a failed previous async save is reported as that step's failure, before starting this one
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(**args), force=force)
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(e, step) from e
    if saved:
      self._in_flight = step
    return saved

  def _write_error(self, e: BaseException, step: Optional[int] = None):
    latest = [s for s in self.manager.all_steps() if step is None or s != step]
    keep = (f"the previous checkpoint (step {max(latest)}) is intact and is where the next launch resumes"
            if latest else "no earlier checkpoint exists; the next launch starts from step 0")
    what = f"checkpoint step {step}" if step is not None else "checkpoint save"
    return write_failed(what, self.directory, e, f"Free space, then rerun the same command: {keep}")

  def wait(self):
    """Blocks until the last async save landed; a failed save raises `WriteFailedError`."""
    step, self._in_flight = self._in_flight, None
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(e, step) from e

  def check(self):
    """Raises `WriteFailedError` if a finished async save failed (cheap: no waiting on a running save)."""
    try:
      self.manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      step, self._in_flight = self._in_flight, None
      raise self._write_error(e, step) from e

  def reached_preemption(self, step: int) -> bool:
    try:
      return bool(self.manager.reached_preemption(step))
    except Exception:  # pylint: disable=broad-except  # no preemption service (CPU, single process)
      return False

  def restore(self, abstract_state, data_iter, *, start_over: bool = False) -> Tuple[Optional[Any], Optional[int]]:
    """Restores the newest readable step into `abstract_state`'s shapes and shardings; (None, None) if the
    directory holds no checkpoint (or, with `start_over`, only unreadable ones, which are then set aside).

    Unreadable steps newer than the restored one are moved to `set_aside/` with the reason. If no step is
    readable, raises `UnreadableCheckpointsError` and changes nothing (unless `start_over`)."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    before = data_iter.get_state() if data_iter is not None else None
    failed: List[Tuple[int, BaseException]] = []
    for step in steps:
      # opt_state: partial, so a checkpoint written while the frozen VAE was in the state (its optimizer state
      # entries are empty placeholders) restores into a state without it.
      opt_restore = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), abstract_state.opt_state)
      args = dict(params=ocp.args.StandardRestore(abstract_state.params),
                  opt_state=ocp.args.PyTreeRestore(abstract_state.opt_state, restore_args=opt_restore,
                                                   partial_restore=True),
                  train=ocp.args.JsonRestore())
      if abstract_state.ema is not None:
        args["ema"] = ocp.args.StandardRestore(abstract_state.ema)
      if data_iter is not None:
        args["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        for item in ("params", "opt_state", "train") + (("ema",) if abstract_state.ema is not None else ()):
          if restored.get(item) is None:
            raise FileNotFoundError(f"item {item!r} is missing")
        if int(restored["train"]["step"]) != step:
          raise ValueError(f"stored step {restored['train']['step']} != directory step {step}")
      except Exception as e:  # pylint: disable=broad-except
        if data_iter is not None:
          data_iter.set_state(before)  # a partly applied restore must not move the input
        log.warning("checkpoint step %d in %s is unreadable (%s)", step, self.directory, _one_line(e))
        failed.append((step, e))
        continue
      for bad, e in failed:
        self._set_aside(bad, e, f"step {step} is the newest readable one and the run resumes from it")
      return abstract_state.replace(step=jax.numpy.asarray(step, jax.numpy.int32), params=restored["params"],
                                    opt_state=restored["opt_state"],
                                    ema=restored["ema"] if abstract_state.ema is not None else None), step
    if failed and not start_over:
      raise UnreadableCheckpointsError(
          f"every checkpoint in {self.directory} is unreadable (steps {[s for s, _ in failed]}; newest: "
          f"{_one_line(failed[0][1])}). Nothing was changed. Inspect or repair them, or rerun with --start_over "
          f"to move them to {os.path.join(self.directory, SET_ASIDE)}/ and train from step 0 (the old "
          f"metrics.jsonl is kept as metrics.previous-<N>.jsonl)")
    for bad, e in failed:
      self._set_aside(bad, e, "--start_over: the run starts from step 0")
    return None, None

  def _set_aside(self, step: int, exc: BaseException, outcome: str) -> str:
    """Moves an unreadable step out of the manager's sight, keeping it for inspection with the reason."""
    dest_root = os.path.join(self.directory, SET_ASIDE)
    name = f"step_{step}.unreadable-{_reason_name(exc)}"
    dest = os.path.join(dest_root, name)
    if jax.process_index() == 0:
      os.makedirs(dest_root, exist_ok=True)
      n = 1
      while os.path.exists(dest):
        n += 1
        dest = os.path.join(dest_root, f"{name}.{n}")
      os.rename(os.path.join(self.directory, str(step)), dest)
      with open(os.path.join(dest, "WHY.txt"), "w") as f:
        f.write(f"set aside {datetime.datetime.now(datetime.timezone.utc).isoformat()} by bagel-train: checkpoint "
                f"step {step} of {self.directory} could not be restored; {outcome}.\n\n"
                + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices(f"bagel_set_aside_{step}")
    self.manager.reload()
    log.warning("set aside unreadable checkpoint step %d as %s (why: %s; %s)", step, dest, _one_line(exc), outcome)
    return dest

  def close(self, quiet: bool = False):
    """Waits for the last save; `quiet` (the run is already failing) logs a failed save instead of raising."""
    try:
      self.wait()
    except Exception as e:  # pylint: disable=broad-except
      if not quiet:
        raise
      log.warning("the last checkpoint save failed while the run was stopping: %s", _one_line(e))
      log.warning("the failed save's traceback", exc_info=True)  # train.log only (bagel-train's console filter)
    finally:
      try:
        self.manager.close()
      except Exception:  # pylint: disable=broad-except
        if not quiet:
          raise


def _reason_name(e: BaseException) -> str:
  """The most specific exception type in the chain (Orbax wraps the real error in a bare Exception)."""
  best, seen = e, set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if type(best) in (Exception, RuntimeError, ValueError) and type(e) not in (Exception, RuntimeError):
      best = e
    e = e.__cause__ or e.__context__
  return type(best).__name__


def _one_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:200] if text else ''}"
