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
"""
from __future__ import annotations

from typing import List, Sequence

import jax.numpy as jnp
from flax import struct

from bagel_jax import batch as batch_lib


def take_rows(x, idx):
  """x [B, L, ...], idx [B, C] (-1 = unused slot) -> [B, C, ...]; unused slots read row position 0."""
  safe = jnp.maximum(idx, 0).reshape(idx.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, safe, axis=1)


@struct.dataclass
class Routing:
  und_index: jnp.ndarray  # [B, NU] positions of und-expert tokens, -1 padded
  gen_index: jnp.ndarray  # [B, NL] positions of gen-expert tokens, -1 padded
  is_gen: jnp.ndarray     # [B, L] bool
  und_slot: jnp.ndarray   # [B, L] buffer slot of each und token (meaningless elsewhere)
  gen_slot: jnp.ndarray   # [B, L]
  dense: bool = struct.field(pytree_node=False, default=False)  # both experts on all tokens (oracle)

  @classmethod
  def from_batch(cls, batch, dense: bool = False) -> "Routing":
    mod = batch["modality"]
    is_gen = mod == batch_lib.VAE
    is_und = (mod != batch_lib.VAE) & (mod != batch_lib.PAD)
    und_slot = jnp.cumsum(is_und, axis=1, dtype=jnp.int32) - 1
    gen_slot = jnp.cumsum(is_gen, axis=1, dtype=jnp.int32) - 1
    return cls(batch["und_index"], batch["latent_dest"], is_gen, und_slot, gen_slot, dense)

  def dispatch(self, x, num: int) -> List[jnp.ndarray]:
    """Row-ordered x [B, L, ...] -> one buffer per expert ([x] when the weights are shared)."""
    if num == 1:
      return [x]
    if self.dense:
      return [x, x]
    return [take_rows(x, self.und_index), take_rows(x, self.gen_index)]

  def combine(self, ys: Sequence[jnp.ndarray]) -> jnp.ndarray:
    """Inverse of `dispatch`: per-expert buffers -> row order [B, L, ...]."""
    if len(ys) == 1:
      return ys[0]
    y_und, y_gen = ys
    if not self.dense:
      y_und, y_gen = self._to_rows(y_und, self.und_slot), self._to_rows(y_gen, self.gen_slot)
    sel = self.is_gen.reshape(self.is_gen.shape + (1,) * (y_und.ndim - 2))
    return jnp.where(sel, y_gen, y_und)

  @staticmethod
  def _to_rows(buf, slot):
    if buf.shape[1] == 0:  # an expert with no capacity in this batch shape (e.g. text-only inference)
      return jnp.zeros(slot.shape + buf.shape[2:], buf.dtype)
    return take_rows(buf, slot)

  @classmethod
  def all_und(cls, batch_size: int, length: int, dense: bool = False) -> "Routing":
    """Every token on the und expert (text-only forward)."""
    idx = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch_size, length))
    return cls(idx, jnp.zeros((batch_size, 0), jnp.int32), jnp.zeros((batch_size, length), bool), idx,
               jnp.zeros((batch_size, length), jnp.int32) - 1, dense)

  def dropped_tokens(self) -> jnp.ndarray:
    """Tokens that found no buffer slot (0 for any batch that passes `validate`)."""
    n_und = self.und_slot[:, -1] + 1
    n_gen = self.gen_slot[:, -1] + 1
    cap_und = jnp.sum(self.und_index >= 0, axis=1)
    cap_gen = jnp.sum(self.gen_index >= 0, axis=1)
    return jnp.sum(jnp.maximum(n_und - cap_und, 0) + jnp.maximum(n_gen - cap_gen, 0))
