"""Training: exact resume after SIGKILL, freezing, NaN stop, config validation, checkpoints across meshes."""
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from bagel_jax import checkpoint as ckpt_lib
from bagel_jax.train import trainer
from experiments.tiny import random_smoke

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "experiments", "tiny", "random_smoke.py")


def _cli(workdir, arg, *overrides, env_extra=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.update(env_extra or {})
  cmd = [sys.executable, "-m", "bagel_jax.train.cli", f"--config={SMOKE}:{arg}", f"--workdir={workdir}",
         *overrides]
  return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)


def _losses(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return {r["step"]: (r["loss"], r["ce"], r["mse"]) for r in rows}


def _params(workdir, step):
  params, _, got = ckpt_lib.load_params(os.path.join(workdir, "checkpoints"), step=step)
  assert got == step
  return params


@pytest.mark.slow
@pytest.mark.smoke
def test_exact_resume_after_sigkill(tmp_path):
  """20 uninterrupted steps == 10 steps, checkpoint, 5 more steps, SIGKILL, resume from 10, run to 20:
  per-step losses and final parameters bit-identical (fp32, CPU)."""
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  r = _cli(a, "steps=20")
  assert r.returncode == 0, r.stderr[-3000:]
  r = _cli(b, "steps=20", "--config.train.debug_kill_at_step=15")
  assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-3000:])
  assert sorted(int(d) for d in os.listdir(os.path.join(b, "checkpoints")) if d.isdigit()) == [10]
  r = _cli(b, "steps=20")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from step 10" in r.stdout
  la, lb = _losses(a), _losses(b)
  assert sorted(la) == sorted(lb) == list(range(1, 21))
  for step in range(1, 21):
    assert la[step] == lb[step], (step, la[step], lb[step])
  pa, pb = _params(a, 20), _params(b, 20)
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _small(arg="", **train):
  c = random_smoke.get_config(arg)
  c.train.update(dict(async_checkpoint=False, **train))
  return c


def test_align_stage_trains_only_the_connector(tmp_path):
  c = _small("stage=align,steps=2,lr=1e-2")
  s = trainer.make_setup(c)
  before = jax.device_get(trainer.create_state(s).params)
  trainer.train(c, str(tmp_path))
  after = jax.device_get(_params(str(tmp_path), 2))
  changed = {k for k in before if any(not np.array_equal(x, y) for x, y in
                                      zip(jax.tree.leaves(before[k]), jax.tree.leaves(after[k])))}
  assert changed == {"connector"}, changed


def _pixel(arg=""):
  """The tiny smoke config with pixel-mode rows (the frozen VAE encodes images inside the step)."""
  c = _small(arg)
  c.batch.update(dict(vae_image_capacity=4, vae_image_size=32))
  return c


def test_frozen_weights_have_no_optimizer_or_ema_copy():
  """Rows with precomputed latents: the VAE is not in the train state at all (params, Adam, EMA); the
  checkpoint view still holds it, so `params` and `ema` load as whole models. Pixel-mode rows: the VAE is in
  the state (the step encodes with it) but frozen: no Adam moments, no EMA copy, FSDP-sharded convs."""
  import flax.linen as nn
  from bagel_jax.parallel import rules as rules_lib
  s = trainer.make_setup(_small("steps=1"))
  paths = lambda tree: {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}
  assert "vae" not in s.abstract_state.params and "vae" not in s.abstract_state.ema
  assert not any("'vae'" in p for p in paths(s.abstract_state.opt_state))
  assert "vae" in s.saved_abstract.params and "vae" in s.saved_abstract.ema and set(s.outside_shardings) == {"vae"}
  px = trainer.make_setup(_pixel("steps=1"))
  assert "vae" in px.abstract_state.params and not any(jax.tree.leaves(px.mask["vae"]))
  assert "vae" not in px.abstract_state.ema and not px.outside_shardings
  assert not any("'vae'" in p for p in paths(px.abstract_state.opt_state) if "mu" in p or "nu" in p)
  for name in ("default", "fsdp_only"):  # what decides the convs' placement on a pod
    spec = nn.logical_to_mesh_axes(("conv_h", "conv_w", "conv_in", "conv_out"), rules_lib.get_rules(name))
    assert tuple(spec) == (None, None, None, "fsdp"), (name, spec)


