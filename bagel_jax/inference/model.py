"""A loaded model for inference: parameters, config, tokenizer and image transforms, from a training run.

`load_model(path)` accepts a run's workdir (holding `checkpoints/`) or a checkpoint directory (an Orbax root
with `model_config.json`), restores the EMA weights when the run kept them (the official inference loads
`ema.safetensors`), else the raw ones, and reads the run's `config.json` beside it for the data settings that
inference must mirror (image sizes, tokenizer, timestep shift). Every mismatch that would otherwise produce
silent garbage (a checkpoint of another architecture, a tokenizer whose special ids differ from the model's)
raises a ValueError naming both sides.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np

from bagel_jax import checkpoint as ckpt_lib
from bagel_jax import console
from bagel_jax.data import samples as samples_lib
from bagel_jax.data import tokenizer as tok_lib
from bagel_jax.data import transforms as tf
from bagel_jax.layout import SpecialTokens
from bagel_jax.models.bagel import abstract_params
from bagel_jax.models import config as config_lib

log = console.logger(__name__)

DEFAULT_IMAGE_SIZE = 32  # the built-in synthetic data's side; real checkpoints pass their own sizes


@dataclasses.dataclass
class LoadedModel:
  params: Any
  config: config_lib.BagelConfig
  tokenizer: Any
  transforms: tf.ImageTransforms
  step: Optional[int] = None
  item: str = "params"
  run_config: Optional[Dict[str, Any]] = None
  checkpoint_dir: str = ""

  @property
  def special(self) -> SpecialTokens:
    return SpecialTokens.from_llm_config(self.config.llm)

  @property
  def gen_size(self) -> Tuple[int, int]:
    """(height, width) of generated images when none is asked for: the VAE side's max edge, square."""
    s = self.transforms.vae.max_size
    return s, s

  @property
  def timestep_shift(self) -> Optional[float]:
    """The run's training timestep shift, if known (inference defaults to the official 3.0 otherwise)."""
    try:
      return float(self.run_config["loss"]["timestep_shift"])
    except (TypeError, KeyError):
      return None


def check_tokenizer(tokenizer, config: config_lib.BagelConfig) -> None:
  """The tokenizer's special ids and vocabulary must fit the model."""
  want = SpecialTokens.from_llm_config(config.llm)
  if tokenizer.special != want:
    raise ValueError(f"tokenizer special tokens {tokenizer.special} do not match the model config's {want}: "
                     f"this tokenizer was not the one the checkpoint was trained with")
  if tokenizer.vocab_size > config.llm.vocab_size:
    raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's embedding has only "
                     f"{config.llm.vocab_size} rows")


def make_transforms(config: config_lib.BagelConfig, gen_size: Tuple[int, int],
                    und_size: Tuple[int, int]) -> tf.ImageTransforms:
  """VAE side (stride = latent downsample) and ViT side (stride = patch), as the data pipeline builds them."""
  try:
    return samples_lib.default_transforms(config, gen_size=tuple(gen_size), und_size=tuple(und_size))
  except ValueError as e:
    raise ValueError(f"image sizes gen={tuple(gen_size)} und={tuple(und_size)} do not fit the model: {e}") from e


def resolve_checkpoint_dir(path: str) -> Tuple[str, Optional[str]]:
  """(checkpoint dir, run workdir or None) for a workdir or a checkpoint dir."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint path {path} does not exist or is not a directory")
  if os.path.exists(os.path.join(path, ckpt_lib.MODEL_CONFIG)):
    parent = os.path.dirname(path)
    return path, parent if os.path.exists(os.path.join(parent, "config.json")) else None
  sub = os.path.join(path, "checkpoints")
  if os.path.exists(os.path.join(sub, ckpt_lib.MODEL_CONFIG)):
    return sub, path
  raise FileNotFoundError(f"{path} is neither a bagel-jax checkpoint directory ({ckpt_lib.MODEL_CONFIG} missing) "
                          f"nor a training workdir with checkpoints/")


def read_run_config(workdir: Optional[str]) -> Optional[Dict[str, Any]]:
  if not workdir:
    return None
  p = os.path.join(workdir, "config.json")
  try:
    with open(p) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None


def checkpoint_steps(checkpoint_dir: str):
  """Saved steps of a checkpoint directory, ascending (what the emergence harness walks)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  with ocp.CheckpointManager(os.path.abspath(checkpoint_dir)) as mngr:
    return sorted(int(s) for s in mngr.all_steps())


def _has_item(checkpoint_dir: str, step: int, item: str) -> bool:
  return os.path.isdir(os.path.join(checkpoint_dir, str(step), item))


