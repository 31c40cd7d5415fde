"""The official Euler sampler with dual classifier-free guidance (reference §7.2-7.3, `Bagel.generate_image`).

- Schedule: u = linspace(1, 0, num_timesteps), t = s*u / (1 + (s-1)*u) with s = timestep_shift; the first
  num_timesteps - 1 values are evaluated and x <- x - v * (t_i - t_{i+1}) (t = 1 is noise; v = eps - x0).
- Each step's query is `<|vision_start|> x_t <|vision_end|>` at the context's RoPE id, mode noise, gen expert
  for the latents; it reads the cache and never writes it.
- Guidance, per step: if cfg_interval[0] < t <= cfg_interval[1] and cfg_text_scale > 1, the text-unconditional
  velocity (cfg_text context) and, if cfg_img_scale > 1, the image-unconditional one (cfg_img context) are
  combined with the conditional one by `cfg_combine` (global / channel / text_channel renorm). With
  cfg_text_scale <= 1 no guidance is applied at all (image CFG alone is ignored, as in the official code).
- `global` renorm takes the norm over all tokens and channels of one request (the official code's norm over the
  whole packed batch is only right for batch 1, as its comment says).

One compiled step serves every step and both guided and unguided steps: the guided branch sits under
`lax.cond`, so unguided steps run one decoder pass and guided ones three.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from bagel_jax.inference import forward
from bagel_jax.inference import kv_cache as kv_lib
from bagel_jax.inference.contexts import TRACE_COUNTS, CFGContexts, Context, vae_block
from bagel_jax.layout import SpecialTokens
from bagel_jax.kernels.mask import NOISE
from bagel_jax.models.bagel import shift_timesteps
from bagel_jax.models.config import BagelConfig

RENORM_TYPES = ("global", "channel", "text_channel")


def schedule(num_timesteps: int, shift: float) -> Tuple[np.ndarray, np.ndarray]:
  """(t_i, dt_i) for the num_timesteps - 1 Euler steps, fp32 like the official torch.linspace schedule."""
  if num_timesteps < 2:
    raise ValueError(f"num_timesteps must be >= 2 (it counts schedule points; steps = num_timesteps - 1), "
                     f"got {num_timesteps}")
  if shift <= 0:
    raise ValueError(f"timestep_shift must be > 0, got {shift}")
  u = np.linspace(1.0, 0.0, num_timesteps, dtype=np.float32)
  t = shift_timesteps(u, np.float32(shift)).astype(np.float32)
  return t[:-1], (t[:-1] - t[1:]).astype(np.float32)


def _renorm(v_ref, v_guided, axes, renorm_min):
  norm_ref = jnp.linalg.norm(v_ref, axis=axes, keepdims=True)
  norm_new = jnp.linalg.norm(v_guided, axis=axes, keepdims=True)
  return v_guided * jnp.clip(norm_ref / (norm_new + 1e-8), renorm_min, 1.0)


def cfg_combine(v, v_text_uncond, v_img_uncond, text_scale, img_scale, use_img, renorm_type, renorm_min):
  """The official `_forward_flow` combination for velocities [B, N, C] (applied when text guidance is on).

  global/channel:  v' = v_tu + s_t (v - v_tu); if image guidance: v' = v_iu + s_i (v' - v_iu);
                   v' *= clip(|v| / (|v'| + 1e-8), renorm_min, 1), norms per request (global) or per token.
  text_channel:    v_t = v_tu + s_t (v - v_tu), renormed per token against v; then (if image guidance)
                   v_iu + s_i (v_t - v_iu) without renorm.
  `renorm_type` is a name or its index in RENORM_TYPES (a traced index selects inside one compiled step)."""
  if isinstance(renorm_type, str):
    if renorm_type not in RENORM_TYPES:
      raise ValueError(f"cfg_renorm_type={renorm_type!r} is not one of {RENORM_TYPES}")
    renorm_type = RENORM_TYPES.index(renorm_type)
  v_text = v_text_uncond + text_scale * (v - v_text_uncond)

  def img_cfg(x):
    return jnp.where(use_img, v_img_uncond + img_scale * (x - v_img_uncond), x)

  def global_(_):
    return _renorm(v, img_cfg(v_text), (1, 2), renorm_min)

  def channel(_):
    return _renorm(v, img_cfg(v_text), -1, renorm_min)

  def text_channel(_):
    return img_cfg(_renorm(v, v_text, -1, renorm_min))

  return jax.lax.switch(renorm_type, (global_, channel, text_channel), None)


def predict_velocity(params, config: BagelConfig, cache: kv_lib.KVCache, block, x_t, t):
  """Velocity [B, N, C] of the noisy latents x_t [B, N, C] at timesteps t [B] given a context cache."""
  b, l = block["modality"].shape
  x = forward.embed_block(params, config, block, x_t=x_t, t=t)
  h, _, _, _ = forward.run_decoder(params, config, cache, x, forward.block_routing(block, config),
                                   block["rel_pos"], jnp.ones((b, l), bool), NOISE, jnp.ones(b, bool))
  h_lat = jnp.take_along_axis(h, block["gen_index"][..., None], axis=1)
  return forward.velocity(params, config, h_lat)


@functools.partial(jax.jit, static_argnames=("config",))
def velocity_fn(params, cache: kv_lib.KVCache, block, x_t, t, *, config: BagelConfig):
  """Compiled `predict_velocity` (one decoder pass; what each CFG branch of a step runs)."""
  return predict_velocity(params, config, cache, block, x_t, t)


@functools.partial(jax.jit, static_argnames=("config",))
def euler_step(params, caches: Tuple[kv_lib.KVCache, kv_lib.KVCache, kv_lib.KVCache], block, x_t, t, dt,
               use_text, use_img, text_scale, img_scale, renorm_type, renorm_min, *, config: BagelConfig):
  """x_{t - dt} = x_t - v dt with the (guided) velocity; caches = (gen, cfg_text, cfg_img); renorm_type is the
  traced index into RENORM_TYPES, so every guidance setting shares one compiled step."""
  TRACE_COUNTS["euler_step"] += 1
  tt = jnp.full((x_t.shape[0],), t, jnp.float32)
  v = predict_velocity(params, config, caches[0], block, x_t, tt)

  def guided(v):
    v_tu = predict_velocity(params, config, caches[1], block, x_t, tt)
    v_iu = jax.lax.cond(use_img, lambda: predict_velocity(params, config, caches[2], block, x_t, tt),
                        lambda: jnp.zeros_like(v))
    return cfg_combine(v, v_tu, v_iu, text_scale, img_scale, use_img, renorm_type, renorm_min)

  v = jax.lax.cond(use_text, guided, lambda v: v, v)
  return (x_t.astype(jnp.float32) - v * dt).astype(jnp.float32)


def check_guidance(cfg_text_scale: float, cfg_img_scale: float, cfg_interval: Sequence[float],
                   cfg_renorm_type: str, cfg_renorm_min: float) -> None:
  if cfg_renorm_type not in RENORM_TYPES:
    raise ValueError(f"cfg_renorm_type={cfg_renorm_type!r} is not one of {RENORM_TYPES}")
  if len(cfg_interval) != 2 or not 0.0 <= cfg_interval[0] <= cfg_interval[1] <= 1.0:
    raise ValueError(f"cfg_interval={tuple(cfg_interval)} must be (lo, hi) with 0 <= lo <= hi <= 1")
  if cfg_text_scale <= 0 or cfg_img_scale <= 0:
    raise ValueError(f"cfg scales must be > 0, got text {cfg_text_scale}, image {cfg_img_scale}")
  if not 0.0 <= cfg_renorm_min <= 1.0:
    raise ValueError(f"cfg_renorm_min={cfg_renorm_min} must be in [0, 1]")


def sample_latents(params, config: BagelConfig, contexts, grid: Tuple[int, int], *, rng=None, noise=None,
                   num_timesteps: int = 50, timestep_shift: float = 3.0, cfg_text_scale: float = 4.0,
                   cfg_img_scale: float = 1.0, cfg_interval: Sequence[float] = (0.4, 1.0),
                   cfg_renorm_type: str = "global", cfg_renorm_min: float = 0.0, progress: bool = False,
                   desc: str = "denoising", on_step: Optional[Callable[[int, int], None]] = None):
  """Generates clean latent tokens [B, h*w, C] (a jax array) for every row of `contexts`.

  `contexts`: a `CFGContexts` (guided) or a single `Context` (unguided: the scales are then irrelevant).
  `noise` [B, h*w, C] overrides the initial N(0, I) draw from `rng` (reproducible across batch sizes).
  `on_step(done, total)`, if given, is called after each Euler step has finished computing (progress reports)."""
  check_guidance(cfg_text_scale, cfg_img_scale, cfg_interval, cfg_renorm_type, cfg_renorm_min)
  if isinstance(contexts, Context):
    contexts = CFGContexts(contexts, contexts, contexts)
    cfg_text_scale, cfg_img_scale = 1.0, 1.0
  gen = contexts.gen
  b = gen.batch_size
  h, w = grid
  special = SpecialTokens.from_llm_config(config.llm)
  block = vae_block(b, (h, w), special, config.max_latent_size)
  shape = (b, h * w, config.latent_channels)
  if noise is None:
    noise = jax.random.normal(jax.random.key(0) if rng is None else rng, shape, jnp.float32)
  elif tuple(noise.shape) != shape:
    raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {shape}")
  ts, dts = schedule(num_timesteps, timestep_shift)
  caches = (gen.cache, contexts.cfg_text.cache, contexts.cfg_img.cache)
  blk = {k: jnp.asarray(v) for k, v in block.items()}
  x = kv_lib.commit(jnp.asarray(noise, jnp.float32))  # as committed as the step's own output: one compile
  for i, (t, dt) in enumerate(tqdm(list(zip(ts, dts)), desc=desc, disable=not progress, leave=False)):
    in_interval = cfg_interval[0] < t <= cfg_interval[1]
    use_text = bool(in_interval and cfg_text_scale > 1.0)
    use_img = bool(use_text and cfg_img_scale > 1.0)
    x = euler_step(params, caches, blk, x, jnp.float32(t), jnp.float32(dt), jnp.asarray(use_text),
                   jnp.asarray(use_img), jnp.float32(cfg_text_scale), jnp.float32(cfg_img_scale),
                   jnp.int32(RENORM_TYPES.index(cfg_renorm_type)), jnp.float32(cfg_renorm_min), config=config)
    if on_step is not None:
      x.block_until_ready()
      on_step(i + 1, len(ts))
  return x


@functools.partial(jax.jit, static_argnames=("config", "grid"))
def decode_latents(params, tokens, *, config: BagelConfig, grid: Tuple[int, int]):
  """Latent tokens [B, h*w, C] -> uint8 images [B, H, W, 3] through the VAE decoder ((x/2 + 1/2) clamped to
  [0, 1], times 255, truncated as the official `decode_image`)."""
  TRACE_COUNTS["vae_decode"] += 1
  img = forward.vae_decode(params, config, tokens, grid)
  return (img * 255.0).astype(jnp.uint8)


@functools.partial(jax.jit, static_argnames=("config",))
def encode_images(params, pixels, rng, *, config: BagelConfig):
  """Pixels [B, H, W, 3] in [-1, 1] -> clean latent tokens [B, (H/f)(W/f), C] (posterior sample)."""
  TRACE_COUNTS["vae_encode"] += 1
  return forward.vae_encode(params, config, pixels, rng)

