"""moe_topk: a learned token-choice top-k router over `num_experts` FFNs (capacity-limited, Switch
load-balancing loss); no official layer, so no released checkpoint naming to convert."""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bagel_jax.models import layers, qwen2
from bagel_jax.models.variants import Experts, Variant


class TopKMoE(nn.Module):
  """Token-choice top-k MoE FFN with a learned router, per-row expert capacity and the Switch load-balancing
  loss. Tokens over capacity skip the FFN (residual only) and are counted.

  Capacity per row C = ceil(capacity_factor * k * L / X); the expert matmuls run on X * C slots, so active
  FLOPs per token are k * F_e * capacity_factor of one FFN of width F_e.
  """
  config: Any  # BagelConfig

  @nn.compact
  def __call__(self, x, valid):
    c, lc = self.config, self.config.llm
    b, l, d = x.shape
    n_exp, k, f = lc.num_experts, lc.experts_per_token, lc.moe_intermediate_size
    cap = max(1, int(math.ceil(lc.capacity_factor * k * l / n_exp)))
    pdt, dt = layers.dtype_of(c.param_dtype), layers.dtype_of(c.dtype)
    router = layers.param(self, "router", layers.normal_init, (d, n_exp), (qwen2.EMBED, "exp"), pdt)
    logits = jnp.einsum("bld,de->ble", x.astype(jnp.float32), router.astype(jnp.float32))
    probs = jax.nn.softmax(logits, axis=-1)
    top_p, top_i = jax.lax.top_k(probs, k)  # [B, L, k]
    gates = top_p / jnp.sum(top_p, -1, keepdims=True) if k > 1 else top_p
    onehot = jax.nn.one_hot(top_i, n_exp, dtype=jnp.int32) * valid[..., None, None].astype(jnp.int32)
    flat = onehot.reshape(b, l * k, n_exp)
    pos_in_expert = (jnp.cumsum(flat, axis=1) - 1) * flat
    pos_in_expert = jnp.sum(pos_in_expert, -1).reshape(b, l, k)
    keep = (pos_in_expert < cap) & valid[..., None]
    slot = jnp.where(keep, top_i * cap + pos_in_expert, n_exp * cap)  # out of range = dropped

    def scatter_row(xr, sr):
      src = jnp.repeat(xr, k, axis=0)
      return jnp.zeros((n_exp * cap, d), xr.dtype).at[sr.reshape(-1)].set(src, mode="drop")

    buf = jax.vmap(scatter_row)(x.astype(dt), slot).reshape(b, n_exp, cap, d)
    w_gate = layers.param(self, "gate_proj", layers.normal_init, (n_exp, d, f), ("exp", qwen2.EMBED, "mlp"), pdt)
    w_up = layers.param(self, "up_proj", layers.normal_init, (n_exp, d, f), ("exp", qwen2.EMBED, "mlp"), pdt)
    w_down = layers.param(self, "down_proj", layers.normal_init, (n_exp, f, d), ("exp", "mlp", qwen2.EMBED), pdt)
    h = jax.nn.silu(jnp.einsum("becd,edf->becf", buf, w_gate.astype(dt)))
    h = h * jnp.einsum("becd,edf->becf", buf, w_up.astype(dt))
    out = jnp.einsum("becf,efd->becd", h, w_down.astype(dt)).reshape(b, n_exp * cap, d)
    gathered = jnp.take_along_axis(out, jnp.minimum(slot, n_exp * cap - 1).reshape(b, l * k, 1), axis=1)
    gathered = gathered.reshape(b, l, k, d) * (gates * keep).astype(dt)[..., None]
    y = jnp.sum(gathered, axis=2)

    n_valid = jnp.maximum(jnp.sum(valid), 1)
    frac_tokens = jnp.sum(onehot, axis=(0, 1, 2)) / (n_valid * k)
    frac_probs = jnp.sum(probs * valid[..., None], axis=(0, 1)) / n_valid
    aux = {"router_aux_loss": n_exp * jnp.sum(frac_tokens * frac_probs),
           "router_dropped": jnp.sum(valid[..., None] & ~keep).astype(jnp.float32)}
    return y, aux


def mlp_params(lc) -> float:
  """k experts of width F_e plus the router."""
  return lc.experts_per_token * 3 * lc.hidden_size * lc.moe_intermediate_size + lc.hidden_size * lc.num_experts


def post_attention(c, x, routing, valid):
  del routing
  lc = c.llm
  h = qwen2.ExpertRMSNorm(1, lc.hidden_size, qwen2.EMBED, lc.rms_norm_eps, name="post_attention_layernorm")([x])[0]
  return TopKMoE(c, name="mlp")(h, valid)


VARIANT = Variant("moe_topk", Experts(attn=1, mlp_norm=1, mlp=1, final_norm=1), None, mlp_params, post_attention)
