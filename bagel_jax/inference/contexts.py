"""Query blocks, prefill, and the three generation contexts of the official inferencer (reference §4.4, §7.1).

A *block* is one item appended to a batch of request rows, laid out on the host by the token layout training
uses for the same item (`bagel_jax.layout`, beneath `data.sequence.layout_sample` too):
- text: `<|im_start|> ids <|im_end|>`, causal, consecutive RoPE ids, und expert;
- ViT image: `<|vision_start|> patches <|vision_end|>`, full, one RoPE id for the block, und expert;
- clean VAE image: `<|vision_start|> latents <|vision_end|>`, full, one RoPE id, latents on the gen expert at
  t = 0, start/end tokens on the und expert;
- noisy VAE image (denoising query): the same layout, mode noise, RoPE id not advanced, never cached.
Rows of a block may hold texts of different lengths (valid tokens first, padding after); images in one block
share one grid.

`Context` is a cache plus host copies of its lengths and RoPE counters (capacity checks without device syncs);
JAX arrays are immutable, so a snapshot is just another reference. `CFGContexts` keeps the official three:
`gen` (everything), `cfg_text` (snapshot before the last text input and after each image) and `cfg_img`
(texts only, never images, never generated think text).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from bagel_jax import batch as batch_lib
from bagel_jax import layout as layout_lib
from bagel_jax.layout import SpecialTokens
from bagel_jax.inference import forward
from bagel_jax.inference import kv_cache as kv_lib
from bagel_jax.kernels.mask import CAUSAL, FULL
from bagel_jax.models.config import BagelConfig

# Incremented inside traced functions only, so tests can count retracing.
TRACE_COUNTS: collections.Counter = collections.Counter()
# Backend compilations per function name ("jit(euler_step)"): a retrace-free recompile (new argument
# shardings or committedness) shows up here and not in TRACE_COUNTS.
COMPILE_COUNTS: collections.Counter = collections.Counter()
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def _count_compile(event: str, duration: float, **kw) -> None:
  del duration
  if event == BACKEND_COMPILE_EVENT:
    COMPILE_COUNTS[kw.get("fun_name", "")] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compile)
TEXT_BUCKET = 16  # text blocks are padded to a multiple of this many tokens: few distinct compiled shapes

Block = Dict[str, np.ndarray]


def _with_routing(block: Block) -> Block:
  und, gen = forward.routing_indices(block["modality"])
  return dict(block, und_index=und, gen_index=gen)


def text_block(ids: Sequence[Sequence[int]], special: SpecialTokens, bucket: int = TEXT_BUCKET) -> Block:
  """`<|im_start|> ids <|im_end|>` per row, right-padded to a multiple of `bucket`."""
  rows = [layout_lib.text_tokens(r, special) for r in ids]
  n = np.array([len(r) for r in rows], np.int32)
  length = int(-(-n.max() // bucket) * bucket)
  text_ids = np.zeros((len(rows), length), np.int32)
  modality = np.full((len(rows), length), batch_lib.PAD, np.int32)
  for b, r in enumerate(rows):
    text_ids[b, :len(r)] = r
    modality[b, :len(r)] = batch_lib.TEXT
  rel = np.broadcast_to(np.arange(length, dtype=np.int32), text_ids.shape).copy()
  return _with_routing(dict(text_ids=text_ids, modality=modality, rel_pos=rel, rope_advance=n))


def _image_frame(batch: int, n: int, kind: int, special: SpecialTokens) -> Block:
  ids, modality = layout_lib.image_tokens(n, kind, special)
  return dict(text_ids=np.broadcast_to(ids, (batch, n + 2)).copy(),
              modality=np.broadcast_to(modality, (batch, n + 2)).copy(), rel_pos=np.zeros((batch, n + 2), np.int32))


def vit_block(patches: np.ndarray, grid: Tuple[int, int], special: SpecialTokens, vit_side: int) -> Block:
  """patches [B, h*w, P] (raster order) -> a ViT image block."""
  b, n, _ = patches.shape
  if n != grid[0] * grid[1]:
    raise ValueError(f"vit_block: {n} patches do not match grid {grid}")
  blk = _image_frame(b, n, batch_lib.VIT, special)
  pos = np.broadcast_to(layout_lib.grid_positions(grid, vit_side), (b, n)).copy()
  blk.update(vit_patches=np.asarray(patches, np.float32), vit_pos=pos, vit_image=np.ones((b, n), np.int32),
             rope_advance=np.full(b, layout_lib.IMAGE_ROPE_ADVANCE, np.int32))
  return _with_routing(blk)


def vae_block(batch: int, grid: Tuple[int, int], special: SpecialTokens, latent_side: int,
              latents: Optional[np.ndarray] = None) -> Block:
  """A VAE image block; with `latents` [B, h*w, C] it is a clean context image (t = 0), without it the query
  layout of a denoising step (the sampler supplies x_t)."""
  n = grid[0] * grid[1]
  blk = _image_frame(batch, n, batch_lib.VAE, special)
  blk["latent_pos"] = np.broadcast_to(layout_lib.grid_positions(grid, latent_side), (batch, n)).copy()
  blk["rope_advance"] = np.full(batch, layout_lib.IMAGE_ROPE_ADVANCE if latents is not None
                                else layout_lib.NOISY_ROPE_ADVANCE, np.int32)
  if latents is not None:
    if latents.shape[:2] != (batch, n):
      raise ValueError(f"vae_block: latents {latents.shape} do not match {batch} rows of grid {grid}")
    blk["latents"] = latents
  return _with_routing(blk)


# ----------------------------------------------------------------------------------------------------------
# Prefill (compiled once per block kind and shape).
# ----------------------------------------------------------------------------------------------------------

def _jnp_block(block: Block) -> Dict[str, jnp.ndarray]:
  return {k: jnp.asarray(v) for k, v in block.items()}


@functools.partial(jax.jit, static_argnames=("config", "mode"))
def _prefill(params, cache: kv_lib.KVCache, block, *, config: BagelConfig, mode: int):
  TRACE_COUNTS["prefill"] += 1
  valid = block["modality"] != batch_lib.PAD
  x = forward.embed_block(params, config, block)
  _, k, v, q_meta = forward.run_decoder(params, config, cache, x, forward.block_routing(block, config),
                                        block["rel_pos"], valid, mode, jnp.ones(valid.shape[0], bool))
  return kv_lib.write(cache, k, v, q_meta, valid, block["rope_advance"], jnp.ones(valid.shape[0], bool))


@dataclasses.dataclass(frozen=True)
class Context:
  """One KV cache for B request rows, with host copies of each row's length and RoPE counter."""
  cache: kv_lib.KVCache
  lengths: np.ndarray
  ropes: np.ndarray

  @classmethod
  def empty(cls, config: BagelConfig, batch_size: int, capacity: int) -> "Context":
    return cls(kv_lib.init_cache(config, batch_size, capacity), np.zeros(batch_size, np.int64),
               np.zeros(batch_size, np.int64))

  @property
  def batch_size(self) -> int:
    return self.cache.batch_size

  @property
  def capacity(self) -> int:
    return self.cache.capacity

  def check_room(self, n_tokens: np.ndarray, what: str) -> None:
    need = self.lengths + np.asarray(n_tokens)
    if np.any(need > self.capacity):
      raise ValueError(f"{what}: the context would hold {int(need.max())} tokens but the KV cache has capacity "
                       f"{self.capacity}; create the session with a larger capacity")

  def append(self, params, config: BagelConfig, block: Block, what: str = "block") -> "Context":
    """Prefills a text, ViT or clean-VAE block (causal for text, full for images) into a new Context."""
    if block["modality"].shape[0] != self.batch_size:
      raise ValueError(f"{what}: {block['modality'].shape[0]} rows for a context of {self.batch_size} requests")
    n_valid = (block["modality"] != batch_lib.PAD).sum(1)
    self.check_room(n_valid, what)
    mode = FULL if ("vit_patches" in block or "latents" in block) else CAUSAL
    cache = _prefill(params, self.cache, _jnp_block(block), config=config, mode=mode)
    return Context(cache, self.lengths + n_valid, self.ropes + block["rope_advance"])

  def advanced(self, cache: kv_lib.KVCache, n_tokens: np.ndarray, rope: np.ndarray) -> "Context":
    """The Context after a compiled step wrote `n_tokens` per row into `cache`."""
    return Context(cache, self.lengths + n_tokens, self.ropes + rope)


