"""Block-sparsity tables for the Pallas attention kernel, computed with jnp from per-token metadata.

A (q-block, kv-block) tile is *empty* (no allowed pair: never visited), *full* (every pair allowed: no mask
needed) or *partial*. The classification uses a handful of per-block summaries (O(L) memory per row) combined
pairwise on the [nq, nk] tile grid, never the [Lq, Lk] mask.

The predicate splits into two relations (with the mode of a split shared by its tokens):

    allowed(q, k) = T1 or T2
    T1: doc[q] == doc[k] != 0, k is not noise, idx[k] <= idx[q]
    T2: split[q] == split[k] (same document), mode[q] in {full, noise}

(a noise key from another split is hidden; one from q's own split makes q a noise token, so T2 covers it).

Guarantees:
- For any metadata in which a split has one mode (TokenMeta's definition, in q and kv alike) the computed
  non-empty set contains every non-empty tile and the full set only full tiles, so the kernel stays exact
  (cross attention against a KV cache included).
- For packed rows in the layout of `bagel_jax.data.sequence` (documents and splits contiguous, index strictly
  increasing, each split with one mode; padding anywhere is ignored) and q/kv the same sequence (training,
  ViT), both sets are exact: visited tiles = non-empty tiles. Proofs are in docs/attention_kernel.md; the
  tests check them against the dense mask tiled the slow way.
"""
from __future__ import annotations

import typing

import jax.numpy as jnp
import numpy as np

from bagel_jax.kernels import mask as mask_lib

EMPTY, PARTIAL, FULL_TILE = 0, 1, 2
_BIG = np.int32(2 ** 30)  # above any index/id a row can hold; |values| < 2**30 keeps comparisons overflow-free


class BlockTables(typing.NamedTuple):
  """Scalar-prefetched iteration tables (int32).

  `fwd[b, i, t]` = 2 * kv_block + is_full for the t-th non-empty kv-block of q-block i (t < fwd_count[b, i];
  later entries are 0 and never read). `bwd` / `bwd_count` are the same for the transposed grid: per
  kv-block, the q-blocks that see it (the dK/dV kernel)."""
  fwd: jnp.ndarray        # [B, nq, nk]
  fwd_count: jnp.ndarray  # [B, nq]
  bwd: jnp.ndarray        # [B, nk, nq]
  bwd_count: jnp.ndarray  # [B, nk]


