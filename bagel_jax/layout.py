"""The token layout of an interleaved sequence: how each item becomes tokens (the official `pack_sequence`).

One module beneath both users, so training and inference cannot lay out the same item differently:
`data.sequence` (the packer's samples) and `inference.contexts` (the query blocks appended to a KV cache).

- text: `<|im_start|> ids <|im_end|>`, causal, consecutive RoPE ids; the RoPE counter advances by its length.
- image (ViT or VAE latents): `<|vision_start|> tokens <|vision_end|>`, full attention (noise for a noisy VAE
  image), the whole block at one RoPE id; the counter advances by 1, except after a noisy image (0).
- position of an image token in its model's 2-D table: row * side + col, raster order.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence, Tuple

import numpy as np

from bagel_jax.batch import TEXT

IMAGE_ROPE_ADVANCE = 1   # after a ViT image or a clean VAE image
NOISY_ROPE_ADVANCE = 0   # after a noisy VAE image (a generation target)


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
  bos: int   # <|im_start|>
  eos: int   # <|im_end|>
  vision_start: int
  vision_end: int

  @classmethod
  def from_llm_config(cls, llm) -> "SpecialTokens":
    return cls(llm.bos_token_id, llm.eos_token_id, llm.vision_start_token_id, llm.vision_end_token_id)


@dataclasses.dataclass(frozen=True)
class LayoutConfig:
  """What laying out a row needs from the model: special-token ids and the sides of the ViT and latent
  position grids (position id = row * side + col)."""
  special: SpecialTokens
  vit_side: int
  latent_side: int

  @classmethod
  def from_model_config(cls, config) -> "LayoutConfig":
    return cls(SpecialTokens.from_llm_config(config.llm), config.vit.max_patches_per_side,
               config.max_latent_size)


def text_tokens(ids: Sequence[int], special: SpecialTokens) -> np.ndarray:
  """`<|im_start|> ids <|im_end|>` (int32); the RoPE counter advances by its length."""
  return np.asarray([special.bos] + [int(i) for i in ids] + [special.eos], np.int32)


def image_tokens(n: int, modality: int, special: SpecialTokens) -> Tuple[np.ndarray, np.ndarray]:
  """(text_ids, modality) of an image of `n` tokens: `<|vision_start|>` and `<|vision_end|>` are text tokens
  around `n` tokens of `modality` (VIT or VAE), whose text id is 0."""
  ids = np.zeros(n + 2, np.int32)
  ids[0], ids[-1] = special.vision_start, special.vision_end
  mod = np.full(n + 2, modality, np.int32)
  mod[0] = mod[-1] = TEXT
  return ids, mod


def grid_positions(grid: Tuple[int, int], side: int, what: str = "image") -> np.ndarray:
  """row * side + col of an h x w grid in raster order (int32), for a position table of `side` per side."""
  h, w = (int(x) for x in grid)
  if not (0 < h <= side and 0 < w <= side):
    raise ValueError(f"{what} grid {h}x{w} outside 1..{side} tokens per side (the model's position table)")
  r, c = np.divmod(np.arange(h * w), w)
  return (r * side + c).astype(np.int32)
