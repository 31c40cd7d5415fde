"""The decoder forward of one query block against a KV cache (the official `forward_inference`).

Training runs the whole packed row through `models.qwen2.Qwen2LM`; inference runs one block at a time (a text
prompt, an image, one decoded token, the noisy latents of a denoising step) whose queries attend to the cache
plus the block itself. Both run the same `models.qwen2.DecoderLayer` (its `cache` argument), the same
attention registry (`kernels.attention.attention_with_cache`) and the same embedding (`Bagel.embed_row`), on
the training parameter tree unchanged, so the two forwards cannot drift apart.

Routing per token follows the official `mode` argument: VAE latent tokens (clean or noisy) use the generation
expert, text, special tokens and ViT tokens the understanding expert.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from bagel_jax import batch as batch_lib
from bagel_jax.kernels import mask as mask_lib
from bagel_jax.inference import kv_cache as kv_lib
from bagel_jax.models import layers, variants
from bagel_jax.models.bagel import Bagel
from bagel_jax.models.config import BagelConfig
from bagel_jax.models.flux_vae import patchify_latents, unpatchify_latents
from bagel_jax.models.qwen2 import EMBED, DecoderLayer, ExpertRMSNorm, LMHead, rope_tables
from bagel_jax.models.routing import Routing

Params = Dict[str, Any]


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
  layer = DecoderLayer(config)

  def body(h, xs):
    lp, kc, vc = xs
    return layer.apply({"params": lp}, h, routing, cos, sin, q_meta, cache=(kc, vc, cache_meta))

  x, (k_new, v_new) = jax.lax.scan(body, x, (_layer_params(params, config), cache.k, cache.v))
  num = variants.get(lc.layer_variant).experts.final_norm
  norm = ExpertRMSNorm(num, lc.hidden_size, EMBED, lc.rms_norm_eps)
  h = routing.combine(norm.apply({"params": params["llm"]["norm"]}, routing.dispatch(x, num)))
  return h, k_new, v_new, q_meta


# ----------------------------------------------------------------------------------------------------------
# Embeddings and heads (the training modules, through `Bagel.apply`).
# ----------------------------------------------------------------------------------------------------------

def _bagel(params, config, fn, *args):
  return Bagel(config).apply({"params": params}, *args, method=fn)


def embed_block(params: Params, config: BagelConfig, block: Dict[str, jnp.ndarray], x_t=None, t=None):
  """Block arrays -> [B, L, D] through `Bagel.embed_row` (training's embedding): token embeddings, ViT
  embeddings at VIT positions, latent embeddings (clean `latents` at t=0, or `x_t` at timestep t [B]) at VAE
  positions."""

  def fn(m: Bagel):
    lat = x_t if x_t is not None else block.get("latents")
    emb = None
    if lat is not None:
      if t is None:
        tt = jnp.zeros(lat.shape[:2], jnp.float32)
      else:
        tt = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1, 1), lat.shape[:2])
      emb = m.embed_latents(lat.astype(layers.dtype_of(config.dtype)), tt, block["latent_pos"])
    return m.embed_row(block, emb)

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
