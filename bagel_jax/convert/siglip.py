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

from bagel_jax.convert.common import (ConversionError, Leaf, Piece, Plan, TensorSource, claim_plan, export_tensors,
                                      flatten, kernel_to_linear, linear_to_kernel, materialize, single)
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


def siglip_plan(config: ViTConfig, prefix: str = "vision_model.", scan_layers: bool = True,
                src: Optional[TensorSource] = None) -> Plan:
  """Our ViT paths -> HF names. The patch embedding is read as a Conv2d when `src` stores it as one and
  otherwise (and always on export) in BAGEL's linear [hidden, p*p*C] layout."""
  d, p, ch = config.hidden_size, config.patch_size, config.num_channels
  e = f"{prefix}embeddings."
  patch = f"{e}patch_embedding.weight"
  plan: Plan = {}
  if src is not None and patch in src and len(src.shape(patch)) == 4:
    # Conv [out, c, kh, kw] -> Linear [out, (kh, kw, c)], the order `patchify` flattens patches in.
    plan["embeddings/patch_embedding/kernel"] = single(
        patch, (d, ch, p, p), (p * p * ch, d),
        lambda w: linear_to_kernel(np.transpose(w, (0, 2, 3, 1)).reshape(d, p * p * ch)),
        lambda k: np.transpose(kernel_to_linear(k).reshape(d, p, p, ch), (0, 3, 1, 2)))
  else:
    plan["embeddings/patch_embedding/kernel"] = single(patch, (d, p * p * ch), (p * p * ch, d), linear_to_kernel,
                                                       kernel_to_linear)
  plan["embeddings/patch_embedding/bias"] = single(f"{e}patch_embedding.bias", (d,), (d,))
  n_pos = config.max_patches_per_side ** 2
  plan["embeddings/position_embedding/embedding"] = single(f"{e}position_embedding.weight", (n_pos, d), (n_pos, d))
  per_layer = [_layer_paths(config, prefix, scan_layers, j) for j in range(config.num_layers)]
  for i, (_, path, _, _, _, shape) in enumerate(per_layer[0]):
    pieces = [Piece((j,) if scan_layers else (), rows[i][0], rows[i][2], rows[i][3], rows[i][4])
              for j, rows in enumerate(per_layer)]
    if scan_layers:
      plan[path] = Leaf((config.num_layers,) + shape, tuple(pieces))
    else:
      for rows, pc in zip(per_layer, pieces):
        plan[rows[i][1]] = Leaf(shape, (pc,))
  plan["post_layernorm/scale"] = single(f"{prefix}post_layernorm.weight", (d,), (d,))
  plan["post_layernorm/bias"] = single(f"{prefix}post_layernorm.bias", (d,), (d,))
  return plan


class DroppedLayerWarning(UserWarning):
  """A stored ViT layer is not converted (the model runs fewer layers than the file holds)."""


def ignore_unused(src: TensorSource, config: ViTConfig, prefix: str = "vision_model.") -> None:
  """Stored layers beyond those run, the pooling head and stale buffers are known to be unused. Dropping a
  stored layer warns, naming it (BAGEL runs SigLIP without its last layer, as the official code does; a
  `--vit-layers` smaller than intended would otherwise silently cut the encoder)."""
  extra_layer = re.compile(re.escape(f"{prefix}encoder.layers.") + r"(\d+)\.")
  dropped = set()
  for name in src.keys():
    m = extra_layer.match(name)
    if (m and int(m.group(1)) >= config.num_layers) or name.startswith(f"{prefix}head.") \
        or name == f"{prefix}embeddings.position_ids":  # non-persistent buffer that some older exports contain
      src.ignore(name)
      if m and int(m.group(1)) >= config.num_layers:
        dropped.add(int(m.group(1)))
  if dropped:
    import warnings  # pylint: disable=import-outside-toplevel
    warnings.warn(f"{src.what}: the file stores {config.num_layers + len(dropped)} ViT layers; layer(s) "
                  f"{sorted(dropped)} are not converted (the model runs {config.num_layers}: BAGEL drops SigLIP's "
                  "last layer; pass --vit-layers to keep more)", DroppedLayerWarning, stacklevel=2)


def siglip_from_source(src: TensorSource, config: ViTConfig, prefix: str = "vision_model.",
                       scan_layers: bool = True, dtype=np.float32) -> Dict:
  """Consumes the SigLIP tensors of `src` (and ignores the unused ones) without calling `finish()`, so a
  whole-model converter can share one source."""
  plan = siglip_plan(config, prefix, scan_layers, src)
  claim_plan(plan, src)
  ignore_unused(src, config, prefix)
  return materialize(plan, src, dtype)


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
  flat = flatten(params)
  plan = siglip_plan(config, prefix, scan_layers=any(k.startswith("encoder/layers/") for k in flat))
  extra = sorted(set(flat) - set(plan))
  if extra:
    raise ConversionError(f"siglip_to_hf: unexpected params {extra}")
  return {name: produce() for name, _, produce in export_tensors(plan, flat)}


def config_to_hf(config: ViTConfig, stored_layers: Optional[int] = None) -> Dict:
  """A SigLIP vision config dict (BAGEL's `vit_config.json`): `num_hidden_layers` is the stored count, which
  BAGEL's loader runs minus one."""
  return dict(model_type="siglip_vision_model", hidden_size=config.hidden_size,
              intermediate_size=config.intermediate_size, num_attention_heads=config.num_heads,
              num_hidden_layers=config.num_layers + 1 if stored_layers is None else stored_layers,
              patch_size=config.patch_size, image_size=config.patch_size * config.max_patches_per_side,
              num_channels=config.num_channels, hidden_act="gelu_pytorch_tanh",
              layer_norm_eps=config.layer_norm_eps, attention_dropout=0.0)
