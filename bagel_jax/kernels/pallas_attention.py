"""Pallas TPU kernels: block-sparse flash attention under BAGEL's generalized causal mask.

Three `pallas_call`s share one iteration scheme: a grid over (batch, kv head, outer block) whose outer operands
are pipelined by BlockSpecs, and inside each grid step a `fori_loop` over that block's entries of a
scalar-prefetched table (`block_tables.BlockTables`) whose trip count is the number of non-empty tiles; the
inner operands are fetched by double-buffered manual DMAs. Empty tiles therefore cost neither a grid step
(~0.35 us each on TPU; a (B, H, nq, nk) grid skipping them would pay it nq*nk times) nor a DMA, so work and
HBM traffic scale with the non-empty tiles. Full tiles skip the mask; partial tiles evaluate it from
per-token int rows. Forward and dQ: outer = q-block, inner = kv tiles; dK/dV: outer = kv-block, inner = the
q-blocks that see it (the transposed table).

Layouts (prepared by `ops.py`):
- q, o, dq, do: [B, Lq, Hq * D]; k, v, dk, dv: [B, Lk, Hkv * D] (heads fused into lanes, D a multiple of 128),
  so a (block, G * D) tile holds the G query heads of one KV head: K/V tiles are fetched once per group and the
  mask is evaluated once per tile for all G heads (GQA without repeating K/V).
- qrows [B, 8, Lq] int32: rows 0..2 = document (padding -> _PAD_Q), index, split if bidirectional (full/noise)
  else _NO_SPLIT. krows [B, 8, Lk]: document (padding -> _PAD_K), index (noise -> _NOISE_INDEX), split.
  With a split's mode shared by its tokens, allowed(q, k) = doc_q == doc_k and (idx_k <= idx_q or
  bidir_split_q == split_k): three compares per element.
- lse, di: [B, Hq, 8, Lq] float32 (rows, broadcast over 8 sublanes). Kernels whose per-token data is needed as
  columns transpose one (128, block) slab per block into lane-replicated VMEM scratch, once per block.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from bagel_jax.kernels import mask as mask_lib

LANES = 128
META_ROWS = 8
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_PAD_Q = np.int32(-2 ** 31)
_PAD_K = np.int32(-2 ** 31 + 1)
_NO_SPLIT = np.int32(-2 ** 31)
_NOISE_INDEX = np.int32(2 ** 31 - 1)
_NN = (((1,), (0,)), ((), ()))
_NT = (((1,), (1,)), ((), ()))


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static kernel parameters (hashable: a custom_vjp non-differentiable argument)."""
  num_heads: int
  num_kv_heads: int
  head_dim: int          # a multiple of 128 (ops.py pads)
  block_q: int
  block_kv: int
  scale: float
  interpret: object = False   # False, True (= pltpu.InterpretParams()) or a pltpu.InterpretParams
  tiles: Optional[int] = None  # non-empty tiles over the batch when known at trace time (cost estimate)
  vmem_limit_bytes: Optional[int] = None

  @property
  def groups(self) -> int:
    return self.num_heads // self.num_kv_heads

  def interpret_arg(self):
    if isinstance(self.interpret, pltpu.InterpretParams):
      return self.interpret
    return pltpu.InterpretParams() if self.interpret else False


def encode_rows(meta, *, query: bool, xp=jnp):
  """TokenMeta -> the [B, 8, L] int32 rows the kernels read (see the module docstring); xp = jnp or np."""
  doc, split, mode, idx = (xp.asarray(a, xp.int32) for a in meta)
  if query:
    bidir = (mode == mask_lib.FULL) | (mode == mask_lib.NOISE)
    rows = [xp.where(doc == 0, _PAD_Q, doc), idx, xp.where(bidir, split, _NO_SPLIT)]
  else:
    rows = [xp.where(doc == 0, _PAD_K, doc), xp.where(mode == mask_lib.NOISE, _NOISE_INDEX, idx), split]
  rows += [xp.zeros_like(doc)] * (META_ROWS - len(rows))
  return xp.stack(rows, axis=1).astype(xp.int32)


# ----------------------------------------------------------------------------------------------------------
# In-kernel helpers.
# ----------------------------------------------------------------------------------------------------------