@dataclasses.dataclass(frozen=True)
class CFGContexts:
  """The official three contexts (`interleave_inference`): gen, cfg_text (before the last text input, after
  each image) and cfg_img (texts only). All share batch size and capacity so one compiled denoising step
  serves every branch."""
  gen: Context
  cfg_text: Context
  cfg_img: Context

  @classmethod
  def empty(cls, config: BagelConfig, batch_size: int, capacity: int) -> "CFGContexts":
    c = Context.empty(config, batch_size, capacity)
    return cls(c, c, c)

  def add_system(self, params, config, block: Block) -> "CFGContexts":
    """A system prompt (think mode): into gen and cfg_img."""
    return CFGContexts(self.gen.append(params, config, block, "system prompt"), self.cfg_text,
                       self.cfg_img.append(params, config, block, "system prompt"))

  def add_text(self, params, config, block: Block) -> "CFGContexts":
    """A text input: cfg_text becomes the context before it; gen and cfg_img receive it."""
    return CFGContexts(self.gen.append(params, config, block, "text input"), self.gen,
                       self.cfg_img.append(params, config, block, "text input"))

  def add_image(self, params, config, blocks: Sequence[Block]) -> "CFGContexts":
    """An image input (its clean-VAE and/or ViT blocks, in that order): into gen only; cfg_text becomes the
    context after it."""
    gen = self.gen
    for blk in blocks:
      gen = gen.append(params, config, blk, "image input")
    return CFGContexts(gen, gen, self.cfg_img)

  def add_generated_text(self, params, config, block: Block) -> "CFGContexts":
    """Think text the model generated: appended to gen only (the official inferencer)."""
    return CFGContexts(self.gen.append(params, config, block, "generated text"), self.cfg_text, self.cfg_img)

