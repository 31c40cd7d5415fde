"""Faults (issue #16): each row of the issue's table is a test here.

Fast tests drive `Checkpointer`, the metrics writer and the CLI parser directly on small trees; the end-to-end
ones (marked slow) train the tiny random-data config through the same fault. `benchmarks/faults.py` runs the
tiny pre-training recipe through them and compares final parameters with an uninterrupted run.
"""
import contextlib
import glob
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bagel_jax.models import config as config_lib
from bagel_jax.train import checkpointing, metrics as metrics_lib
from bagel_jax.train import trainer
from bagel_jax.train.errors import UnreadableCheckpointsError, WriteFailedError
from bagel_jax.train.step import TrainState
from experiments.tiny import random_smoke

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "experiments", "tiny", "random_smoke.py")


# ----------------------------------------------------------------------------------------------------------
# Small checkpoints: a toy train state and a resumable input, written by the real Checkpointer.
# ----------------------------------------------------------------------------------------------------------

class CountingInput:
  """The input protocol of bagel_jax.train.inputs (get_state/set_state bytes)."""

  def __init__(self):
    self.index = 0

  def __next__(self):
    self.index += 1
    return self.index

  def get_state(self) -> bytes:
    return json.dumps({"index": self.index}).encode()

  def set_state(self, state):
    self.index = int(json.loads(state)["index"])

  def start_prefetch(self):
    pass


def _state(step: int, n: int = 256, value: float = None):
  """Random (incompressible) values that identify the step: leaf[0] == step (or `value`)."""
  sh = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  rng = np.random.default_rng(step)

  def arr():
    x = rng.standard_normal(n).astype(np.float32)
    x[0] = float(step) if value is None else value
    return jax.device_put(x, sh)
  return TrainState(step=jnp.asarray(step, jnp.int32), params={"w": arr()}, opt_state={"mu": arr()},
                    ema={"w": arr()})


def _abstract(n: int = 256):
  sh = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), _state(0, n))


def _ckpt(directory, **kw):
  kw.setdefault("async_save", False)
  return checkpointing.Checkpointer(str(directory), config_lib.get_preset("tiny"), keep=5, **kw)


def _write_steps(directory, steps, n=256):
  ckpt = _ckpt(directory)
  it = CountingInput()
  for s in steps:
    it.index = s * 10
    ckpt.save(_state(s, n), it, force=True)
  ckpt.close()


def _largest_file(step_dir, item="params"):
  """The largest array-data chunk of an item (TensorStore OCDBT data files live under .../d/)."""
  files = [f for f in glob.glob(os.path.join(step_dir, item, "**", "d", "*"), recursive=True) if os.path.isfile(f)]
  return max(files, key=os.path.getsize)


