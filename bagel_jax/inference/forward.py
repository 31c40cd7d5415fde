"""The decoder forward of one query block against a KV cache (the official `forward_inference`).

Training runs the whole packed row through `models.qwen2.Qwen2LM`; inference runs one block at a time (a text
prompt, an image, one decoded token, the noisy latents of a denoising step) whose queries attend to the cache
plus the block itself. The layer below is `models.qwen2.DecoderLayer` with the attention call swapped for the
cached one: it is built from the same submodules (`ExpertLinear`, `ExpertRMSNorm`, `SwiGLU`, `TopKMoE`) under
the same names, so it reads the training parameter tree unchanged and the two forwards cannot drift apart.

Routing per token follows the official `mode` argument: VAE latent tokens (clean or noisy) use the generation
expert, text, special tokens and ViT tokens the understanding expert.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bagel_jax import batch as batch_lib
from bagel_jax.kernels import mask as mask_lib
from bagel_jax.kernels.reference import reference_attention
from bagel_jax.kernels.tiled import sharded_tiled_attention
from bagel_jax.inference import kv_cache as kv_lib
from bagel_jax.models import layers
from bagel_jax.models.bagel import Bagel, scatter_in_order
from bagel_jax.models.config import BagelConfig
from bagel_jax.models.flux_vae import patchify_latents, unpatchify_latents
from bagel_jax.models.qwen2 import (EMBED, ExpertRMSNorm, LMHead, apply_rope,
                                    expert_counts, rope_tables)
from bagel_jax.models import qwen2
from bagel_jax.models.routing import Routing

Params = Dict[str, Any]


def _reference_cached(q, k, v, q_meta, k_cache, v_cache, cache_meta, scale):
  kv_meta = mask_lib.TokenMeta(*(jnp.concatenate([c, m], axis=1) for c, m in zip(cache_meta, q_meta)))
  return reference_attention(q, jnp.concatenate([k_cache.astype(k.dtype), k], 1),
                             jnp.concatenate([v_cache.astype(v.dtype), v], 1), q_meta, kv_meta, scale=scale)


def _tiled_cached(q, k, v, q_meta, k_cache, v_cache, cache_meta, scale):
  kv_meta = mask_lib.TokenMeta(*(jnp.concatenate([c, m], axis=1) for c, m in zip(cache_meta, q_meta)))
  return sharded_tiled_attention(q, jnp.concatenate([k_cache.astype(k.dtype), k], 1),
                                 jnp.concatenate([v_cache.astype(v.dtype), v], 1), q_meta, kv_meta, scale=scale)


def cached_attention(q, k, v, q_meta, k_cache, v_cache, cache_meta, *, impl: str, scale: float):
  """Queries attend to the cache plus their own block under the training mask predicate. `impl` follows the
  config's attention_impl: reference, tiled, pallas, pallas_interpret, or auto (the Pallas kernel when lowered
  for TPU, tiled elsewhere)."""
  if impl == "reference":
    return _reference_cached(q, k, v, q_meta, k_cache, v_cache, cache_meta, scale)
  if impl == "tiled":
    return _tiled_cached(q, k, v, q_meta, k_cache, v_cache, cache_meta, scale)
  from bagel_jax.kernels import ops  # pylint: disable=import-outside-toplevel  # Pallas only when asked for
  pallas = functools.partial(ops.cached_attention, scale=scale, interpret=impl == "pallas_interpret")
  if impl == "auto":
    return jax.lax.platform_dependent(
        q, k, v, q_meta, k_cache, v_cache, cache_meta, tpu=pallas,
        default=lambda *a: _tiled_cached(*a, scale))
  if impl not in ("pallas", "pallas_interpret"):
    raise ValueError(f"unknown attention_impl {impl!r} for cached attention")
  return pallas(q, k, v, q_meta, k_cache, v_cache, cache_meta)


class CachedAttention(nn.Module):
  """`qwen2.Attention` whose keys are the cache plus the block; also returns the block's K (post norm+RoPE)
  and V for the cache."""
  config: BagelConfig
  num: int

  @nn.compact
  def __call__(self, hs, routing: Routing, cos, sin, q_meta, k_cache, v_cache, cache_meta):
    c, lc = self.config, self.config.llm
    q, k, v = qwen2.expert_qkv(c, self.num, hs)
    q, k, v = routing.combine(q), routing.combine(k), routing.combine(v)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = cached_attention(q, k, v, q_meta, k_cache, v_cache, cache_meta, impl=c.attention_impl,
                           scale=1.0 / math.sqrt(lc.head_dim))
    return qwen2.expert_o_proj(c, self.num, routing, out), k, v


class CachedDecoderLayer(nn.Module):
  """`qwen2.DecoderLayer` (same parameter names) over a query block and one layer's cache."""
  config: BagelConfig

  @nn.compact
  def __call__(self, x, routing: Routing, cos, sin, q_meta, k_cache, v_cache, cache_meta):
    c, lc = self.config, self.config.llm
    n = expert_counts(lc.layer_variant)
    hs = ExpertRMSNorm(n["attn"], lc.hidden_size, EMBED, lc.rms_norm_eps, name="input_layernorm")(
        routing.dispatch(x, n["attn"]))
    o, k, v = CachedAttention(c, n["attn"], name="self_attn")(hs, routing, cos, sin, q_meta, k_cache, v_cache,
                                                             cache_meta)
    x = x + routing.combine(o)
    y, _ = qwen2.post_attention_mlp(c, x, routing, q_meta.document > 0)
    return x + y, k, v


