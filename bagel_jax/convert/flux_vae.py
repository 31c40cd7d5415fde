"""FLUX AutoEncoder tensors (BFL `ae.safetensors` or diffusers `AutoencoderKL`) <-> our VAE parameter tree.

Conversion walks our abstract parameter tree, so every parameter is read exactly once and anything left in the
source raises. The BAGEL release ships no VAE config: `config_from_bfl_shapes` infers the architecture from
tensor shapes alone; what shapes cannot tell (latent scale/shift, GroupNorm groups) comes from flags, else from
the metadata our `export` writes into `ae.safetensors` (`vae_metadata`), else FLUX's values.
"""
from __future__ import annotations

import json
import re
from typing import Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bagel_jax.convert.common import (ConversionError, Plan, TensorSource, claim_plan, conv_to_kernel,
                                      export_tensors, flatten, kernel_to_conv, kernel_to_linear, linear_to_kernel,
                                      materialize, single)
from bagel_jax.models.config import VAEConfig
from bagel_jax.models.flux_vae import FluxAutoEncoder

FLUX_SCALE, FLUX_SHIFT, FLUX_NUM_GROUPS = 0.3611, 0.1159, 32
# `__metadata__` key of an exported ae.safetensors (a JSON string; loaders of the official format ignore it).
VAE_METADATA_KEY = "bagel_jax.vae"


def abstract_vae_params(cfg: VAEConfig) -> Dict[str, jax.ShapeDtypeStruct]:
  f = cfg.downsample
  tree = jax.eval_shape(FluxAutoEncoder(cfg).init, jax.random.key(0), jnp.zeros((1, 2 * f, 2 * f, cfg.in_channels)))
  return flatten(nn.unbox(tree)["params"])


def bfl_name(path: str) -> str:
  """'encoder/down_1/block_0/conv1/kernel' -> 'encoder.down.1.block.0.conv1.weight'; the mid blocks keep
  BFL's underscore ('encoder.mid.block_1.conv1.weight', 'encoder.mid.attn_1.q.weight')."""
  parts = path.split("/")
  leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[parts[-1]]
  mods = [p if i and parts[i - 1] == "mid" else re.sub(r"^(down|up|block)_(\d+)$", r"\1.\2", p)
          for i, p in enumerate(parts[:-1])]
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


def flux_plan(cfg: VAEConfig, naming: str = "bfl") -> Plan:
  """Our VAE paths -> BFL (`ae.safetensors`) or diffusers `AutoencoderKL` names, walking the abstract tree so
  every parameter is planned exactly once."""
  if naming not in ("bfl", "diffusers"):
    raise ValueError(f"unknown FLUX AE naming {naming!r}")
  plan: Plan = {}
  for path, sd in abstract_vae_params(cfg).items():
    name, linear = (bfl_name(path), False) if naming == "bfl" else diffusers_name(path, cfg)
    shape = tuple(sd.shape)
    if not path.endswith("/kernel"):
      plan[path] = single(name, shape, shape)
    elif linear:  # diffusers attention projections are Linear [C, C]
      plan[path] = single(name, (shape[3], shape[2]), shape, lambda w: linear_to_kernel(w)[None, None],
                          lambda k: kernel_to_linear(k[0, 0]))
    else:
      kh, kw, cin, cout = shape
      plan[path] = single(name, (cout, cin, kh, kw), shape, conv_to_kernel, kernel_to_conv)
  return plan


def _from_source(src: TensorSource, cfg: VAEConfig, naming: str, dtype) -> Dict:
  plan = flux_plan(cfg, naming)
  claim_plan(plan, src)
  src.finish()
  return materialize(plan, src, dtype)


def flux_ae_from_bfl(tensors: Mapping[str, np.ndarray], cfg: VAEConfig, dtype=np.float32) -> Dict:
  return _from_source(TensorSource(tensors, what="ae.safetensors"), cfg, "bfl", dtype)


def flux_ae_from_diffusers(tensors: Mapping[str, np.ndarray], cfg: VAEConfig, dtype=np.float32) -> Dict:
  src = TensorSource(tensors, what="diffusers AutoencoderKL")
  ignore_diffusers_extras(src)
  return _from_source(src, cfg, "diffusers", dtype)


def ignore_diffusers_extras(src: TensorSource) -> None:
  """FLUX's AutoencoderKL has no quant convs; an SD-style VAE with them is a different model, not a layout."""
  quant = [k for k in src.keys() if k.startswith(("quant_conv.", "post_quant_conv."))]
  if quant:
    raise ConversionError(f"{src.what}: has {quant[:2]}: an AutoencoderKL with quant convs is not FLUX's "
                          f"autoencoder (use_quant_conv must be False)")


