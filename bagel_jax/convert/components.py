"""Component checkpoints (HF Qwen2/Qwen2.5, HF SigLIP, FLUX AE) -> a complete BAGEL checkpoint.

Our checkpoint format always holds the whole model, so a component conversion names where the other modules
come from: `into` (an existing checkpoint whose other modules are kept) or a preset whose shapes are
initialised the way the official training starts (random connector/time/vae2llm, zero llm2vae, gen expert
copied from und). This is how the paper's starting point is built: `qwen2 --vit ... --vae ...`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Dict, List, Optional

import numpy as np

from bagel_jax.convert import safetensors_io
from bagel_jax.convert.bagel import TOKENIZER_FILES, read_json, save_checkpoint, special_ids_from_tokenizer
from bagel_jax.convert.common import (ConversionError, Plan, ShardingFn, TensorSource, atomic_output_dir, cast,
                                      check_tree_shapes, claim_plan, dtype_name, flatten, materialize, plan_abstract,
                                      prefixed, target_dtype, unflatten)
from bagel_jax.convert.flux_vae import (config_from_bfl_source, config_from_diffusers, flux_plan,
                                        ignore_diffusers_extras)
from bagel_jax.convert.qwen2 import llm_config_from_hf, llm_plan
from bagel_jax.convert.siglip import config_from_hf as vit_config_from_hf
from bagel_jax.convert.siglip import ignore_unused as ignore_unused_vit
from bagel_jax.convert.siglip import siglip_plan
from bagel_jax import checkpoint as ckpt_lib
from bagel_jax.models import config as config_lib
from bagel_jax.models import bagel as bagel_lib
from bagel_jax.models.flux_vae import init_vae_params

HF_CONFIG = "config.json"


@dataclasses.dataclass
class Part:
  """One converted top-level module: its config, its claimed plan (paths prefixed with `key`) and source."""
  key: str
  config: object
  plan: Plan
  src: TensorSource
  files: Dict[str, str] = dataclasses.field(default_factory=dict)
  special_ids: Dict[str, int] = dataclasses.field(default_factory=dict)  # found in the tokenizer files


def _dir_files(directory: str, names) -> Dict[str, str]:
  return {n: os.path.join(directory, n) for n in names if os.path.isfile(os.path.join(directory, n))}


def qwen2_part(src_dir: str, *, variant: str = "mot", qk_norm: bool = True, scan_layers: bool = True) -> Part:
  """HF Qwen2/Qwen2.5 directory -> our `llm`: dense, or moe/mot with the gen expert a copy of the und one
  (`copy_init_moe`); QK-norm weights, absent from Qwen2.5, start at ones as in the official loader; a tied
  checkpoint's head is untied from the embedding."""
  hf = read_json(os.path.join(src_dir, HF_CONFIG), "an HF Qwen2 directory holds config.json and *.safetensors")
  if hf.get("model_type", "qwen2") != "qwen2":
    raise ConversionError(f"{src_dir}: model_type {hf.get('model_type')!r} is not a Qwen2/Qwen2.5 model")
  files = _dir_files(src_dir, TOKENIZER_FILES)
  special = special_ids_from_tokenizer(files)
  cfg = llm_config_from_hf(hf, layer_variant=variant, qk_norm=qk_norm, **special)
  src = safetensors_io.open_dir(src_dir, what=f"Qwen2 checkpoint {src_dir}")
  plan = llm_plan(cfg, src=src, prefix="model.", lm_head="lm_head.weight", scan_layers=scan_layers,
                  qk_norm_default_ones=True, gen_from_und=True, tie_fallback=bool(hf.get("tie_word_embeddings")))
  claim_plan(plan, src)
  src.ignore(*[k for k in src.keys() if k.endswith("rotary_emb.inv_freq")])
  src.finish()
  return Part("llm", cfg, prefixed(plan, "llm"), src, files, special)


def siglip_part(src_dir: str, *, vit_layers: Optional[int] = None, scan_layers: bool = True) -> Part:
  """HF SigLIP directory (SiglipVisionModel, or a full SiglipModel whose text tower is ignored) -> our `vit`.
  Layers run default to stored - 1 with the post-LN kept, as BAGEL uses SigLIP (reference §2)."""
  hf = read_json(os.path.join(src_dir, HF_CONFIG), "an HF SigLIP directory holds config.json and *.safetensors")
  stored = int(hf.get("vision_config", hf).get("num_hidden_layers", 12))
  cfg = vit_config_from_hf(hf, num_layers=vit_layers if vit_layers is not None else max(stored - 1, 1))
  src = safetensors_io.open_dir(src_dir, what=f"SigLIP checkpoint {src_dir}")
  # Hub checkpoints (and transformers 4) prefix the tower with `vision_model.`; transformers 5 saves a
  # SiglipVisionModel without it.
  prefix = "vision_model." if any(k.startswith("vision_model.") for k in src.keys()) else ""
  plan = siglip_plan(cfg, prefix, scan_layers, src)
  claim_plan(plan, src)
  ignore_unused_vit(src, cfg, prefix)
  src.ignore(*[k for k in src.keys() if k.startswith("text_model.") or k in ("logit_scale", "logit_bias")])
  src.finish()
  return Part("vit", cfg, prefixed(plan, "vit"), src)


