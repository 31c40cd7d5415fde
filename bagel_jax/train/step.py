"""The training step: a pure function (state, batch) -> (state, metrics), jitted with shardings by the loop.

The RNG is folded from the step number, so a resumed run draws the same noise and timesteps. Gradient
accumulation splits the rows into micro-batches whose losses are normalised by the token counts of the whole
batch, so k accumulated micro-steps produce exactly the full-batch gradient (clip, update and EMA happen once).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax

from bagel_jax.models import bagel as bagel_lib
from bagel_jax.models.config import BagelConfig
from bagel_jax.train import optimizer as opt_lib


@flax.struct.dataclass
class TrainState:
  """`params`: what the step uses (frozen leaves included, no optimizer state for them); `ema`: the EMA of the
  trained leaves only (`optimizer.trained`)."""
  step: jnp.ndarray
  params: Any
  opt_state: Any
  ema: Optional[Any] = None


def init_state(params, tx, ema: bool, mask: Any) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema=jax.tree.map(jnp.copy, opt_lib.trained(params, mask)) if ema else None)


def batch_counts(batch):
  """Global CE weight total and noisy-token total (the loss denominators)."""
  return jnp.sum(batch["ce_weight"]), jnp.sum(batch["mse_weight"])


def make_train_step(model_cfg: BagelConfig, *, tx: optax.GradientTransformation, mask: Any, schedule: Callable,
                    seed: int, timestep_shift: float, ce_weight: float, mse_weight: float, grad_accum: int = 1,
                    ema_decay: float = 0.0):
  """Returns train_step(state, batch) -> (state, metrics)."""

  def loss(params, batch, rng, counts):
    return bagel_lib.loss_fn(opt_lib.freeze(params, mask), batch, rng, model_cfg, timestep_shift=timestep_shift,
                             ce_weight=ce_weight, mse_weight=mse_weight, counts=counts)

  grad_fn = jax.value_and_grad(loss, has_aux=True)

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    counts = batch_counts(batch)
    if grad_accum == 1:
      (_, metrics), grads = grad_fn(state.params, batch, rng, counts)
    else:
      micro = jax.tree.map(lambda x: x.reshape((grad_accum, x.shape[0] // grad_accum) + x.shape[1:]), batch)

      def body(carry, xs):
        g_acc, m_acc = carry
        i, mb = xs
        (_, m), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i), counts)
        return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, m_acc, m)), None

      zeros_g = jax.tree.map(jnp.zeros_like, state.params)
      m_shape = jax.eval_shape(lambda: grad_fn(state.params, jax.tree.map(lambda x: x[0], micro), rng, counts))[0][1]
      zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape)
      (grads, metrics), _ = jax.lax.scan(body, (zeros_g, zeros_m), (jnp.arange(grad_accum), micro))
      # loss terms were normalised by the global counts, so their sums are the batch means; counters sum.
      metrics = dict(metrics, ce_count=counts[0], mse_count=counts[1])
      if "router_aux_loss" in metrics:
        metrics["router_aux_loss"] = metrics["router_aux_loss"] / grad_accum
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema
    if ema is not None:
      ema = opt_lib.ema_update(ema, params, mask, ema_decay)
    metrics = dict(metrics, grad_norm=opt_lib.global_norm(grads, mask), lr=schedule(state.step),
                   param_norm=optax.tree.norm(params))
    for k in ("ce_sum", "mse_sum"):
      metrics.pop(k, None)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics

  return train_step