def flux_ae_to_bfl(params: Mapping, cfg: VAEConfig) -> Dict[str, np.ndarray]:
  """Our VAE tree -> BFL names and PyTorch layouts."""
  return {name: produce() for name, _, produce in export_tensors(flux_plan(cfg, "bfl"), flatten(params))}


def config_from_diffusers(hf: Mapping, scale_factor: Optional[float] = None,
                          shift_factor: Optional[float] = None) -> VAEConfig:
  """VAEConfig from a diffusers `AutoencoderKL` config.json (FLUX's has scaling 0.3611, shift 0.1159)."""
  blocks = [int(c) for c in hf["block_out_channels"]]
  if any(c % blocks[0] for c in blocks):
    raise ConversionError(f"AutoencoderKL block_out_channels {blocks} are not multiples of the first")
  if hf.get("use_quant_conv", True) or hf.get("use_post_quant_conv", True):
    raise ConversionError("AutoencoderKL with use_quant_conv / use_post_quant_conv is not FLUX's autoencoder")
  # diffusers' own defaults: scaling 0.18215, no shift (FLUX's config sets 0.3611 / 0.1159 explicitly).
  scale = hf.get("scaling_factor", 0.18215) if scale_factor is None else scale_factor
  shift = (hf.get("shift_factor") or 0.0) if shift_factor is None else shift_factor
  return VAEConfig(ch=blocks[0], ch_mult=tuple(c // blocks[0] for c in blocks),
                   num_res_blocks=int(hf.get("layers_per_block", 2)), z_channels=int(hf.get("latent_channels", 16)),
                   in_channels=int(hf.get("in_channels", 3)), out_channels=int(hf.get("out_channels", 3)),
                   scale_factor=float(scale), shift_factor=float(shift),
                   num_groups=int(hf.get("norm_num_groups", 32)))


def config_from_bfl_shapes(shapes: Mapping[str, tuple], scale_factor: float = 0.3611, shift_factor: float = 0.1159,
                           num_groups: int = 32) -> VAEConfig:
  """Infers ch, ch_mult, num_res_blocks, z and in/out channels from BFL tensor shapes (no VAE config ships with
  BAGEL); scale/shift and GroupNorm groups are not visible in shapes and come from the arguments."""
  try:
    ch, in_ch = shapes["encoder.conv_in.weight"][:2]
    z2 = shapes["encoder.conv_out.weight"][0]
    out_ch = shapes["decoder.conv_out.weight"][0]
  except KeyError as e:
    raise ConversionError(f"not a FLUX AutoEncoder checkpoint: missing {e.args[0]}") from e
  levels = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
  if levels != list(range(len(levels))) or not levels:
    raise ConversionError(f"FLUX AE: encoder levels {levels} are not 0..n-1")
  mult = tuple(int(shapes[f"encoder.down.{i}.block.0.conv1.weight"][0]) // int(ch) for i in levels)
  blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
  return VAEConfig(ch=int(ch), ch_mult=mult, num_res_blocks=len(blocks), z_channels=int(z2) // 2,
                   in_channels=int(in_ch), out_channels=int(out_ch), scale_factor=scale_factor,
                   shift_factor=shift_factor, num_groups=num_groups)


def vae_metadata(cfg: VAEConfig) -> Dict[str, str]:
  """What `config_from_bfl_shapes` cannot infer, for the `__metadata__` of an exported `ae.safetensors`."""
  return {VAE_METADATA_KEY: json.dumps(dict(scale_factor=cfg.scale_factor, shift_factor=cfg.shift_factor,
                                            num_groups=cfg.num_groups))}


def config_from_bfl_source(src: TensorSource, scale_factor: Optional[float] = None,
                           shift_factor: Optional[float] = None, num_groups: Optional[int] = None) -> VAEConfig:
  """`config_from_bfl_shapes` for a BFL file: each of scale, shift and groups from its argument, else the
  file's `vae_metadata` (our exports), else FLUX's 0.3611 / 0.1159 / 32."""
  stored = {}
  if VAE_METADATA_KEY in src.metadata:
    try:
      stored = dict(json.loads(src.metadata[VAE_METADATA_KEY]))
    except (TypeError, ValueError) as e:
      raise ConversionError(f"{src.what}: unreadable {VAE_METADATA_KEY!r} metadata: {e}") from e
  pick = lambda arg, key, default: arg if arg is not None else type(default)(stored.get(key, default))
  return config_from_bfl_shapes({k: src.shape(k) for k in src.keys()},
                                pick(scale_factor, "scale_factor", FLUX_SCALE),
                                pick(shift_factor, "shift_factor", FLUX_SHIFT),
                                pick(num_groups, "num_groups", FLUX_NUM_GROUPS))
