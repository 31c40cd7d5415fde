"""Understanding, text-to-image, editing, interleaved continuation and think mode (the official
`InterleaveInferencer`), batched over requests of the same structure.

`Session` holds the three contexts of one batch of conversations and appends inputs the way the official
`interleave_inference` does (reference §7.1): texts go to gen and cfg_img (cfg_text = the context before the
text), images go to gen only as clean VAE then ViT blocks (cfg_text = the context after the image), a think
system prompt goes to gen and cfg_img, generated think text goes to gen only. `interleave()` runs a whole
official call; `understand`, `text_to_image` and `edit` are its common shapes.

Input images are resized like the official inferencer: first by the VAE-side rule (stride = latent token), then
the ViT-side rule on the result; an edit's output size is the input's size after that resize. After an image
is generated, `Session.generate_image(reinsert=True)` puts it back as clean VAE (its sampled latents) + ViT
(its decoded pixels) context, so a conversation can continue after it (paper: noisy tokens are replaced by their
clean counterparts).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, UnidentifiedImageError

from bagel_jax.data import samples as samples_lib
from bagel_jax.data import transforms as tf
from bagel_jax.inference import contexts as ctx_lib
from bagel_jax.inference import decode as decode_lib
from bagel_jax.inference import sampler as sampler_lib
from bagel_jax.inference.model import LoadedModel

ImageInput = Union[str, os.PathLike, np.ndarray, Image.Image]

GEN_THINK_SYSTEM_PROMPT = samples_lib.GEN_THINK_SYSTEM_PROMPT
VLM_THINK_SYSTEM_PROMPT = samples_lib.VLM_THINK_SYSTEM_PROMPT


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  """Image generation settings (official names). `default_t2i()` / `default_edit()` give the notebook/app
  defaults of reference §7.3."""
  num_timesteps: int = 50
  timestep_shift: float = 3.0
  cfg_text_scale: float = 4.0
  cfg_img_scale: float = 1.0
  cfg_interval: Tuple[float, float] = (0.4, 1.0)
  cfg_renorm_type: str = "global"
  cfg_renorm_min: float = 0.0

  @classmethod
  def default_t2i(cls, **kw) -> "GenerationConfig":
    return cls(**kw)

  @classmethod
  def default_edit(cls, **kw) -> "GenerationConfig":
    return cls(**{**dict(cfg_img_scale=2.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel"), **kw})

  def check(self) -> None:
    sampler_lib.check_guidance(self.cfg_text_scale, self.cfg_img_scale, self.cfg_interval, self.cfg_renorm_type,
                               self.cfg_renorm_min)
    sampler_lib.schedule(self.num_timesteps, self.timestep_shift)


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """Text decoding settings (official `gen_text`: greedy by default, temperature 0.3 when sampling)."""
  max_new_tokens: int = 64
  do_sample: bool = False
  temperature: float = 0.3
  top_p: float = 1.0


# ----------------------------------------------------------------------------------------------------------
# Inputs.
# ----------------------------------------------------------------------------------------------------------

def load_image(src: ImageInput, what: str = "image") -> Image.Image:
  """A path, a uint8 HxWx3 array or a PIL image -> RGB PIL image; clear errors for anything else."""
  if isinstance(src, Image.Image):
    return tf.to_rgb(src)
  if isinstance(src, np.ndarray):
    if src.dtype != np.uint8 or src.ndim != 3 or src.shape[2] not in (3, 4):
      raise ValueError(f"{what}: an image array must be uint8 [H, W, 3], got {src.dtype} {src.shape}")
    return tf.to_rgb(Image.fromarray(src))
  if isinstance(src, (str, os.PathLike)):
    path = os.fspath(src)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{what}: no such file {path}")
    try:
      with Image.open(path) as img:
        img.load()
        return tf.to_rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
      raise ValueError(f"{what}: {path} is not an image file PIL can decode ({type(e).__name__}: {e})") from e
  raise TypeError(f"{what}: expected an image path, a uint8 array or a PIL image, got {type(src).__name__}")


def check_text(text: Any, what: str = "prompt") -> str:
  if not isinstance(text, str):
    raise TypeError(f"{what} must be a string, got {type(text).__name__}")
  if not text.strip():
    raise ValueError(f"{what} is empty")
  return text


@dataclasses.dataclass
class PreparedImage:
  vae_pixels: np.ndarray      # [H, W, 3] in [-1, 1]
  latent_grid: Tuple[int, int]
  vit_patches: np.ndarray     # [h*w, P]
  vit_grid: Tuple[int, int]
  size: Tuple[int, int]       # (H, W) after the VAE-side resize: the output size of an edit


def prepare_image(model: LoadedModel, src: ImageInput, what: str = "image") -> PreparedImage:
  """The official input path: VAE-side resize first, then the ViT-side rule on the resized image."""
  img = load_image(src, what)
  c = model.config
  patch, f = c.vit.patch_size, c.latent_downsample
  if min(img.size) < max(patch, f):
    raise ValueError(f"{what} is {img.width}x{img.height} px, smaller than one patch (the model needs at least "
                     f"{patch} px for a ViT patch and {f} px for a latent token per side)")
  t = model.transforms
  vae_img = tf.resize(img, t.vae)
  px = tf.to_float(vae_img)
  grid = (px.shape[0] // f, px.shape[1] // f)
  patches, vgrid = t.vit_image(vae_img)
  return PreparedImage(px, grid, patches, vgrid, (px.shape[0], px.shape[1]))


def _per_row(values, b: int, what: str) -> list:
  if isinstance(values, (str, np.ndarray, Image.Image, os.PathLike)) or not isinstance(values, (list, tuple)):
    values = [values] * b
  if len(values) != b:
    raise ValueError(f"{what}: {len(values)} values for a batch of {b} requests")
  return list(values)


# ----------------------------------------------------------------------------------------------------------
# Session.
# ----------------------------------------------------------------------------------------------------------

class Session:
  """A batch of B conversations sharing one structure (same kinds of inputs in the same order)."""

  def __init__(self, model: LoadedModel, batch_size: int = 1, capacity: int = 256, seed: int = 0):
    self.model = model
    self.batch_size = int(batch_size)
    self.ctx = ctx_lib.CFGContexts.empty(model.config, self.batch_size, int(capacity))
    self.image_hw: Optional[Tuple[int, int]] = None
    self.rng = jax.random.key(seed)
    self._calls = 0

  # -- helpers -------------------------------------------------------------------------------------------
  @property
  def params(self):
    return self.model.params

  @property
  def config(self):
    return self.model.config

  def _next_rng(self):
    self._calls += 1
    return jax.random.fold_in(self.rng, self._calls)

  def _text_block(self, texts, what: str) -> ctx_lib.Block:
    texts = [check_text(t, f"{what} {i}" if self.batch_size > 1 else what)
             for i, t in enumerate(_per_row(texts, self.batch_size, what))]
    ids = [self.model.tokenizer.encode(t) for t in texts]
    for i, r in enumerate(ids):
      if not r:
        raise ValueError(f"{what} {texts[i]!r} has no tokens")
    return ctx_lib.text_block(ids, self.model.special)

  def image_blocks(self, images: Sequence[PreparedImage], vae: bool, vit: bool,
                   latents: Optional[np.ndarray] = None) -> List[ctx_lib.Block]:
    """Clean VAE block (encoded now, or the given latents) then ViT block, as training lays them out."""
    grids = {(im.latent_grid, im.vit_grid) for im in images}
    if len(grids) != 1:
      raise ValueError(f"images of one batch must have the same size after resizing, got "
                       f"{sorted({im.size for im in images})}")
    c, sp = self.config, self.model.special
    blocks = []
    if vae:
      if latents is None:
        px = jnp.asarray(np.stack([im.vae_pixels for im in images]))
        latents = sampler_lib.encode_images(self.params, px, self._next_rng(), config=c)
      blocks.append(ctx_lib.vae_block(len(images), images[0].latent_grid, sp, c.max_latent_size,
                                      np.asarray(latents, np.float32)))
    if vit:
      blocks.append(ctx_lib.vit_block(np.stack([im.vit_patches for im in images]), images[0].vit_grid, sp,
                                      c.vit.max_patches_per_side))
    return blocks

  # -- inputs --------------------------------------------------------------------------------------------
  def add_system_prompt(self, texts) -> None:
    self.ctx = self.ctx.add_system(self.params, self.config, self._text_block(texts, "system prompt"))

  def add_text(self, texts, what: str = "prompt") -> None:
    self.ctx = self.ctx.add_text(self.params, self.config, self._text_block(texts, what))

  def add_image(self, images, vae: bool = True, vit: bool = True, what: str = "image") -> List[PreparedImage]:
    prepared = [img if isinstance(img, PreparedImage) else prepare_image(self.model, img, f"{what} {i}"
                                                                         if self.batch_size > 1 else what)
                for i, img in enumerate(_per_row(images, self.batch_size, what))]
    self.ctx = self.ctx.add_image(self.params, self.config, self.image_blocks(prepared, vae, vit))
    self.image_hw = prepared[0].size
    return prepared

  # -- outputs -------------------------------------------------------------------------------------------
  def generate_text(self, text: TextConfig = TextConfig(), seed: Optional[int] = None,
                    on_text: Optional[Callable[[List[str]], None]] = None) -> List[str]:
    """Decodes from gen without changing it (the official `gen_text` works on a copy). `on_text`, if given,
    receives the text decoded so far per request after every token (streaming)."""
    tok = self.model.tokenizer
    on_token = None if on_text is None else (lambda ids: on_text([tok.decode(r) for r in ids]))
    ids, _, _ = decode_lib.generate_text(
        self.params, self.config, self.ctx.gen, max_new_tokens=text.max_new_tokens, do_sample=text.do_sample,
        temperature=text.temperature, top_p=text.top_p, vocab_limit=tok.vocab_size,
        rng=jax.random.key(seed) if seed is not None else self._next_rng(), on_token=on_token)
    return [tok.decode(r) for r in ids]

  def think(self, text: TextConfig = TextConfig(), seed: Optional[int] = None,
            on_text: Optional[Callable[[List[str]], None]] = None) -> List[str]:
    """Generates the think text and appends it to gen only (official think mode)."""
    out = self.generate_text(text, seed, on_text)
    block = ctx_lib.text_block([self.model.tokenizer.encode(t) for t in out], self.model.special)
    self.ctx = self.ctx.add_generated_text(self.params, self.config, block)
    return out

  def image_size(self, height: Optional[int], width: Optional[int]) -> Tuple[int, int]:
    """Output size: given, else the last input image's (editing), else the model's generation size."""
    h, w = (height, width) if height and width else (self.image_hw or self.model.gen_size)
    f, side = self.config.latent_downsample, self.config.max_latent_size
    for name, v in (("height", h), ("width", w)):
      if v <= 0 or v % f:
        raise ValueError(f"image {name}={v} must be a positive multiple of {f} px (one latent token)")
      if v > f * side:
        raise ValueError(f"image {name}={v} exceeds the model's max_latent_size {side} x {f} = {f * side} px")
    return int(h), int(w)

  def generate_image(self, gen: GenerationConfig = GenerationConfig(), *, height: Optional[int] = None,
                     width: Optional[int] = None, seed: Optional[int] = None, noise=None, progress: bool = False,
                     reinsert: bool = False, on_step: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
    """uint8 images [B, H, W, 3] from the three contexts; with `reinsert`, the result becomes clean VAE + ViT
    context for whatever comes next. `on_step(done, total)` reports each finished denoising step."""
    gen.check()
    h, w = self.image_size(height, width)
    f = self.config.latent_downsample
    grid = (h // f, w // f)
    rng = jax.random.key(seed) if seed is not None else self._next_rng()
    lat = sampler_lib.sample_latents(
        self.params, self.config, self.ctx, grid, rng=rng, noise=noise, num_timesteps=gen.num_timesteps,
        timestep_shift=gen.timestep_shift, cfg_text_scale=gen.cfg_text_scale, cfg_img_scale=gen.cfg_img_scale,
        cfg_interval=gen.cfg_interval, cfg_renorm_type=gen.cfg_renorm_type, cfg_renorm_min=gen.cfg_renorm_min,
        progress=progress, on_step=on_step)
    images = np.asarray(sampler_lib.decode_latents(self.params, lat, config=self.config, grid=grid))
    if reinsert:  # its own latents for the VAE block (no re-encode), its pixels through the ViT-side rule
      prepared = []
      for im in images:
        patches, vgrid = self.model.transforms.vit_image(Image.fromarray(im))
        prepared.append(PreparedImage(tf.to_float(Image.fromarray(im)), grid, patches, vgrid, (h, w)))
      self.ctx = self.ctx.add_image(self.params, self.config, self.image_blocks(prepared, True, True, latents=lat))
      self.image_hw = (h, w)
    return images


# ----------------------------------------------------------------------------------------------------------
# The official call shapes.
# ----------------------------------------------------------------------------------------------------------

def estimate_capacity(model: LoadedModel, inputs: Sequence[Sequence[Any]], extra_text: int) -> int:
  """KV slots a batch of conversations needs: its inputs (images at the largest size the transforms produce),
  a think system prompt, `extra_text` decoded tokens twice (decoding, then re-prefilled think text) and one
  re-inserted image; rounded up to a multiple of 128 so requests of one kind share compiled shapes (text-only and
  image-conditioned requests usually land on the same capacity)."""
  c, t, tok = model.config, model.transforms, model.tokenizer
  image_tokens = ((t.vae.max_size // c.latent_downsample) ** 2 + (t.vit.max_size // c.vit.patch_size) ** 2 + 4)
  n = 0
  for j, item in enumerate(inputs[0]):
    if isinstance(item, str):
      n += max(len(tok.encode(row[j])) for row in inputs) + 2
    else:
      n += image_tokens
  n += len(tok.encode(GEN_THINK_SYSTEM_PROMPT)) + 2 + 2 * (extra_text + 2) + image_tokens
  return int(-(-n // 128) * 128)


def interleave(model: LoadedModel, inputs: Sequence[Sequence[Any]], *, think: bool = False,
               understanding_output: bool = False, gen: Optional[GenerationConfig] = None,
               text: TextConfig = TextConfig(), height: Optional[int] = None, width: Optional[int] = None,
               seed: int = 0, progress: bool = False, capacity: Optional[int] = None) -> Dict[str, Any]:
  """The official `interleave_inference` for B requests: inputs[b] is a list of texts (str) and images (uint8
  arrays, PIL images, `PreparedImage`s or os.PathLike paths; a plain str is always text), the same kinds in the
  same order for every b. Returns {"text": [str] | None, "image": uint8 [B, H, W, 3] | None,
  "think": [str] | None, "session": Session}."""
  if not inputs or not inputs[0]:
    raise ValueError("interleave: no inputs")
  b = len(inputs)
  kinds = [[isinstance(x, str) for x in row] for row in inputs]
  if any(k != kinds[0] for k in kinds):
    raise ValueError("interleave: every request of a batch needs the same sequence of text/image inputs")
  gen = gen or GenerationConfig()
  cap = capacity or estimate_capacity(model, inputs, text.max_new_tokens)
  s = Session(model, b, cap, seed)
  if think:
    s.add_system_prompt(VLM_THINK_SYSTEM_PROMPT if understanding_output else GEN_THINK_SYSTEM_PROMPT)
  for j in range(len(inputs[0])):
    column = [row[j] for row in inputs]
    if kinds[0][j]:
      s.add_text(column, "prompt")
    else:
      s.add_image(column, vae=not understanding_output, vit=True)
  out: Dict[str, Any] = dict(text=None, image=None, think=None, session=s)
  if understanding_output:
    out["text"] = s.generate_text(text)
    return out
  if think:
    out["think"] = s.think(text)
  out["image"] = s.generate_image(gen, height=height, width=width, progress=progress)
  return out


def _as_image(src, what: str):
  """Image inputs of the wrappers may be paths; `interleave` reads a str as text, so open them here."""
  if src is None or isinstance(src, (np.ndarray, Image.Image, PreparedImage)):
    return src
  return load_image(src, what)


def understand(model: LoadedModel, images, questions: Sequence[str], *, think: bool = False,
               text: TextConfig = TextConfig(), seed: int = 0) -> List[str]:
  """VQA / chat: per request an image (or None) and a question -> the answer (after `</think>` in think mode)."""
  questions = list(questions)
  images = _per_row(images, len(questions), "images") if images is not None else [None] * len(questions)
  images = [_as_image(im, f"image {i}" if len(images) > 1 else "image") for i, im in enumerate(images)]
  rows = [([im] if im is not None else []) + [q] for im, q in zip(images, questions)]
  res = interleave(model, rows, think=think, understanding_output=True, text=text, seed=seed)
  return res["text"]


def split_think(text: str) -> Tuple[str, str]:
  """'<think> plan </think> answer' -> (plan, answer); no think block -> ('', text)."""
  if "</think>" in text:
    head, _, tail = text.partition("</think>")
    return head.replace("<think>", "").strip(), tail.strip()
  return "", text.strip()


def text_to_image(model: LoadedModel, prompts: Sequence[str], *, think: bool = False,
                  gen: Optional[GenerationConfig] = None, text: TextConfig = TextConfig(), height=None, width=None,
                  seed: int = 0, progress: bool = False) -> Dict[str, Any]:
  return interleave(model, [[p] for p in prompts], think=think, gen=gen or GenerationConfig.default_t2i(),
                    text=text, height=height, width=width, seed=seed, progress=progress)


def edit(model: LoadedModel, images, instructions: Sequence[str], *, think: bool = False,
         gen: Optional[GenerationConfig] = None, text: TextConfig = TextConfig(), seed: int = 0,
         progress: bool = False) -> Dict[str, Any]:
  """Source image (clean VAE + ViT context), instruction, generation at the source's size."""
  instructions = list(instructions)
  images = [_as_image(im, f"image {i}" if len(instructions) > 1 else "image")
            for i, im in enumerate(_per_row(images, len(instructions), "images"))]
  return interleave(model, [[im, t] for im, t in zip(images, instructions)], think=think,
                    gen=gen or GenerationConfig.default_edit(), text=text, seed=seed, progress=progress)
