"""Block-sparse flash attention in plain JAX: the CPU/GPU path (`attention_impl="tiled"`).

The Pallas kernel (ops.py) is TPU-only; the reference materialises the whole [L, L] mask and score matrix,
of which a packed row of short samples needs ~10%. This path computes only the non-empty (q-block, kv-block)
tiles of the same block tables (`block_tables.tile_classes`), one tile per iteration of a `lax.while_loop`
whose trip count is the traced number of non-empty tiles: shapes stay static, work follows the data.

Forward: online softmax per q-block (flash attention), saving the log-sum-exp. Backward (custom VJP): one
second pass over the same tile list recomputes each tile's probabilities from the saved log-sum-exp and
accumulates dQ, dK and dV. Tiles are listed in (row, q-block, kv-block) order, so accumulators are updated
in place with dynamic slices. Numerics equal `reference_attention` up to fp32 summation order (tested with
the parity sweep of the Pallas kernel); queries that see no key return zeros as the reference does.
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

DEFAULT_BLOCK = 128


class _Cfg(NamedTuple):
  block_q: int
  block_kv: int
  scale: float


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _pad_tokens(x, length: int):
  pad = length - x.shape[1]
  return x if pad == 0 else jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))


def _blocked_meta(meta: mask_lib.TokenMeta, length: int, block: int):
  """TokenMeta of [B, L] -> each field [B, n, block] (padding: document 0)."""
  return mask_lib.TokenMeta(*(_pad_tokens(jnp.asarray(a, jnp.int32), length).reshape(a.shape[0], -1, block)
                              for a in meta))


def _tile_list(qm, km, bq: int, bk: int):
  """Flat ids b * nq * nk + qi * nk + ki of the non-empty tiles, ascending (padded to the grid size), and
  their count."""
  classes = tables_lib.tile_classes(qm, km, bq, bk)
  flat = (classes != tables_lib.EMPTY).reshape(-1)
  ids = jnp.nonzero(flat, size=flat.shape[0], fill_value=0)[0].astype(jnp.int32)
  return ids, jnp.sum(flat, dtype=jnp.int32)


def _tile_mask(qmb, kmb, b, qi, ki):
  """The allowed [bq, bk] pairs of one tile from the blocked metadata."""
  q = [a[b, qi][:, None] for a in qmb]
  k = [a[b, ki][None, :] for a in kmb]
  return mask_lib.allowed(*q, *k)


def _split_id(t, ids, nq: int, nk: int):
  e = ids[t]
  return e // (nq * nk), (e // nk) % nq, e % nk


def _walk(cfg: _Cfg, q, k, qm, km):
  """What both passes need to visit the non-empty tiles: their traced count and tile(t) -> (row, q-block,
  kv-block, allowed pairs [G*bq, bk] with rows group-major like q's layout)."""
  nq, nk = q.shape[1], k.shape[1]
  g = q.shape[3] // cfg.block_q
  ids, count = _tile_list(qm, km, cfg.block_q, cfg.block_kv)
  qmb = _blocked_meta(qm, nq * cfg.block_q, cfg.block_q)
  kmb = _blocked_meta(km, nk * cfg.block_kv, cfg.block_kv)

  def tile(t):
    b, qi, ki = _split_id(t, ids, nq, nk)
    return b, qi, ki, jnp.tile(_tile_mask(qmb, kmb, b, qi, ki), (g, 1))

  return count, tile


def _forward(cfg: _Cfg, q, k, v, qm, km):
  """q [B, nq, Hkv, G*bq, D] (query-group major), k/v [B, nk, Hkv, bk, D], blocked metadata.
  Returns out (same layout as q, q's dtype) and lse [B, nq, Hkv, G*bq] (fp32, -inf for queries seeing
  nothing)."""
  b_, nq, hkv, gq, d = q.shape
  count, tile = _walk(cfg, q, k, qm, km)
  neg = jnp.float32(-jnp.inf)

  def body(t, carry):
    m, l, acc = carry
    b, qi, ki, allowed = tile(t)
    qb, kb, vb = q[b, qi], k[b, ki], v[b, ki]
    s = jnp.einsum("hqd,hkd->hqk", qb, kb, preferred_element_type=jnp.float32) * cfg.scale
    s = jnp.where(allowed[None], s, neg)
    m_old, l_old, acc_old = m[b, qi], l[b, qi], acc[b, qi]
    m_new = jnp.maximum(m_old, s.max(-1))
    m_safe = jnp.where(m_new == neg, 0.0, m_new)
    p = jnp.exp(s - m_safe[..., None])
    alpha = jnp.exp(m_old - m_safe)
    l_new = alpha * l_old + p.sum(-1)
    pv = jnp.einsum("hqk,hkd->hqd", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
    acc_new = alpha[..., None] * acc_old + pv
    return m.at[b, qi].set(m_new), l.at[b, qi].set(l_new), acc.at[b, qi].set(acc_new)

  init = (jnp.full((b_, nq, hkv, gq), neg), jnp.zeros((b_, nq, hkv, gq), jnp.float32),
          jnp.zeros((b_, nq, hkv, gq, d), jnp.float32))
  m, l, acc = jax.lax.fori_loop(0, count, body, init)
  seen = l > 0
  out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0).astype(q.dtype)
  lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), neg)
  return out, lse