def flux_part(path: str, *, scale_factor: Optional[float] = None, shift_factor: Optional[float] = None,
              num_groups: Optional[int] = None) -> Part:
  """FLUX AE: a BFL `ae.safetensors` file (architecture from shapes; scale/shift/groups from the arguments, the
  file's metadata or FLUX's) or a diffusers `AutoencoderKL` directory (all from its config.json, scale/shift
  overridable)."""
  if os.path.isdir(path):
    hf = read_json(os.path.join(path, HF_CONFIG), "a diffusers AutoencoderKL directory holds config.json and "
                   "diffusion_pytorch_model.safetensors")
    cfg = config_from_diffusers(hf, scale_factor, shift_factor)
    src = safetensors_io.open_dir(path, stem="diffusion_pytorch_model", what=f"AutoencoderKL {path}")
    ignore_diffusers_extras(src)
    plan = flux_plan(cfg, "diffusers")
  else:
    src = safetensors_io.open_file(path)
    cfg = config_from_bfl_source(src, scale_factor, shift_factor, num_groups)
    plan = flux_plan(cfg, "bfl")
  claim_plan(plan, src)
  src.finish()
  return Part("vae", cfg, prefixed(plan, "vae"), src)


def compose_config(base: config_lib.BagelConfig, parts: List[Part], *, dtype="float32",
                   max_latent_size: Optional[int] = None, scan_layers: Optional[bool] = None) -> config_lib.BagelConfig:
  """`base` with the converted modules' configs; an LLM without tokenizer files keeps the base's special-token
  ids (they index its embedding table)."""
  kw = {p.key: p.config for p in parts}
  for p in parts:
    if p.key == "llm":
      keep = {f: getattr(base.llm, f) for f in ("bos_token_id", "eos_token_id", "vision_start_token_id",
                                               "vision_end_token_id") if f not in p.special_ids}
      kw["llm"] = dataclasses.replace(p.config, **keep)
  kw.update(param_dtype=dtype_name(target_dtype(dtype)))
  if max_latent_size is not None:
    kw["max_latent_size"] = max_latent_size
  if scan_layers is not None:
    kw["scan_layers"] = scan_layers
  return dataclasses.replace(base, **kw)


def random_init(config: config_lib.BagelConfig, keys, seed: int = 0) -> Dict:
  """The top-level modules `keys` initialised as `models.bagel.init_params(config, key(seed))` does (XLA drops
  the unrequested modules), with the gen expert copied from und as the official training starts."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  keys = set(keys)
  rng_model, rng_vae = jax.random.split(jax.random.key(seed))
  out = {}
  model_keys = sorted(keys - {"vae"})
  if model_keys:
    init = jax.jit(lambda r: {k: v for k, v in nn.unbox(bagel_lib._boxed_init(  # pylint: disable=protected-access
        config, r, with_vae=False))["params"].items() if k in model_keys})
    out.update(init(rng_model))
    if "llm" in out and config.llm.num_modality_experts == 2:
      out.update(bagel_lib.init_gen_from_und({"llm": out["llm"]}, config))
  if "vae" in keys:
    out["vae"] = init_vae_params(config.vae, rng_vae)
  return out


def assemble(dst: str, parts: List[Part], config: config_lib.BagelConfig, *, into: Optional[str] = None,
             seed: int = 0, dtype="float32", sharding_fn: Optional[ShardingFn] = None, progress: bool = False,
             overwrite: bool = False, log: Callable[[str], None] = lambda s: None) -> config_lib.BagelConfig:
  """Writes `config`'s full parameter tree to `dst`: the converted parts, the rest from `into` or init."""
  import jax  # pylint: disable=import-outside-toplevel
  want = flatten(bagel_lib.abstract_params(config))
  converted = {p.key for p in parts}
  others = sorted({k.split("/")[0] for k in want} - converted)
  dt = target_dtype(dtype)
  planned = {k: v for p in parts for k, v in flatten(plan_abstract(p.plan, dt)).items()}
  check_tree_shapes(planned, {k: v for k, v in want.items() if k.split("/")[0] in converted}, "converted modules")
  axes = flatten(bagel_lib.param_logical_axes(config)) if sharding_fn is not None else None
  files: Dict[str, str] = {}
  for p in parts:
    files.update(p.files)
  with atomic_output_dir(dst, overwrite) as tmp:
    if into is not None:
      base, _, _ = ckpt_lib.load_params(into)
      rest = {k: base[k] for k in others}
      log(f"kept from {into}: {others}")
    else:
      rest = random_init(config, others, seed)
      log(f"initialised: {others}")
    flat_rest = flatten(rest)
    check_tree_shapes(flat_rest, {k: v for k, v in want.items() if k.split("/")[0] in others},
                      f"modules kept from {into}" if into else "initialised modules")
    placed = {}
    for path, value in flat_rest.items():
      value = cast(np.asarray(value), np.dtype(want[path].dtype))
      placed[path] = value if sharding_fn is None else jax.device_put(value, sharding_fn(axes[path], value.shape))
    params = unflatten(placed)
    for p in parts:
      params.update(materialize(p.plan, p.src, dt, logical_axes=axes, sharding_fn=sharding_fn, progress=progress,
                                desc=p.src.what, dtypes={k: v.dtype for k, v in want.items()}))
    save_checkpoint(tmp, params, config, files)
  return config


def base_config(preset: Optional[str], into: Optional[str], variant: str = "mot") -> config_lib.BagelConfig:
  if (preset is None) == (into is None):
    raise ConversionError("give exactly one of --preset NAME (other modules initialised) or --into CHECKPOINT "
                          "(other modules kept from it): the checkpoint always holds the whole model")
  if into is not None:
    return ckpt_lib.read_model_config(into)
  return config_lib.get_preset(preset, variant)
