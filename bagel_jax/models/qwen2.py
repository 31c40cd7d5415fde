"""Qwen2 decoder with BAGEL's layer variants: dense, MoE (FFN expert), MoT (all-parameter expert), top-k MoE.

Hard-routed variants store the two weight sets (und = index 0, gen = index 1) stacked on a leading
`modality` axis; the official `X` / `X_moe_gen` pairs map to [0] / [1]. All tokens share one joint attention
under the generalized causal mask. Parameter names follow `modeling/bagel/qwen2_navit.py`.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from bagel_jax.kernels import attention as attention_lib
from bagel_jax.kernels import mask as mask_lib
from bagel_jax.models import layers
from bagel_jax.models.config import BagelConfig
from bagel_jax.models.routing import Routing

EMBED = "embed"


def expert_counts(variant: str) -> dict:
  """How many hard-routed weight sets each block of a layer has."""
  mot = variant == "mot"
  return dict(attn=2 if mot else 1, mlp=2 if variant in ("mot", "moe") else 1,
              final_norm=2 if variant in ("mot", "moe") else 1)


# ----------------------------------------------------------------------------------------------------------
# RoPE (HF Llama/Qwen2: split-half rotation, fp32 tables cast to the activation dtype).
# ----------------------------------------------------------------------------------------------------------

def rope_tables(positions, head_dim: int, theta: float, dtype) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """positions [B, L] -> cos, sin [B, L, head_dim]."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x, cos, sin):
  """x [B, L, H, D]; cos/sin [B, L, D]."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


# ----------------------------------------------------------------------------------------------------------
# Expert-stacked building blocks: each takes one buffer per expert and returns one output per expert.
# ----------------------------------------------------------------------------------------------------------

class ExpertLinear(nn.Module):
  """`num` weight sets stacked on a leading `modality` axis (none when num == 1)."""
  num: int
  in_shape: Tuple[int, ...]
  out_shape: Tuple[int, ...]
  in_axes: Tuple[str, ...]
  out_axes: Tuple[str, ...]
  use_bias: bool
  dtype: str
  param_dtype: str

  @nn.compact
  def __call__(self, xs: Sequence[jnp.ndarray]):
    lead, lead_axes = ((self.num,), ("modality",)) if self.num > 1 else ((), ())
    pdt, dt = layers.dtype_of(self.param_dtype), layers.dtype_of(self.dtype)
    kernel = layers.param(self, "kernel", layers.normal_init, lead + self.in_shape + self.out_shape,
                          lead_axes + self.in_axes + self.out_axes, pdt)
    bias = (layers.param(self, "bias", layers.zeros_init, lead + self.out_shape, lead_axes + self.out_axes, pdt)
            if self.use_bias else None)
    outs = []
    for e, x in enumerate(xs):
      k = kernel[e] if self.num > 1 else kernel
      y = layers.flat_matmul(x.astype(dt), k.astype(dt), len(self.in_shape))
      if bias is not None:
        y = y + (bias[e] if self.num > 1 else bias).astype(dt)
      outs.append(y)
    return outs


class ExpertRMSNorm(nn.Module):
  num: int
  features: int
  axis_name: str
  eps: float

  @nn.compact
  def __call__(self, xs: Sequence[jnp.ndarray]):
    lead, lead_axes = ((self.num,), ("modality",)) if self.num > 1 else ((), ())
    w = layers.param(self, "scale", layers.ones_init, lead + (self.features,), lead_axes + (self.axis_name,),
                     jnp.float32)
    return [layers.rms_norm(x, w[e] if self.num > 1 else w, self.eps) for e, x in enumerate(xs)]


def _stop_und(xs, freeze: bool):
  """`freeze_und`: detach the und-expert buffer (index 0) so no gradient reaches und parameters."""
  if freeze and len(xs) == 2:
    return [jax.lax.stop_gradient(xs[0]), xs[1]]
  return list(xs)


# ----------------------------------------------------------------------------------------------------------
# Attention and MLP blocks.
# ----------------------------------------------------------------------------------------------------------

def expert_qkv(c: BagelConfig, num: int, hs):
  """Per-expert q/k/v projections (+ QK-RMSNorm) of the expert buffers `hs`. Called inside a compact
  `__call__` (training `Attention`, inference `CachedAttention`), so both own the same parameter names."""
  lc = c.llm
  kw = dict(num=num, dtype=c.dtype, param_dtype=c.param_dtype)
  d = (lc.hidden_size,)
  q = ExpertLinear(in_shape=d, out_shape=(lc.num_heads, lc.head_dim), in_axes=(EMBED,),
                   out_axes=("heads", "head_dim"), use_bias=True, name="q_proj", **kw)(hs)
  k = ExpertLinear(in_shape=d, out_shape=(lc.num_kv_heads, lc.head_dim), in_axes=(EMBED,),
                   out_axes=("kv_heads", "head_dim"), use_bias=True, name="k_proj", **kw)(hs)
  v = ExpertLinear(in_shape=d, out_shape=(lc.num_kv_heads, lc.head_dim), in_axes=(EMBED,),
                   out_axes=("kv_heads", "head_dim"), use_bias=True, name="v_proj", **kw)(hs)
  if lc.qk_norm:
    q = ExpertRMSNorm(num, lc.head_dim, "head_dim", lc.rms_norm_eps, name="q_norm")(q)
    k = ExpertRMSNorm(num, lc.head_dim, "head_dim", lc.rms_norm_eps, name="k_norm")(k)
  return q, k, v


def expert_o_proj(c: BagelConfig, num: int, routing: Routing, out):
  """The attention output projection of each expert over its dispatched rows (inside a compact `__call__`)."""
  lc = c.llm
  return ExpertLinear(in_shape=(lc.num_heads, lc.head_dim), out_shape=(lc.hidden_size,),
                      in_axes=("heads", "head_dim"), out_axes=(EMBED,), use_bias=False, name="o_proj", num=num,
                      dtype=c.dtype, param_dtype=c.param_dtype)(routing.dispatch(out, num))


class Attention(nn.Module):
  config: BagelConfig
  num: int

  @nn.compact
  def __call__(self, hs, routing: Routing, cos, sin, meta: mask_lib.TokenMeta):
    c, lc = self.config, self.config.llm
    q, k, v = expert_qkv(c, self.num, hs)
    q, k, v = (_stop_und(t, c.freeze_und) for t in (q, k, v))
    q, k, v = routing.combine(q), routing.combine(k), routing.combine(v)
    q = layers.constrain(apply_rope(q, cos, sin), ("activation_batch", "activation_length", "activation_heads",
                                                  "head_dim"))
    k = layers.constrain(apply_rope(k, cos, sin), ("activation_batch", "activation_length",
                                                  "activation_kv_heads", "head_dim"))
    v = layers.constrain(v, ("activation_batch", "activation_length", "activation_kv_heads", "head_dim"))
    out = attention_lib.attention(q, k, v, meta, meta, impl=c.attention_impl,
                                  scale=1.0 / math.sqrt(lc.head_dim))
    out = checkpoint_name(out, "attn_out")
    return _stop_und(expert_o_proj(c, self.num, routing, out), c.freeze_und)


class SwiGLU(nn.Module):
  """down(silu(gate(x)) * up(x)), per expert buffer."""
  config: BagelConfig
  num: int

  @nn.compact
  def __call__(self, hs):
    c, lc = self.config, self.config.llm
    kw = dict(num=self.num, dtype=c.dtype, param_dtype=c.param_dtype, use_bias=False)
    d, f = (lc.hidden_size,), (lc.intermediate_size,)
    gate = ExpertLinear(in_shape=d, out_shape=f, in_axes=(EMBED,), out_axes=("mlp",), name="gate_proj", **kw)(hs)
    up = ExpertLinear(in_shape=d, out_shape=f, in_axes=(EMBED,), out_axes=("mlp",), name="up_proj", **kw)(hs)
    act = [layers.constrain(jax.nn.silu(g) * u, ("activation_batch", "activation_length", "activation_mlp"))
           for g, u in zip(gate, up)]
    return ExpertLinear(in_shape=f, out_shape=d, in_axes=("mlp",), out_axes=(EMBED,), name="down_proj",
                        **kw)(act)


class TopKMoE(nn.Module):
  """Token-choice top-k MoE FFN with a learned router, per-row expert capacity and the Switch load-balancing
  loss. Tokens over capacity skip the FFN (residual only) and are counted.

  Capacity per row C = ceil(capacity_factor * k * L / X); the expert matmuls run on X * C slots, so active
  FLOPs per token are k * F_e * capacity_factor of one FFN of width F_e.
  """
  config: BagelConfig

  @nn.compact
  def __call__(self, x, valid):
    c, lc = self.config, self.config.llm
    b, l, d = x.shape
    n_exp, k, f = lc.num_experts, lc.experts_per_token, lc.moe_intermediate_size
    cap = max(1, int(math.ceil(lc.capacity_factor * k * l / n_exp)))
    pdt, dt = layers.dtype_of(c.param_dtype), layers.dtype_of(c.dtype)
    router = layers.param(self, "router", layers.normal_init, (d, n_exp), (EMBED, "exp"), pdt)
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
    w_gate = layers.param(self, "gate_proj", layers.normal_init, (n_exp, d, f), ("exp", EMBED, "mlp"), pdt)
    w_up = layers.param(self, "up_proj", layers.normal_init, (n_exp, d, f), ("exp", EMBED, "mlp"), pdt)
    w_down = layers.param(self, "down_proj", layers.normal_init, (n_exp, f, d), ("exp", "mlp", EMBED), pdt)
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


# ----------------------------------------------------------------------------------------------------------
# Decoder layer and stack.
# ----------------------------------------------------------------------------------------------------------

def post_attention_mlp(c: BagelConfig, x, routing: Routing, valid):
  """The layer's second half, post-attention norm then MLP, per layer variant (inside a compact `__call__`, so
  training and cached decoding own the same parameters). Returns (y, aux losses); `valid`: non-padding tokens."""
  lc = c.llm
  n = expert_counts(lc.layer_variant)
  if lc.layer_variant == "moe_topk":
    h = ExpertRMSNorm(1, lc.hidden_size, EMBED, lc.rms_norm_eps, name="post_attention_layernorm")([x])[0]
    return TopKMoE(c, name="mlp")(h, valid)
  if n["attn"] == 2:   # mot: routed norm, routed MLP
    hs = ExpertRMSNorm(2, lc.hidden_size, EMBED, lc.rms_norm_eps, name="post_attention_layernorm")(
        routing.dispatch(x, 2))
  else:                # dense / moe: shared norm, then (moe) routed MLP
    h = ExpertRMSNorm(1, lc.hidden_size, EMBED, lc.rms_norm_eps, name="post_attention_layernorm")([x])[0]
    hs = routing.dispatch(h, n["mlp"])
  return routing.combine(_stop_und(SwiGLU(c, n["mlp"], name="mlp")(hs), c.freeze_und)), {}


class DecoderLayer(nn.Module):
  config: BagelConfig

  @nn.compact
  def __call__(self, x, routing: Routing, cos, sin, meta: mask_lib.TokenMeta):
    c, lc = self.config, self.config.llm
    n = expert_counts(lc.layer_variant)
    act_axes = ("activation_batch", "activation_length", "activation_embed")
    x = checkpoint_name(layers.constrain(x, act_axes), "layer_input")  # what "offload_layer_inputs" sends to host
    hs = ExpertRMSNorm(n["attn"], lc.hidden_size, EMBED, lc.rms_norm_eps, name="input_layernorm")(
        routing.dispatch(x, n["attn"]))
    o = Attention(c, n["attn"], name="self_attn")(hs, routing, cos, sin, meta)
    x = x + routing.combine(o)

    y, aux = post_attention_mlp(c, x, routing, meta.document > 0)
    y = checkpoint_name(y, "mlp_out")
    return layers.constrain(x + y, act_axes), aux


class Qwen2LM(nn.Module):
  """Token embedding, decoder stack, routed final norm and an untied LM head."""
  config: BagelConfig

  def setup(self):
    c, lc = self.config, self.config.llm
    self.embed_tokens = nn.Embed(
        lc.vocab_size, lc.hidden_size, dtype=layers.dtype_of(c.dtype), param_dtype=layers.dtype_of(c.param_dtype),
        embedding_init=nn.with_logical_partitioning(layers.normal_init, ("vocab", EMBED)))
    block = layers.maybe_remat(DecoderLayer, c.remat_policy)
    if c.scan_layers:
      # DecoderLayer already has the (carry, *broadcast) -> (carry, per-layer aux) form nn.scan wants.
      self.layers = nn.scan(
          block, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(nn.broadcast,) * 4, length=lc.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"})(c)
    else:
      self.layers = [block(c, name=f"layers_{i}") for i in range(lc.num_layers)]
    self.norm = ExpertRMSNorm(expert_counts(lc.layer_variant)["final_norm"], lc.hidden_size, EMBED,
                              lc.rms_norm_eps)
    self.lm_head = LMHead(c)

  def embed(self, ids):
    return self.embed_tokens(ids)

  def __call__(self, x, routing: Routing, positions, meta: mask_lib.TokenMeta):
    """x: embedded row [B, L, D] -> final-normed hidden states [B, L, D], per-layer aux (summed)."""
    lc = self.config.llm
    cos, sin = rope_tables(positions, lc.head_dim, lc.rope_theta, layers.dtype_of(self.config.dtype))
    if self.config.scan_layers:
      x, aux = self.layers(x, routing, cos, sin, meta)
      aux = jax.tree.map(jnp.sum, aux)
    else:
      aux_list = []
      for layer in self.layers:
        x, a = layer(x, routing, cos, sin, meta)
        aux_list.append(a)
      aux = jax.tree.map(lambda *a: sum(a), *aux_list) if aux_list and aux_list[0] else {}
    num = expert_counts(lc.layer_variant)["final_norm"]
    h = routing.combine(_stop_und(self.norm(routing.dispatch(x, num)), self.config.freeze_und))
    return h, aux

  def text_logits(self, ids):
    """Plain causal LM over text ids [B, L] (one document per row, und expert): for parity with HF Qwen2."""
    b, l = ids.shape
    ones = jnp.ones((b, l), jnp.int32)
    meta = mask_lib.TokenMeta.from_row(ones, ones, jnp.zeros_like(ones) + mask_lib.CAUSAL)
    positions = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    h, _ = self(self.embed(ids), Routing.all_und(b, l, self.config.routing == "dense"), positions, meta)
    return self.logits(h)

  def ce_loss(self, h, targets, weights):
    return self.lm_head(h, targets, weights)

  def logits(self, h):
    return self.lm_head(h)


class LMHead(nn.Module):
  """Untied `lm_head` [D, V]. With targets, returns (weighted CE sum, weight sum) without keeping the
  [B, N, V] logits alive beyond one chunk when `ce_chunk_size` > 0."""
  config: BagelConfig

  @nn.compact
  def __call__(self, h, targets=None, weights=None):
    c, lc = self.config, self.config.llm
    kernel = layers.param(self, "kernel", layers.normal_init, (lc.hidden_size, lc.vocab_size), (EMBED, "vocab"),
                          layers.dtype_of(c.param_dtype))
    dt = layers.dtype_of(c.dtype)

    def logits_of(hc):
      return jnp.einsum("bnd,dv->bnv", hc.astype(dt), kernel.astype(dt), preferred_element_type=jnp.float32)

    if targets is None:
      return logits_of(h)

    def ce_of(hc, tc, wc):
      lg = logits_of(hc)
      lse = jax.nn.logsumexp(lg, axis=-1)
      tgt = jnp.take_along_axis(lg, tc[..., None], axis=-1)[..., 0]
      return jnp.sum((lse - tgt) * wc)

    n = h.shape[1]
    chunk = c.ce_chunk_size
    if chunk <= 0 or chunk >= n:
      return ce_of(h, targets, weights), jnp.sum(weights)
    pad = (-n) % chunk
    hp = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    tp = jnp.pad(targets, ((0, 0), (0, pad)))
    wp = jnp.pad(weights, ((0, 0), (0, pad)))
    nch = (n + pad) // chunk
    split = lambda a: jnp.moveaxis(a.reshape((a.shape[0], nch, chunk) + a.shape[2:]), 1, 0)
    per_chunk = jax.lax.map(lambda args: jax.checkpoint(ce_of)(*args), (split(hp), split(tp), split(wp)))
    return jnp.sum(per_chunk), jnp.sum(weights)
