"""The command line (issue #16): config args that are rejected naming the arg, unknown `--config.x` keys as
one line with exit code 2, `--help` that lists the flags and exits 0 for every CLI, and CPU without libtpu's
noise on machines without a TPU."""
import os
import subprocess
import sys

import pytest

from bagel_jax import accelerators
from experiments.bagel_7b import pretrain
from experiments.tiny import random_smoke

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "experiments", "tiny", "random_smoke.py")


def _cli(workdir, arg, *overrides, env_extra=None, config=SMOKE):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.update(env_extra or {})
  cmd = [sys.executable, "-m", "bagel_jax.train.cli", f"--config={config}:{arg}", f"--workdir={workdir}",
         *overrides]
  return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)


# ----------------------------------------------------------------------------------------------------------
# Rows 6-8: config args.
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arg, match", [
    ("model=tiny,steps=0", r"config arg steps=0: must be >= 1"),
    ("model=tiny,steps=-5", r"config arg steps=-5: must be >= 1"),
    ("model=7B", r"config arg model='7B': not one of \['7b', 'tiny'\]"),
    ("model=small", r"config arg model='small': not one of"),
])
def test_bad_config_args_are_rejected_naming_the_arg(arg, match):
  with pytest.raises(ValueError, match=match):
    pretrain.get_config(arg)


def test_good_config_args_still_work():
  assert pretrain.get_config("model=tiny").train.steps == 300
  assert pretrain.get_config("model=tiny,steps=7").train.steps == 7
  assert pretrain.get_config("").model.preset == "bagel_7b"
  with pytest.raises(ValueError, match=r"config arg steps=0"):
    random_smoke.get_config("steps=0")


# ----------------------------------------------------------------------------------------------------------
# Rows 9-10: the command line.
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, expect", [
    ("--config.train.stepz=3", "--config.train.stepz: unknown config key 'stepz' in config.train (closest known: "
                               "steps"),
    ("--config.optm.lr=3", "--config.optm.lr: unknown config key 'optm' in config (closest known: optim)"),
])
def test_unknown_config_key_is_one_line_exit_2(tmp_path, override, expect):
  r = _cli(str(tmp_path / "w"), "steps=1", override)
  assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  assert r.stderr.startswith(f"bagel-train: error: {expect}"), r.stderr
  assert not os.path.exists(tmp_path / "w")


def test_bad_config_arg_from_the_cli_is_one_line_exit_2(tmp_path):
  r = _cli(str(tmp_path / "w"), "model=tiny,steps=0", config=os.path.join(REPO, "experiments", "bagel_7b",
                                                                          "pretrain.py"))
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert r.stderr.startswith("bagel-train: error: ") and "config arg steps=0: must be >= 1" in r.stderr, r.stderr
  assert len(r.stderr.strip().splitlines()) == 2, r.stderr  # the error and the pointer to --help


def _console_scripts():
  import re  # pylint: disable=import-outside-toplevel
  text = open(os.path.join(REPO, "setup.py")).read()
  return dict(re.findall(r'"([\w-]+) = ([\w.]+:\w+)"', text))


# Every console script of setup.py, plus the two `python -m` entry points of the README.
CLIS = dict(_console_scripts(), demo="bagel_jax.demo:main", **{"experiments.run": "experiments.run:main"})


def test_the_console_scripts_were_found():
  assert {"bagel-train", "bagel-aot", "bagel-sample", "bagel-eval"} <= set(_console_scripts())


@pytest.mark.parametrize("prog", sorted(CLIS))
def test_help_lists_the_flags_and_exits_0(prog):
  module, fn = CLIS[prog].split(":")
  code = f"import sys; from {module} import {fn} as m; sys.argv = [{prog!r}, '--help']; m()"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
  assert r.returncode == 0, (prog, r.returncode, r.stdout[-1000:], r.stderr[-2000:])
  assert "--" in r.stdout and ("usage" in r.stdout.lower() or prog in r.stdout), r.stdout
  if prog == "bagel-train":
    for flag in ("--config", "--workdir", "--config.", "--start_over", "Examples:"):
      assert flag in r.stdout, flag


# ----------------------------------------------------------------------------------------------------------
# TPU-runtime noise on CPU-only machines.
# ----------------------------------------------------------------------------------------------------------

def test_cpu_default_only_without_accelerators_and_never_over_a_user_choice(tmp_path):
  root = str(tmp_path)
  os.makedirs(os.path.join(root, "dev", "vfio"))
  env = {}
  assert accelerators.use_cpu_if_no_accelerator(env, root=root) and env["JAX_PLATFORMS"] == "cpu"
  for user in ({"JAX_PLATFORMS": "tpu"}, {"JAX_PLATFORMS": "cpu,tpu"}, {"JAX_PLATFORM_NAME": "tpu"}):
    env = dict(user)
    assert not accelerators.use_cpu_if_no_accelerator(env, root=root) and env == user
  for device in ("dev/accel0", "dev/vfio/0", "dev/nvidia0"):
    open(os.path.join(root, device), "w").close()
    env = {}
    assert not accelerators.use_cpu_if_no_accelerator(env, root=root) and env == {}, device
    os.remove(os.path.join(root, device))


@pytest.mark.skipif(bool(accelerators.accelerator_devices()),
                    reason="this machine has accelerator devices: the CLIs rightly leave JAX_PLATFORMS unset")
def test_cli_on_a_cpu_only_machine_prints_no_tpu_runtime_noise():
  """The CLI entry with JAX_PLATFORMS unset (as a user runs it) must pick the CPU without libtpu's errors.
  Held under the AOT tests' libtpu lock: without the fix this process would load libtpu."""
  from bagel_jax.aot import libtpu  # pylint: disable=import-outside-toplevel
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "JAX_PLATFORM_NAME")}
  env["PYTHONPATH"] = REPO
  code = ("import sys; from bagel_jax.train import cli; sys.argv = ['bagel-train', '--help']\n"
          "try:\n  cli.main()\nexcept SystemExit:\n  pass\n"
          "import jax; print('backend', jax.default_backend(), jax.devices()[0].platform)")
  with libtpu.libtpu_lock():
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "backend cpu cpu" in r.stdout
  assert "TPU" not in r.stderr and "libtpu" not in r.stderr, r.stderr[-3000:]


def test_console_keeps_tracebacks_of_our_own_records_for_train_log():
  """A failed save logged while the run stops on another error (a full disk: the metrics write fails, then the
  pending checkpoint save) printed its chained traceback on the console (5 in benchmarks/faults.py's disk-full
  run); records with a traceback now go to train.log only, one-line records still print."""
  import logging as std_logging  # pylint: disable=import-outside-toplevel
  from bagel_jax.train import cli  # pylint: disable=import-outside-toplevel
  f = cli._ConsoleFilter()  # pylint: disable=protected-access
  rec = lambda name, exc: std_logging.LogRecord(name, std_logging.WARNING, __file__, 1, "msg", (),
                                                (ValueError, ValueError("x"), None) if exc else None)
  assert f.filter(rec("bagel_jax.train.checkpointing", False))
  assert not f.filter(rec("bagel_jax.train.checkpointing", True))
  assert not f.filter(rec("orbax", True)) and not f.filter(rec("asyncio", False))
