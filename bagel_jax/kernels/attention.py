"""Attention dispatch: one entry point, implementations chosen by the config key `attention_impl`.

Model code calls `attention(...)` with metadata; whether the mask is materialised (reference) or evaluated
per tile by the Pallas kernel is decided here, so models never import a kernel directly.

Implementations: `reference` (jnp oracle, O(L^2) mask), `tiled` (the same block tables as the kernel, in
plain JAX: only non-empty tiles are computed, the CPU/GPU path), `pallas` (the block-sparse TPU kernel),
`pallas_interpret` (the same kernel under the TPU interpreter, for CPU tests) and `auto`: the Pallas kernel
when the program is lowered for TPU and `tiled` otherwise. `auto` is resolved per lowering platform
(`lax.platform_dependent`), not from the host's default backend, so an AOT compile for a TPU topology on a
CPU host (bagel-aot) gets the kernel while the same config on CPU gets `tiled`; only the branch of the
target platform is lowered.
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict

import jax
import jax.numpy as jnp

from bagel_jax.kernels import mask as mask_lib
from bagel_jax.kernels.reference import reference_attention
from bagel_jax.kernels.tiled import sharded_tiled_attention

DEFAULT_IMPL = "auto"
_IMPLS: Dict[str, Callable] = {"reference": reference_attention, "tiled": sharded_tiled_attention}
# The Pallas implementations, imported on first use (by module name, so this module never imports ops.py at
# load time): the reference and tiled paths stay free of Pallas/Mosaic imports, and ops.py, which needs nothing
# from here, does not import its own dispatcher back.
_DEFERRED = {"pallas": ("bagel_jax.kernels.ops", "pallas_attention"),
             "pallas_interpret": ("bagel_jax.kernels.ops", "pallas_interpret_attention")}


def register(name: str, fn: Callable) -> None:
  """Registers an attention implementation with the signature of `reference_attention`."""
  _IMPLS[name] = fn


def implementation(name: str) -> Callable:
  """The function behind `attention_impl=name`."""
  if name not in _IMPLS and name in _DEFERRED:
    module, attr = _DEFERRED[name]
    _IMPLS[name] = getattr(importlib.import_module(module), attr)
  if name not in _IMPLS:
    raise ValueError(f"unknown attention_impl {name!r}; available: {sorted(set(_IMPLS) | set(_DEFERRED))}")
  return _IMPLS[name]


def auto_attention(q, k, v, q_meta: mask_lib.TokenMeta, kv_meta: mask_lib.TokenMeta, *, scale=None):
  """attention_impl="auto": the Pallas kernel on TPU, `tiled` elsewhere (chosen at lowering)."""
  pallas, tiled = implementation("pallas"), implementation("tiled")
  return jax.lax.platform_dependent(
      q, k, v, q_meta, kv_meta,
      tpu=lambda *a: pallas(*a, scale=scale),
      default=lambda *a: tiled(*a, scale=scale))


_IMPLS["auto"] = auto_attention


def attention(q, k, v, q_meta: mask_lib.TokenMeta, kv_meta: mask_lib.TokenMeta, *, impl: str = DEFAULT_IMPL,
              scale=None):
  """q: [B, Lq, Hq, D]; k, v: [B, Lk, Hkv, D]; metadata [B, L*] each. Returns [B, Lq, Hq, D]."""
  return implementation(impl)(q, k, v, q_meta, kv_meta, scale=scale)


def attention_with_cache(q, k, v, q_meta: mask_lib.TokenMeta, k_cache, v_cache, cache_meta: mask_lib.TokenMeta, *,
                         impl: str = DEFAULT_IMPL, scale=None):
  """Cached decoding: a block's queries (with their own k, v) attend to a KV cache [B, Lc, Hkv, D] plus the
  block, under the training mask predicate (`cache_meta`: unused slots are document 0), through the same
  implementations as `attention`."""
  kv_meta = mask_lib.TokenMeta(*(jnp.concatenate([jnp.asarray(c, jnp.int32), jnp.asarray(m, jnp.int32)], axis=1)
                                 for c, m in zip(cache_meta, q_meta)))
  k_all = jnp.concatenate([k_cache.astype(k.dtype), k], axis=1)
  v_all = jnp.concatenate([v_cache.astype(v.dtype), v], axis=1)
  return attention(q, k_all, v_all, q_meta, kv_meta, impl=impl, scale=scale)