def _truncate(step_dir):
  f = _largest_file(step_dir)
  with open(f, "r+b") as fh:
    fh.truncate(os.path.getsize(f) // 2)


def _delete(step_dir):
  os.remove(_largest_file(step_dir))


def _overwrite_mid_file(step_dir):
  f = _largest_file(step_dir)
  size = os.path.getsize(f)
  with open(f, "r+b") as fh:
    fh.seek(size // 3)
    fh.write(b"\xff" * max(8, size // 3))


def _drop_data_iter(step_dir):
  import shutil  # pylint: disable=import-outside-toplevel
  shutil.rmtree(os.path.join(step_dir, "data_iter"))


CORRUPTIONS = {"truncated": _truncate, "deleted": _delete, "overwritten": _overwrite_mid_file,
               "data_iter_missing": _drop_data_iter}


# ----------------------------------------------------------------------------------------------------------
# Row 1: newest checkpoint step unreadable.
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_unreadable_newest_step_is_set_aside_and_the_run_can_save_it_again(tmp_path, corruption, capsys):
  d = tmp_path / "checkpoints"
  _write_steps(d, [1, 2, 3])
  CORRUPTIONS[corruption](str(d / "3"))
  ckpt = _ckpt(d)
  it = CountingInput()
  state, step = ckpt.restore(_abstract(), it)
  assert step == 2 and it.index == 20
  np.testing.assert_array_equal(np.asarray(state.params["w"]), np.asarray(_state(2).params["w"]))
  # kept for inspection under a name that says why, with the full reason; no longer a step of the run
  aside = glob.glob(str(d / "set_aside" / "step_3.unreadable-*"))
  assert len(aside) == 1, os.listdir(d)
  assert "could not be restored" in open(os.path.join(aside[0], "WHY.txt")).read()
  assert not os.path.exists(d / "3") and ckpt.latest_step() == 2
  err = capsys.readouterr().err  # a warning (bagel_jax.console): stderr
  assert "WARNING: set aside unreadable checkpoint step 3" in err and "why:" in err and aside[0] in err
  # the resumed run reaches step 3 again and saves it (before: StepAlreadyExistsError on every relaunch)
  it.index = 30
  assert ckpt.save(_state(3), it, force=True)
  ckpt.close()
  state, step = _ckpt(d).restore(_abstract(), CountingInput())
  assert step == 3 and float(state.params["w"][0]) == 3.0


@pytest.mark.slow
def test_run_with_an_unreadable_newest_step_finishes(tmp_path):
  """End to end: 4 steps, corrupt step 4, relaunch: step 4 set aside, resumed from 3, finished, and the final
  parameters equal the uninterrupted run's."""
  c = random_smoke.get_config("steps=4")
  c.train.update(dict(async_checkpoint=False, checkpoint_every=1, keep_checkpoints=3))
  trainer.train(c, str(tmp_path))
  ckdir = os.path.join(tmp_path, "checkpoints")
  ref = checkpointing.ckpt_lib.load_params(ckdir, step=4)[0]
  _truncate(os.path.join(ckdir, "4"))
  trainer.train(c, str(tmp_path))
  assert glob.glob(os.path.join(ckdir, "set_aside", "step_4.unreadable-*"))
  got = checkpointing.ckpt_lib.load_params(ckdir, step=4)[0]
  for x, y in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  steps = [r["step"] for r in metrics_lib.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))]
  assert steps == [1, 2, 3, 4]


# ----------------------------------------------------------------------------------------------------------
# Row 2: every checkpoint unreadable.
# ----------------------------------------------------------------------------------------------------------

def test_every_step_unreadable_refuses_without_start_over_and_changes_nothing(tmp_path):
  d = tmp_path / "checkpoints"
  _write_steps(d, [1, 2])
  for s in ("1", "2"):
    _truncate(str(d / s))  # params unreadable, the data_iter item still restores (and would move the input)
  it = CountingInput()
  with pytest.raises(UnreadableCheckpointsError) as e:
    _ckpt(d).restore(_abstract(), it)
  msg = str(e.value)
  assert str(d) in msg and "[2, 1]" in msg and "--start_over" in msg
  assert it.index == 0, "a failed restore moved the input"
  assert sorted(os.listdir(d)) == ["1", "2", "model_config.json"], "refusing must not change the workdir"


def test_start_over_sets_every_step_aside_and_reuses_no_state(tmp_path):
  d = tmp_path / "checkpoints"
  _write_steps(d, [1, 2])
  for s in ("1", "2"):
    _truncate(str(d / s))
  it = CountingInput()
  ckpt = _ckpt(d)
  assert ckpt.restore(_abstract(), it, start_over=True) == (None, None)
  assert it.index == 0
  assert sorted(n.split(".")[0] for n in os.listdir(d / "set_aside")) == ["step_1", "step_2"]
  assert ckpt.latest_step() is None
  assert ckpt.save(_state(1, value=7.0), it, force=True)  # step 1 is free again (was skipped silently before)
  ckpt.close()


def test_fresh_start_keeps_the_previous_metrics_history(tmp_path):
  w = str(tmp_path)
  with open(os.path.join(w, "metrics.jsonl"), "w") as f:
    f.write('{"step": 10, "loss": 1.0}\n{"step": 20, "loss": 0.5}\n')
  open(os.path.join(w, "metrics.csv"), "w").write("step,loss\n10,1.0\n20,0.5\n")
  kept = metrics_lib.rotate_history(w)
  assert [os.path.basename(k) for k in kept] == ["metrics.previous-1.jsonl", "metrics.previous-1.csv"]
  assert [r["step"] for r in metrics_lib.read_jsonl(kept[0])] == [10, 20]
  assert not os.path.exists(os.path.join(w, "metrics.jsonl"))
  open(os.path.join(w, "metrics.jsonl"), "w").write('{"step": 1, "loss": 2.0}\n')
  assert os.path.basename(metrics_lib.rotate_history(w)[0]) == "metrics.previous-2.jsonl"


@pytest.mark.slow
def test_start_over_end_to_end(tmp_path):
  """All checkpoints unreadable: the trainer refuses naming the workdir; with start_over it trains from step 0
  on fresh state and the old metrics history is kept."""
  c = random_smoke.get_config("steps=2")
  c.train.update(dict(async_checkpoint=False, checkpoint_every=1))
  trainer.train(c, str(tmp_path))
  for s in ("1", "2"):
    _truncate(os.path.join(tmp_path, "checkpoints", s))
  with pytest.raises(UnreadableCheckpointsError, match=str(tmp_path)):
    trainer.train(c, str(tmp_path))
  first = metrics_lib.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  trainer.train(c, str(tmp_path), start_over=True)
  assert metrics_lib.read_jsonl(os.path.join(tmp_path, "metrics.previous-1.jsonl")) == first
  again = metrics_lib.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  assert [r["step"] for r in again] == [1, 2]
  assert [r["loss"] for r in again] == [r["loss"] for r in first]  # same data and init: fresh state, step 0


# ----------------------------------------------------------------------------------------------------------
# Row 3: NaN / Inf.
# ----------------------------------------------------------------------------------------------------------

def test_nan_state_is_never_checkpointed_and_the_halt_says_how_to_resume(tmp_path):
  """lr=1e39 is inf in fp32: the step-1 loss is still finite (computed before the update) but the updated
  parameters are not. Before: step 1 was saved with non-finite params and called 'last good'."""
  c = random_smoke.get_config("steps=4,lr=1e39")
  c.optim.clip_norm = 0.0
  c.train.update(dict(async_checkpoint=False, checkpoint_every=1))
  with pytest.raises(trainer.NonFiniteLossError) as e:
    trainer.train(c, str(tmp_path))
  msg = str(e.value)
  assert "not finite after step 1" in msg and "No checkpoint was saved yet" in msg
  assert "--config.optim.lr" in msg and "rerun" in msg.lower()
  assert not glob.glob(os.path.join(tmp_path, "checkpoints", "[0-9]*"))


def test_state_finiteness_check_covers_params_optimizer_and_ema():
  good = _state(1)
  assert bool(trainer.state_is_finite(good))
  for field in ("params", "opt_state", "ema"):
    tree = getattr(good, field)
    bad = jax.tree.map(lambda x: x.at[3].set(jnp.inf), tree)
    assert not bool(trainer.state_is_finite(good.replace(**{field: bad}))), field


# ----------------------------------------------------------------------------------------------------------
# Row 4: disk full during an async save.
# ----------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def small_tmpfs(path, size_kib: int):
  os.makedirs(path, exist_ok=True)
  if os.geteuid() != 0:
    pytest.skip("disk-full test needs root to mount a small tmpfs (not root here)")
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path)],
                     capture_output=True, text=True, check=False)
  if r.returncode:
    pytest.skip(f"disk-full test: cannot mount a tmpfs here ({r.stderr.strip()})")
  try:
    yield str(path)
  finally:
    subprocess.run(["umount", "-l", str(path)], check=False)


