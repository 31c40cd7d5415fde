"""The sampler is tied to training semantics: the velocity of a sampler step equals the training forward's
prediction for the same noisy image and context; CFG with both scales 1 equals the unguided sampler; the renorm
variants match the official formulas; the schedule and the Euler update are the official ones; one compiled
step serves guided and unguided steps of every renorm type."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bagel_jax import batch as batch_lib
from bagel_jax.data.examples import batch_spec_for
from bagel_jax.data.sequence import Text, VaeImage, VitImage, assemble_batch, layout_sample
from bagel_jax.layout import LayoutConfig, SpecialTokens
from bagel_jax.inference import contexts as ctx_lib
from bagel_jax.inference import model as model_lib
from bagel_jax.inference import sampler as S
from bagel_jax.models import bagel as bagel_lib
from bagel_jax.models import config as config_lib
from bagel_jax.models.routing import take_rows

CFG = config_lib.tiny("mot")


@pytest.fixture(scope="module")
def params():
  p = model_lib.random_params(CFG, seed=2)
  p["llm2vae"] = jax.tree.map(lambda x: x * 20.0, p["llm2vae"])  # velocities of order 1
  return p


def training_velocity(params, items, x_t, t):
  """Training path: the packed row of `items` (its noisy image last), latents embedded at x_t / t for the noisy
  tokens and x0 / 0 for clean ones, `Bagel.hidden_states`, `llm2vae` at the noisy tokens."""
  layout = LayoutConfig.from_model_config(CFG)
  spec = batch_spec_for(CFG, batch_size=1, seq_len=64)
  b = assemble_batch([[layout_sample(items, layout)]], spec, layout)
  batch_lib.validate(b, spec)
  bj = {k: jnp.asarray(v) for k, v in b.items()}
  noisy = np.isfinite(b["latent_t_logit"][0]) & (b["latent_image"][0] > 0)
  x = np.array(b["latent_x0"][0])
  x[noisy] = x_t
  tt = np.where(noisy, t, 0.0).astype(np.float32)
  m = bagel_lib.Bagel(CFG)
  emb = m.apply({"params": params}, jnp.asarray(x)[None], jnp.asarray(tt)[None], bj["latent_pos"],
                method=m.embed_latents)
  h, _ = m.apply({"params": params}, bj, emb, method=m.hidden_states)
  v = m.apply({"params": params}, take_rows(h, bj["latent_dest"]), method=m.velocity)
  return np.asarray(v)[0][noisy]


@pytest.mark.parametrize("kind", ["t2i", "edit"])
def test_sampler_velocity_equals_training_prediction(kind, params):
  rng = np.random.default_rng(0)
  sp = SpecialTokens.from_llm_config(CFG.llm)
  grid, c = (2, 3), CFG.latent_channels
  x0 = rng.normal(size=(6, c)).astype(np.float32)
  x_t = rng.normal(size=(6, c)).astype(np.float32)
  t = 0.63
  prompt = rng.integers(5, 200, 6).tolist()
  ctx = ctx_lib.Context.empty(CFG, 1, 128)
  items = []
  if kind == "edit":  # clean VAE + ViT of the source, then the instruction
    src = rng.normal(size=(6, c)).astype(np.float32)
    patches = rng.uniform(-1, 1, (4, CFG.vit.patch_dim)).astype(np.float32)
    items += [VaeImage(grid, latents=src), VitImage(patches, (2, 2))]
    ctx = ctx.append(params, CFG, ctx_lib.vae_block(1, grid, sp, CFG.max_latent_size, src[None]))
    ctx = ctx.append(params, CFG, ctx_lib.vit_block(patches[None], (2, 2), sp, CFG.vit.max_patches_per_side))
  items += [Text(prompt), VaeImage(grid, latents=x0, noisy=True, t_logit=0.0)]
  ctx = ctx.append(params, CFG, ctx_lib.text_block([prompt], sp))
  block = {k: jnp.asarray(v) for k, v in ctx_lib.vae_block(1, grid, sp, CFG.max_latent_size).items()}
  got = np.asarray(S.velocity_fn(params, ctx.cache, block, jnp.asarray(x_t)[None], jnp.full((1,), t),
                                 config=CFG))[0]
  want = training_velocity(params, items, x_t, t)
  assert np.abs(want).max() > 0.1
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def _official(v, v_tu, v_iu, st, si, kind, rmin):
  """The official `_forward_flow` combination, transcribed in numpy for batch 1 (norms over everything)."""
  if kind == "text_channel":
    vt_ = v_tu + st * (v - v_tu)
    scale = np.clip(np.linalg.norm(v, axis=-1, keepdims=True) /
                    (np.linalg.norm(vt_, axis=-1, keepdims=True) + 1e-8), rmin, 1.0)
    vt = vt_ * scale
    return v_iu + si * (vt - v_iu) if si > 1 else vt
  vt_ = v_tu + st * (v - v_tu)
  v_ = v_iu + si * (vt_ - v_iu) if si > 1 else vt_
  if kind == "global":
    scale = np.clip(np.linalg.norm(v) / (np.linalg.norm(v_) + 1e-8), rmin, 1.0)
  else:
    scale = np.clip(np.linalg.norm(v, axis=-1, keepdims=True) /
                    (np.linalg.norm(v_, axis=-1, keepdims=True) + 1e-8), rmin, 1.0)
  return v_ * scale


@pytest.mark.parametrize("kind", S.RENORM_TYPES)
@pytest.mark.parametrize("st,si,rmin", [(4.0, 1.0, 0.0), (3.0, 1.5, 0.0), (4.0, 2.0, 0.5), (1.0, 1.0, 0.0)])
def test_renorm_variants_match_the_formulas(kind, st, si, rmin):
  rng = np.random.default_rng(hash((kind, st, si)) % 2 ** 31)
  v, v_tu, v_iu = (rng.normal(size=(3, 10, 16)).astype(np.float32) for _ in range(3))
  got = np.asarray(S.cfg_combine(jnp.asarray(v), jnp.asarray(v_tu), jnp.asarray(v_iu), st, si, si > 1, kind, rmin))
  for b in range(3):  # "global" is per request: the official batch-1 formula applied row by row
    np.testing.assert_allclose(got[b], _official(v[b], v_tu[b], v_iu[b], st, si, kind, rmin), rtol=2e-5,
                               atol=2e-6)
  if st == 1.0 and si == 1.0:
    np.testing.assert_allclose(got, v, atol=1e-6)


def test_schedule_is_the_official_one():
  t, dt = S.schedule(50, 3.0)
  u = np.linspace(1, 0, 50)
  ref = 3.0 * u / (1 + 2.0 * u)
  assert len(t) == 49 and t[0] == 1.0
  np.testing.assert_allclose(t, ref[:-1], rtol=1e-6)
  np.testing.assert_allclose(dt, ref[:-1] - ref[1:], rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="num_timesteps"):
    S.schedule(1, 3.0)


@pytest.fixture(scope="module")
def contexts(params):
  """Three different contexts of 2 requests: full (text a + text b), text-uncond (text a), image-uncond (b)."""
  sp = SpecialTokens.from_llm_config(CFG.llm)
  a, b = ctx_lib.text_block([[7, 8, 9], [10]], sp), ctx_lib.text_block([[11, 12], [13, 14, 15]], sp)
  empty = ctx_lib.Context.empty(CFG, 2, 128)
  full = empty.append(params, CFG, a).append(params, CFG, b)
  return ctx_lib.CFGContexts(full, empty.append(params, CFG, a), empty.append(params, CFG, b))


def test_cfg_scales_one_equal_unguided_and_steps_compile_once(params, contexts):
  noise = jax.random.normal(jax.random.key(1), (2, 4, CFG.latent_channels))
  kw = dict(noise=noise, num_timesteps=6, timestep_shift=3.0)
  plain = S.sample_latents(params, CFG, contexts.gen, (2, 2), **kw)  # compiles the step (at most once)
  before = ctx_lib.TRACE_COUNTS["euler_step"], ctx_lib.COMPILE_COUNTS["jit(euler_step)"]
  ones = S.sample_latents(params, CFG, contexts, (2, 2), cfg_text_scale=1.0, cfg_img_scale=1.0,
                          cfg_interval=(0.0, 1.0), **kw)
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(ones))
  guided = {}
  assert sum(0.8 < t <= 1.0 for t in S.schedule(6, 3.0)[0]) == 3  # 3 guided steps, then 2 unguided ones
  for kind in S.RENORM_TYPES:  # guided steps inside the interval, unguided outside, every renorm type
    guided[kind] = np.asarray(S.sample_latents(params, CFG, contexts, (2, 2), cfg_text_scale=4.0, cfg_img_scale=2.0,
                                               cfg_interval=(0.8, 1.0), cfg_renorm_type=kind, **kw))
  # no retrace, no recompile: guided and unguided steps, every renorm type, other scales and intervals
  assert (ctx_lib.TRACE_COUNTS["euler_step"], ctx_lib.COMPILE_COUNTS["jit(euler_step)"]) == before
  assert not np.allclose(guided["global"], np.asarray(plain))
  assert not np.allclose(guided["global"], guided["text_channel"])


def test_euler_update_and_guidance_use_the_three_contexts(params, contexts):
  """One step from t=1 to 0 is x - v: with guidance, v is the renormed combination of the three contexts."""
  sp = SpecialTokens.from_llm_config(CFG.llm)
  block = {k: jnp.asarray(v) for k, v in ctx_lib.vae_block(2, (2, 2), sp, CFG.max_latent_size).items()}
  x = jax.random.normal(jax.random.key(2), (2, 4, CFG.latent_channels))
  one = jnp.ones((2,))
  v = [S.velocity_fn(params, c.cache, block, x, one, config=CFG)
       for c in (contexts.gen, contexts.cfg_text, contexts.cfg_img)]
  assert not np.allclose(np.asarray(v[0]), np.asarray(v[1]))
  want = np.asarray(x)[0] - _official(np.asarray(v[0][0]), np.asarray(v[1][0]), np.asarray(v[2][0]), 4.0, 2.0,
                                   "global", 0.0)
  got = S.sample_latents(params, CFG, contexts, (2, 2), noise=x, num_timesteps=2, cfg_text_scale=4.0,
                         cfg_img_scale=2.0, cfg_interval=(0.0, 1.0))
  np.testing.assert_allclose(np.asarray(got)[0], want, atol=1e-5)
  unguided = S.sample_latents(params, CFG, contexts.gen, (2, 2), noise=x, num_timesteps=2)
  np.testing.assert_allclose(np.asarray(unguided), np.asarray(x - v[0]), atol=1e-6)