def _lane_columns(rows, n_fields: int):
  """(8, n) rows -> n_fields arrays (n, 128), field f replicated over lanes (one aligned transpose)."""
  pad = jnp.zeros((LANES - rows.shape[0], rows.shape[1]), rows.dtype)
  cols = jnp.concatenate([rows, pad], axis=0).T  # (n, 128)
  return [jnp.broadcast_to(cols[:, f:f + 1], (cols.shape[0], LANES)) for f in range(n_fields)]


def _tile_lanes(x, width: int):
  """(n, 128) lane-replicated -> (n, width)."""
  return x if width == LANES else jnp.tile(x, (1, width // LANES))


def _q_major_mask(qcols_scr, krows, bk: int):
  qd, qi, qs = (_tile_lanes(qcols_scr[f], bk) for f in range(3))
  kd, ki, ks = krows[0:1, :], krows[1:2, :], krows[2:3, :]
  return (qd == kd) & ((ki <= qi) | (qs == ks))


def _kv_major_mask(kcols_scr, qrows, bq: int):
  kd, ki, ks = (_tile_lanes(kcols_scr[f], bq) for f in range(3))
  qd, qi, qs = qrows[0:1, :], qrows[1:2, :], qrows[2:3, :]
  return (kd == qd) & ((ki <= qi) | (qs == ks))


def _tile_loop(tbl_ref, cnt_ref, b, o, copies, body):
  """Runs body(slot, masked) over the listed tiles of outer block o, double-buffering their DMAs.

  copies(slot, inner_block) -> the async copies filling buffer `slot`; body reads that slot. The loop's trip
  count is the table count, so empty tiles cost nothing (no grid step, no DMA)."""
  n = cnt_ref[b, o]

  def start(slot, t):
    for c in copies(slot, tbl_ref[b, o, t] // 2):
      c.start()

  @pl.when(n > 0)
  def _first():
    start(0, 0)

  def step(t, carry):
    slot = t % 2
    entry = tbl_ref[b, o, t]
    for c in copies(slot, entry // 2):
      c.wait()

    @pl.when(t + 1 < n)
    def _next():
      start(1 - slot, t + 1)

    full = (entry % 2) == 1

    @pl.when(full)
    def _full():
      body(slot, False)

    @pl.when(jnp.logical_not(full))
    def _partial():
      body(slot, True)

    return carry

  lax.fori_loop(0, n, step, 0)


def _cost(flops_per_tile, transc_per_tile, bytes_fixed, bytes_per_tile, cfg: KernelConfig, batch, nq, nk):
  tiles = cfg.tiles if cfg.tiles is not None else batch * nq * nk
  return pl.CostEstimate(flops=int(flops_per_tile * tiles), transcendentals=int(transc_per_tile * tiles),
                         bytes_accessed=int(bytes_fixed + bytes_per_tile * tiles))


def _compiler_params(cfg: KernelConfig):
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel"),
                              vmem_limit_bytes=cfg.vmem_limit_bytes)


_HBM = pl.BlockSpec(memory_space=pl.ANY)


# ----------------------------------------------------------------------------------------------------------
# Forward: grid (batch, kv head, q-block); kv tiles from the forward table.
# ----------------------------------------------------------------------------------------------------------

def _fwd_kernel(tbl_ref, cnt_ref, qrows_ref, q_ref, k_hbm, v_hbm, krows_hbm, o_ref, lse_ref, *rest,
                groups, head_dim, scale, count_visits):
  if count_visits:
    visits_ref, kbuf, vbuf, krbuf, sem, m_scr, l_scr, acc_scr, qcols_scr, vis_scr = rest
  else:
    kbuf, vbuf, krbuf, sem, m_scr, l_scr, acc_scr, qcols_scr = rest
  b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  bk, d = kbuf.shape[1], head_dim

  m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
  l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
  acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)
  for f, col in enumerate(_lane_columns(qrows_ref[...], 3)):
    qcols_scr[f] = col
  if count_visits:
    vis_scr[...] = jnp.zeros(vis_scr.shape, jnp.int32)

  def copies(slot, j):
    rows = pl.ds(j * bk, bk)
    return (pltpu.make_async_copy(k_hbm.at[b, rows, pl.ds(h * d, d)], kbuf.at[slot], sem.at[0, slot]),
            pltpu.make_async_copy(v_hbm.at[b, rows, pl.ds(h * d, d)], vbuf.at[slot], sem.at[1, slot]),
            pltpu.make_async_copy(krows_hbm.at[b, :, rows], krbuf.at[slot], sem.at[2, slot]))

  def body(slot, masked):
    k, v = kbuf[slot], vbuf[slot]
    mask = _q_major_mask(qcols_scr, krbuf[slot], bk) if masked else None
    for g in range(groups):
      q = q_ref[:, g * d:(g + 1) * d]
      s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale
      if mask is not None:
        s = jnp.where(mask, s, MASK_VALUE)
      m_prev, l_prev = m_scr[g], l_scr[g]
      m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
      p = jnp.exp(s - _tile_lanes(m_next, bk))
      alpha = jnp.exp(m_prev - m_next)
      l_scr[g] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
      m_scr[g] = m_next
      pv = lax.dot_general(p.astype(v.dtype), v, _NN, preferred_element_type=jnp.float32)
      acc_scr[g] = _tile_lanes(alpha, d) * acc_scr[g] + pv
    if count_visits:
      vis_scr[...] += 1

  _tile_loop(tbl_ref, cnt_ref, b, i, copies, body)

  for g in range(groups):
    m, l = m_scr[g], l_scr[g]
    empty = m == MASK_VALUE  # no allowed key: output 0 and no probability mass (lse = +inf)
    inv = jnp.where(empty, 0.0, 1.0 / jnp.where(empty, 1.0, l))
    o_ref[:, g * d:(g + 1) * d] = (acc_scr[g] * _tile_lanes(inv, d)).astype(o_ref.dtype)
    lse = jnp.where(empty, jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))
    lse_ref[g] = lse.T[:META_ROWS, :]
  if count_visits:
    visits_ref[...] = vis_scr[...]


def flash_forward(q, k, v, qrows, krows, tbl, cnt, cfg: KernelConfig, *, count_visits: bool = False):
  """-> o [B, Lq, Hq*D], lse [B, Hq, 8, Lq] (+ visits [B, Hkv, nq*8, 128] int32 when count_visits)."""
  bsz, lq, _ = q.shape
  lk = k.shape[1]
  g, d, bq, bk = cfg.groups, cfg.head_dim, cfg.block_q, cfg.block_kv
  nq, nk = lq // bq, lk // bk
  in_specs = [pl.BlockSpec((None, META_ROWS, bq), lambda b, h, i, tbl, cnt: (b, 0, i)),
              pl.BlockSpec((None, bq, g * d), lambda b, h, i, tbl, cnt: (b, i, h)),
              _HBM, _HBM, _HBM]
  out_specs = [pl.BlockSpec((None, bq, g * d), lambda b, h, i, tbl, cnt: (b, i, h)),
               pl.BlockSpec((None, g, META_ROWS, bq), lambda b, h, i, tbl, cnt: (b, h, 0, i))]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((bsz, cfg.num_heads, META_ROWS, lq), jnp.float32)]
  scratch = [pltpu.VMEM((2, bk, d), k.dtype), pltpu.VMEM((2, bk, d), v.dtype),
             pltpu.VMEM((2, META_ROWS, bk), jnp.int32), pltpu.SemaphoreType.DMA((3, 2)),
             pltpu.VMEM((g, bq, LANES), jnp.float32), pltpu.VMEM((g, bq, LANES), jnp.float32),
             pltpu.VMEM((g, bq, d), jnp.float32), pltpu.VMEM((3, bq, LANES), jnp.int32)]
  if count_visits:
    out_specs.append(pl.BlockSpec((None, None, META_ROWS, LANES), lambda b, h, i, tbl, cnt: (b, h, i, 0)))
    out_shape.append(jax.ShapeDtypeStruct((bsz, cfg.num_kv_heads, nq * META_ROWS, LANES), jnp.int32))
    scratch.append(pltpu.VMEM((META_ROWS, LANES), jnp.int32))
  it = q.dtype.itemsize
  hq = cfg.num_heads
  cost = _cost(4 * bq * bk * d * hq, bq * bk * hq, 2 * q.size * it + 4 * bsz * hq * META_ROWS * lq,
               cfg.num_kv_heads * (2 * bk * d * it + 4 * META_ROWS * bk), cfg, bsz, nq, nk)
  kernel = functools.partial(_fwd_kernel, groups=g, head_dim=d, scale=cfg.scale, count_visits=count_visits)
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=2, grid=(bsz, cfg.num_kv_heads, nq),
                                             in_specs=in_specs, out_specs=out_specs, scratch_shapes=scratch),
      out_shape=out_shape, compiler_params=_compiler_params(cfg), cost_estimate=cost,
      interpret=cfg.interpret_arg(), name="bagel_flash_fwd",
  )(tbl, cnt, qrows, q, k, v, krows)