def test_disk_full_during_async_save_stops_with_one_clear_error_and_keeps_the_previous_step(tmp_path):
  n = 128 * 1024  # 512 KiB per array, 1.5 MiB per step (params, opt_state, ema)
  with small_tmpfs(tmp_path / "disk", 2560) as disk:
    d = os.path.join(disk, "checkpoints")
    ckpt = _ckpt(d, async_save=True)
    it = CountingInput()
    ckpt.save(_state(1, n), it, force=True)
    ckpt.wait()
    ckpt.save(_state(2, n), it, force=True)  # does not fit: fails in the background
    with pytest.raises(WriteFailedError) as e:
      ckpt.wait()
    msg = str(e.value)
    assert "[Errno 28] No space left on device" in msg and "MiB free of" in msg and d in msg
    assert "step 1" in msg and "rerun the same command" in msg
    ckpt.close(quiet=True)
    state, step = _ckpt(d).restore(_abstract(n), CountingInput())
    assert step == 1 and float(state.params["w"][0]) == 1.0


def test_metrics_write_on_a_full_disk_leaves_no_torn_line(tmp_path):
  with small_tmpfs(tmp_path / "disk", 64) as disk:
    w = metrics_lib.JsonlCsvWriter(disk)
    w.write_scalars(1, {"loss": 1.0})
    with open(os.path.join(disk, "filler"), "wb", buffering=0) as f:  # fill the disk up to the last byte
      with contextlib.suppress(OSError):
        while True:
          f.write(b"\0" * 4096)
          f.flush()
      with contextlib.suppress(OSError):
        while True:
          f.write(b"\0")
          f.flush()
    with pytest.raises(WriteFailedError, match=r"metrics\.(jsonl|csv).*\[Errno 28\]"):
      w.write_scalars(2, {"loss": 0.5, "x" * 6000: 1.0})  # more than the free tail of the last page
    assert [r["step"] for r in metrics_lib.read_jsonl(os.path.join(disk, "metrics.jsonl"))] == [1]
    assert open(os.path.join(disk, "metrics.jsonl")).read().endswith("\n")


