"""BAGEL's generalized causal mask as a function of per-token metadata (reference §4.2).

    allowed(q, k) = doc[q] == doc[k] != 0
                    and (idx[k] <= idx[q] or (split[q] == split[k] and mode[q] in {FULL, NOISE}))
                    and not (mode[k] == NOISE and split[q] != split[k])

`idx` is the token's index in its packed row; queries and keys carry their own metadata so the same
predicate serves self-attention (training), cached decoding and denoising against a KV cache (inference).
The mask is never stored in a batch: the reference attention materialises it, the Pallas kernel evaluates
it per tile.
"""
from __future__ import annotations

import typing

import jax.numpy as jnp

CAUSAL, FULL, NOISE = 0, 1, 2
SPLIT_MODES = {"causal": CAUSAL, "full": FULL, "noise": NOISE}


class TokenMeta(typing.NamedTuple):
  """Per-token attention metadata, each [B, L] int32."""
  document: jnp.ndarray  # sample id in the row, 0 = padding
  split: jnp.ndarray     # split id, unique per row
  mode: jnp.ndarray      # CAUSAL / FULL / NOISE of the token's split
  index: jnp.ndarray     # position in the packed row (order for causality)

  @classmethod
  def from_row(cls, document, split, mode) -> "TokenMeta":
    """Metadata of a packed row where token i sits at index i."""
    document = jnp.asarray(document, jnp.int32)
    index = jnp.broadcast_to(jnp.arange(document.shape[-1], dtype=jnp.int32), document.shape)
    return cls(document, jnp.asarray(split, jnp.int32), jnp.asarray(mode, jnp.int32), index)

  @classmethod
  def segments(cls, segment_ids) -> "TokenMeta":
    """Bidirectional attention inside each segment (ViT images); 0 = padding."""
    seg = jnp.asarray(segment_ids, jnp.int32)
    return cls.from_row(seg, seg, jnp.full_like(seg, FULL))


def allowed(q_doc, q_split, q_mode, q_idx, k_doc, k_split, k_mode, k_idx):
  """The §4.2 predicate, elementwise over broadcastable int arrays."""
  same_doc = (q_doc == k_doc) & (q_doc != 0)
  same_split = q_split == k_split
  bidirectional = same_split & ((q_mode == FULL) | (q_mode == NOISE))
  hidden_noise = (k_mode == NOISE) & jnp.logical_not(same_split)
  return same_doc & ((k_idx <= q_idx) | bidirectional) & jnp.logical_not(hidden_noise)


def materialize(q: TokenMeta, k: TokenMeta) -> jnp.ndarray:
  """Dense boolean mask [B, Lq, Lk]."""
  e = lambda a: a[:, :, None]
  f = lambda a: a[:, None, :]
  return allowed(e(q.document), e(q.split), e(q.mode), e(q.index),
                 f(k.document), f(k.split), f(k.mode), f(k.index))
