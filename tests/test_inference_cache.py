"""KV-cache inference equals the training forward: incremental decoding reproduces the full-forward logits
(tiny model, fp32, <= 1e-5), batched ragged requests equal single ones, the decode step compiles once, noisy
tokens never enter the cache, and the Pallas cached-attention path (interpret mode) matches the reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bagel_jax import batch as batch_lib
from bagel_jax.data.examples import batch_spec_for
from bagel_jax.data.sequence import Text, VaeImage, VitImage, assemble_batch, layout_sample
from bagel_jax.layout import LayoutConfig, SpecialTokens
from bagel_jax.inference import contexts as ctx_lib
from bagel_jax.inference import decode as decode_lib
from bagel_jax.inference import forward
from bagel_jax.inference import model as model_lib
from bagel_jax.kernels import attention as attention_lib
from bagel_jax.kernels import mask as mask_lib
from bagel_jax.models import bagel as bagel_lib
from bagel_jax.models import config as config_lib


def full_forward_logits(cfg, params, items):
  """Training path: lay the items out as one packed row, `Bagel.hidden_states` -> lm_head logits [L, V]."""
  layout = LayoutConfig.from_model_config(cfg)
  spec = batch_spec_for(cfg, batch_size=1, seq_len=64)
  b = assemble_batch([[layout_sample(items, layout)]], spec, layout)
  batch_lib.validate(b, spec)
  bj = {k: jnp.asarray(v) for k, v in b.items()}
  m = bagel_lib.Bagel(cfg)
  emb = m.apply({"params": params}, bj["latent_x0"], jnp.zeros(bj["latent_pos"].shape), bj["latent_pos"],
                method=m.embed_latents)
  h, _ = m.apply({"params": params}, bj, emb, method=m.hidden_states)
  return np.asarray(forward.lm_logits(params, cfg, h))[0], int(b["num_tokens"][0])


def make_request(cfg, rng, q_len, a_len):
  lat = rng.normal(size=(2 * 3, cfg.latent_channels)).astype(np.float32)
  patches = rng.uniform(-1, 1, (2 * 2, cfg.vit.patch_dim)).astype(np.float32)
  q = rng.integers(5, 200, q_len).tolist()
  a = rng.integers(5, 200, a_len).tolist()
  return lat, patches, q, a


def prefilled(cfg, params, reqs, capacity=128):
  """Context with [clean VAE][ViT][question] for every request (one batch)."""
  sp = SpecialTokens.from_llm_config(cfg.llm)
  c = ctx_lib.Context.empty(cfg, len(reqs), capacity)
  c = c.append(params, cfg, ctx_lib.vae_block(len(reqs), (2, 3), sp, cfg.max_latent_size,
                                              np.stack([r[0] for r in reqs])))
  c = c.append(params, cfg, ctx_lib.vit_block(np.stack([r[1] for r in reqs]), (2, 2), sp,
                                              cfg.vit.max_patches_per_side))
  return c.append(params, cfg, ctx_lib.text_block([r[2] for r in reqs], sp))


MOT = config_lib.tiny("mot")


@pytest.fixture(scope="module")
def mot_params():
  return model_lib.random_params(MOT, seed=1)


@pytest.mark.parametrize("variant,scan,impl", [
    ("mot", True, "reference"),
    pytest.param("dense", False, "reference", marks=pytest.mark.slow),
    ("mot", True, "tiled"),  # the CPU path ("auto" off TPU) over the cache
    pytest.param("mot", True, "pallas_interpret", marks=pytest.mark.slow)])  # the cached Pallas kernel path
def test_incremental_decode_equals_full_forward(variant, scan, impl, mot_params):
  cfg = config_lib.tiny(variant, scan_layers=scan, attention_impl=impl)
  params = mot_params if variant == "mot" else model_lib.random_params(cfg, seed=1)
  rng = np.random.default_rng(0)
  reqs = [make_request(cfg, rng, 7, 5), make_request(cfg, rng, 3, 5)]  # ragged prompts in one batch
  ctx = prefilled(cfg, params, reqs)
  forced = np.array([r[3] for r in reqs])
  _, _, logits = decode_lib.generate_text(params, cfg, ctx, max_new_tokens=8, forced=forced, return_logits=True)
  got = np.stack(logits, 1)  # [B, steps, V]: after feeding <|im_start|>, a1, ..., a5
  for row, (lat, patches, q, a) in enumerate(reqs):
    items = [VaeImage((2, 3), latents=lat), VitImage(patches, (2, 2)), Text(q), Text(a, loss=True)]
    full, n = full_forward_logits(cfg, params, items)
    start = n - (len(a) + 2)  # <|im_start|> of the answer split
    want = full[start:start + len(a) + 1]
    np.testing.assert_allclose(got[row], want, atol=1e-5, rtol=0, err_msg=f"row {row}")


def test_cache_contents_and_rope_follow_the_layout_rules(mot_params):
  cfg, params = MOT, mot_params
  rng = np.random.default_rng(1)
  reqs = [make_request(cfg, rng, 4, 1), make_request(cfg, rng, 2, 1)]
  ctx = prefilled(cfg, params, reqs)
  c = ctx.cache
  # VAE block 6+2 tokens at one RoPE id, ViT block 4+2 at the next, text 4+2 consecutive ids.
  assert ctx.lengths.tolist() == [8 + 6 + 6, 8 + 6 + 4] and c.length.tolist() == [20, 18]
  assert ctx.ropes.tolist() == [1 + 1 + 6, 1 + 1 + 4] and c.rope.tolist() == [8, 6]
  assert c.document[1, :18].tolist() == [1] * 18 and c.document[1, 18:].sum() == 0
  assert c.document[0, :20].tolist() == [1] * 20 and c.document[0, 20:].sum() == 0
  assert c.split[0, :20].tolist() == [1] * 8 + [2] * 6 + [3] * 6
  assert c.mode[0, :20].tolist() == [mask_lib.FULL] * 14 + [mask_lib.CAUSAL] * 6
  assert int(c.num_splits[0]) == 3
  with pytest.raises(ValueError, match="capacity"):
    prefilled(cfg, params, reqs, capacity=16)


def test_decode_step_compiles_once_and_sampling_is_seeded(mot_params):
  cfg, params = MOT, mot_params
  sp = SpecialTokens.from_llm_config(cfg.llm)
  ctx = ctx_lib.Context.empty(cfg, 3, 48).append(params, cfg, ctx_lib.text_block([[9, 10], [11], [12, 13, 14]], sp))
  before = ctx_lib.TRACE_COUNTS["decode_step"], ctx_lib.COMPILE_COUNTS["jit(decode_step)"]

  def grew():
    return (ctx_lib.TRACE_COUNTS["decode_step"] - before[0], ctx_lib.COMPILE_COUNTS["jit(decode_step)"] - before[1])

  kw = dict(max_new_tokens=12, vocab_limit=200)
  greedy, _, _ = decode_lib.generate_text(params, cfg, ctx, **kw)
  assert grew() == (1, 1)  # one trace and one compilation for all 12 steps (B=3 is used nowhere else)
  s1, _, _ = decode_lib.generate_text(params, cfg, ctx, do_sample=True, temperature=0.7, top_p=0.9,
                                      rng=jax.random.key(3), **kw)
  s2, _, _ = decode_lib.generate_text(params, cfg, ctx, do_sample=True, temperature=0.7, top_p=0.9,
                                      rng=jax.random.key(3), **kw)
  assert grew() == (1, 1)  # sampling settings are traced values
  assert s1 == s2 and all(max(r, default=0) < 200 for r in greedy + s1)


def test_top_p_and_temperature():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  draws = [int(decode_lib.sample_logits(logits, jax.random.key(i), 1.0, 0.7, False)[0]) for i in range(200)]
  assert set(draws) == {0, 1}  # nucleus of mass >= 0.7 is the two most likely tokens
  assert int(decode_lib.sample_logits(logits, jax.random.key(0), 1.0, 1.0, True)[0]) == 0
  cold = [int(decode_lib.sample_logits(logits, jax.random.key(i), 1e-3, 1.0, False)[0]) for i in range(20)]
  assert set(cold) == {0}


def test_denoising_never_writes_the_cache(mot_params):
  from bagel_jax.inference import sampler as sampler_lib  # pylint: disable=import-outside-toplevel
  cfg, params = MOT, mot_params
  rng = np.random.default_rng(2)
  ctx = prefilled(cfg, params, [make_request(cfg, rng, 4, 1), make_request(cfg, rng, 6, 1)])
  before = jax.tree.map(np.asarray, ctx.cache)
  cfgs = ctx_lib.CFGContexts(ctx, ctx, ctx)
  sampler_lib.sample_latents(params, cfg, cfgs, (2, 2), num_timesteps=3, cfg_text_scale=2.0, cfg_img_scale=2.0,
                             cfg_interval=(0.0, 1.0))
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, ctx.cache))


def test_pallas_cached_attention_matches_reference():
  rng = np.random.default_rng(0)
  b, lq, lc, hq, hkv, d = 2, 6, 20, 4, 2, 16
  q = jnp.asarray(rng.normal(size=(b, lq, hq, d)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(b, lq, hkv, d)), jnp.float32) for _ in range(2))
  kc, vc = (jnp.asarray(rng.normal(size=(b, lc, hkv, d)), jnp.float32) for _ in range(2))
  filled = np.array([14, 9])
  doc_c = (np.arange(lc)[None] < filled[:, None]).astype(np.int32)
  split_c = np.where(doc_c, 1 + np.arange(lc)[None] // 5, 0).astype(np.int32)
  mode_c = np.where(split_c % 2, mask_lib.FULL, mask_lib.CAUSAL).astype(np.int32)
  cache_meta = mask_lib.TokenMeta(jnp.asarray(doc_c), jnp.asarray(split_c), jnp.asarray(mode_c),
                                  jnp.broadcast_to(jnp.arange(lc, dtype=jnp.int32), (b, lc)))
  for mode in (mask_lib.CAUSAL, mask_lib.NOISE):
    q_meta = mask_lib.TokenMeta(jnp.ones((b, lq), jnp.int32), jnp.full((b, lq), 9, jnp.int32),
                                jnp.full((b, lq), mode, jnp.int32),
                                jnp.asarray(filled[:, None] + np.arange(lq)[None], jnp.int32))
    ref = attention_lib.attention_with_cache(q, k, v, q_meta, kc, vc, cache_meta, impl="reference", scale=0.25)
    pal = attention_lib.attention_with_cache(q, k, v, q_meta, kc, vc, cache_meta, impl="pallas_interpret",
                                             scale=0.25)
    np.testing.assert_allclose(np.asarray(pal), np.asarray(ref), atol=2e-5, err_msg=f"mode {mode}")
    til = attention_lib.attention_with_cache(q, k, v, q_meta, kc, vc, cache_meta, impl="tiled", scale=0.25)
    np.testing.assert_allclose(np.asarray(til), np.asarray(ref), atol=2e-6, err_msg=f"tiled, mode {mode}")
  auto = jax.jit(lambda *a: attention_lib.attention_with_cache(*a, impl="auto", scale=0.25))(q, k, v, q_meta, kc, vc,
                                                                                  cache_meta)
  np.testing.assert_array_equal(np.asarray(auto), np.asarray(til))  # "auto" on CPU: the tiled path