@pytest.mark.slow
def test_disk_full_from_the_cli_is_one_line_and_resumable(tmp_path):
  """bagel-train on a small tmpfs: the first failed checkpoint write stops the run with one line (path, errno,
  free space), exit 1, no traceback; after freeing space the same command resumes from the previous step."""
  with small_tmpfs(tmp_path / "disk", 40 * 1024) as disk:
    work = os.path.join(disk, "w")
    filler = os.path.join(disk, "filler")
    r = _cli(work, "steps=2", "--config.train.checkpoint_every=1")
    assert r.returncode == 0, r.stderr[-2000:]
    one = sum(os.path.getsize(f) for f in glob.glob(os.path.join(work, "checkpoints", "1", "**", "*"),
                                                    recursive=True) if os.path.isfile(f))
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(filler, "wb") as f:
      f.write(b"\0" * max(0, free - one // 2))  # room for half a checkpoint
    r = _cli(work, "steps=4", "--config.train.checkpoint_every=1")
    assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("bagel-train: error: checkpoint") and "[Errno 28]" in last and "MiB free" in last
    assert "step 2" in last, last
    os.remove(filler)
    r = _cli(work, "steps=4", "--config.train.checkpoint_every=1")
    assert r.returncode == 0 and "resumed from step 2" in r.stdout, r.stderr[-3000:]


# ----------------------------------------------------------------------------------------------------------
# Row 5: torn last line in metrics.jsonl.
# ----------------------------------------------------------------------------------------------------------

def test_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, capsys):
  path = os.path.join(tmp_path, "metrics.jsonl")
  with open(path, "w") as f:
    f.write('{"step": 1, "loss": 2.0, "tokens_seen": 10}\n{"step": 2, "loss": 1.5, "tokens_seen": 20}\n{"step": 3, "lo')
  w = metrics_lib.JsonlCsvWriter(str(tmp_path))
  assert path in capsys.readouterr().err
  w.truncate_after(2)
  assert [r["step"] for r in metrics_lib.read_jsonl(path)] == [1, 2]
  assert trainer._tokens_seen_at(str(tmp_path), 2) == 20  # pylint: disable=protected-access
  with open(path, "a") as f:
    f.write('{"step": 3, "lo\n{"step": 4}\n')  # a bad line that is not the last one is an error naming it
  with pytest.raises(ValueError, match=r"metrics\.jsonl:3: not a JSON line"):
    metrics_lib.read_jsonl(path)


def _cli(workdir, arg, *overrides, env_extra=None, config=SMOKE):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.update(env_extra or {})
  cmd = [sys.executable, "-m", "bagel_jax.train.cli", f"--config={config}:{arg}", f"--workdir={workdir}",
         *overrides]
  return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
