"""Plain jnp masked attention: the oracle for the Pallas kernel and the CPU fallback.

Materialises the [B, Lq, Lk] mask from metadata, so it is O(L^2) in memory; use it for short rows and tests.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from bagel_jax.kernels import mask as mask_lib


def reference_attention(q, k, v, q_meta: mask_lib.TokenMeta, kv_meta: mask_lib.TokenMeta, *, scale=None):
  """Grouped-query attention under the generalized causal mask.

  q: [B, Lq, Hq, D]; k, v: [B, Lk, Hkv, D] with Hq a multiple of Hkv. Softmax in fp32. Queries that may see
  no key (padding) return zeros rather than NaN.
  """
  b, lq, hq, d = q.shape
  hkv = k.shape[2]
  if hq % hkv:
    raise ValueError(f"reference_attention: q heads {hq} not a multiple of kv heads {hkv}")
  group = hq // hkv
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  mask = mask_lib.materialize(q_meta, kv_meta)  # [B, Lq, Lk]
  qg = q.reshape(b, lq, hkv, group, d)
  logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
  big_neg = jnp.finfo(jnp.float32).min
  logits = jnp.where(mask[:, None, None], logits, big_neg)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = probs * jnp.any(mask, axis=-1)[:, None, None, :, None]
  out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.reshape(b, lq, hq, d).astype(q.dtype)


def reference_attention_lse(q, k, v, q_meta, kv_meta, *, scale=None):
  """Log-sum-exp of the masked logits, [B, Hq, Lq] (what a flash kernel saves for its backward).
  Empty rows give -inf."""
  b, lq, hq, d = q.shape
  hkv = k.shape[2]
  group = hq // hkv
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  mask = mask_lib.materialize(q_meta, kv_meta)
  qg = q.reshape(b, lq, hkv, group, d)
  logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
  logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
  return jax.nn.logsumexp(logits, axis=-1).reshape(b, hq, lq)
