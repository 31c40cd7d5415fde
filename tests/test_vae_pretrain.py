"""The tiny VAE stand-in (bagel_jax.train.vae_pretrain): pretraining learns, the cache round-trips, and
`init.vae="synthetic"` puts the cached VAE into a run's initial parameters."""
import jax
import numpy as np
import pytest

from bagel_jax.models.config import tiny
from bagel_jax.models.flux_vae import init_vae_params
from bagel_jax.train import trainer
from bagel_jax.train import vae_pretrain as vp
from experiments import common

CFG = tiny().vae
SIZE, STEPS = 32, 60  # a short run; the trainer's cache key uses the default batch size, so the fixture does too


def _no_training(*_, **__):
  raise RuntimeError("cache miss: retrained")


def _leaves_equal(a, b):
  fa, fb = jax.tree_util.tree_flatten_with_path(a), jax.tree_util.tree_flatten_with_path(b)
  assert fa[1] == fb[1]
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for (_, x), (_, y) in zip(fa[0], fb[0]))


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp("cache"))
  params = vp.cached_pretrained_vae(CFG, SIZE, steps=STEPS, cache_dir=cache, verbose=False)
  return cache, params


def test_pretraining_reconstructs_held_out_renders(cached):
  _, params = cached
  test = vp.synthetic_images(64, SIZE, split="test")
  random_mse = vp.recon_mse(CFG, init_vae_params(CFG, jax.random.key(0)), test)
  mse = vp.recon_mse(CFG, params, test)
  assert mse < random_mse / 3 and mse < test.var() / 2, (mse, random_mse, float(test.var()))
  # the trainer encodes with a posterior sample: the pinned log-variance makes it agree with the mean
  assert abs(vp.recon_mse(CFG, params, test, jax.random.key(1)) - mse) < 0.02 * mse
  mu, sd = vp.latent_stats(CFG, params, test)  # scaled latents ~ N(0, 1) per channel, like the flow's noise
  assert np.all(np.abs(mu) < 0.3) and np.all((sd > 0.6) & (sd < 1.5)), (mu, sd)


def test_cache_round_trip_loads_without_training(cached, monkeypatch):
  cache, params = cached
  monkeypatch.setattr(vp, "pretrain_vae", _no_training)
  again = vp.cached_pretrained_vae(CFG, SIZE, steps=STEPS, cache_dir=cache)
  assert _leaves_equal(params, again)
  with pytest.raises(RuntimeError, match="cache miss"):  # another key (steps) is a different entry
    vp.cached_pretrained_vae(CFG, SIZE, steps=STEPS + 1, cache_dir=cache)


def _tiny_config(vae):
  c = common.base_config()
  common.tiny_cpu(c, batch_size=1, seq_len=256)
  c.init.vae, c.init.vae_steps = vae, STEPS
  return c


def test_init_vae_synthetic_uses_the_cached_vae(cached, monkeypatch):
  cache, params = cached
  monkeypatch.setenv("BAGEL_JAX_CACHE", cache)
  monkeypatch.setattr(vp, "pretrain_vae", _no_training)
  assert common.tiny_cpu(common.base_config()).init.vae == "synthetic"
  s = trainer.make_setup(_tiny_config("synthetic"))
  got = jax.device_get(trainer.init_params_sharded(s, jax.random.key(0))["vae"])
  assert _leaves_equal(got, params)
  rand = jax.device_get(trainer.initial_vae_params(trainer.make_setup(_tiny_config("random")), jax.random.key(0)))
  assert not _leaves_equal(rand, params)


def test_bad_vae_init_names_the_key():
  c = _tiny_config("flux")
  with pytest.raises(ValueError, match=r"config\.init\.vae='flux'"):
    trainer.make_setup(c)
  c = _tiny_config("synthetic")
  c.batch.vae_image_size = 0
  c.data.image_size = 0
  with pytest.raises(ValueError, match=r"config\.init\.vae='synthetic' needs"):
    trainer.make_setup(c)


def test_the_vae_experiment_writes_what_init_vae_loads(tmp_path, monkeypatch):
  """experiments/tiny/vae.py (recipe "vae", synthetic renders) runs `pretrain_vae`, the recipe
  `init.vae="synthetic"` caches, into a workdir that `init.vae=<workdir>` loads; a finished run is not redone."""
  import os
  from bagel_jax.train import config as train_config, vae_recipe
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  c = train_config.load_config(os.path.join(repo, "experiments", "tiny", "vae.py") + ":steps=3,batch_size=2")
  work = str(tmp_path / "vae")
  ev = vae_recipe.train(c, work)
  assert ev["step"] == 3 and ev["psnr_heldout"] > 0 and os.path.exists(os.path.join(work, "recon_grid.png"))
  assert _leaves_equal(vp.load_vae(work, CFG), vp.pretrain_vae(CFG, SIZE, 3, 0, 2, verbose=False))
  monkeypatch.setattr(vae_recipe, "pretrain_vae", _no_training)
  assert vae_recipe.train(c, work)["step"] == 3
