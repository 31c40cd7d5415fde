"""Resume: iterate N batches, checkpoint the iterator (Orbax Composite + grain.checkpoint.CheckpointSave, as the
trainer does), iterate M more; restore in a fresh process and iterate M: identical bytes. Also with Grain worker
processes, and with 2 JAX processes each reading its own shard and assembling the global batch."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import hashlib, json, sys
import numpy as np
import grain, orbax.checkpoint as ocp
args = json.loads(sys.argv[1])
import jax
if args["procs"] > 1:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=args["coord"], num_processes=args["procs"],
                             process_id=args["pid"])
from bagel_jax.data import pipeline
from bagel_jax.data.config import synthetic_mixture
from bagel_jax.data.examples import batch_spec_for
from bagel_jax.layout import LayoutConfig
from bagel_jax.models.config import tiny

def digest(b):
  h = hashlib.sha256()
  for k in sorted(b):
    h.update(k.encode()); h.update(np.ascontiguousarray(b[k]).tobytes())
  return h.hexdigest()[:16]

if __name__ == "__main__":
  cfg = tiny()
  spec = batch_spec_for(cfg, batch_size=2, seq_len=192, vit_capacity=64, latent_capacity=112, image_capacity=12,
                        pixel_images=8, pixel_size=32)
  dc = synthetic_mixture(num_workers=args["workers"], prefetch=2)
  it = pipeline.make_pipeline(dc, spec, LayoutConfig.from_model_config(cfg), seed=7,
                              process_index=jax.process_index(), process_count=jax.process_count())
  mngr = ocp.CheckpointManager(args["dir"], item_names=("data_iter",))
  out = {}
  if args["mode"] == "save":
    for _ in range(args["n"]):
      next(it)
    mngr.save(args["n"], args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  else:
    mngr.restore(args["n"], args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(it)))
  hashes, locals_ = [], []
  for _ in range(args["m"]):
    b = next(it)
    hashes.append(digest(b))
    locals_.append(b)
  out["hashes"] = hashes
  out["stats"] = {k: it.stats[k] for k in ("samples_in", "samples_out", "skipped", "buffered", "batches")}
  if args["procs"] > 1:
    from jax.sharding import Mesh
    mesh = Mesh(np.array(jax.devices()), ("data",))
    from bagel_jax.train.inputs import to_global
    g = to_global(locals_[0], mesh)
    shard = g["text_ids"].addressable_shards[0]
    out["global_shape"] = list(g["text_ids"].shape)
    out["shard_rows"] = [shard.index[0].start, shard.index[0].stop]
    out["shard_equal"] = bool(np.array_equal(np.asarray(shard.data), locals_[0]["text_ids"]))
    out["vae_shape"] = list(g["vae_pixels"].shape)
  it.close()
  mngr.close()
  print("RESULT " + json.dumps(out))
"""


def _launch(args_list, timeout=300):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(SCRIPT), json.dumps(a)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for a in args_list]
  outs = []
  for p in procs:
    o, e = p.communicate(timeout=timeout)
    assert p.returncode == 0, e[-4000:]
    line = [l for l in o.splitlines() if l.startswith("RESULT ")][-1]
    outs.append(json.loads(line[len("RESULT "):]))
  return outs


def _resume(tmp_path, workers, n=5, m=4):
  base = dict(dir=str(tmp_path / "ckpt"), n=n, m=m, workers=workers, procs=1, pid=0, coord="")
  (saved,) = _launch([dict(base, mode="save")])
  (restored,) = _launch([dict(base, mode="restore")])
  assert saved["hashes"] == restored["hashes"] and len(set(saved["hashes"])) == m
  assert saved["stats"] == restored["stats"]  # counters are part of the checkpoint
  s = restored["stats"]
  assert s["samples_in"] == s["samples_out"] + s["skipped"] + s["buffered"] and s["batches"] == n + m
  assert os.path.exists(tmp_path / "ckpt" / str(n) / "data_iter" / "process_0-of-1.json")


def test_resume_in_fresh_process(tmp_path):
  _resume(tmp_path, workers=0)


@pytest.mark.slow
def test_resume_in_fresh_process_with_two_workers(tmp_path):
  _resume(tmp_path, workers=2)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.smoke
@pytest.mark.multiprocess
def test_resume_two_processes_each_with_its_shard(tmp_path):
  """2 JAX processes (gloo): each packs its own shard, checkpoints process_{i}-of-2.json, assembles the global
  batch with make_array_from_process_local_data; a fresh 2-process launch restores and continues identically."""
  def run(mode):
    port = _free_port()
    base = dict(dir=str(tmp_path / "ckpt"), n=4, m=3, workers=0, procs=2, coord=f"127.0.0.1:{port}", mode=mode)
    return _launch([dict(base, pid=0), dict(base, pid=1)])

  saved = run("save")
  restored = run("restore")
  for s, r in zip(saved, restored):
    assert s["hashes"] == r["hashes"]
    assert r["global_shape"] == [4, 192] and r["shard_equal"] and r["vae_shape"] == [4, 8, 32, 32, 3]
  assert not set(saved[0]["hashes"]) & set(saved[1]["hashes"])  # different shards, different batches
  assert [saved[0]["shard_rows"], saved[1]["shard_rows"]] == [[0, 2], [2, 4]]
  for i in range(2):
    assert os.path.exists(tmp_path / "ckpt" / "4" / "data_iter" / f"process_{i}-of-2.json")