def load_params(checkpoint_dir: str, config: config_lib.BagelConfig, step: Optional[int], use_ema: bool):
  """Restores params (EMA if present and asked for); Orbax shape errors become a message naming the config."""
  if step is None:
    steps = checkpoint_steps(checkpoint_dir)
    if not steps:
      raise FileNotFoundError(f"no checkpoint steps under {checkpoint_dir}")
    step = steps[-1]
  item = "ema" if use_ema and _has_item(checkpoint_dir, step, "ema") else "params"
  if not _has_item(checkpoint_dir, step, item):
    raise FileNotFoundError(f"checkpoint {checkpoint_dir} has no step {step} with '{item}' weights")
  try:
    params, _, step = ckpt_lib.load_params(checkpoint_dir, config, step=step, item=item)
  except ValueError as e:
    if "different model config" in str(e):
      raise
    raise ValueError(f"checkpoint {checkpoint_dir} step {step}: stored '{item}' arrays do not match the model "
                     f"config in {ckpt_lib.MODEL_CONFIG} ({str(e).splitlines()[0][:300]})") from e
  return params, step, item


def load_model(path: str, *, step: Optional[int] = None, use_ema: bool = True,
               expect: Optional[config_lib.BagelConfig] = None, attention_impl: Optional[str] = None,
               dtype: Optional[str] = None, tokenizer: Optional[str] = None, image_size: Optional[int] = None,
               gen_size: Optional[Tuple[int, int]] = None, und_size: Optional[Tuple[int, int]] = None
               ) -> LoadedModel:
  """Loads a checkpoint for inference.

  expect: the architecture the caller needs (e.g. `config.get_preset('tiny')`); a checkpoint written for
    another one raises naming the differing fields. attention_impl/dtype override implementation knobs; by
    default the checkpoint's attention is kept, except that the Pallas kernel (compiled or interpreted) becomes
    `auto` (the tiled attention) off TPU, which is logged.
  tokenizer: a tokenizer.json path; default the run's `config.data.tokenizer`, else the synthetic vocabulary.
  image_size / gen_size / und_size: (min, max) edges of VAE / ViT inputs; default the run's data config, else
    `DEFAULT_IMAGE_SIZE`."""
  ckpt_dir, workdir = resolve_checkpoint_dir(path)
  saved = ckpt_lib.read_model_config(ckpt_dir)
  if expect is not None:
    ckpt_lib.check_compatible(saved, expect, ckpt_dir)
  cfg = saved
  if attention_impl is None and cfg.attention_impl.startswith("pallas") and jax.default_backend() != "tpu":
    # same numerics (tiled off TPU); the interpreter is for kernel tests, Mosaic needs a TPU
    log.info("attention_impl=%r of the checkpoint runs as 'auto' here (the tiled attention off TPU); pass "
             "attention_impl= to choose another", cfg.attention_impl)
    attention_impl = "auto"
  if attention_impl:
    cfg = cfg.replace(attention_impl=attention_impl)
  if dtype:
    cfg = cfg.replace(dtype=dtype)
  run = read_run_config(workdir)
  data = (run or {}).get("data", {}) if isinstance(run, dict) else {}
  if image_size:
    gen_size = gen_size or (image_size, image_size)
    und_size = und_size or (image_size, image_size)
  side = int(data.get("image_size", DEFAULT_IMAGE_SIZE) or DEFAULT_IMAGE_SIZE)
  gen_size = tuple(gen_size or data.get("gen_size") or (side, side))
  und_size = tuple(und_size or data.get("und_size") or (side, side))
  tok = tok_lib.load_tokenizer(tokenizer if tokenizer is not None else data.get("tokenizer", ""))
  check_tokenizer(tok, cfg)
  transforms = make_transforms(cfg, gen_size, und_size)
  params, step, item = load_params(ckpt_dir, cfg, step, use_ema)
  return LoadedModel(params, cfg, tok, transforms, step, item, run, ckpt_dir)


def from_params(params, config: config_lib.BagelConfig, *, tokenizer=None, image_size: int = DEFAULT_IMAGE_SIZE,
                gen_size=None, und_size=None) -> LoadedModel:
  """An in-memory model (tests, notebooks, right after training)."""
  tok = tokenizer or tok_lib.WordTokenizer.load()
  check_tokenizer(tok, config)
  t = make_transforms(config, gen_size or (image_size, image_size), und_size or (image_size, image_size))
  # committed like restored weights: jit keys executables on committedness, so both share compiled steps
  return LoadedModel(jax.device_put(params, jax.devices()[0]), config, tok, t)


def random_params(config: config_lib.BagelConfig, seed: int = 0):
  """Random parameters of the right shapes built on the host from abstract shapes (no model trace to compile):
  weights N(0, 0.05), norm scales 1 + N(0, 0.1), VAE convs N(0, 1/fan_in); committed to the default device like
  restored weights. For tests and smoke runs."""
  rng = np.random.default_rng(seed)
  abstract = abstract_params(config)

  def make(path, sd):
    names = [getattr(p, "key", "") for p in path]
    shape, last = sd.shape, names[-1]
    if last == "scale":
      x = 1.0 + 0.1 * rng.standard_normal(shape)
    elif names[0] == "vae" and last == "kernel":
      x = rng.standard_normal(shape) / np.sqrt(max(1, int(np.prod(shape[:-1]))))
    else:
      x = 0.05 * rng.standard_normal(shape)
    return jax.numpy.asarray(x.astype(sd.dtype))

  return jax.device_put(jax.tree_util.tree_map_with_path(make, abstract), jax.devices()[0])
