"""HF `SiglipVisionModel` tensors <-> `models/siglip.py` parameters (reference §8).

BAGEL stores the patch embedding already as a Linear [hidden, p*p*C] with (row, col, channel) input order;
stock SigLIP checkpoints store the Conv2d [hidden, C, p, p]. Both load; export always writes BAGEL's linear
layout. Only the first `config.num_layers` encoder layers are loaded (BAGEL runs 26 of 27 stored), the rest
and the unused pooling head are ignored explicitly so anything else left over is an error.
"""
from __future__ import annotations

import re
from typing import Dict, Mapping, Optional

import numpy as np

from bagel_jax.convert.common import TensorSource, flatten, kernel_to_linear, linear_to_kernel, set_path
from bagel_jax.models.config import ViTConfig

# SiglipVisionConfig defaults: BAGEL's vit_config.json relies on them for the activation and eps.
_HF_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
                    layer_norm_eps=1e-6)
_TANH_GELUS = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")


def config_from_hf(hf_config: Mapping, num_layers: Optional[int] = None) -> ViTConfig:
  """ViTConfig from a SigLIP vision config dict (or a full SiglipConfig dict with `vision_config`).

  `num_layers` is how many layers to run (BAGEL: num_hidden_layers - 1); None runs all of them.
  """
  cfg = dict(_HF_DEFAULTS)
  cfg.update(hf_config.get("vision_config", hf_config))
  if cfg["hidden_act"] not in _TANH_GELUS:
    raise ValueError(f"SigLIP hidden_act={cfg['hidden_act']!r} unsupported; the encoder implements tanh-GELU")
  image_size, patch_size = cfg["image_size"], cfg["patch_size"]
  if isinstance(image_size, (list, tuple)) or isinstance(patch_size, (list, tuple)):
    raise ValueError(f"non-square SigLIP image_size={image_size!r} / patch_size={patch_size!r} unsupported")
  stored = cfg["num_hidden_layers"]
  num_layers = stored if num_layers is None else num_layers
  if not 0 < num_layers <= stored:
    raise ValueError(f"num_layers={num_layers} must be in 1..num_hidden_layers={stored}")
  return ViTConfig(hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
                   num_heads=cfg["num_attention_heads"], num_layers=num_layers, patch_size=patch_size,
                   max_patches_per_side=image_size // patch_size, num_channels=cfg["num_channels"],
                   layer_norm_eps=float(cfg["layer_norm_eps"]))


def _layer_paths(config: ViTConfig, prefix: str, scan_layers: bool, j: int):
  """(hf name, our path, to-ours, to-hf, our per-layer shape) for every tensor of encoder layer j."""
  d, f, h, hd = config.hidden_size, config.intermediate_size, config.num_heads, config.head_dim
  src = f"{prefix}encoder.layers.{j}."
  dst = "encoder/layers/" if scan_layers else f"encoder/layers_{j}/"
  ident = lambda w: np.asarray(w)
  rows = []
  for norm in ("layer_norm1", "layer_norm2"):
    rows.append((f"{src}{norm}.weight", f"{dst}{norm}/scale", (d,), ident, ident, (d,)))
    rows.append((f"{src}{norm}.bias", f"{dst}{norm}/bias", (d,), ident, ident, (d,)))
  for n in "qkv":
    rows.append((f"{src}self_attn.{n}_proj.weight", f"{dst}self_attn/{n}_proj/kernel", (d, d),
                 lambda w: linear_to_kernel(w).reshape(d, h, hd), lambda k: kernel_to_linear(k.reshape(d, d)),
                 (d, h, hd)))
    rows.append((f"{src}self_attn.{n}_proj.bias", f"{dst}self_attn/{n}_proj/bias", (d,),
                 lambda b: np.asarray(b).reshape(h, hd), lambda b: b.reshape(d), (h, hd)))
  rows.append((f"{src}self_attn.out_proj.weight", f"{dst}self_attn/out_proj/kernel", (d, d),
               lambda w: linear_to_kernel(w).reshape(h, hd, d), lambda k: kernel_to_linear(k.reshape(d, d)),
               (h, hd, d)))
  rows.append((f"{src}self_attn.out_proj.bias", f"{dst}self_attn/out_proj/bias", (d,), ident, ident, (d,)))
  rows.append((f"{src}mlp.fc1.weight", f"{dst}mlp/fc1/kernel", (f, d), linear_to_kernel, kernel_to_linear, (d, f)))
  rows.append((f"{src}mlp.fc1.bias", f"{dst}mlp/fc1/bias", (f,), ident, ident, (f,)))
  rows.append((f"{src}mlp.fc2.weight", f"{dst}mlp/fc2/kernel", (d, f), linear_to_kernel, kernel_to_linear, (f, d)))
  rows.append((f"{src}mlp.fc2.bias", f"{dst}mlp/fc2/bias", (d,), ident, ident, (d,)))
  return rows