# ----------------------------------------------------------------------------------------------------------
# Routing of a query block.
# ----------------------------------------------------------------------------------------------------------

def routing_indices(modality: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Host side: (und_index [B, L], gen_index [B, NL]) of a block layout `modality` [B, L], -1 padded.

  Buffer capacities are static: und = L, gen = the number of VAE positions, which every row of a block shares
  (a text block has an empty gen buffer)."""
  modality = np.asarray(modality)
  b, l = modality.shape
  is_gen = modality == batch_lib.VAE
  n_gen = int(is_gen[0].sum()) if b else 0
  if np.any(is_gen.sum(1) != n_gen):
    raise ValueError("routing_indices: rows of one block must have the same number of VAE tokens")
  und_idx = np.full((b, l), -1, np.int32)
  gen_idx = np.full((b, n_gen), -1, np.int32)
  for r in range(b):
    u = np.nonzero(~is_gen[r] & (modality[r] != batch_lib.PAD))[0]
    und_idx[r, :len(u)] = u
    gen_idx[r] = np.nonzero(is_gen[r])[0]
  return und_idx, gen_idx


def block_routing(block: Dict[str, jnp.ndarray], config: BagelConfig) -> Routing:
  """The MoT/MoE routing of a block (arrays from `routing_indices`)."""
  fake = dict(modality=block["modality"], und_index=block["und_index"], latent_dest=block["gen_index"])
  return Routing.from_batch(fake, dense=config.routing == "dense")


# ----------------------------------------------------------------------------------------------------------
# The decoder over a block.
# ----------------------------------------------------------------------------------------------------------

def _layer_params(params: Params, config: BagelConfig):
  llm = params["llm"]
  if config.scan_layers:
    return llm["layers"]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *[llm[f"layers_{i}"] for i in range(config.llm.num_layers)])


def query_meta(cache: kv_lib.KVCache, valid, mode: int, new_split) -> mask_lib.TokenMeta:
  """Metadata of a block appended after the cache: its tokens take the next slots (causal order), one split
  (a new one if `new_split`, else the last written split, as decoded text continues its split)."""
  b, l = valid.shape
  index = cache.length[:, None] + jnp.arange(l, dtype=jnp.int32)[None]
  split = jnp.broadcast_to((cache.num_splits + new_split.astype(jnp.int32))[:, None], (b, l))
  return mask_lib.TokenMeta(valid.astype(jnp.int32), split, jnp.full((b, l), mode, jnp.int32), index)


def run_decoder(params: Params, config: BagelConfig, cache: kv_lib.KVCache, x, routing: Routing, rel_pos, valid,
                mode: int, new_split) -> Tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, mask_lib.TokenMeta]:
  """Embedded block x [B, L, D] -> final-normed hidden states [B, L, D], the block's K and V per layer
  [layers, B, L, Hkv, D] and its metadata. Valid tokens must come first in each row (slots are consecutive)."""
  lc = config.llm
  positions = cache.rope[:, None] + rel_pos
  cos, sin = rope_tables(positions, lc.head_dim, lc.rope_theta, layers.dtype_of(config.dtype))
  q_meta = query_meta(cache, valid, mode, new_split)
  cache_meta = cache.meta()
  layer = CachedDecoderLayer(config)

  def body(h, xs):
    lp, kc, vc = xs
    h, k, v = layer.apply({"params": lp}, h, routing, cos, sin, q_meta, kc, vc, cache_meta)
    return h, (k, v)

  x, (k_new, v_new) = jax.lax.scan(body, x, (_layer_params(params, config), cache.k, cache.v))
  num = expert_counts(lc.layer_variant)["final_norm"]
  norm = ExpertRMSNorm(num, lc.hidden_size, EMBED, lc.rms_norm_eps)
  h = routing.combine(norm.apply({"params": params["llm"]["norm"]}, routing.dispatch(x, num)))
  return h, k_new, v_new, q_meta


# ----------------------------------------------------------------------------------------------------------
# Embeddings and heads (the training modules, through `Bagel.apply`).
# ----------------------------------------------------------------------------------------------------------

def _bagel(params, config, fn, *args):
  return Bagel(config).apply({"params": params}, *args, method=fn)


def embed_block(params: Params, config: BagelConfig, block: Dict[str, jnp.ndarray], x_t=None, t=None):
  """Block arrays -> [B, L, D]: token embeddings, ViT embeddings at VIT positions, latent embeddings (clean
  `latents` at t=0, or `x_t` at timestep t [B]) at VAE positions."""
  mod = block["modality"]

  def fn(m: Bagel):
    x = m.llm.embed(block["text_ids"])
    if "vit_patches" in block:
      vit = m.embed_vit(block["vit_patches"], block["vit_pos"], block["vit_image"])
      x = scatter_in_order(x, vit, mod == batch_lib.VIT)
    lat = x_t if x_t is not None else block.get("latents")
    if lat is not None:
      if t is None:
        tt = jnp.zeros(lat.shape[:2], jnp.float32)
      else:
        tt = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1, 1), lat.shape[:2])
      emb = m.embed_latents(lat.astype(layers.dtype_of(config.dtype)), tt, block["latent_pos"])
      x = scatter_in_order(x, emb, mod == batch_lib.VAE)
    return x

  return _bagel(params, config, fn)


def lm_logits(params: Params, config: BagelConfig, h):
  """[B, L, D] -> fp32 logits [B, L, V] (the untied `lm_head`)."""
  return LMHead(config).apply({"params": params["llm"]["lm_head"]}, h)


def velocity(params: Params, config: BagelConfig, h_latent):
  """Hidden states of latent tokens -> predicted velocity eps - x0 (`llm2vae`), fp32."""
  return _bagel(params, config, lambda m, h: m.velocity(h), h_latent).astype(jnp.float32)


def vae_encode(params: Params, config: BagelConfig, pixels, rng):
  """[N, H, W, 3] in [-1, 1] -> latent tokens [N, (H/16)(W/16), 64] (posterior sample, as the official
  inference encodes context images), scaled/shifted."""
  z = _bagel(params, config, lambda m, x, r: m.vae.encode(x, r), pixels, rng)
  return patchify_latents(z, config.latent_patch_size).astype(jnp.float32)


def vae_decode(params: Params, config: BagelConfig, tokens, grid: Tuple[int, int]):
  """Latent tokens [N, h*w, 64] -> uint8-ready pixels [N, H, W, 3] in [0, 1]."""
  h, w = grid
  z = unpatchify_latents(tokens, h, w, config.latent_patch_size, config.vae.z_channels)
  img = _bagel(params, config, lambda m, z: m.decode_latents(z), z)
  return jnp.clip(img.astype(jnp.float32) * 0.5 + 0.5, 0.0, 1.0)