# ----------------------------------------------------------------------------------------------------------
# Backward: dQ on the forward grid, dK/dV on the transposed one (per kv-block, the q-blocks that see it).
# ----------------------------------------------------------------------------------------------------------

def _dq_kernel(tbl_ref, cnt_ref, qrows_ref, q_ref, do_ref, lse_ref, di_ref, k_hbm, v_hbm, krows_hbm, dq_ref,
               kbuf, vbuf, krbuf, sem, dq_scr, qcols_scr, lse_scr, di_scr, *, groups, head_dim, scale):
  b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  bk, d = kbuf.shape[1], head_dim

  dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)
  for f, col in enumerate(_lane_columns(qrows_ref[...], 3)):
    qcols_scr[f] = col
  for g in range(groups):
    lse_scr[g] = _lane_columns(lse_ref[g], 1)[0]
    di_scr[g] = _lane_columns(di_ref[g], 1)[0]

  def copies(slot, j):
    rows = pl.ds(j * bk, bk)
    return (pltpu.make_async_copy(k_hbm.at[b, rows, pl.ds(h * d, d)], kbuf.at[slot], sem.at[0, slot]),
            pltpu.make_async_copy(v_hbm.at[b, rows, pl.ds(h * d, d)], vbuf.at[slot], sem.at[1, slot]),
            pltpu.make_async_copy(krows_hbm.at[b, :, rows], krbuf.at[slot], sem.at[2, slot]))

  def body(slot, masked):
    k, v = kbuf[slot], vbuf[slot]
    mask = _q_major_mask(qcols_scr, krbuf[slot], bk) if masked else None
    for g in range(groups):
      q, do = q_ref[:, g * d:(g + 1) * d], do_ref[:, g * d:(g + 1) * d]
      s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale
      if mask is not None:
        s = jnp.where(mask, s, MASK_VALUE)
      p = jnp.exp(s - _tile_lanes(lse_scr[g], bk))
      dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
      ds = p * (dp - _tile_lanes(di_scr[g], bk))
      dq_scr[g] += lax.dot_general(ds.astype(k.dtype), k, _NN, preferred_element_type=jnp.float32)

  _tile_loop(tbl_ref, cnt_ref, b, i, copies, body)

  for g in range(groups):
    dq_ref[:, g * d:(g + 1) * d] = (dq_scr[g] * scale).astype(dq_ref.dtype)