def _patch_kernel(src: TensorSource, name: str, config: ViTConfig) -> np.ndarray:
  d, p, ch = config.hidden_size, config.patch_size, config.num_channels
  shape = src.shape(name) if name in src else None
  if shape is not None and len(shape) == 4:
    w = src.take(name, (d, ch, p, p))
    # Conv [out, c, kh, kw] -> Linear [out, (kh, kw, c)], the order `patchify` flattens patches in.
    w = np.transpose(w, (0, 2, 3, 1)).reshape(d, p * p * ch)
  else:
    w = src.take(name, (d, p * p * ch))
  return linear_to_kernel(w)


def siglip_from_source(src: TensorSource, config: ViTConfig, prefix: str = "vision_model.",
                       scan_layers: bool = True) -> Dict:
  """Consumes the SigLIP tensors of `src` (and ignores the unused ones) without calling `finish()`, so a
  whole-model converter can share one source."""
  d = config.hidden_size
  params: Dict = {}
  e = f"{prefix}embeddings."
  set_path(params, "embeddings/patch_embedding/kernel", _patch_kernel(src, f"{e}patch_embedding.weight", config))
  set_path(params, "embeddings/patch_embedding/bias", src.take(f"{e}patch_embedding.bias", (d,)))
  set_path(params, "embeddings/position_embedding/embedding",
           src.take(f"{e}position_embedding.weight", (config.max_patches_per_side ** 2, d)))
  per_layer = [_layer_paths(config, prefix, scan_layers, j) for j in range(config.num_layers)]
  for i, (_, path, _, to_ours, _, _) in enumerate(per_layer[0]):
    values = [to_ours(src.take(rows[i][0], rows[i][2])) for rows in per_layer]
    if scan_layers:
      set_path(params, path, np.stack(values))
    else:
      for rows, v in zip(per_layer, values):
        set_path(params, rows[i][1], v)
  set_path(params, "post_layernorm/scale", src.take(f"{prefix}post_layernorm.weight", (d,)))
  set_path(params, "post_layernorm/bias", src.take(f"{prefix}post_layernorm.bias", (d,)))

  extra_layer = re.compile(re.escape(f"{prefix}encoder.layers.") + r"(\d+)\.")
  for name in src.keys():
    m = extra_layer.match(name)
    if (m and int(m.group(1)) >= config.num_layers) or name.startswith(f"{prefix}head.") \
        or name == f"{e}position_ids":  # non-persistent buffer that some older exports still contain
      src.ignore(name)
  return params


def siglip_from_hf(tensors: Mapping[str, np.ndarray], config: ViTConfig, prefix: str = "vision_model.",
                   scan_layers: bool = True) -> Dict:
  """{HF name: array} -> SiglipViT params (the tree under 'params'). Every tensor must be consumed or known
  to be unused; shape mismatches raise ValueError naming the tensor."""
  src = TensorSource(tensors, what="SigLIP checkpoint")
  params = siglip_from_source(src, config, prefix, scan_layers)
  src.finish()
  return params


def siglip_to_hf(params: Mapping, config: ViTConfig, prefix: str = "vision_model.") -> Dict[str, np.ndarray]:
  """SiglipViT params -> HF names, patch embedding in BAGEL's linear [hidden, p*p*C] layout. Accepts scanned or
  unscanned trees (detected from the names), unboxed."""
  if set(params) == {"params"}:
    params = params["params"]
  flat = {k: np.asarray(v) for k, v in flatten(params).items()}
  e = f"{prefix}embeddings."
  out = {
      f"{e}patch_embedding.weight": kernel_to_linear(flat.pop("embeddings/patch_embedding/kernel")),
      f"{e}patch_embedding.bias": flat.pop("embeddings/patch_embedding/bias"),
      f"{e}position_embedding.weight": flat.pop("embeddings/position_embedding/embedding"),
  }
  stacked = [k for k in flat if k.startswith("encoder/layers/")]
  scan_layers = bool(stacked)
  for path in stacked:
    if flat[path].shape[0] != config.num_layers:
      raise ValueError(f"SiglipViT param {path!r} stacks {flat[path].shape[0]} layers, expected "
                       f"{config.num_layers}")
  for j in range(config.num_layers):
    for name, path, _, _, to_hf, shape in _layer_paths(config, prefix, scan_layers, j):
      value = flat[path][j] if scan_layers else flat.pop(path)
      if value.shape != shape:
        raise ValueError(f"SiglipViT param {path!r} (layer {j}) has shape {value.shape}, expected {shape}")
      out[name] = np.ascontiguousarray(to_hf(value))
  for path in stacked:
    del flat[path]
  out[f"{prefix}post_layernorm.weight"] = flat.pop("post_layernorm/scale")
  out[f"{prefix}post_layernorm.bias"] = flat.pop("post_layernorm/bias")
  if flat:
    raise ValueError(f"siglip_to_hf: unexpected params {sorted(flat)}")
  return out
