"""Fixed-capacity KV cache: a pytree that jit-compiled prefill, decode and denoising steps take and return.

The official `NaiveCache` grows a packed tensor per layer; under `jit` shapes are static, so here every request
row owns `capacity` slots and unused slots carry document 0 (invisible under the mask). What is stored matches
the official cache (reference §4.4): K after the k-norm and RoPE, V, and, so that the one mask predicate of
training (`kernels.mask.allowed`) also governs inference, each cached token's split id and split mode. A
token's slot is its causal order (`TokenMeta.index`).

Only text, ViT and clean-VAE blocks are ever written; denoising steps read the cache and never write it
(noisy tokens stay invisible to everything after them, as in training).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from bagel_jax.kernels import mask as mask_lib
from bagel_jax.models import layers
from bagel_jax.models.config import BagelConfig


@struct.dataclass
class KVCache:
  k: jnp.ndarray          # [layers, B, C, kv_heads, head_dim], after k-norm and RoPE
  v: jnp.ndarray          # [layers, B, C, kv_heads, head_dim]
  document: jnp.ndarray   # [B, C] int32: 1 for a filled slot, 0 for an empty one
  split: jnp.ndarray      # [B, C] int32: split id of the cached token
  mode: jnp.ndarray       # [B, C] int32: CAUSAL / FULL of its split (NOISE never enters)
  length: jnp.ndarray     # [B] int32: filled slots (the next token's slot / causal index)
  rope: jnp.ndarray       # [B] int32: next RoPE position id
  num_splits: jnp.ndarray  # [B] int32: splits written so far (the next split's id is num_splits + 1)

  @property
  def capacity(self) -> int:
    return self.k.shape[2]

  @property
  def batch_size(self) -> int:
    return self.k.shape[1]

  def meta(self) -> mask_lib.TokenMeta:
    """Mask metadata of the cached tokens as keys (index = slot)."""
    index = jnp.broadcast_to(jnp.arange(self.capacity, dtype=jnp.int32), self.document.shape)
    return mask_lib.TokenMeta(self.document, self.split, self.mode, index)


def init_cache(config: BagelConfig, batch_size: int, capacity: int) -> KVCache:
  """An empty cache of `capacity` slots per request row."""
  if capacity <= 0 or batch_size <= 0:
    raise ValueError(f"init_cache: batch_size={batch_size} and capacity={capacity} must be positive")
  lc = config.llm
  shape = (lc.num_layers, batch_size, capacity, lc.num_kv_heads, lc.head_dim)
  dt = layers.dtype_of(config.dtype)
  zeros_i = jnp.zeros((batch_size, capacity), jnp.int32)
  zeros_b = jnp.zeros((batch_size,), jnp.int32)
  cache = KVCache(jnp.zeros(shape, dt), jnp.zeros(shape, dt), zeros_i, zeros_i, zeros_i, zeros_b, zeros_b, zeros_b)
  return commit(cache)


def commit(tree):
  """Places arrays on the default device as *committed* arrays, like the outputs of a compiled step. jit keys
  its executables on committedness, so a step fed a fresh (uncommitted) array once and its own output after
  that would compile twice."""
  return jax.device_put(tree, jax.devices()[0])


def write(cache: KVCache, k_new, v_new, q_meta: mask_lib.TokenMeta, valid, rope_advance, new_split) -> KVCache:
  """Appends a query block: k_new/v_new [layers, B, L, H, D] land in slots `q_meta.index` of the rows where
  `valid` [B, L] holds (invalid tokens are dropped, so ragged batches need no special case).

  rope_advance [B]: how far each row's RoPE counter moves (n for text, 1 for an image block); new_split [B]
  bool: whether the block opened a split (text decoding appends tokens to one split)."""
  cap = cache.capacity
  slot = jnp.where(valid, q_meta.index, cap)  # out of range -> dropped
  rows = jnp.arange(cache.batch_size)[:, None]
  k = cache.k.at[:, rows, slot].set(k_new.astype(cache.k.dtype), mode="drop")
  v = cache.v.at[:, rows, slot].set(v_new.astype(cache.v.dtype), mode="drop")
  put = lambda dst, src: dst.at[rows, slot].set(src.astype(jnp.int32), mode="drop")
  any_valid = jnp.any(valid, axis=1)
  return KVCache(
      k=k, v=v, document=put(cache.document, q_meta.document), split=put(cache.split, q_meta.split),
      mode=put(cache.mode, q_meta.mode), length=cache.length + jnp.sum(valid, axis=1, dtype=jnp.int32),
      rope=cache.rope + jnp.where(any_valid, rope_advance, 0).astype(jnp.int32),
      num_splits=cache.num_splits + (new_split & any_valid).astype(jnp.int32))

