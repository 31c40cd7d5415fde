"""The decoder's layer variants: one module per variant, one registry line each.

A variant module defines `VARIANT = Variant(...)`: how many hard-routed weight sets (und, gen) each block of a
layer stacks (`Experts`, which also fixes the conversion names: a block with 2 experts has the official
`*_moe_gen` twins), the official training code's layer module (`official_layer`, None when no released
checkpoint uses the variant), the active MLP parameters per token (`mlp_params`, for model FLOPs: the attention
half is common to all variants) and the layer's second half (`post_attention`: post-attention norm and MLP,
called inside `qwen2.DecoderLayer`'s compact `__call__`, so training and cached decoding own the same
parameters). Adding a variant: one module here, one line in `REGISTRY`, one experiment config.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Dict, Optional

# name -> module defining VARIANT. Imported on first use (`get`): the variant modules import the decoder's
# blocks (models/qwen2.py), which look variants up here.
REGISTRY: Dict[str, str] = {
    "dense": "bagel_jax.models.variants.dense",
    "moe": "bagel_jax.models.variants.moe",
    "mot": "bagel_jax.models.variants.mot",
    "moe_topk": "bagel_jax.models.variants.moe_topk",
}
NAMES = tuple(REGISTRY)


@dataclasses.dataclass(frozen=True)
class Experts:
  """Hard-routed weight sets per block: 1 (shared by every token) or 2 (und = index 0, gen = index 1)."""
  attn: int        # input_layernorm, q/k/v/o projections, q/k norms
  mlp_norm: int    # post_attention_layernorm
  mlp: int         # the FFN
  final_norm: int  # the stack's final norm

  @property
  def most(self) -> int:
    return max(self.attn, self.mlp_norm, self.mlp, self.final_norm)


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  experts: Experts
  official_layer: Optional[str]           # `layer_module` of the official llm_config.json
  mlp_params: Callable                    # LLMConfig -> active MLP parameters per token
  post_attention: Callable                # (BagelConfig, x, Routing, valid) -> (y, aux losses)


_LOADED: Dict[str, Variant] = {}


def get(name: str) -> Variant:
  if name not in _LOADED:
    if name not in REGISTRY:
      raise ValueError(f"unknown layer variant {name!r}; choose one of {NAMES}")
    _LOADED[name] = importlib.import_module(REGISTRY[name]).VARIANT
  return _LOADED[name]
