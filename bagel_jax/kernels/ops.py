"""Entry points of the Pallas attention: validation, padding, block tables, custom VJP, shard_map, registry.

`flash_attention` has the signature of `reference_attention` plus kernel options. `pallas_attention` and
`pallas_interpret_attention` are `attention_impl="pallas"` (compiled for TPU) and `"pallas_interpret"` (the same
kernels under `pltpu.InterpretParams()`, for CPU tests) in the registry of `kernels.attention`. Inside `jit` under `jax.set_mesh(mesh)` both run the kernel under
`shard_map`: batch over whichever of ('data', 'fsdp') the mesh has and heads over 'tensor' where they divide
(replicated otherwise), as splash attention is run. `cached_attention` is the sampler's variant: queries
against a KV cache plus themselves.

Preconditions on metadata beyond shape/dtype (checked by `bagel_jax.batch.validate` on the host, not here):
a split has one mode in q and kv metadata alike (TokenMeta's definition); ids are >= 0. Under them the result
equals `reference_attention` for any metadata; the packed-row layout additionally makes the tables exact.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu

from bagel_jax.kernels import block_tables as tables_lib
from bagel_jax.kernels import mask as mask_lib
from bagel_jax.kernels import pallas_attention as pk
from bagel_jax.kernels import sharding as sharding_lib
from bagel_jax.kernels.sharding import mesh_specs  # noqa: F401  (part of this module's API)

DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_KV = 512
# Tile edge by row length when the caller names none: (longest row, block). On packed rows of the stage mixes
# (benchmarks/attention_kernel.py) 256-token tiles follow document boundaries closely enough to save 29% of the
# kernel's FLOPs at 2,048 tokens and 16% at 8,192; at 36,864 they would save 14% for 4x the grid steps and
# DMAs of 512-token tiles, which keep the MXU busy. 256 is also the MXU width of v6e: no smaller default.
BLOCK_BY_LENGTH = ((8192, 256),)
# Largest VMEM working set we ask Mosaic for: under the physical VMEM of v5e/v5p/v6e cores (>= 95 MiB).
VMEM_BUDGET_BYTES = 64 * 2 ** 20


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


# Cost-analysis hint for traced metadata (see `assume_tile_fraction`).
_TILE_FRACTION: contextvars.ContextVar = contextvars.ContextVar("bagel_tile_fraction", default=None)


@contextlib.contextmanager
def assume_tile_fraction(fraction: Union[float, Mapping[int, float], None]):
  """While tracing inside this context, kernels whose metadata are traced (training: the tables are built in
  the step) give XLA cost estimates for `fraction` of their tiles instead of all of them. `fraction` is a
  float, or {query length: float} to tell the LLM row from the ViT row. Affects `cost_analysis()` only,
  never what the kernels compute; bagel-aot sets it to the non-empty fraction measured on a representative
  packed row of the stage's mix, so compiled FLOPs count the attention work the kernel will actually do."""
  token = _TILE_FRACTION.set(fraction)
  try:
    yield
  finally:
    _TILE_FRACTION.reset(token)


def _assumed_tiles(lq: int, total_tiles: int) -> Optional[int]:
  f = _TILE_FRACTION.get()
  if isinstance(f, Mapping):
    f = f.get(lq)
  if f is None:
    return None
  if not 0.0 <= float(f) <= 1.0:
    raise ValueError(f"assume_tile_fraction: fraction must be in [0, 1], got {f}")
  return int(round(float(f) * total_tiles))


# ----------------------------------------------------------------------------------------------------------
# Validation (trace time; every message names the offending argument).
# ----------------------------------------------------------------------------------------------------------

def _check_meta(name: str, meta, shape):
  if not isinstance(meta, tuple) or len(meta) != len(mask_lib.TokenMeta._fields):
    raise TypeError(f"{name} must be a TokenMeta(document, split, mode, index), got {type(meta).__name__}")
  for field, a in zip(mask_lib.TokenMeta._fields, meta):
    a_shape, dtype = tuple(np.shape(a)), jnp.result_type(a)
    if a_shape != tuple(shape):
      raise ValueError(f"{name}.{field} must have shape {tuple(shape)} (batch, tokens), got {a_shape}")
    if not jnp.issubdtype(dtype, jnp.integer):
      raise ValueError(f"{name}.{field} must be an integer array, got dtype {dtype}")