def _dkv_kernel(tbl_ref, cnt_ref, krows_ref, k_ref, v_ref, qrows_hbm, q_hbm, do_hbm, lse_hbm, di_hbm, dk_ref,
                dv_ref, qrbuf, qbuf, dobuf, lsebuf, dibuf, sem, dk_scr, dv_scr, kcols_scr, *, groups, head_dim,
                scale):
  b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  bq, d = qbuf.shape[1], head_dim
  gd = groups * d

  dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
  dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)
  for f, col in enumerate(_lane_columns(krows_ref[...], 3)):
    kcols_scr[f] = col

  def copies(slot, i):
    rows = pl.ds(i * bq, bq)
    heads = pl.ds(h * groups, groups)
    return (pltpu.make_async_copy(qrows_hbm.at[b, :, rows], qrbuf.at[slot], sem.at[0, slot]),
            pltpu.make_async_copy(q_hbm.at[b, rows, pl.ds(h * gd, gd)], qbuf.at[slot], sem.at[1, slot]),
            pltpu.make_async_copy(do_hbm.at[b, rows, pl.ds(h * gd, gd)], dobuf.at[slot], sem.at[2, slot]),
            pltpu.make_async_copy(lse_hbm.at[b, heads, :, rows], lsebuf.at[slot], sem.at[3, slot]),
            pltpu.make_async_copy(di_hbm.at[b, heads, :, rows], dibuf.at[slot], sem.at[4, slot]))

  def body(slot, masked):
    k, v = k_ref[...], v_ref[...]
    mask = _kv_major_mask(kcols_scr, qrbuf[slot], bq) if masked else None
    for g in range(groups):
      q, do = qbuf[slot, :, g * d:(g + 1) * d], dobuf[slot, :, g * d:(g + 1) * d]
      s = lax.dot_general(k, q, _NT, preferred_element_type=jnp.float32) * scale  # [bk, bq]
      if mask is not None:
        s = jnp.where(mask, s, MASK_VALUE)
      p = jnp.exp(s - lsebuf[slot, g, 0:1, :])
      dv_scr[...] += lax.dot_general(p.astype(do.dtype), do, _NN, preferred_element_type=jnp.float32)
      dp = lax.dot_general(v, do, _NT, preferred_element_type=jnp.float32)
      ds = p * (dp - dibuf[slot, g, 0:1, :])
      dk_scr[...] += lax.dot_general(ds.astype(q.dtype), q, _NN, preferred_element_type=jnp.float32)

  _tile_loop(tbl_ref, cnt_ref, b, j, copies, body)

  dk_ref[...] = (dk_scr[...] * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def flash_backward(q, k, v, do, lse, di, qrows, krows, tables, cfg: KernelConfig):
  """-> dq, dk, dv in the fused-head layouts of q, k, v."""
  bsz, lq, _ = q.shape
  lk = k.shape[1]
  g, d, bq, bk = cfg.groups, cfg.head_dim, cfg.block_q, cfg.block_kv
  nq, nk = lq // bq, lk // bk
  it = q.dtype.itemsize
  hq, hkv = cfg.num_heads, cfg.num_kv_heads
  interpret = cfg.interpret_arg()

  q_spec = pl.BlockSpec((None, bq, g * d), lambda b, h, i, tbl, cnt: (b, i, h))
  row_spec = pl.BlockSpec((None, g, META_ROWS, bq), lambda b, h, i, tbl, cnt: (b, h, 0, i))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, groups=g, head_dim=d, scale=cfg.scale),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(bsz, hkv, nq),
          in_specs=[pl.BlockSpec((None, META_ROWS, bq), lambda b, h, i, tbl, cnt: (b, 0, i)),
                    q_spec, q_spec, row_spec, row_spec, _HBM, _HBM, _HBM],
          out_specs=q_spec,
          scratch_shapes=[pltpu.VMEM((2, bk, d), k.dtype), pltpu.VMEM((2, bk, d), v.dtype),
                          pltpu.VMEM((2, META_ROWS, bk), jnp.int32), pltpu.SemaphoreType.DMA((3, 2)),
                          pltpu.VMEM((g, bq, d), jnp.float32), pltpu.VMEM((3, bq, LANES), jnp.int32),
                          pltpu.VMEM((g, bq, LANES), jnp.float32), pltpu.VMEM((g, bq, LANES), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), compiler_params=_compiler_params(cfg),
      cost_estimate=_cost(6 * bq * bk * d * hq, bq * bk * hq, 3 * q.size * it + 8 * bsz * hq * META_ROWS * lq,
                          hkv * (2 * bk * d * it + 4 * META_ROWS * bk), cfg, bsz, nq, nk),
      interpret=interpret, name="bagel_flash_dq",
  )(tables.fwd, tables.fwd_count, qrows, q, do, lse, di, k, v, krows)

  kv_spec = pl.BlockSpec((None, bk, d), lambda b, h, j, tbl, cnt: (b, j, h))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, groups=g, head_dim=d, scale=cfg.scale),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(bsz, hkv, nk),
          in_specs=[pl.BlockSpec((None, META_ROWS, bk), lambda b, h, j, tbl, cnt: (b, 0, j)),
                    kv_spec, kv_spec, _HBM, _HBM, _HBM, _HBM, _HBM],
          out_specs=[kv_spec, kv_spec],
          scratch_shapes=[pltpu.VMEM((2, META_ROWS, bq), jnp.int32), pltpu.VMEM((2, bq, g * d), q.dtype),
                          pltpu.VMEM((2, bq, g * d), do.dtype), pltpu.VMEM((2, g, META_ROWS, bq), jnp.float32),
                          pltpu.VMEM((2, g, META_ROWS, bq), jnp.float32), pltpu.SemaphoreType.DMA((5, 2)),
                          pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32),
                          pltpu.VMEM((3, bk, LANES), jnp.int32)]),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_compiler_params(cfg),
      cost_estimate=_cost(8 * bq * bk * d * hq, bq * bk * hq, 4 * k.size * it,
                          hkv * (2 * bq * g * d * it + 8 * g * META_ROWS * bq + 4 * META_ROWS * bq),
                          cfg, bsz, nq, nk),
      interpret=interpret, name="bagel_flash_dkv",
  )(tables.bwd, tables.bwd_count, krows, k, v, qrows, q, do, lse, di)
  return dq, dk, dv