def _blocks(x, block):
  b, l = x.shape
  return x.reshape(b, l // block, block)


def _masked_min(xp, cond, x):
  return xp.where(cond, x, _BIG).min(-1)


def _masked_max(xp, cond, x):
  return xp.where(cond, x, -_BIG).max(-1)


def _common(meta: mask_lib.TokenMeta, block: int, xp):
  doc, split, mode, idx = (_blocks(xp.asarray(a, xp.int32), block) for a in meta)
  valid = doc != 0
  s = dict(any_valid=valid.any(-1), all_valid=valid.all(-1),
           doc_lo=_masked_min(xp, valid, doc), doc_hi=_masked_max(xp, valid, doc),
           split_lo=_masked_min(xp, valid, split), split_hi=_masked_max(xp, valid, split))
  in_doc_lo = valid & (doc == s["doc_lo"][..., None])
  in_doc_hi = valid & (doc == s["doc_hi"][..., None])
  in_split_lo = valid & (split == s["split_lo"][..., None])
  return s, (doc, split, mode, idx, valid, in_doc_lo, in_doc_hi, in_split_lo)


def query_summaries(meta: mask_lib.TokenMeta, block: int, xp=jnp):
  """Per q-block summaries, each [B, nq]."""
  s, (_, split, mode, idx, valid, in_doc_lo, in_doc_hi, in_split_lo) = _common(meta, block, xp)
  bidir = (mode == mask_lib.FULL) | (mode == mask_lib.NOISE)
  in_split_hi = valid & (split == s["split_hi"][..., None])
  rest = valid & ~in_split_lo
  s.update(idx_max=_masked_max(xp, valid, idx), idx_min=_masked_min(xp, valid, idx),
           idx_max_doc_lo=_masked_max(xp, in_doc_lo, idx), idx_max_doc_hi=_masked_max(xp, in_doc_hi, idx),
           bidir_any_split_lo=(in_split_lo & bidir).any(-1), bidir_any_split_hi=(in_split_hi & bidir).any(-1),
           bidir_all_split_lo=(~in_split_lo | bidir).all(-1),
           idx_min_rest=_masked_min(xp, rest, idx), has_rest=rest.any(-1))
  return s


def key_summaries(meta: mask_lib.TokenMeta, block: int, xp=jnp):
  """Per kv-block summaries, each [B, nk]. Split groups: lo (split == split_lo), hi (split == split_hi !=
  split_lo), mid (the rest), so that they are disjoint."""
  s, (_, split, mode, idx, valid, in_doc_lo, in_doc_hi, in_split_lo) = _common(meta, block, xp)
  noise = mode == mask_lib.NOISE
  nn = valid & ~noise
  in_split_hi = valid & (split == s["split_hi"][..., None]) & ~in_split_lo
  mid = valid & ~in_split_lo & ~in_split_hi
  s.update(nn_idx_min=_masked_min(xp, nn, idx), nn_idx_min_doc_lo=_masked_min(xp, nn & in_doc_lo, idx),
           nn_idx_min_doc_hi=_masked_min(xp, nn & in_doc_hi, idx))
  for name, group in (("lo", in_split_lo), ("hi", in_split_hi), ("mid", mid)):
    s[f"{name}_all_nn"] = (~group | ~noise).all(-1)
    s[f"{name}_idx_max"] = _masked_max(xp, group, idx)
  return s


def tile_classes(q_meta: mask_lib.TokenMeta, kv_meta: mask_lib.TokenMeta, block_q: int, block_kv: int,
                 xp=jnp):
  """[B, nq, nk] int32: EMPTY / PARTIAL / FULL_TILE from block summaries (see the module docstring).

  xp = jnp (traced, inside the step) or np (host, when the metadata are known at trace time)."""
  q = {k: v[:, :, None] for k, v in query_summaries(q_meta, block_q, xp).items()}
  k = {k: v[:, None, :] for k, v in key_summaries(kv_meta, block_kv, xp).items()}
  both = q["any_valid"] & k["any_valid"]

  # T1: one shared document d needs min kv index (non-noise, doc d) <= max q index (doc d); two or more shared
  # documents mean overlapping blocks of one sequence, which share a token that sees itself.
  d_lo = xp.maximum(q["doc_lo"], k["doc_lo"])
  d_hi = xp.minimum(q["doc_hi"], k["doc_hi"])
  q_max_d = xp.where(d_lo == q["doc_lo"], q["idx_max_doc_lo"],
                      xp.where(d_lo == q["doc_hi"], q["idx_max_doc_hi"], q["idx_max"]))
  k_min_d = xp.where(d_lo == k["doc_lo"], k["nn_idx_min_doc_lo"],
                      xp.where(d_lo == k["doc_hi"], k["nn_idx_min_doc_hi"], k["nn_idx_min"]))
  t1 = (d_lo < d_hi) | ((d_lo == d_hi) & (k_min_d <= q_max_d))

  # T2: a bidirectional split present in both blocks.
  s_lo = xp.maximum(q["split_lo"], k["split_lo"])
  s_hi = xp.minimum(q["split_hi"], k["split_hi"])
  bidir = xp.where(s_lo == q["split_lo"], q["bidir_any_split_lo"],
                    xp.where(s_lo == q["split_hi"], q["bidir_any_split_hi"], True))
  t2 = (s_lo < s_hi) | ((s_lo == s_hi) & bidir)
  nonempty = both & (t1 | t2)

  # Full: no padding, one document, and with s0 = the first split of the q-block: every kv token outside s0
  # is non-noise and precedes every query; kv tokens of s0 are either all before every query (causal s0) or
  # s0 is bidirectional and they precede every query outside s0.
  s0 = q["split_lo"]
  is_lo = s0 == k["split_lo"]
  is_hi = (s0 == k["split_hi"]) & ~is_lo
  s0_mid = (s0 > k["split_lo"]) & (s0 < k["split_hi"])
  ks0_all_nn = xp.where(is_lo, k["lo_all_nn"], xp.where(is_hi, k["hi_all_nn"], True))
  ks0_idx_max = xp.where(is_lo, k["lo_idx_max"], xp.where(is_hi, k["hi_idx_max"], -_BIG))
  rest_all_nn = xp.where(is_lo, True, k["lo_all_nn"]) & xp.where(is_hi, True, k["hi_all_nn"]) & k["mid_all_nn"]
  rest_idx_max = xp.maximum(xp.maximum(xp.where(is_lo, -_BIG, k["lo_idx_max"]),
                                         xp.where(is_hi, -_BIG, k["hi_idx_max"])), k["mid_idx_max"])
  one_doc = (q["doc_lo"] == q["doc_hi"]) & (k["doc_lo"] == k["doc_hi"]) & (q["doc_lo"] == k["doc_lo"])
  before_all = rest_all_nn & (rest_idx_max <= q["idx_min"])
  s0_causal = ks0_all_nn & (ks0_idx_max <= q["idx_min"])
  s0_bidir = q["bidir_all_split_lo"] & (~q["has_rest"] | (ks0_all_nn & (ks0_idx_max <= q["idx_min_rest"])))
  full = (q["all_valid"] & k["all_valid"] & one_doc & ~s0_mid & before_all & (s0_causal | s0_bidir))
  return xp.where(nonempty, xp.where(full, FULL_TILE, PARTIAL), EMPTY).astype(xp.int32)


def _compact(classes, xp):
  """Per row of [B, n, m] classes: the non-empty column ids (ascending) as 2*col + full, then zeros."""
  m = classes.shape[-1]
  nonempty = classes != EMPTY
  count = nonempty.sum(-1).astype(xp.int32)
  key = (~nonempty).astype(xp.int32)
  order = (xp.argsort(key, axis=-1, kind="stable") if xp is np else
           jnp.argsort(key, axis=-1, stable=True)).astype(xp.int32)
  entries = 2 * order + (xp.take_along_axis(classes, order, axis=-1) == FULL_TILE)
  listed = xp.arange(m, dtype=xp.int32)[None, None] < count[..., None]
  return xp.where(listed, entries, 0).astype(xp.int32), count


def build_tables(q_meta: mask_lib.TokenMeta, kv_meta: mask_lib.TokenMeta, block_q: int, block_kv: int,
                 xp=jnp) -> BlockTables:
  classes = tile_classes(q_meta, kv_meta, block_q, block_kv, xp)
  fwd, fwd_count = _compact(classes, xp)
  bwd, bwd_count = _compact(xp.swapaxes(classes, 1, 2), xp)
  return BlockTables(fwd, fwd_count, bwd, bwd_count)


def dense_tile_classes(q_meta: mask_lib.TokenMeta, kv_meta: mask_lib.TokenMeta, block_q: int, block_kv: int,
                       chunk: int = 1024) -> np.ndarray:
  """The slow oracle: the dense mask tiled block by block (numpy, O(chunk * Lk) memory at a time, one row of
  the batch at a time: eight 36,864-token rows at once needed 21 GB)."""
  qm = [np.asarray(a, np.int32) for a in q_meta]
  km = [np.asarray(a, np.int32) for a in kv_meta]
  bsz, lq = qm[0].shape
  lk = km[0].shape[1]
  nq, nk = lq // block_q, lk // block_kv
  out = np.zeros((bsz, nq, nk), np.int32)
  rows = max(1, chunk // block_q) * block_q
  for b in range(bsz):
    f = lambda a: a[b:b + 1, None, :]
    for start in range(0, lq, rows):
      e = lambda a: a[b:b + 1, start:start + rows, None]
      m = np.asarray(mask_lib.allowed(*(e(a) for a in qm), *(f(a) for a in km)))
      m = m.reshape(1, -1, block_q, nk, block_kv)
      cls = np.where(m.all(axis=(2, 4)), FULL_TILE, np.where(m.any(axis=(2, 4)), PARTIAL, EMPTY))
      out[b:b + 1, start // block_q:start // block_q + cls.shape[1]] = cls
  return out