def test_checkpoint_of_the_old_layout_resumes(tmp_path):
  """A checkpoint written when the frozen VAE lived in the state (its optimizer entries and an EMA copy of
  every weight) resumes under the new layout, and training from it gives the same parameters as a fresh run."""
  from bagel_jax.train import checkpointing, inputs, optimizer as opt_lib
  from bagel_jax.train.step import TrainState
  c = _small("steps=3")
  fresh, old = str(tmp_path / "fresh"), str(tmp_path / "old")
  trainer.train(c, fresh)
  s = trainer.make_setup(c)
  params = trainer.initial_params(s)
  tx_full, _, _ = opt_lib.make_optimizer(c.optim, params)
  old_state = TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params, opt_state=tx_full.init(params),
                         ema=jax.tree.map(jax.numpy.copy, params))
  data = inputs.make_input(s.run, s.local_spec, 0, 1)
  ck = checkpointing.Checkpointer(os.path.join(old, "checkpoints"), s.model_cfg, async_save=False)
  ck.save(old_state, data, force=True)
  ck.close()
  trainer.train(c, old)
  for x, y in zip(jax.tree.leaves(_params(fresh, 3)), jax.tree.leaves(_params(old, 3))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  ema, _, _ = ckpt_lib.load_params(os.path.join(old, "checkpoints"), step=3, item="ema")
  np.testing.assert_array_equal(np.asarray(jax.tree.leaves(ema["vae"])[0]),
                                np.asarray(jax.tree.leaves(params["vae"])[0]))


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
  c = _small("steps=6,lr=1e38", checkpoint_every=1)
  c.optim.clip_norm = 0.0
  with pytest.raises(trainer.NonFiniteLossError, match=r"loss is (nan|inf|-inf) at step (\d+) \(batch index \d+\)") as e:
    trainer.train(c, str(tmp_path))
  bad_step = int(str(e.value).split(" at step ")[1].split()[0])
  last_good = ckpt_lib.load_params(os.path.join(tmp_path, "checkpoints"))[2]
  assert last_good == bad_step - 1
  assert f"last good checkpoint is step {last_good}" in str(e.value)


@pytest.mark.parametrize("mutate, match", [
    (lambda c: c.batch.__setitem__("vit_capacity", 4), r"config\.batch\.vit_capacity=4 is smaller than one sample"),
    (lambda c: c.mesh.ici.__setitem__("fsdp", 3), r"config\.mesh\.ici.*product 3 != 1 devices"),
    (lambda c: c.optim.__setitem__("schedule", "linear"), r"config\.optim\.schedule='linear'"),
    (lambda c: c.optim.__setitem__("grad_accum", 3), r"config\.batch\.batch_size=2 must be divisible"),
    (lambda c: c.model.__setitem__("variant", "sparse"), r"layer_variant='sparse'"),
])
def test_bad_config_names_the_key(mutate, match):
  c = _small("steps=1")
  mutate(c)
  with pytest.raises(ValueError, match=match):
    trainer.make_setup(c)


def test_unknown_key_and_wrong_type_from_the_cli(tmp_path):
  r = _cli(str(tmp_path), "steps=1", "--config.optim.lr_typo=1")
  assert r.returncode != 0 and "lr_typo" in r.stderr
  r = _cli(str(tmp_path), "steps=1", "--config.train.steps=abc")
  assert r.returncode != 0 and "train.steps" in r.stderr
  with pytest.raises(ValueError, match="unknown key 'stepz'"):
    random_smoke.get_config("stepz=3")
  c = _small("steps=1")
  with c.unlocked():
    c.optim.betas = (0.9, 0.95)
  with pytest.raises(ValueError, match=r"config\.optim\.betas: unknown config key"):
    trainer.make_setup(c)
