"""FLUX AutoEncoder: parity with diffusers AutoencoderKL in FLUX layout, BFL naming, shape inference, latents."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bagel_jax.convert.common import unflatten
from bagel_jax.convert.flux_vae import (abstract_vae_params, config_from_bfl_shapes, flux_ae_from_bfl,
                                        flux_ae_from_diffusers, flux_ae_to_bfl)
from bagel_jax.models.config import VAEConfig
from bagel_jax.models.flux_vae import FluxAutoEncoder, patchify_latents, unpatchify_latents

TINY = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, num_groups=8)


def _diffusers_model(seed=0):
  torch = pytest.importorskip("torch", reason="parity tests need the torch extra: pip install -e '.[torch]'")
  diffusers = pytest.importorskip("diffusers", reason="parity tests need the torch extra")
  torch.manual_seed(seed)
  model = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
      up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
      latent_channels=4, norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:  # non-trivial GroupNorm affine parameters
        p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
  return torch, model


@pytest.mark.torch
def test_parity_with_diffusers_autoencoderkl():
  torch, model = _diffusers_model()
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  params = flux_ae_from_diffusers(state, TINY)
  x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)
  with torch.no_grad():
    mean_ref = model.encode(torch.tensor(x)).latent_dist.mean.numpy()
    z = torch.tensor(np.random.default_rng(1).normal(size=mean_ref.shape).astype(np.float32))
    dec_ref = model.decode(z).sample.numpy()
  vae = FluxAutoEncoder(TINY)
  mean, _ = vae.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), method=FluxAutoEncoder.encode_moments)
  np.testing.assert_allclose(np.asarray(mean).transpose(0, 3, 1, 2), mean_ref, atol=1e-4, rtol=0)
  dec = vae.apply({"params": params}, jnp.asarray(z.numpy().transpose(0, 2, 3, 1)), method=lambda m, z: m.decoder(z))
  np.testing.assert_allclose(np.asarray(dec).transpose(0, 3, 1, 2), dec_ref, atol=1e-4, rtol=0)
  # diffusers -> ours -> BFL -> ours is the identity
  again = flux_ae_from_bfl(flux_ae_to_bfl(params, TINY), TINY)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)


def _random_params(cfg, seed=0):
  rng = np.random.default_rng(seed)
  return {k: rng.normal(size=v.shape).astype(np.float32) for k, v in abstract_vae_params(cfg).items()}


def test_bfl_round_trip_and_names():
  params = unflatten(_random_params(TINY))
  bfl = flux_ae_to_bfl(params, TINY)
  assert "encoder.down.0.block.0.conv1.weight" in bfl and "decoder.up.1.upsample.conv.weight" in bfl
  assert bfl["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
  assert bfl["encoder.down.1.block.0.nin_shortcut.weight"].shape == (64, 32, 1, 1)
  back = flux_ae_to_bfl(flux_ae_from_bfl(bfl, TINY), TINY)
  assert set(back) == set(bfl)
  for k in bfl:
    np.testing.assert_array_equal(back[k], bfl[k])


def test_strictness_names_the_tensor():
  params = unflatten(_random_params(TINY))
  bfl = flux_ae_to_bfl(params, TINY)
  bad = dict(bfl, **{"decoder.conv_in.weight": bfl["decoder.conv_in.weight"][:, :2]})
  with pytest.raises(ValueError, match=r"decoder\.conv_in\.weight.*\(64, 2, 3, 3\).*\(64, 4, 3, 3\)"):
    flux_ae_from_bfl(bad, TINY)
  with pytest.raises(ValueError, match="unexpected.*encoder.extra.weight"):
    flux_ae_from_bfl(dict(bfl, **{"encoder.extra.weight": np.zeros(1)}), TINY)
  missing = dict(bfl)
  del missing["encoder.norm_out.bias"]
  with pytest.raises(KeyError, match="encoder.norm_out.bias"):
    flux_ae_from_bfl(missing, TINY)


def test_config_inferred_from_shapes():
  full = VAEConfig()
  for cfg in (TINY, full):
    shapes = {}
    for path, sd in abstract_vae_params(cfg).items():
      from bagel_jax.convert.flux_vae import bfl_name  # pylint: disable=import-outside-toplevel
      shape = sd.shape if not path.endswith("/kernel") else (sd.shape[3], sd.shape[2], sd.shape[0], sd.shape[1])
      shapes[bfl_name(path)] = shape
    assert config_from_bfl_shapes(shapes, num_groups=cfg.num_groups) == cfg
  total = sum(int(np.prod(v.shape)) for v in abstract_vae_params(full).values())
  assert abs(total - 83.82e6) < 0.05e6
  with pytest.raises(ValueError, match="missing"):
    config_from_bfl_shapes({"foo": (1,)})


def test_patchify_order():
  # latent [1, 4, 4, 2]: value encodes (row, col, channel) so the order is readable
  z = np.zeros((1, 4, 4, 2), np.float32)
  for r in range(4):
    for c in range(4):
      for ch in range(2):
        z[0, r, c, ch] = 100 * r + 10 * c + ch
  tok = np.asarray(patchify_latents(jnp.asarray(z), 2))
  assert tok.shape == (1, 4, 8)
  # token 1 = latent rows 0-1, cols 2-3; inside: (p, q, c) with channel fastest
  np.testing.assert_array_equal(tok[0, 1], [20, 21, 30, 31, 120, 121, 130, 131])
  np.testing.assert_array_equal(np.asarray(unpatchify_latents(jnp.asarray(tok), 2, 2, 2, 2)), z)


def test_encode_samples_posterior_and_scales():
  vae = FluxAutoEncoder(TINY)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  params = vae.init(jax.random.key(0), x)
  mean, logvar = vae.apply(params, x, method=FluxAutoEncoder.encode_moments)
  z_mean = vae.apply(params, x, method=FluxAutoEncoder.encode)
  np.testing.assert_allclose(z_mean, TINY.scale_factor * (mean - TINY.shift_factor), rtol=1e-6)
  z_s = vae.apply(params, x, jax.random.key(3), method=FluxAutoEncoder.encode)
  eps = jax.random.normal(jax.random.key(3), mean.shape)
  np.testing.assert_allclose(z_s, TINY.scale_factor * (mean + jnp.exp(0.5 * logvar) * eps - TINY.shift_factor),
                             rtol=1e-5, atol=1e-6)
  assert z_mean.shape == (2, 8, 8, 4)
  out = vae.apply(params, z_mean, method=FluxAutoEncoder.decode)
  assert out.shape == x.shape
