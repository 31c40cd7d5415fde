"""The FLUX (BFL) AutoEncoder, NHWC, frozen in BAGEL (reference §3.1-3.2).

Parameter names mirror BFL's `ae.safetensors` (`encoder.down.{i}.block.{j}.conv1` -> `encoder/down_{i}/block_{j}/
conv1`), so conversion is a rename plus layout transposes. Latents are sampled from the posterior at encode time
when an rng is given (BAGEL does this in training and inference), then scaled/shifted.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bagel_jax.models import layers
from bagel_jax.models.config import VAEConfig

CONV_AXES = ("conv_h", "conv_w", "conv_in", "conv_out")


def swish(x):
  return x * jax.nn.sigmoid(x)


class Conv(nn.Module):
  features: int
  kernel: int = 3
  stride: int = 1
  padding: object = "SAME"
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    cin = x.shape[-1]
    fan_in = cin * self.kernel * self.kernel
    init = layers.torch_linear_init((0, 1, 2))
    w = layers.param(self, "kernel", init, (self.kernel, self.kernel, cin, self.features), CONV_AXES,
                     layers.dtype_of(self.param_dtype))
    bound = 1.0 / math.sqrt(fan_in)
    b = layers.param(self, "bias", lambda k, s, d: jax.random.uniform(k, s, d, -bound, bound), (self.features,),
                     ("conv_out",), layers.dtype_of(self.param_dtype))
    dt = layers.dtype_of(self.dtype)
    y = jax.lax.conv_general_dilated(x.astype(dt), w.astype(dt), (self.stride, self.stride), self.padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + b.astype(dt)


class GroupNorm(nn.Module):
  num_groups: int
  eps: float

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = layers.param(self, "scale", layers.ones_init, (c,), ("conv_out",), jnp.float32)
    bias = layers.param(self, "bias", layers.zeros_init, (c,), ("conv_out",), jnp.float32)
    xf = x.astype(jnp.float32)
    g = xf.reshape(x.shape[:-1] + (self.num_groups, c // self.num_groups))
    axes = tuple(range(1, g.ndim - 2)) + (g.ndim - 1,)
    mean = g.mean(axes, keepdims=True)
    var = jnp.square(g - mean).mean(axes, keepdims=True)
    y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
    return (y * scale + bias).astype(x.dtype)


class ResnetBlock(nn.Module):
  cfg: VAEConfig
  out_ch: int
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype)
    h = Conv(self.out_ch, name="conv1", **kw)(swish(GroupNorm(self.cfg.num_groups, self.cfg.eps, name="norm1")(x)))
    h = Conv(self.out_ch, name="conv2", **kw)(swish(GroupNorm(self.cfg.num_groups, self.cfg.eps, name="norm2")(h)))
    if x.shape[-1] != self.out_ch:
      x = Conv(self.out_ch, kernel=1, padding="VALID", name="nin_shortcut", **kw)(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head spatial self-attention with 1x1-conv projections."""
  cfg: VAEConfig
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    n, hh, ww, c = x.shape
    h = GroupNorm(self.cfg.num_groups, self.cfg.eps, name="norm")(x)
    conv = lambda name: Conv(c, kernel=1, padding="VALID", name=name, dtype=self.dtype)
    q, k, v = (conv(nm)(h).reshape(n, hh * ww, c) for nm in ("q", "k", "v"))
    logits = jnp.einsum("nqc,nkc->nqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(c)
    out = jnp.einsum("nqk,nkc->nqc", jax.nn.softmax(logits, -1).astype(v.dtype), v).reshape(n, hh, ww, c)
    return x + conv("proj_out")(out)


class Downsample(nn.Module):
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))  # BFL pads right/bottom only
    return Conv(x.shape[-1], stride=2, padding="VALID", name="conv", dtype=self.dtype)(x)


class Upsample(nn.Module):
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest x2
    return Conv(x.shape[-1], name="conv", dtype=self.dtype)(x)


class Mid(nn.Module):
  cfg: VAEConfig
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = ResnetBlock(self.cfg, c, name="block_1", dtype=self.dtype)(x)
    x = AttnBlock(self.cfg, name="attn_1", dtype=self.dtype)(x)
    return ResnetBlock(self.cfg, c, name="block_2", dtype=self.dtype)(x)


class Encoder(nn.Module):
  cfg: VAEConfig
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    c, kw = self.cfg, dict(dtype=self.dtype)
    h = Conv(c.ch, name="conv_in", **kw)(x)
    for i, mult in enumerate(c.ch_mult):
      h = _Level(c, mult, down=i != len(c.ch_mult) - 1, name=f"down_{i}", **kw)(h)
    h = Mid(c, name="mid", **kw)(h)
    h = swish(GroupNorm(c.num_groups, c.eps, name="norm_out")(h))
    return Conv(2 * c.z_channels, name="conv_out", **kw)(h)


