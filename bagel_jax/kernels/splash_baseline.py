"""BAGEL's mask through stock splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`): the
baseline the Pallas kernel is benchmarked against (benchmarks/attention_kernel.py), not a model path.

Splash cannot express the mask from O(L) metadata. Its static masks (`CausalMask`, `LocalMask`, `NumpyMask`,
...) are fixed when the kernel is built, so one kernel serves one mask, while every packed row has its own;
`SegmentIds` only add "same document"; lazy `_ComputableMask`s see token positions, not per-example data. The
one per-example route is a dynamic mask: a dense boolean `jax.Array` [heads, Lq, Lk] per row, tiled on device
into block tables plus the full mask as "partial blocks" (O(L^2) bytes per row: 1.36 GB at 36,864 tokens), and
in jax 0.10.2 building it under `jit`/`vmap` needs `is_dynamic_mask` forced back to a Python bool on the
kernel's three mask-info tuples (it becomes an array, and `SplashAttentionKernel.__call__` branches on it).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

from bagel_jax.kernels import mask as mask_lib


def _force_dynamic(kernel: splash.SplashAttentionKernel) -> splash.SplashAttentionKernel:
  fix = lambda info: None if info is None else info._replace(is_dynamic_mask=True)
  return splash.SplashAttentionKernel(fix(kernel.fwd_mask_info), fix(kernel.dq_mask_info),
                                      fix(kernel.dkv_mask_info), **kernel.kwargs)


def splash_attention(q, k, v, q_meta: mask_lib.TokenMeta, kv_meta: mask_lib.TokenMeta, *, scale=None,
                     block_q: int = 512, block_kv: int = 512, interpret=False):
  """The signature of `reference_attention`: q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D]; lengths must be multiples
  of the blocks. The dense mask is built from the metadata inside the step."""
  scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else scale
  mask = mask_lib.materialize(q_meta, kv_meta)  # [B, Lq, Lk]: the O(L^2) per-row cost
  sizes = splash.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv, block_q_dkv=block_q,
                            block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv, block_q_dq=block_q,
                            block_kv_dq=block_kv)

  def one_row(q, k, v, m):  # q [Hq, Lq, D], k/v [Hkv, Lk, D], m [Lq, Lk]
    kernel = splash.make_splash_mha(m[None], block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                    interpret=interpret)
    return _force_dynamic(kernel)((q.astype(jnp.float32) * scale).astype(q.dtype), k, v)

  t = lambda x: jnp.swapaxes(x, 1, 2)
  out = t(jax.vmap(one_row)(t(q), t(k), t(v), mask))
  # Splash gives fully masked rows the mean of v; the reference (and our kernel) give 0.
  return jnp.where(mask.any(-1)[:, :, None, None], out, 0).astype(q.dtype)
