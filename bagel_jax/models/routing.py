"""Hard modality routing for MoT/MoE layers: fixed-capacity per-expert buffers.

The official code indexes `x[und]` / `x[gen]` with data-dependent index sets. Under `jit` shapes are static,
so each row's und-expert tokens are gathered into a buffer of NU slots (`und_index` from the batch) and its
gen-expert tokens (exactly the VAE latent tokens) into NL slots (`latent_dest`). Each expert's matmuls run on
its own buffer only, so the per-token matmul FLOPs are (NU + NL) / L of one dense pass over the row — exactly
1.0 when the packer sets NU = L - NL, against 2.0 for "compute both experts and select". Results are brought
back to row order with gathers (`combine`); rows keep their batch axis, so this partitions cleanly under
data/FSDP sharding.

`dense=True` is the oracle: both experts see every token and `combine` selects per token. It costs twice the
FLOPs and exists for tests and for checking the capacity path.

Every row gather here moves each token to at most one place, so its transpose is a gather too: `gather_rows`
carries the inverse index and differentiates by gathering the cotangent back, never by scatter-add. On TPU a
row scatter-add costs ~35-40K VLIW bundles and ~2 s of compile each, and autodiff of the plain gathers put
two dozen of them in a one-layer step (docs/tpu_aot.md).
"""
from __future__ import annotations

from typing import List, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from bagel_jax import batch as batch_lib


def take_rows(x, idx):
  """x [B, L, ...], idx [B, C] (-1 = unused slot) -> [B, C, ...]; unused slots read row position 0."""
  safe = jnp.maximum(idx, 0).reshape(idx.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, safe, axis=1)


def inverse_index(idx, length: int):
  """idx [B, C] of distinct positions in [0, length) (-1 = unused) -> inv [B, length]: inv[b, idx[b, c]] = c,
  -1 where no slot reads the position. An int scatter of C elements (no gradient, cheap)."""
  b, c = idx.shape
  rows = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, c))
  dest = jnp.where(idx >= 0, idx, length)  # out of range: dropped
  slots = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, c))
  return jnp.full((b, length), -1, jnp.int32).at[rows, dest].set(slots, mode="drop")


@jax.custom_vjp
def gather_rows(x, idx, inv):
  """`take_rows(x, idx)` whose gradient is a gather: `inv` must be `inverse_index(idx, L)` (each position is
  read by at most one slot). Unused slots read position 0, as in `take_rows`, and their cotangent goes there."""
  return take_rows(x, idx)


def _gather_rows_fwd(x, idx, inv):
  return take_rows(x, idx), (idx, inv)


def _gather_rows_bwd(res, g):
  idx, inv = res
  expand = lambda m: m.reshape(m.shape + (1,) * (g.ndim - 2))
  dx = jnp.where(expand(inv >= 0), take_rows(g, inv), jnp.zeros((), g.dtype))
  unused = jnp.sum(jnp.where(expand(idx < 0), g, jnp.zeros((), g.dtype)), axis=1, keepdims=True)
  first = (jnp.arange(inv.shape[1]) == 0).reshape((1, -1) + (1,) * (g.ndim - 2))
  dx = dx + jnp.where(first, unused, jnp.zeros((), g.dtype))
  return dx, _int_zero(idx), _int_zero(inv)


def _int_zero(a):
  return np.zeros(a.shape, jax.dtypes.float0)


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def read_slots(buf, idx, inv):
  """The inverse move: row positions [B, L, ...] from slots `buf` [B, C, ...] (zero where inv < 0), with
  idx [B, C] / inv [B, L] as for `gather_rows(x, idx, inv)`."""
  rows = gather_rows(buf, inv, idx)
  return jnp.where((inv >= 0).reshape(inv.shape + (1,) * (buf.ndim - 2)), rows, jnp.zeros((), buf.dtype))


@struct.dataclass
class Routing:
  und_index: jnp.ndarray  # [B, NU] positions of und-expert tokens, -1 padded
  gen_index: jnp.ndarray  # [B, NL] positions of gen-expert tokens, -1 padded
  is_gen: jnp.ndarray     # [B, L] bool
  und_slot: jnp.ndarray   # [B, L] buffer slot of each und token (meaningless elsewhere)
  gen_slot: jnp.ndarray   # [B, L]
  und_inv: jnp.ndarray    # [B, L] inverse_index(und_index): the token's und slot, -1 if it has none
  gen_inv: jnp.ndarray    # [B, L]
  dense: bool = struct.field(pytree_node=False, default=False)  # both experts on all tokens (oracle)

  @classmethod
  def from_batch(cls, batch, dense: bool = False) -> "Routing":
    mod = batch["modality"]
    is_gen = mod == batch_lib.VAE
    is_und = (mod != batch_lib.VAE) & (mod != batch_lib.PAD)
    und_slot = jnp.cumsum(is_und, axis=1, dtype=jnp.int32) - 1
    gen_slot = jnp.cumsum(is_gen, axis=1, dtype=jnp.int32) - 1
    length = mod.shape[1]
    und, gen = batch["und_index"], batch["latent_dest"]
    return cls(und, gen, is_gen, und_slot, gen_slot, inverse_index(und, length), inverse_index(gen, length),
               dense)

  def dispatch(self, x, num: int) -> List[jnp.ndarray]:
    """Row-ordered x [B, L, ...] -> one buffer per expert ([x] when the weights are shared)."""
    if num == 1:
      return [x]
    if self.dense:
      return [x, x]
    return [gather_rows(x, self.und_index, self.und_inv), gather_rows(x, self.gen_index, self.gen_inv)]

  def combine(self, ys: Sequence[jnp.ndarray]) -> jnp.ndarray:
    """Inverse of `dispatch`: per-expert buffers -> row order [B, L, ...] (zero at positions neither expert
    holds: padding)."""
    if len(ys) == 1:
      return ys[0]
    y_und, y_gen = ys
    if not self.dense:
      y_und = self._to_rows(y_und, self.und_index, self.und_inv)
      y_gen = self._to_rows(y_gen, self.gen_index, self.gen_inv)
    sel = self.is_gen.reshape(self.is_gen.shape + (1,) * (y_und.ndim - 2))
    return jnp.where(sel, y_gen, y_und)

  @staticmethod
  def _to_rows(buf, idx, inv):
    if buf.shape[1] == 0:  # an expert with no capacity in this batch shape (e.g. text-only inference)
      return jnp.zeros(inv.shape + buf.shape[2:], buf.dtype)
    return read_slots(buf, idx, inv)

  @classmethod
  def all_und(cls, batch_size: int, length: int, dense: bool = False) -> "Routing":
    """Every token on the und expert (text-only forward)."""
    idx = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch_size, length))
    none = jnp.zeros((batch_size, length), jnp.int32) - 1
    return cls(idx, jnp.zeros((batch_size, 0), jnp.int32), jnp.zeros((batch_size, length), bool), idx, none,
               idx, none, dense)

  def dropped_tokens(self) -> jnp.ndarray:
    """Tokens that found no buffer slot (0 for any batch that passes `validate`)."""
    n_und = self.und_slot[:, -1] + 1
    n_gen = self.gen_slot[:, -1] + 1
    cap_und = jnp.sum(self.und_index >= 0, axis=1)
    cap_gen = jnp.sum(self.gen_index >= 0, axis=1)
    return jnp.sum(jnp.maximum(n_und - cap_und, 0) + jnp.maximum(n_gen - cap_gen, 0))
