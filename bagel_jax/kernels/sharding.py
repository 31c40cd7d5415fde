"""Running an attention implementation per shard: batch over the data axes, heads over 'tensor'.

Both block-sparse paths (the Pallas kernel and `tiled`) iterate over per-row tile lists, which only make
sense on the rows a device holds; under a mesh they run inside `shard_map` with these specs, as splash
attention is run.
"""
from __future__ import annotations

import math

import jax
from jax.sharding import PartitionSpec as P

from bagel_jax.kernels import mask as mask_lib

BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"


def mesh_specs(mesh, batch: int, num_heads: int, num_kv_heads: int):
  """PartitionSpecs (q/k/v/out, metadata) for `mesh`: batch over the ('data', 'fsdp') axes present (dropping
  trailing ones until they divide the batch), heads over 'tensor' if it divides both head counts."""
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  batch_axes = [a for a in BATCH_AXES if a in sizes]
  while batch_axes and batch % math.prod(sizes[a] for a in batch_axes):
    batch_axes.pop()
  t = sizes.get(HEAD_AXIS)
  head = HEAD_AXIS if t and num_heads % t == 0 and num_kv_heads % t == 0 else None
  bspec = tuple(batch_axes) if batch_axes else None
  return P(bspec, None, head, None), P(bspec, None)


def in_mesh(call, arrays, metas, num_heads: int, num_kv_heads: int):
  """call(*arrays, *metas), under shard_map when a mesh is set (arrays [B, L, H, D], metas TokenMeta [B, L])."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.manual_axes:
    return call(*arrays, *metas)
  qkv, meta = mesh_specs(mesh, arrays[0].shape[0], num_heads, num_kv_heads)
  metas = tuple(mask_lib.TokenMeta(*m) for m in metas)
  meta_specs = tuple(mask_lib.TokenMeta(*([meta] * 4)) for _ in metas)
  return jax.shard_map(call, mesh=mesh, in_specs=(qkv,) * len(arrays) + meta_specs, out_specs=qkv,
                       check_vma=False)(*arrays, *metas)
