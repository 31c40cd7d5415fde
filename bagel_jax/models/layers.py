"""Small building blocks shared by the LLM, ViT and VAE modules.

Every parameter is created with logical axis names (`nn.with_logical_partitioning`) and every large
activation is constrained with logical names, so where things live is decided by the rules in
`bagel_jax/parallel/rules.py`, never here.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Axes = Tuple[Union[str, None], ...]

# Initialisers matching the PyTorch defaults the official code relies on.
normal_init = nn.initializers.normal(stddev=0.02)  # HF `_init_weights` for Linear / Embedding
zeros_init = nn.initializers.zeros_init()
ones_init = nn.initializers.ones_init()


def torch_linear_init(fan_in_axes: Sequence[int] = (-2,)):
  """PyTorch `nn.Linear` default (kaiming-uniform a=sqrt(5) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)))."""
  def init(key, shape, dtype=jnp.float32):
    fan_in = int(np.prod([shape[a] for a in fan_in_axes]))
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def dtype_of(name) -> jnp.dtype:
  return jnp.dtype(name)


def param(module: nn.Module, name: str, init, shape, axes: Axes, dtype):
  """A parameter annotated with logical axis names."""
  if len(axes) != len(shape):
    raise ValueError(f"{module.name}/{name}: {len(axes)} logical axes for shape {shape}")
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def constrain(x, axes: Axes):
  return nn.with_logical_constraint(x, axes)


def flat_matmul(x, kernel, n_in: int):
  """x [*lead, *in] @ kernel [*in, *out] -> [*lead, *out] as one 2-D matmul [prod(lead), prod(in)] x
  [prod(in), prod(out)] (the reshapes are bitcasts).

  Why not one dot_general over the original axes: its weight gradient contracts several token axes
  (batch and length), which XLA's CPU backend canonicalises with transposing copies of the cotangent fused
  with the elementwise ops before it, a slow loop on CPU (docs/cpu_performance.md); a single flat token axis
  gives a plain transposed-operand matmul. Numerically the same contraction.
  """
  lead, ins, outs = x.shape[:x.ndim - n_in], kernel.shape[:n_in], kernel.shape[n_in:]
  if kernel.ndim == n_in + 1 and len(lead) == 1 and n_in == 1:
    return x @ kernel
  y = x.reshape(math.prod(lead), math.prod(ins)) @ kernel.reshape(math.prod(ins), math.prod(outs))
  return y.reshape(lead + outs)


class Linear(nn.Module):
  """y = x @ kernel + bias, contracting the last `len(in_shape)` axes of x.

  kernel shape = in_shape + out_shape (Flax layout; PyTorch [out, in] transposed), e.g. q_proj:
  [embed] -> [heads, head_dim].
  """
  in_shape: Tuple[int, ...]
  out_shape: Tuple[int, ...]
  in_axes: Axes
  out_axes: Axes
  use_bias: bool = True
  dtype: str = "float32"
  param_dtype: str = "float32"
  kernel_init: object = None
  bias_init: object = zeros_init

  @nn.compact
  def __call__(self, x):
    n_in = len(self.in_shape)
    init = self.kernel_init or torch_linear_init(tuple(range(n_in)))
    kernel = param(self, "kernel", init, tuple(self.in_shape) + tuple(self.out_shape),
                   tuple(self.in_axes) + tuple(self.out_axes), dtype_of(self.param_dtype))
    dt = dtype_of(self.dtype)
    y = flat_matmul(x.astype(dt), kernel.astype(dt), n_in)
    if self.use_bias:
      bias = param(self, "bias", self.bias_init, tuple(self.out_shape), tuple(self.out_axes),
                   dtype_of(self.param_dtype))
      y = y + bias.astype(dt)
    return y


class LayerNorm(nn.Module):
  """LayerNorm with `scale`/`bias` (PyTorch weight/bias), statistics in fp32."""
  features: int
  axis_name: str
  eps: float = 1e-6
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    scale = param(self, "scale", ones_init, (self.features,), (self.axis_name,), dtype_of(self.param_dtype))
    bias = param(self, "bias", zeros_init, (self.features,), (self.axis_name,), dtype_of(self.param_dtype))
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * scale + bias).astype(dtype_of(self.dtype))


def rms_norm(x, weight, eps: float):
  """Qwen2RMSNorm: normalise in fp32, cast back to the input dtype, then multiply by the weight."""
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
  return weight.astype(x.dtype) * y.astype(x.dtype)


def gelu_tanh(x):
  return jax.nn.gelu(x, approximate=True)


REMAT_POLICIES = {
    "full": None,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "minimal": jax.checkpoint_policies.save_only_these_names("attn_out", "mlp_out"),
    # nothing_saveable, but each decoder layer's input (the one residual it keeps per layer under scan: L x D
    # per layer per row) lives in host memory between forward and backward (MaxText's offloaded policies).
    "offload_layer_inputs": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=["layer_input"], offload_src="device",
        offload_dst="pinned_host"),
}


def maybe_remat(block_cls, policy: str, static_argnums=()):
  """Wraps a layer class with `nn.remat` under the named policy ("none" disables)."""
  if policy == "none":
    return block_cls
  return nn.remat(block_cls, policy=REMAT_POLICIES[policy], prevent_cse=False, static_argnums=static_argnums)


def sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
  """MAE/DiT 1-D sin-cos embedding: [sin(pos*omega), cos(pos*omega)], omega = 1/10000^(2i/d)."""
  omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
  omega = 1.0 / 10000 ** omega
  out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d_table(embed_dim: int, grid_size: int) -> np.ndarray:
  """Fixed 2-D table [grid*grid, d] indexed by row*grid + col; first half encodes the column, second half the
  row (official `get_2d_sincos_pos_embed`)."""
  if embed_dim % 4:
    raise ValueError(f"2-D sin-cos embedding needs a dim divisible by 4, got {embed_dim}")
  rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
  emb_col = sincos_1d(embed_dim // 2, cols)
  emb_row = sincos_1d(embed_dim // 2, rows)
  return np.concatenate([emb_col, emb_row], axis=1).astype(np.float32)


def sincos_2d_at(pos_ids, grid_size: int, embed_dim: int):
  """The row `pos_ids` of `sincos_2d_table(embed_dim, grid_size)`, computed on the fly in fp32.

  Same values as the table, without materialising [grid^2, d] constants in the program (70 MB at 7B).
  """
  if embed_dim % 4:
    raise ValueError(f"2-D sin-cos embedding needs a dim divisible by 4, got {embed_dim}")
  quarter = embed_dim // 4
  omega = 1.0 / 10000 ** (jnp.arange(quarter, dtype=jnp.float32) / quarter)

  def emb_1d(p):
    out = p.astype(jnp.float32)[..., None] * omega
    return jnp.concatenate([jnp.sin(out), jnp.cos(out)], axis=-1)

  return jnp.concatenate([emb_1d(pos_ids % grid_size), emb_1d(pos_ids // grid_size)], axis=-1)
