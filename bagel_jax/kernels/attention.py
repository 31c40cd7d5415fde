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

from typing import Callable, Dict

from bagel_jax.kernels import mask as mask_lib
from bagel_jax.kernels.reference import reference_attention
from bagel_jax.kernels.tiled import sharded_tiled_attention

_IMPLS: Dict[str, Callable] = {"reference": reference_attention, "tiled": sharded_tiled_attention}
DEFAULT_IMPL = "auto"


def register(name: str, fn: Callable) -> None:
  """Registers an attention implementation with the signature of `reference_attention`."""
  _IMPLS[name] = fn


def _lazy_register(name: str) -> None:
  # The Pallas implementations register themselves on import; importing lazily keeps the reference path
  # free of Pallas/Mosaic imports.
  if name in ("pallas", "pallas_interpret", "auto"):
    try:
      import bagel_jax.kernels.ops  # noqa: F401  pylint: disable=import-outside-toplevel
    except ImportError as e:  # pragma: no cover - only before the kernel exists
      raise ValueError(f"attention_impl={name!r} is unavailable: {e}") from e


def auto_attention(q, k, v, q_meta: mask_lib.TokenMeta, kv_meta: mask_lib.TokenMeta, *, scale=None):
  """attention_impl="auto": the Pallas kernel on TPU, `tiled` elsewhere (chosen at lowering)."""
  import jax  # pylint: disable=import-outside-toplevel
  _lazy_register("pallas")
  pallas = _IMPLS["pallas"]
  return jax.lax.platform_dependent(
      q, k, v, q_meta, kv_meta,
      tpu=lambda *a: pallas(*a, scale=scale),
      default=lambda *a: _IMPLS["tiled"](*a, scale=scale))


_IMPLS["auto"] = auto_attention


def attention(q, k, v, q_meta: mask_lib.TokenMeta, kv_meta: mask_lib.TokenMeta, *, impl: str = DEFAULT_IMPL,
              scale=None):
  """q: [B, Lq, Hq, D]; k, v: [B, Lk, Hkv, D]; metadata [B, L*] each. Returns [B, Lq, Hq, D]."""
  if impl not in _IMPLS:
    _lazy_register(impl)
  if impl not in _IMPLS:
    raise ValueError(f"unknown attention_impl {impl!r}; available: {sorted(_IMPLS)}")
  return _IMPLS[impl](q, k, v, q_meta, kv_meta, scale=scale)
