"""AdamW with BAGEL's settings, warm-up + constant/cosine schedules, regex freezing, EMA.

Freezing is by regex over '/'-joined parameter paths (big_vision style): a parameter trains iff it matches
`optim.trainable` and not `optim.frozen`. Frozen leaves get `optax.set_to_zero` (no optimizer state, no
contribution to the clipping norm, as `requires_grad=False` parameters in the official FSDP setup), no EMA
copy (`trained`), and are passed through `stop_gradient` in the step, so XLA never computes their gradients.
"""
from __future__ import annotations

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

TRAIN, FROZEN = "train", "frozen"


def path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def trainable_mask(params: Any, trainable: str, frozen: str) -> Any:
  """Tree of bools: True where the parameter is trained."""
  try:
    t_re, f_re = re.compile(trainable), re.compile(frozen) if frozen else None
  except re.error as e:
    raise ValueError(f"config.optim.trainable/frozen: bad regex ({e})") from e

  def one(path, _):
    p = path_str(path)
    return bool(t_re.fullmatch(p)) and not (f_re and f_re.fullmatch(p))

  mask = jax.tree_util.tree_map_with_path(one, params)
  if not any(jax.tree.leaves(mask)):
    raise ValueError(f"config.optim.trainable={trainable!r} with frozen={frozen!r} leaves no trainable parameter")
  return mask


def make_schedule(optim) -> Callable:
  """Linear warm-up from 0, then constant or cosine decay to `min_lr` (the official schedules)."""
  warm = int(optim.warmup_steps)
  if optim.schedule == "constant":
    main = optax.constant_schedule(optim.lr)
  elif optim.schedule == "cosine":
    main = optax.cosine_decay_schedule(optim.lr, max(1, int(optim.total_steps) - warm),
                                       alpha=optim.min_lr / optim.lr if optim.lr else 0.0)
  else:
    raise ValueError(f"config.optim.schedule={optim.schedule!r} is not 'constant' or 'cosine'")
  if warm <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warm), main], [warm])


def make_optimizer(optim, params: Any) -> tuple:
  """Returns (tx, schedule, trainable mask)."""
  schedule = make_schedule(optim)
  mask = trainable_mask(params, optim.trainable, optim.frozen)
  inner = optax.chain(
      optax.clip_by_global_norm(optim.clip_norm) if optim.clip_norm else optax.identity(),
      optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay),
  )
  labels = jax.tree.map(lambda m: TRAIN if m else FROZEN, mask)
  tx = optax.multi_transform({TRAIN: inner, FROZEN: optax.set_to_zero()}, labels)
  return tx, schedule, mask


def trained(tree: Any, mask: Any) -> Any:
  """The trained leaves of a parameter-shaped tree of nested dicts (frozen leaves, and modules left empty,
  dropped): what the EMA holds, so frozen weights have no second copy in HBM."""
  if not isinstance(tree, dict):
    return tree
  out = {}
  for k, v in tree.items():
    m = mask[k]
    if isinstance(v, dict):
      sub = trained(v, m)
      if sub:
        out[k] = sub
    elif m:
      out[k] = v
  return out


def merge(base: Any, part: Any) -> Any:
  """`base` with the leaves of `part` (a subtree of nested dicts, e.g. `trained(...)`) put in."""
  if not isinstance(part, dict):
    return part
  return {k: merge(v, part[k]) if k in part else v for k, v in base.items()}


def ema_update(ema: Any, params: Any, mask: Any, decay: float) -> Any:
  """ema <- decay * ema + (1 - decay) * param over the trained leaves (`ema` is `trained(params, mask)`)."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, trained(params, mask))


def freeze(params: Any, mask: Any) -> Any:
  """stop_gradient on frozen leaves: their backward pass is pruned, not computed and discarded."""
  return jax.tree.map(lambda p, m: p if m else jax.lax.stop_gradient(p), params, mask)


def global_norm(tree: Any, mask: Any) -> jnp.ndarray:
  return optax.tree.norm(jax.tree.map(lambda g, m: g if m else jnp.zeros((), g.dtype), tree, mask))