def _backward(cfg: _Cfg, q, k, v, qm, km, out, lse, do):
  count, tile = _walk(cfg, q, k, qm, km)
  di = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [B, nq, Hkv, G*bq]
  lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)

  def body(t, carry):
    dq, dk, dv = carry
    b, qi, ki, allowed = tile(t)
    qb, kb, vb, dob = q[b, qi], k[b, ki], v[b, ki], do[b, qi]
    s = jnp.einsum("hqd,hkd->hqk", qb, kb, preferred_element_type=jnp.float32) * cfg.scale
    p = jnp.where(allowed[None], jnp.exp(s - lse_safe[b, qi][..., None]), 0.0)
    dv_t = jnp.einsum("hqk,hqd->hkd", p.astype(dob.dtype), dob, preferred_element_type=jnp.float32)
    dp = jnp.einsum("hqd,hkd->hqk", dob, vb, preferred_element_type=jnp.float32)
    ds = p * (dp - di[b, qi][..., None]) * cfg.scale
    dq_t = jnp.einsum("hqk,hkd->hqd", ds.astype(kb.dtype), kb, preferred_element_type=jnp.float32)
    dk_t = jnp.einsum("hqk,hqd->hkd", ds.astype(qb.dtype), qb, preferred_element_type=jnp.float32)
    return (dq.at[b, qi].add(dq_t), dk.at[b, ki].add(dk_t), dv.at[b, ki].add(dv_t))

  init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  dq, dk, dv = jax.lax.fori_loop(0, count, body, init)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tiled(cfg: _Cfg, q, k, v, qm, km):
  return _forward(cfg, q, k, v, qm, km)[0]


def _tiled_fwd(cfg, q, k, v, qm, km):
  out, lse = _forward(cfg, q, k, v, qm, km)
  return out, (q, k, v, qm, km, out, lse)


def _tiled_bwd(cfg, res, do):
  q, k, v, qm, km, out, lse = res
  dq, dk, dv = _backward(cfg, q, k, v, qm, km, out, lse, do)
  return dq, dk, dv, None, None


_tiled.defvjp(_tiled_fwd, _tiled_bwd)


def tiled_attention(q, k, v, q_meta: mask_lib.TokenMeta, kv_meta: mask_lib.TokenMeta, *, scale=None,
                    block_q: int = DEFAULT_BLOCK, block_kv: int = DEFAULT_BLOCK):
  """Same contract as `reference_attention`: q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D] -> [B, Lq, Hq, D].

  Blocks shrink to the sequence (rounded up to 8) when it is shorter; other lengths are padded internally."""
  b, lq, hq, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  if hq % hkv:
    raise ValueError(f"tiled_attention: q heads {hq} not a multiple of kv heads {hkv}")
  if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
    raise ValueError(f"tiled_attention: k {k.shape} / v {v.shape} do not match q {q.shape}")
  for name, value in (("block_q", block_q), ("block_kv", block_kv)):
    if not isinstance(value, (int, np.integer)) or value <= 0:
      raise ValueError(f"tiled_attention: {name} must be a positive int, got {value!r}")
  g = hq // hkv
  bq, bk = min(block_q, _round_up(lq, 8)), min(block_kv, _round_up(lk, 8))
  lqp, lkp = _round_up(lq, bq), _round_up(lk, bk)
  nq, nk = lqp // bq, lkp // bk
  cfg = _Cfg(bq, bk, 1.0 / math.sqrt(d) if scale is None else float(scale))
  # [B, L, Hkv*G, D] -> [B, nq, Hkv, G*bq, D]: each kv head's query group stacked block by block, so one
  # tile is one batched matmul per kv head.
  qb = _pad_tokens(q, lqp).reshape(b, nq, bq, hkv, g, d).transpose(0, 1, 3, 4, 2, 5).reshape(b, nq, hkv, g * bq, d)
  kb = _pad_tokens(k, lkp).reshape(b, nk, bk, hkv, d).transpose(0, 1, 3, 2, 4)
  vb = _pad_tokens(v, lkp).reshape(b, nk, bk, hkv, d).transpose(0, 1, 3, 2, 4)
  qm = mask_lib.TokenMeta(*(_pad_tokens(jnp.asarray(a, jnp.int32), lqp) for a in q_meta))
  km = mask_lib.TokenMeta(*(_pad_tokens(jnp.asarray(a, jnp.int32), lkp) for a in kv_meta))
  out = _tiled(cfg, qb, kb, vb, qm, km)
  out = out.reshape(b, nq, hkv, g, bq, d).transpose(0, 1, 4, 2, 3, 5).reshape(b, lqp, hq, d)
  return out[:, :lq]


def sharded_tiled_attention(q, k, v, q_meta: mask_lib.TokenMeta, kv_meta: mask_lib.TokenMeta, *, scale=None):
  """attention_impl="tiled": `tiled_attention` per shard (rows over the data axes, heads over 'tensor') when
  a mesh is set, so each device walks the tile list of its own rows."""
  call = functools.partial(tiled_attention, scale=scale)
  return sharding_lib.in_mesh(call, (q, k, v), (q_meta, kv_meta), q.shape[2], k.shape[2])