def _check_block(name: str, value):
  if not isinstance(value, (int, np.integer)) or value <= 0 or value % pk.LANES:
    raise ValueError(f"{name}={value!r} must be a positive multiple of {pk.LANES} (TPU lanes): the kernel tiles "
                     f"logits [block_q, block_kv] and transposes [128, block] slabs")


def _check_arrays(q, k, v):
  for name, x in (("q", q), ("k", k), ("v", v)):
    if np.ndim(x) != 4:
      raise ValueError(f"{name} must be [batch, tokens, heads, head_dim], got shape {np.shape(x)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be floating point, got dtype {x.dtype}")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape, got k {k.shape} and v {v.shape}")
  if k.dtype != q.dtype or v.dtype != q.dtype:
    raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
  if q.shape[0] != k.shape[0]:
    raise ValueError(f"q batch {q.shape[0]} != k batch {k.shape[0]}")
  if q.shape[3] != k.shape[3]:
    raise ValueError(f"q head_dim {q.shape[3]} != k head_dim {k.shape[3]}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"q heads {q.shape[2]} must be a multiple of k/v heads {k.shape[2]} (GQA)")


def vmem_bytes(block_q: int, block_kv: int, head_dim: int, groups: int, itemsize: int) -> int:
  """Largest VMEM working set of the three kernels (double-buffered blocks + scratch + f32 tile temps)."""
  d = _round_up(head_dim, pk.LANES)
  bq, bk, g, rows = block_q, block_kv, groups, pk.META_ROWS
  tmp = 4 * bq * bk * 4
  fwd = (2 * 2 * bq * g * d * itemsize + 2 * 2 * bk * d * itemsize + 2 * g * rows * bq * 4
         + 2 * g * bq * pk.LANES * 4 + g * bq * d * 4 + 3 * bq * pk.LANES * 4 + tmp)
  dq = (3 * 2 * bq * g * d * itemsize + 2 * 2 * bk * d * itemsize + 2 * 2 * g * rows * bq * 4
        + g * bq * d * 4 + (3 + 2 * g) * bq * pk.LANES * 4 + tmp)
  dkv = (2 * 2 * bq * g * d * itemsize + 2 * 2 * 2 * bk * d * itemsize + 2 * 2 * g * rows * bq * 4
         + 2 * bk * d * 4 + 3 * bk * pk.LANES * 4 + tmp)
  return max(fwd, dq, dkv)


# ----------------------------------------------------------------------------------------------------------
# The differentiable core on prepared (fused-head, padded) arrays.
# ----------------------------------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: pk.KernelConfig, q, k, v, qrows, krows, tables):
  return pk.flash_forward(q, k, v, qrows, krows, tables.fwd, tables.fwd_count, cfg)[0]


def _flash_fwd(cfg, q, k, v, qrows, krows, tables):
  o, lse = pk.flash_forward(q, k, v, qrows, krows, tables.fwd, tables.fwd_count, cfg)
  return o, (q, k, v, o, lse, qrows, krows, tables)


def _flash_bwd(cfg, res, do):
  q, k, v, o, lse, qrows, krows, tables = res
  b, lq, _ = q.shape
  di = (o.astype(jnp.float32) * do.astype(jnp.float32)).reshape(b, lq, cfg.num_heads, cfg.head_dim).sum(-1)
  di = jnp.broadcast_to(jnp.swapaxes(di, 1, 2)[:, :, None, :], (b, cfg.num_heads, pk.META_ROWS, lq))
  dq, dk, dv = pk.flash_backward(q, k, v, do.astype(q.dtype), lse, di, qrows, krows, tables, cfg)
  return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------------------------------------
# Public entry points.
# ----------------------------------------------------------------------------------------------------------

def _pad_meta(meta: mask_lib.TokenMeta, length: int, xp) -> mask_lib.TokenMeta:
  pad = length - np.shape(meta.document)[1]
  return mask_lib.TokenMeta(*(xp.pad(xp.asarray(a, xp.int32), ((0, 0), (0, pad))) for a in meta))  # doc 0 = pad


def block_size(length: int) -> int:
  """The default tile edge for rows of `length` tokens (`BLOCK_BY_LENGTH`)."""
  for longest, block in BLOCK_BY_LENGTH:
    if length <= longest:
      return block
  return DEFAULT_BLOCK_Q


def _concrete(meta) -> bool:
  return not any(isinstance(a, jax.core.Tracer) for a in meta)


_build_tables = jax.jit(tables_lib.build_tables, static_argnums=(2, 3))


def _prepare(q, k, v, q_meta, kv_meta, *, scale, block_q, block_kv, interpret):
  """Validates, pads (tokens to blocks, head_dim to lanes), fuses heads, builds rows and tables."""
  _check_arrays(q, k, v)
  b, lq, hq, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  _check_meta("q_meta", q_meta, (b, lq))
  _check_meta("kv_meta", kv_meta, (b, lk))
  block_q = block_size(lq) if block_q is None else block_q
  block_kv = block_size(lk) if block_kv is None else block_kv
  _check_block("block_q", block_q)
  _check_block("block_kv", block_kv)
  bq, bk = min(block_q, _round_up(lq, pk.LANES)), min(block_kv, _round_up(lk, pk.LANES))
  need = vmem_bytes(bq, bk, d, hq // hkv, q.dtype.itemsize)
  if need > VMEM_BUDGET_BYTES:
    raise ValueError(f"block_q={block_q}, block_kv={block_kv} with head_dim={d} and {hq // hkv} query heads per "
                     f"KV head need ~{need / 2 ** 20:.0f} MiB of VMEM (> {VMEM_BUDGET_BYTES / 2 ** 20:.0f} MiB); "
                     f"use smaller blocks")
  scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
  dp = _round_up(d, pk.LANES)
  lqp, lkp = _round_up(lq, bq), _round_up(lk, bk)
  # Metadata known at trace time (benchmarks, AOT studies) are processed on the host with NumPy (the same
  # code), so the cost estimates count exactly the non-empty tiles; traced metadata (training) are processed
  # in the step and the estimates assume every tile (or the fraction set by `assume_tile_fraction`).
  if _concrete(q_meta) and _concrete(kv_meta):
    qm, km = _pad_meta(q_meta, lqp, np), _pad_meta(kv_meta, lkp, np)
    tables = tables_lib.build_tables(qm, km, bq, bk, xp=np)
    rows = pk.encode_rows(qm, query=True, xp=np), pk.encode_rows(km, query=False, xp=np)
    tiles = int(tables.fwd_count.sum())
  else:
    qm, km = _pad_meta(q_meta, lqp, jnp), _pad_meta(kv_meta, lkp, jnp)
    tables = _build_tables(qm, km, bq, bk)
    rows = pk.encode_rows(qm, query=True), pk.encode_rows(km, query=False)
    tiles = _assumed_tiles(lq, b * (lqp // bq) * (lkp // bk))

  def fuse(x, length):
    x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, dp - d)))
    return x.reshape(b, length, x.shape[2] * dp)

  cfg = pk.KernelConfig(num_heads=hq, num_kv_heads=hkv, head_dim=dp, block_q=bq, block_kv=bk, scale=scale,
                        interpret=interpret if isinstance(interpret, pltpu.InterpretParams) else bool(interpret),
                        tiles=tiles,
                        vmem_limit_bytes=min(VMEM_BUDGET_BYTES, max(32 * 2 ** 20, _round_up(need * 5 // 4, 2 ** 20))))
  return cfg, (fuse(q, lqp), fuse(k, lkp), fuse(v, lkp)) + rows + (tables,), (b, lq, hq, d, lqp)


def flash_attention(q, k, v, q_meta: mask_lib.TokenMeta, kv_meta: mask_lib.TokenMeta, *, scale=None,
                    block_q: Optional[int] = None, block_kv: Optional[int] = None, interpret: bool = False):
  """Block-sparse attention: q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D] -> [B, Lq, Hq, D]; differentiable in q, k, v.

  `scale` must be static (a Python number); None means 1/sqrt(D). Blocks default to `block_size` of the
  q / kv lengths; they shrink to the (128-rounded) sequence
  when it is shorter; other lengths and head dims are padded internally. `interpret`: False (Mosaic), True
  (`pltpu.InterpretParams()`) or a `pltpu.InterpretParams` (e.g. with race detection)."""
  cfg, args, (b, lq, hq, d, lqp) = _prepare(q, k, v, q_meta, kv_meta, scale=scale, block_q=block_q,
                                            block_kv=block_kv, interpret=interpret)
  o = _flash(cfg, *args)
  return o.reshape(b, lqp, hq, cfg.head_dim)[:, :lq, :, :d]


def flash_attention_visits(q, k, v, q_meta, kv_meta, *, scale=None, block_q: Optional[int] = None,
                           block_kv: Optional[int] = None, interpret: bool = True):
  """Forward only, with the kernel's own count of executed tiles: (out, visits [B, Hkv, nq], tables)."""
  cfg, (qf, kf, vf, qrows, krows, tables), (b, lq, hq, d, lqp) = _prepare(
      q, k, v, q_meta, kv_meta, scale=scale, block_q=block_q, block_kv=block_kv, interpret=interpret)
  o, _, visits = pk.flash_forward(qf, kf, vf, qrows, krows, tables.fwd, tables.fwd_count, cfg, count_visits=True)
  visits = visits.reshape(b, cfg.num_kv_heads, -1, pk.META_ROWS, pk.LANES)[..., 0, 0]
  return o.reshape(b, lqp, hq, cfg.head_dim)[:, :lq, :, :d], visits, tables


def cached_attention(q, k, v, q_meta: mask_lib.TokenMeta, k_cache, v_cache, cache_meta: mask_lib.TokenMeta, *,
                     scale=None, block_q: Optional[int] = None, block_kv: Optional[int] = None,
                     interpret: bool = False):
  """Inference: queries q (with their own k, v) attend to a KV cache plus themselves.

  k_cache/v_cache [B, Lc, Hkv, D] with `cache_meta` [B, Lc] (unused slots: document 0); q_meta carries the
  queries' row indices, so text decoding (causal), image prefill (full) and denoising steps (noise; nothing
  in the cache sees them) all follow the training mask. Runs under shard_map when a mesh is set."""
  _check_arrays(q, k, v)
  for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
    if np.ndim(x) != 4 or x.shape[0] != k.shape[0] or x.shape[2:] != k.shape[2:]:
      raise ValueError(f"{name} must be [batch, cache_tokens, {k.shape[2]}, {k.shape[3]}] like k, got "
                       f"shape {np.shape(x)}")
  _check_meta("cache_meta", cache_meta, (k_cache.shape[0], k_cache.shape[1]))
  _check_meta("q_meta", q_meta, q.shape[:2])

  def call(q, k, v, k_cache, v_cache, q_meta, cache_meta):
    kv_meta = mask_lib.TokenMeta(*(jnp.concatenate([jnp.asarray(c, jnp.int32), jnp.asarray(m, jnp.int32)], 1)
                                   for c, m in zip(cache_meta, q_meta)))
    k_all = jnp.concatenate([k_cache.astype(k.dtype), k], axis=1)
    v_all = jnp.concatenate([v_cache.astype(v.dtype), v], axis=1)
    return flash_attention(q, k_all, v_all, q_meta, kv_meta, scale=scale, block_q=block_q, block_kv=block_kv,
                           interpret=interpret)

  return sharding_lib.in_mesh(call, (q, k, v, k_cache, v_cache), (q_meta, cache_meta), q.shape[2], k.shape[2])


# ----------------------------------------------------------------------------------------------------------
# The registry entries (kernels.attention imports them by name on first use).
# ----------------------------------------------------------------------------------------------------------

def _sharded(q, k, v, q_meta, kv_meta, *, scale, interpret):
  _check_arrays(q, k, v)
  _check_meta("q_meta", q_meta, q.shape[:2])
  _check_meta("kv_meta", kv_meta, k.shape[:2])
  call = functools.partial(flash_attention, scale=scale, interpret=interpret)
  return sharding_lib.in_mesh(call, (q, k, v), (q_meta, kv_meta), q.shape[2], k.shape[2])


def pallas_attention(q, k, v, q_meta, kv_meta, *, scale=None):
  """attention_impl="pallas": the compiled TPU kernel."""
  return _sharded(q, k, v, q_meta, kv_meta, scale=scale, interpret=False)


def pallas_interpret_attention(q, k, v, q_meta, kv_meta, *, scale=None):
  """attention_impl="pallas_interpret": the same kernels under the TPU-semantics interpreter (CPU)."""
  return _sharded(q, k, v, q_meta, kv_meta, scale=scale, interpret=True)
