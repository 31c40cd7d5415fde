"""FLUX AutoEncoder tensors (BFL `ae.safetensors` or diffusers `AutoencoderKL`) <-> our VAE parameter tree.

Conversion walks our abstract parameter tree, so every parameter is read exactly once and anything left in the
source raises. The BAGEL release ships no VAE config: `config_from_bfl_shapes` infers the architecture from
tensor shapes alone.
"""
from __future__ import annotations

import re
from typing import Dict, Mapping, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bagel_jax.convert.common import (TensorSource, conv_to_kernel, flatten, kernel_to_conv, linear_to_kernel,
                                      set_path)
from bagel_jax.models.config import VAEConfig
from bagel_jax.models.flux_vae import FluxAutoEncoder


def abstract_vae_params(cfg: VAEConfig) -> Dict[str, jax.ShapeDtypeStruct]:
  f = cfg.downsample
  tree = jax.eval_shape(FluxAutoEncoder(cfg).init, jax.random.key(0), jnp.zeros((1, 2 * f, 2 * f, cfg.in_channels)))
  return flatten(nn.unbox(tree)["params"])


def bfl_name(path: str) -> str:
  """'encoder/down_1/block_0/conv1/kernel' -> 'encoder.down.1.block.0.conv1.weight'."""
  parts = path.split("/")
  leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[parts[-1]]
  mods = [re.sub(r"^(down|up|block)_(\d+)$", r"\1.\2", p) for p in parts[:-1]]
  return ".".join(mods + [leaf])


def diffusers_name(path: str, cfg: VAEConfig) -> Tuple[str, bool]:
  """Our path -> (diffusers name, whether the diffusers tensor is a Linear rather than a conv)."""
  n_levels = len(cfg.ch_mult)
  parts = path.split("/")
  leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[parts[-1]]
  side, mods = parts[0], parts[1:-1]
  out, linear = [side], False
  i = 0
  while i < len(mods):
    m = mods[i]
    if m == "mid":
      sub = mods[i + 1]
      if sub.startswith("block_"):
        out += ["mid_block", "resnets", str(int(sub[-1]) - 1)]
      else:  # attn_1/<proj>
        proj = mods[i + 2]
        out += ["mid_block", "attentions", "0"] + {"norm": ["group_norm"], "q": ["to_q"], "k": ["to_k"],
                                                   "v": ["to_v"], "proj_out": ["to_out", "0"]}[proj]
        linear = proj != "norm"
        i += 1
      i += 2
      continue
    g = re.match(r"^(down|up)_(\d+)$", m)
    if g:
      level = int(g.group(2))
      out += (["down_blocks", str(level)] if g.group(1) == "down" else ["up_blocks", str(n_levels - 1 - level)])
    elif m.startswith("block_"):
      out += ["resnets", m.split("_")[1]]
    elif m in ("downsample", "upsample"):
      out += [m + "rs", "0"]
    elif m == "nin_shortcut":
      out.append("conv_shortcut")
    elif m == "norm_out":
      out.append("conv_norm_out")
    else:
      out.append(m)
    i += 1
  return ".".join(out + [leaf]), linear


def _from_source(src: TensorSource, cfg: VAEConfig, name_of, dtype) -> Dict:
  params: Dict = {}
  for path, sd in abstract_vae_params(cfg).items():
    name, linear = name_of(path)
    leaf = path.rsplit("/", 1)[1]
    if leaf == "kernel":
      if linear:  # diffusers attention projections are Linear [C, C]
        value = linear_to_kernel(src.take(name, (sd.shape[3], sd.shape[2])))[None, None]
      else:
        kh, kw, cin, cout = sd.shape
        value = conv_to_kernel(src.take(name, (cout, cin, kh, kw)))
    else:
      value = src.take(name, sd.shape)
    set_path(params, path, np.asarray(value, dtype))
  src.finish()
  return params


def flux_ae_from_bfl(tensors: Mapping[str, np.ndarray], cfg: VAEConfig, dtype=np.float32) -> Dict:
  return _from_source(TensorSource(tensors, what="ae.safetensors"), cfg, lambda p: (bfl_name(p), False), dtype)


def flux_ae_from_diffusers(tensors: Mapping[str, np.ndarray], cfg: VAEConfig, dtype=np.float32) -> Dict:
  src = TensorSource(tensors, what="diffusers AutoencoderKL")
  src.ignore(*[k for k in tensors if k.startswith(("quant_conv.", "post_quant_conv."))])
  return _from_source(src, cfg, lambda p: diffusers_name(p, cfg), dtype)


def flux_ae_to_bfl(params: Mapping, cfg: VAEConfig) -> Dict[str, np.ndarray]:
  """Our VAE tree -> BFL names and PyTorch layouts."""
  out = {}
  for path, value in flatten(params).items():
    value = np.asarray(value)
    out[bfl_name(path)] = kernel_to_conv(value) if path.endswith("/kernel") else value
  return out


def config_from_bfl_shapes(shapes: Mapping[str, tuple], scale_factor: float = 0.3611, shift_factor: float = 0.1159,
                           num_groups: int = 32) -> VAEConfig:
  """Infers ch, ch_mult, num_res_blocks, z and in/out channels from BFL tensor shapes (no VAE config ships with
  BAGEL); scale/shift and GroupNorm groups are not visible in shapes and come from the arguments."""
  try:
    ch, in_ch = shapes["encoder.conv_in.weight"][:2]
    z2 = shapes["encoder.conv_out.weight"][0]
    out_ch = shapes["decoder.conv_out.weight"][0]
  except KeyError as e:
    raise ValueError(f"not a FLUX AutoEncoder checkpoint: missing {e.args[0]}") from e
  levels = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
  if levels != list(range(len(levels))) or not levels:
    raise ValueError(f"FLUX AE: encoder levels {levels} are not 0..n-1")
  mult = tuple(int(shapes[f"encoder.down.{i}.block.0.conv1.weight"][0]) // int(ch) for i in levels)
  blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
  return VAEConfig(ch=int(ch), ch_mult=mult, num_res_blocks=len(blocks), z_channels=int(z2) // 2,
                   in_channels=int(in_ch), out_channels=int(out_ch), scale_factor=scale_factor,
                   shift_factor=shift_factor, num_groups=num_groups)
