"""SigLIP NaViT encoder: HF parity, packing isolation, checkpoint conversion."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bagel_jax.convert.siglip import config_from_hf, siglip_from_hf, siglip_to_hf
from bagel_jax.models import config as config_lib
from bagel_jax.models.siglip import SiglipViT, patch_position_ids, patchify

HF_CFG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=8,
              image_size=32, num_channels=3, layer_norm_eps=1e-6)
CFG = config_from_hf(HF_CFG)
P = "vision_model."


def random_hf_tensors(cfg, seed=0, stored_layers=None, conv=True, head=False):
  """HF-named SigLIP tensors with random values; optionally extra stored layers and a pooling head."""
  rng = np.random.default_rng(seed)
  d, f, p, ch = cfg.hidden_size, cfg.intermediate_size, cfg.patch_size, cfg.num_channels
  w = lambda *s: (0.1 * rng.standard_normal(s)).astype(np.float32)
  t = {f"{P}embeddings.patch_embedding.weight": w(d, ch, p, p) if conv else w(d, p * p * ch),
       f"{P}embeddings.patch_embedding.bias": w(d),
       f"{P}embeddings.position_embedding.weight": w(cfg.max_patches_per_side ** 2, d),
       f"{P}post_layernorm.weight": 1 + w(d), f"{P}post_layernorm.bias": w(d)}
  for j in range(stored_layers or cfg.num_layers):
    lp = f"{P}encoder.layers.{j}."
    for n in ("layer_norm1", "layer_norm2"):
      t[f"{lp}{n}.weight"], t[f"{lp}{n}.bias"] = 1 + w(d), w(d)
    for n in "qkv":
      t[f"{lp}self_attn.{n}_proj.weight"], t[f"{lp}self_attn.{n}_proj.bias"] = w(d, d), w(d)
    t[f"{lp}self_attn.out_proj.weight"], t[f"{lp}self_attn.out_proj.bias"] = w(d, d), w(d)
    t[f"{lp}mlp.fc1.weight"], t[f"{lp}mlp.fc1.bias"] = w(f, d), w(f)
    t[f"{lp}mlp.fc2.weight"], t[f"{lp}mlp.fc2.bias"] = w(d, f), w(d)
  if head:
    t[f"{P}head.probe"] = w(1, 1, d)
    t[f"{P}head.layernorm.weight"] = w(d)
  return t


@functools.lru_cache(maxsize=None)
def _apply(cfg, **kw):
  # One jit per module variant: eager op-by-op dispatch is several times slower on CPU than compiling.
  model = SiglipViT(cfg, **kw)
  return jax.jit(lambda params, *args: model.apply({"params": params}, *args))


def run(params, cfg, patches, pos, ids, **kw):
  return np.asarray(_apply(cfg, **kw)(params, jnp.asarray(patches), jnp.asarray(pos), jnp.asarray(ids)))


def single_image(rng, cfg, gh, gw):
  """A random image in [-1, 1] of gh x gw patches -> (patches, pos_ids)."""
  p = cfg.patch_size
  img = rng.uniform(-1, 1, (gh * p, gw * p, cfg.num_channels)).astype(np.float32)
  return patchify(img, p), patch_position_ids(gh, gw, cfg.max_patches_per_side)


@pytest.mark.torch
@pytest.mark.parametrize("num_layers", [2, 1])
def test_parity_with_hf_siglip(num_layers):
  torch = pytest.importorskip("torch", reason="HF parity needs torch (CPU) + transformers")
  transformers = pytest.importorskip("transformers", reason="HF parity needs transformers")
  torch.manual_seed(0)
  hf_cfg = transformers.SiglipVisionConfig(**HF_CFG, vision_use_head=False)
  hf_cfg._attn_implementation = "eager"
  model = transformers.SiglipVisionModel(hf_cfg).eval()
  # Non-trivial norms and biases so a swapped scale/bias or a missed bias would show.
  with torch.no_grad():
    for name, t in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        t.add_(0.1 * torch.randn_like(t))
  pixels = torch.rand(1, 3, 32, 32) * 2 - 1
  with torch.no_grad():
    out = model(pixel_values=pixels, output_hidden_states=True)
    # BAGEL truncation: post_layernorm applied to the output of the last layer that is run.
    want = model.post_layernorm(out.hidden_states[num_layers]).numpy()[0]
  if num_layers == 2:
    np.testing.assert_allclose(want, out.last_hidden_state.numpy()[0], atol=1e-6)

  cfg = config_from_hf(hf_cfg.to_dict(), num_layers=num_layers)
  tensors = {f"{P}{k}" if not k.startswith(P) else k: v.numpy() for k, v in model.state_dict().items()}
  params = siglip_from_hf(tensors, cfg)
  patches = patchify(pixels[0].permute(1, 2, 0).numpy(), cfg.patch_size)
  pos = patch_position_ids(4, 4, cfg.max_patches_per_side)
  got = run(params, cfg, patches[None], pos[None], np.ones((1, 16), np.int32))[0]
  assert np.abs(got - want).max() <= 1e-4, np.abs(got - want).max()


def test_packing_matches_single_images():
  params = siglip_from_hf(random_hf_tensors(CFG), CFG)
  rng = np.random.default_rng(1)
  (pa, qa), (pb, qb) = single_image(rng, CFG, 4, 4), single_image(rng, CFG, 2, 3)
  alone_a = run(params, CFG, pa[None], qa[None], np.ones((1, 16), np.int32))[0]
  alone_b = run(params, CFG, pb[None], qb[None], np.ones((1, 6), np.int32))[0]

  def pad(n):  # garbage patches and out-of-range position ids: must not leak into real tokens
    return rng.uniform(-5, 5, (n, CFG.patch_dim)).astype(np.float32), np.full((n,), 999, np.int32)

  (p0, q0), (p1, q1), (p2, q2) = pad(2), pad(4), pad(6)
  row0 = [(pa, qa, 1), (p0, q0, 0), (pb, qb, 2), (p1, q1, 0)]
  row1 = [(pb, qb, 1), (pa, qa, 2), (p2, q2, 0)]
  rows = [(np.concatenate([r[0] for r in row]), np.concatenate([r[1] for r in row]),
           np.concatenate([np.full((len(r[1]),), r[2], np.int32) for r in row])) for row in (row0, row1)]
  patches, pos, ids = (np.stack(x) for x in zip(*rows))
  out = run(params, CFG, patches, pos, ids)
  assert np.isfinite(out).all()
  for got, want in [(out[0, :16], alone_a), (out[0, 18:24], alone_b), (out[1, :6], alone_b),
                    (out[1, 6:22], alone_a)]:
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_converted_tree_matches_init(scan_layers):
  model = SiglipViT(CFG, scan_layers=scan_layers)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4, CFG.patch_dim)),
                             jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))
  boxed = variables["params"]
  for leaf in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
    assert isinstance(leaf, nn.Partitioned) and len(leaf.names) == leaf.value.ndim
  shapes = lambda t: jax.tree.map(lambda x: np.shape(x), t)
  converted = siglip_from_hf(random_hf_tensors(CFG), CFG, scan_layers=scan_layers)
  assert shapes(nn.unbox(boxed)) == shapes(converted)


def test_scan_and_unrolled_agree():
  tensors = random_hf_tensors(CFG)
  rng = np.random.default_rng(2)
  patches, pos = single_image(rng, CFG, 3, 4)
  args = (patches[None], pos[None], np.ones((1, 12), np.int32))
  scanned = run(siglip_from_hf(tensors, CFG, scan_layers=True), CFG, *args, scan_layers=True)
  unrolled = run(siglip_from_hf(tensors, CFG, scan_layers=False), CFG, *args, scan_layers=False)
  np.testing.assert_allclose(scanned, unrolled, atol=1e-6, rtol=1e-6)


def test_remat_gradients_match():
  params = siglip_from_hf(random_hf_tensors(CFG), CFG)
  rng = np.random.default_rng(3)
  patches, pos = single_image(rng, CFG, 2, 2)
  args = (jnp.asarray(patches[None]), jnp.asarray(pos[None]), jnp.ones((1, 4), jnp.int32))

  def grads(policy):
    model = SiglipViT(CFG, remat_policy=policy)
    return jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, *args) ** 2)))(params)

  for a, b in zip(jax.tree.leaves(grads("none")), jax.tree.leaves(grads("minimal"))):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_round_trip(scan_layers):
  linear = random_hf_tensors(CFG, conv=False)
  back = siglip_to_hf(siglip_from_hf(linear, CFG, scan_layers=scan_layers), CFG)
  assert sorted(back) == sorted(linear)
  for k, v in linear.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)

  # A stock conv checkpoint comes back in BAGEL's linear (kh, kw, c) layout; extra layers and the head are
  # dropped rather than rejected.
  conv = random_hf_tensors(CFG, stored_layers=3, head=True)
  back = siglip_to_hf(siglip_from_hf(conv, CFG, scan_layers=scan_layers), CFG)
  w = conv[f"{P}embeddings.patch_embedding.weight"]
  np.testing.assert_array_equal(back[f"{P}embeddings.patch_embedding.weight"],
                                w.transpose(0, 2, 3, 1).reshape(CFG.hidden_size, -1))
  assert not any(".layers.2." in k or ".head." in k for k in back)


def test_conv_patch_embedding_matches_convolution():
  """The converted kernel applied to `patchify` output equals the stride-p convolution of the image."""
  tensors = random_hf_tensors(CFG)
  kernel = siglip_from_hf(tensors, CFG)["embeddings"]["patch_embedding"]["kernel"]
  w = tensors[f"{P}embeddings.patch_embedding.weight"]  # [d, c, p, p]
  img = np.random.default_rng(4).uniform(-1, 1, (16, 24, 3)).astype(np.float32)
  p = CFG.patch_size
  blocks = img.reshape(2, p, 3, p, 3).transpose(0, 2, 4, 1, 3)  # [gh, gw, c, p, p]
  conv = np.einsum("hwcij,dcij->hwd", blocks, w).reshape(6, -1)
  np.testing.assert_allclose(patchify(img, p) @ kernel, conv, atol=1e-5)


def test_bad_checkpoints_raise():
  name = f"{P}encoder.layers.1.mlp.fc1.weight"
  bad = random_hf_tensors(CFG)
  bad[name] = np.zeros((64, 31), np.float32)
  with pytest.raises(ValueError, match=r"fc1\.weight.*\(64, 31\).*\(64, 32\)"):
    siglip_from_hf(bad, CFG)

  bad = random_hf_tensors(CFG)
  bad[f"{P}embeddings.patch_embedding.weight"] = np.zeros((32, 3, 8), np.float32)
  with pytest.raises(ValueError, match="patch_embedding.weight"):
    siglip_from_hf(bad, CFG)

  extra = random_hf_tensors(CFG)
  extra[f"{P}encoder.layers.0.self_attn.rotary.inv_freq"] = np.zeros((4,), np.float32)
  with pytest.raises(ValueError, match="rotary.inv_freq"):
    siglip_from_hf(extra, CFG)

  missing = random_hf_tensors(CFG)
  del missing[f"{P}post_layernorm.bias"]
  with pytest.raises(KeyError, match="post_layernorm.bias"):
    siglip_from_hf(missing, CFG)


def test_config_from_hf_bagel_release():
  vit_config_json = dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16, num_hidden_layers=27,
                         patch_size=14, image_size=980, num_channels=3)
  cfg = config_from_hf(vit_config_json, num_layers=26)
  assert cfg == config_lib.bagel_7b().vit
  assert config_from_hf({"vision_config": vit_config_json}).num_layers == 27
  with pytest.raises(ValueError, match="hidden_act"):
    config_from_hf(dict(vit_config_json, hidden_act="relu"))
  with pytest.raises(ValueError, match="num_layers"):
    config_from_hf(vit_config_json, num_layers=28)