class _Level(nn.Module):
  """One encoder resolution level: `num_res_blocks` ResnetBlocks then an optional Downsample."""
  cfg: VAEConfig
  mult: int
  down: bool
  dtype: str = "float32"

  @nn.compact
  def __call__(self, h):
    for j in range(self.cfg.num_res_blocks):
      h = ResnetBlock(self.cfg, self.cfg.ch * self.mult, name=f"block_{j}", dtype=self.dtype)(h)
    if self.down:
      h = Downsample(name="downsample", dtype=self.dtype)(h)
    return h


class _UpLevel(nn.Module):
  cfg: VAEConfig
  mult: int
  up: bool
  dtype: str = "float32"

  @nn.compact
  def __call__(self, h):
    for j in range(self.cfg.num_res_blocks + 1):
      h = ResnetBlock(self.cfg, self.cfg.ch * self.mult, name=f"block_{j}", dtype=self.dtype)(h)
    if self.up:
      h = Upsample(name="upsample", dtype=self.dtype)(h)
    return h


class Decoder(nn.Module):
  cfg: VAEConfig
  dtype: str = "float32"

  @nn.compact
  def __call__(self, z):
    c, kw = self.cfg, dict(dtype=self.dtype)
    h = Conv(c.ch * c.ch_mult[-1], name="conv_in", **kw)(z)
    h = Mid(c, name="mid", **kw)(h)
    for i in reversed(range(len(c.ch_mult))):
      h = _UpLevel(c, c.ch_mult[i], up=i != 0, name=f"up_{i}", **kw)(h)
    h = swish(GroupNorm(c.num_groups, c.eps, name="norm_out")(h))
    return Conv(c.out_channels, name="conv_out", **kw)(h)


class FluxAutoEncoder(nn.Module):
  config: VAEConfig
  dtype: str = "float32"
  param_dtype: str = "float32"

  def setup(self):
    self.encoder = Encoder(self.config, dtype=self.dtype)
    self.decoder = Decoder(self.config, dtype=self.dtype)

  def encode_moments(self, images):
    """images [N, H, W, C] in [-1, 1] -> posterior mean, logvar [N, H/f, W/f, z] (before scale/shift)."""
    moments = self.encoder(images).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, logvar

  def encode(self, images, rng=None):
    """Scaled/shifted latents; a posterior sample when `rng` is given (as BAGEL trains), else the mean."""
    mean, logvar = self.encode_moments(images)
    z = mean if rng is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
    return self.config.scale_factor * (z - self.config.shift_factor)

  def decode(self, z):
    return self.decoder(z / self.config.scale_factor + self.config.shift_factor)

  def __call__(self, images):
    return self.decode(self.encode(images))


def patchify_latents(z, p: int):
  """[N, H, W, c] latents -> [N, (H/p)*(W/p), p*p*c] tokens: raster token order, (p, q, c) inside a token."""
  n, hh, ww, c = z.shape
  h, w = hh // p, ww // p
  t = z[:, :h * p, :w * p].reshape(n, h, p, w, p, c)
  return t.transpose(0, 1, 3, 2, 4, 5).reshape(n, h * w, p * p * c)


def unpatchify_latents(tokens, h: int, w: int, p: int, c: int):
  """Inverse of `patchify_latents`: [N, h*w, p*p*c] -> [N, h*p, w*p, c]."""
  n = tokens.shape[0]
  t = tokens.reshape(n, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return t.reshape(n, h * p, w * p, c)


def init_vae_params(cfg: VAEConfig, rng):
  """Parameters with the module's own init rules (PyTorch defaults: conv kernel and bias U(+-1/sqrt(fan_in)),
  GroupNorm scale 1 and bias 0) built on the host from abstract shapes. The VAE is frozen and normally loaded
  from a checkpoint; tracing its convs (or ~100 threefry calls) only to create parameters costs ~10 s of
  compilation on CPU."""
  f = cfg.downsample
  abstract = nn.unbox(jax.eval_shape(FluxAutoEncoder(cfg).init, jax.random.key(0),
                                     jnp.zeros((1, 2 * f, 2 * f, cfg.in_channels))))["params"]
  seed = int(jax.random.randint(rng, (), 0, 2 ** 31 - 1))
  gen = np.random.default_rng(seed)

  def init(path, sd):
    names = [p.key for p in path]
    if names[-1] == "scale":
      return np.ones(sd.shape, sd.dtype)
    if names[-1] == "bias" and (names[-2].startswith("norm") or names[-2] == "norm"):
      return np.zeros(sd.shape, sd.dtype)
    node = abstract
    for n in names[:-1]:
      node = node[n]
    bound = 1.0 / math.sqrt(int(np.prod(node["kernel"].shape[:-1])))
    return gen.uniform(-bound, bound, sd.shape).astype(sd.dtype)

  return jax.tree_util.tree_map_with_path(lambda p, x: jnp.asarray(init(p, x)), abstract)
