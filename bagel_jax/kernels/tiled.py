"""Block-sparse flash attention in plain JAX: the CPU/GPU path (`attention_impl="tiled"`).

The Pallas kernel (ops.py) is TPU-only; the reference materialises the whole [L, L] mask and score matrix,
of which a packed row of short samples needs ~10%. This path computes only the non-empty (q-block, kv-block)
tiles of the same block tables (`block_tables.tile_classes`): shapes stay static, work follows the data.

The non-empty tiles are listed in (row, q-block, kv-block) order and processed `batch` tiles at a time: each
iteration of a `fori_loop` (traced trip count: ceil(tiles / batch)) gathers its tiles' q, k, v blocks and
metadata and computes all of them with batched einsums. Why batches of tiles: on CPU one tile is a fraction
of a millisecond of arithmetic, less than the cost of a loop iteration (loop control, carry slices, XLA's
thunk dispatch), and XLA's CPU backend runs the body of a loop on one thread; few iterations of large batched
ops are what it runs well. Why 64-token blocks by default: with batching, small tiles cost little extra, and
they leave fewer masked pairs than 128 on rows of short documents (official-small row: 4.8M computed scores
per layer against 6.7M at 128).

Forward (flash attention across batches): each tile's scores get a local max, probabilities, row sums and
P @ V; tiles of one q-block within the batch are combined by segment ops, then merged into that q-block's
running (max, sum, output) by gather -> rescale -> scatter, touching only the q-blocks of the batch. The
log-sum-exp is saved. Backward (custom VJP): one pass over the same batches recomputes the probabilities from
the saved log-sum-exp; dQ, dK, dV are scatter-added per tile. Numerics equal `reference_attention` up to
fp32 summation order (tested with the parity sweep of the Pallas kernel); queries that see no key return
zeros as the reference does.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bagel_jax.kernels import block_tables as tables_lib
from bagel_jax.kernels import mask as mask_lib
from bagel_jax.kernels import sharding as sharding_lib

DEFAULT_BLOCK = 64
DEFAULT_BATCH = 32  # tiles per loop iteration


class _Cfg(NamedTuple):
  block_q: int
  block_kv: int
  batch: int
  scale: float


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _pad_tokens(x, length: int):
  pad = length - x.shape[1]
  return x if pad == 0 else jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))


def _flat_blocks(meta: mask_lib.TokenMeta, block: int):
  """TokenMeta of [B, L] (L a multiple of block) -> each field [B * n, block]."""
  return mask_lib.TokenMeta(*(a.reshape(-1, block) for a in meta))


def _tile_list(qm, km, bq: int, bk: int, batch: int = 1):
  """Flat ids b * nq * nk + qi * nk + ki of the non-empty tiles, ascending, padded with B * nq * nk up to a
  multiple of `batch` at least the grid size; and their count."""
  classes = tables_lib.tile_classes(qm, km, bq, bk)
  flat = (classes != tables_lib.EMPTY).reshape(-1)
  size = _round_up(flat.shape[0], batch)
  ids = jnp.nonzero(flat, size=size, fill_value=flat.shape[0])[0].astype(jnp.int32)
  return ids, jnp.sum(flat, dtype=jnp.int32)


class _Tiles(NamedTuple):
  """One batch of tiles: flat q-block and kv-block ids [T] (row-major over rows), whether each slot holds a
  tile, and the allowed pairs [T, bq, bk] (none in empty slots, which point at block 0)."""
  q: jnp.ndarray
  kv: jnp.ndarray
  live: jnp.ndarray
  allowed: jnp.ndarray


def _walk(cfg: _Cfg, nq: int, nk: int, qm, km):
  """What both passes need: the trip count and batch(i) -> _Tiles."""
  ids, count = _tile_list(qm, km, cfg.block_q, cfg.block_kv, cfg.batch)
  qmb, kmb = _flat_blocks(qm, cfg.block_q), _flat_blocks(km, cfg.block_kv)
  grid = nq * nk
  empty = qm.document.shape[0] * grid  # the fill value of empty slots

  def batch(i):
    e = jax.lax.dynamic_slice_in_dim(ids, i * cfg.batch, cfg.batch)
    live = e < empty
    e = jnp.where(live, e, 0)
    b, rest = e // grid, e % grid
    qb, kb = b * nq + rest // nk, b * nk + rest % nk
    allowed = mask_lib.allowed(*(a[qb][:, :, None] for a in qmb), *(a[kb][:, None, :] for a in kmb))
    return _Tiles(qb, kb, live, allowed & live[:, None, None])

  return (count + cfg.batch - 1) // cfg.batch, batch


def _forward(cfg: _Cfg, q, k, v, qm, km, nq: int, nk: int):
  """q [B*nq, Hkv, G, bq, D], k/v [B*nk, Hkv, bk, D] (flat blocks), metadata [B, L]. Returns out (q's layout
  and dtype) and lse [B*nq, Hkv, G, bq] (fp32, -inf for queries seeing nothing)."""
  n_q, hkv, g, bq, d = q.shape
  trips, batch = _walk(cfg, nq, nk, qm, km)
  neg = jnp.float32(-jnp.inf)
  t = cfg.batch
  safe = lambda m: jnp.where(m == neg, 0.0, m)

  def body(i, carry):
    m_acc, l_acc, o_acc = carry
    tl = batch(i)
    s = jnp.einsum("thgqd,thkd->thgqk", q[tl.q], k[tl.kv], preferred_element_type=jnp.float32) * cfg.scale
    s = jnp.where(tl.allowed[:, None, None], s, neg)
    m_t = s.max(-1)                                            # [T, Hkv, G, bq]
    p = jnp.exp(s - safe(m_t)[..., None])
    l_t = p.sum(-1)
    o_t = jnp.einsum("thgqk,thkd->thgqd", p.astype(v.dtype), v[tl.kv], preferred_element_type=jnp.float32)
    # Combine the batch's tiles per q-block (tiles are sorted, so one q-block is one run of slots; empty
    # slots, at the end, form a run of their own bound for the spare block n_q, never for block 0, which a
    # live run of the same batch may update)...
    qid = jnp.where(tl.live, tl.q, n_q)
    start = jnp.concatenate([jnp.ones((1,), bool), qid[1:] != qid[:-1]])
    seg = jnp.cumsum(start) - 1                                # run of each slot
    m_s = jax.ops.segment_max(m_t, seg, num_segments=t, indices_are_sorted=True)
    w = jnp.exp(m_t - safe(m_s)[seg])
    l_s = jax.ops.segment_sum(w * l_t, seg, num_segments=t, indices_are_sorted=True)
    o_s = jax.ops.segment_sum(w[..., None] * o_t, seg, num_segments=t, indices_are_sorted=True)
    # ...then merge each run into its q-block's running state; unused runs go to the spare block n_q.
    used = jnp.arange(t) <= seg[-1]
    q_s = jnp.where(used, jnp.zeros((t,), jnp.int32).at[seg].max(qid), n_q)
    m_old, l_old, o_old = m_acc[q_s], l_acc[q_s], o_acc[q_s]
    m_new = jnp.maximum(m_old, m_s)
    a, c = jnp.exp(m_old - safe(m_new)), jnp.exp(m_s - safe(m_new))
    return (m_acc.at[q_s].set(m_new), l_acc.at[q_s].set(a * l_old + c * l_s),
            o_acc.at[q_s].set(a[..., None] * o_old + c[..., None] * o_s))

  init = (jnp.full((n_q + 1, hkv, g, bq), neg), jnp.zeros((n_q + 1, hkv, g, bq), jnp.float32),
          jnp.zeros((n_q + 1, hkv, g, bq, d), jnp.float32))
  m, l, acc = (x[:n_q] for x in jax.lax.fori_loop(0, trips, body, init))
  seen = l > 0
  out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0).astype(q.dtype)
  lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), neg)
  return out, lse


def _backward(cfg: _Cfg, q, k, v, qm, km, nq: int, nk: int, out, lse, do):
  n_q, hkv, g, bq, d = q.shape
  trips, batch = _walk(cfg, nq, nk, qm, km)
  di = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [B*nq, Hkv, G, bq]
  lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
  # One contraction axis of G*bq rows per tile: XLA's CPU dots then take the transposed operands as they are.
  rows = lambda x: x.reshape(x.shape[:2] + (g * bq,) + x.shape[4:])

  def body(i, carry):
    dq, dk, dv = carry
    tl = batch(i)
    qt, kt, vt, dot = rows(q[tl.q]), k[tl.kv], v[tl.kv], rows(do[tl.q])
    s = jnp.einsum("thqd,thkd->thqk", qt, kt, preferred_element_type=jnp.float32) * cfg.scale
    allowed = jnp.tile(tl.allowed, (1, g, 1))[:, None]
    p = jnp.where(allowed, jnp.exp(s - rows(lse_safe[tl.q][..., None])), 0.0)
    dp = jnp.einsum("thqd,thkd->thqk", dot, vt, preferred_element_type=jnp.float32)
    ds = p * (dp - rows(di[tl.q][..., None])) * cfg.scale
    dq_t = jnp.einsum("thqk,thkd->thqd", ds.astype(kt.dtype), kt, preferred_element_type=jnp.float32)
    # dV, dK contract the query rows: written as (dO^T P)^T and (Q^T dS)^T so that the transposed operand
    # is the gathered dO / Q, not P / dS (a transposing copy fused into the softmax backward is a slow loop
    # on XLA's CPU backend: 26 of 95 ms per layer on the official-small row).
    dv_t = jnp.einsum("thqd,thqk->thdk", dot, p.astype(dot.dtype), preferred_element_type=jnp.float32)
    dk_t = jnp.einsum("thqd,thqk->thdk", qt, ds.astype(qt.dtype), preferred_element_type=jnp.float32)
    # Empty slots point at block 0 with every pair masked: they add exact zeros.
    return (dq.at[tl.q].add(dq_t.reshape((-1, hkv, g, bq, d))), dk.at[tl.kv].add(dk_t.swapaxes(-1, -2)),
            dv.at[tl.kv].add(dv_t.swapaxes(-1, -2)))

  init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  dq, dk, dv = jax.lax.fori_loop(0, trips, body, init)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 6, 7))
def _tiled(cfg: _Cfg, q, k, v, qm, km, nq, nk):
  return _forward(cfg, q, k, v, qm, km, nq, nk)[0]


def _tiled_fwd(cfg, q, k, v, qm, km, nq, nk):
  out, lse = _forward(cfg, q, k, v, qm, km, nq, nk)
  return out, (q, k, v, qm, km, out, lse)


def _tiled_bwd(cfg, nq, nk, res, do):
  q, k, v, qm, km, out, lse = res
  dq, dk, dv = _backward(cfg, q, k, v, qm, km, nq, nk, out, lse, do)
  return dq, dk, dv, None, None


_tiled.defvjp(_tiled_fwd, _tiled_bwd)


def tiled_attention(q, k, v, q_meta: mask_lib.TokenMeta, kv_meta: mask_lib.TokenMeta, *, scale=None,
                    block_q: int = DEFAULT_BLOCK, block_kv: int = DEFAULT_BLOCK, batch: int = DEFAULT_BATCH):
  """Same contract as `reference_attention`: q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D] -> [B, Lq, Hq, D].

  Blocks shrink to the sequence (rounded up to 8) when it is shorter; other lengths are padded internally
  (padding tokens carry document 0: they see and are seen by nothing). `batch`: tiles per loop iteration."""
  b, lq, hq, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  if hq % hkv:
    raise ValueError(f"tiled_attention: q heads {hq} not a multiple of kv heads {hkv}")
  if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
    raise ValueError(f"tiled_attention: k {k.shape} / v {v.shape} do not match q {q.shape}")
  for name, value in (("block_q", block_q), ("block_kv", block_kv), ("batch", batch)):
    if not isinstance(value, (int, np.integer)) or value <= 0:
      raise ValueError(f"tiled_attention: {name} must be a positive int, got {value!r}")
  g = hq // hkv
  bq, bk = min(block_q, _round_up(lq, 8)), min(block_kv, _round_up(lk, 8))
  lqp, lkp = _round_up(lq, bq), _round_up(lk, bk)
  nq, nk = lqp // bq, lkp // bk
  cfg = _Cfg(bq, bk, min(batch, b * nq * nk), 1.0 / math.sqrt(d) if scale is None else float(scale))
  # q [B, L, Hkv*G, D] -> [B*nq, Hkv, G, bq, D]; k/v [B, L, Hkv, D] -> [B*nk, Hkv, bk, D]: a tile is one
  # batched matmul per kv head against its query group.
  qb = _pad_tokens(q, lqp).reshape(b, nq, bq, hkv, g, d).transpose(0, 1, 3, 4, 2, 5).reshape(b * nq, hkv, g, bq, d)
  kb = _pad_tokens(k, lkp).reshape(b, nk, bk, hkv, d).transpose(0, 1, 3, 2, 4).reshape(b * nk, hkv, bk, d)
  vb = _pad_tokens(v, lkp).reshape(b, nk, bk, hkv, d).transpose(0, 1, 3, 2, 4).reshape(b * nk, hkv, bk, d)
  qm = mask_lib.TokenMeta(*(_pad_tokens(jnp.asarray(a, jnp.int32), lqp) for a in q_meta))
  km = mask_lib.TokenMeta(*(_pad_tokens(jnp.asarray(a, jnp.int32), lkp) for a in kv_meta))
  out = _tiled(cfg, qb, kb, vb, qm, km, nq, nk)
  out = out.reshape(b, nq, hkv, g, bq, d).transpose(0, 1, 4, 2, 3, 5).reshape(b, lqp, hq, d)
  return out[:, :lq]


def sharded_tiled_attention(q, k, v, q_meta: mask_lib.TokenMeta, kv_meta: mask_lib.TokenMeta, *, scale=None):
  """attention_impl="tiled": `tiled_attention` per shard (rows over the data axes, heads over 'tensor') when
  a mesh is set, so each device walks the tile list of its own rows."""
  call = functools.partial(tiled_attention, scale=scale)
  return sharding_lib.in_mesh(call, (q, k, v), (q_meta, kv_meta), q.shape[2], k.shape[2])
