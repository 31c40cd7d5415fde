"""Official BAGEL release directory <-> our checkpoint (reference §8).

A release directory holds `llm_config.json`, `vit_config.json`, `ema.safetensors` (or `model.safetensors`),
`ae.safetensors` and optionally the Qwen2 tokenizer files. Nothing else describes the model, so the rest is
inferred from tensors: the LLM variant from the `*_moe_gen` names, `max_latent_size` and the ViT grid from the
position tables, the AE architecture from `ae.safetensors` shapes, the latent patch size from `vae2llm`. ViT
layers run = stored - 1, as the official inference does. The two fixed sin-cos tables are not parameters here
(`models/layers.py` recomputes them): conversion checks them against that formula, so a layout drift fails
loudly, and export writes them back.

`inspect_release` plans the whole conversion from headers alone (every strictness error is raised before any
data is read or anything written); `load_release` then reads one leaf at a time.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np

from bagel_jax import checkpoint as ckpt_lib
from bagel_jax.convert import safetensors_io
from bagel_jax.convert.common import (ConversionError, Plan, ShardingFn, TensorSource, atomic_output_dir, cast,
                                      check_tree_shapes, claim_plan, export_tensors, flatten, linear_leaves,
                                      materialize, plan_abstract, prefixed, target_dtype, dtype_name, unflatten)
from bagel_jax.convert.flux_vae import config_from_bfl_source, flux_plan, vae_metadata
from bagel_jax.convert.qwen2 import infer_variant, llm_config_from_hf, llm_config_to_hf, llm_plan
from bagel_jax.convert.siglip import config_from_hf as vit_config_from_hf
from bagel_jax.convert.siglip import config_to_hf as vit_config_to_hf
from bagel_jax.convert.siglip import ignore_unused as ignore_unused_vit
from bagel_jax.convert.siglip import siglip_plan
from bagel_jax.models import config as config_lib
from bagel_jax.models.bagel import abstract_params, count_params, param_logical_axes
from bagel_jax.models.layers import sincos_2d_table

EMA, MODEL, AE = "ema.safetensors", "model.safetensors", "ae.safetensors"
LLM_JSON, VIT_JSON = "llm_config.json", "vit_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "generation_config.json")
LLM_PREFIX, LM_HEAD = "language_model.model.", "language_model.lm_head.weight"
VIT_PREFIX = "vit_model.vision_model."
LATENT_TABLE, VIT_TABLE = "latent_pos_embed.pos_embed", "vit_pos_embed.pos_embed"
# Inside our checkpoint directory: the source's JSON configs and tokenizer files, kept for `export` and for the
# data pipeline's tokenizer (Orbax ignores the folder).
SOURCE_FILES = "source_files"
TIMESTEP_FREQ_DIM = 256
_VARIANT_ORDER = ("dense", "moe", "mot")
_QWEN_SPECIALS = dict(bos_token_id="<|im_start|>", eos_token_id="<|im_end|>",
                      vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>")


# ----------------------------------------------------------------------------------------------------------
# Plans.
# ----------------------------------------------------------------------------------------------------------

def ema_plan(config: config_lib.BagelConfig, src: Optional[TensorSource] = None,
             gen_from_und: bool = False) -> Plan:
  """Our paths (all top-level modules but `vae`) -> `ema.safetensors` names. `src` and `gen_from_und` as in
  `qwen2.llm_plan` (None: the full official naming, for export)."""
  d, vd = config.llm.hidden_size, config.vit.hidden_size
  plan = prefixed(llm_plan(config.llm, src=src, prefix=LLM_PREFIX, lm_head=LM_HEAD, scan_layers=config.scan_layers,
                           qk_norm_default_ones=False, gen_from_und=gen_from_und, tie_fallback=False), "llm")
  plan.update(prefixed(siglip_plan(config.vit, VIT_PREFIX, config.scan_layers, src), "vit"))
  linear_leaves(plan, "connector/fc1", "connector.fc1", vd, d)
  linear_leaves(plan, "connector/fc2", "connector.fc2", d, d)
  linear_leaves(plan, "time_embedder/mlp_0", "time_embedder.mlp.0", TIMESTEP_FREQ_DIM, d)
  linear_leaves(plan, "time_embedder/mlp_2", "time_embedder.mlp.2", d, d)
  linear_leaves(plan, "vae2llm", "vae2llm", config.latent_channels, d)
  linear_leaves(plan, "llm2vae", "llm2vae", d, config.latent_channels)
  return plan


def vae_plan(config: config_lib.BagelConfig) -> Plan:
  return prefixed(flux_plan(config.vae, "bfl"), "vae")


def fixed_tables(config: config_lib.BagelConfig) -> Dict[str, Tuple[int, int]]:
  """The recomputable tables of `ema.safetensors`: name -> (grid side, dim)."""
  d = config.llm.hidden_size
  return {LATENT_TABLE: (config.max_latent_size, d), VIT_TABLE: (config.vit.max_patches_per_side, d)}


def release_shapes(config: config_lib.BagelConfig) -> Dict[str, Dict]:
  """{'ema': {name: shape}, 'ae': {name: shape}} of the official files for `config` (as `export` writes them)."""
  ema = {p.name: p.src_shape for leaf in ema_plan(config).values() for p in leaf.pieces}
  for name, (side, d) in fixed_tables(config).items():
    ema[name] = (side * side, d)
  ae = {p.name: p.src_shape for leaf in vae_plan(config).values() for p in leaf.pieces}
  return {"ema": ema, "ae": ae}


# ----------------------------------------------------------------------------------------------------------
# Inference from a release.
# ----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Release:
  """A planned conversion: the inferred config and the claimed sources (no data read yet)."""
  config: config_lib.BagelConfig
  ema: TensorSource
  ae: TensorSource
  plan: Plan
  vae: Plan
  file_variant: str
  source_files: Dict[str, str] = dataclasses.field(default_factory=dict)  # file name -> path
  dtypes: Dict[str, np.dtype] = dataclasses.field(default_factory=dict)  # path -> the model's dtype

  def abstract(self, dtype="float32"):
    tree = plan_abstract(self.plan, dtype)
    tree["vae"] = plan_abstract(self.vae, dtype)["vae"]
    if self.dtypes:
      import jax  # pylint: disable=import-outside-toplevel
      tree = unflatten({k: jax.ShapeDtypeStruct(v.shape, self.dtypes.get(k, v.dtype))
                        for k, v in flatten(tree).items()})
    return tree

  def summary(self) -> str:
    c = self.config
    n = count_params(self.abstract())
    return (f"LLM {c.llm.layer_variant} (file: {self.file_variant}) hidden {c.llm.hidden_size} x "
            f"{c.llm.num_layers} layers, vocab {c.llm.vocab_size}; ViT {c.vit.num_layers} layers run, grid "
            f"{c.vit.max_patches_per_side}; max_latent_size {c.max_latent_size}, latent patch "
            f"{c.latent_patch_size}; VAE ch {c.vae.ch} x {list(c.vae.ch_mult)}, {c.vae.num_res_blocks} res-blocks, "
            f"z {c.vae.z_channels}, scale {c.vae.scale_factor}, shift {c.vae.shift_factor}; {n:,} parameters")


def _square_side(src: TensorSource, name: str) -> int:
  rows = src.shape(name)[0]
  side = math.isqrt(rows)
  if side * side != rows:
    raise ConversionError(f"{src.what}: {name!r} has {rows} rows, not a square grid")
  return side


def special_ids_from_tokenizer(files: Mapping[str, str]) -> Dict[str, int]:
  """The ids of <|im_start|>, <|im_end|>, <|vision_start|>, <|vision_end|> in the shipped tokenizer files, so a
  model with its own vocabulary converts with the right special tokens; {} if there are no tokenizer files."""
  vocab: Dict[str, int] = {}
  if "tokenizer.json" in files:
    with open(files["tokenizer.json"]) as f:
      tok = json.load(f)
    vocab.update({t["content"]: int(t["id"]) for t in tok.get("added_tokens", [])})
    model_vocab = (tok.get("model") or {}).get("vocab")
    if isinstance(model_vocab, dict):
      vocab = {**{k: int(v) for k, v in model_vocab.items() if k in _QWEN_SPECIALS.values()}, **vocab}
  if "tokenizer_config.json" in files:
    with open(files["tokenizer_config.json"]) as f:
      dec = json.load(f).get("added_tokens_decoder", {})
    vocab.update({t["content"]: int(i) for i, t in dec.items() if "content" in t})
  return {field: vocab[tok] for field, tok in _QWEN_SPECIALS.items() if tok in vocab}


SPECIAL_FIELDS = ("bos_token_id", "eos_token_id", "vision_start_token_id", "vision_end_token_id")


def check_special_ids(config: config_lib.BagelConfig, what: str) -> None:
  """Every special-token id must index a row of the embedding: an id past `vocab_size` would make the model read
  garbage (or fail at run time) for every <|im_start|>, so the conversion is refused instead."""
  llm = config.llm
  bad = {f: getattr(llm, f) for f in SPECIAL_FIELDS if not 0 <= getattr(llm, f) < llm.vocab_size}
  if bad:
    raise ConversionError(f"{what}: special-token ids {bad} are outside the vocabulary of {llm.vocab_size} "
                          "(ship the tokenizer files that name <|im_start|>, <|im_end|>, <|vision_start|>, "
                          "<|vision_end|>, or convert onto a base with matching ids)")


def _latent_patch_size(ema: TensorSource, z: int) -> int:
  name = "vae2llm.weight"
  if name not in ema:
    return 2
  width = ema.shape(name)[1]
  p = math.isqrt(width // z) if width % z == 0 else 0
  if p * p * z != width:
    raise ConversionError(f"{ema.what}: {name!r} input width {width} is not p*p*z for the AE's z={z}")
  return p


def inspect_release(llm_json: Mapping, vit_json: Mapping, ema: TensorSource, ae: TensorSource, *,
                    variant: Optional[str] = None, max_latent_size: Optional[int] = None,
                    vit_layers: Optional[int] = None, vit_grid: Optional[int] = None,
                    vae_scale: Optional[float] = None, vae_shift: Optional[float] = None,
                    vae_num_groups: Optional[int] = None,
                    special_ids: Optional[Mapping[str, int]] = None, scan_layers: bool = True,
                    dtype="float32", check_model: bool = True) -> Release:
  """Infers the config and claims every tensor of both files (headers only). Each inferred value can be
  overridden; `variant` may only add experts to the file's (dense -> moe/mot, moe -> mot; the new gen expert
  is a copy of the und one, `copy_init_moe`), never drop trained weights. The VAE's scale, shift and GroupNorm
  groups, invisible in shapes, default to the `ae.safetensors` metadata our export writes, else FLUX's."""
  file_variant = infer_variant(ema.keys(), LLM_PREFIX)
  variant = variant or file_variant
  if variant not in _VARIANT_ORDER:
    raise ConversionError(f"variant {variant!r} has no official naming; choose one of {_VARIANT_ORDER}")
  if _VARIANT_ORDER.index(variant) < _VARIANT_ORDER.index(file_variant):
    raise ConversionError(f"{ema.what} holds a {file_variant} LLM; converting it to {variant} would drop the "
                          f"trained generation expert")
  # The official inference forces qk_norm=True and untied heads (reference §8).
  llm = llm_config_from_hf(llm_json, layer_variant=variant, qk_norm=True, **dict(special_ids or {}))

  stored = int(vit_json.get("num_hidden_layers", 0)) or None
  vit = vit_config_from_hf(vit_json, num_layers=vit_layers if vit_layers is not None else
                           (stored - 1 if stored and stored > 1 else stored))
  pos_name = VIT_PREFIX + "embeddings.position_embedding.weight"
  grid = vit_grid or (_square_side(ema, pos_name) if pos_name in ema else vit.max_patches_per_side)
  vit = dataclasses.replace(vit, max_patches_per_side=grid)
  if VIT_TABLE in ema and _square_side(ema, VIT_TABLE) != grid:
    raise ConversionError(f"{ema.what}: {VIT_TABLE!r} is a {_square_side(ema, VIT_TABLE)}^2 grid but the ViT "
                          f"position embedding is {grid}^2")

  if max_latent_size is None:
    if LATENT_TABLE not in ema:
      raise ConversionError(f"{ema.what}: no {LATENT_TABLE!r} to infer max_latent_size from; pass it "
                            f"(the released 7B model uses 64)")
    max_latent_size = _square_side(ema, LATENT_TABLE)

  vae = config_from_bfl_source(ae, vae_scale, vae_shift, vae_num_groups)
  dt = target_dtype(dtype)
  config = config_lib.BagelConfig(llm=llm, vit=vit, vae=vae, latent_patch_size=_latent_patch_size(ema, vae.z_channels),
                                  max_latent_size=max_latent_size, param_dtype=dtype_name(dt),
                                  scan_layers=scan_layers)
  plan = ema_plan(config, ema, gen_from_und=variant != file_variant)
  claim_plan(plan, ema)
  ema.ignore(LATENT_TABLE, VIT_TABLE, *[k for k in ema.keys() if k.endswith("rotary_emb.inv_freq")])
  ignore_unused_vit(ema, vit, VIT_PREFIX)
  ema.finish()
  vplan = vae_plan(config)
  claim_plan(vplan, ae)
  ae.finish()
  release = Release(config, ema, ae, plan, vplan, file_variant)
  if check_model:
    model = flatten(abstract_params(config))
    check_tree_shapes(flatten(release.abstract()), model, "converted release")
    release.dtypes = {k: np.dtype(v.dtype) for k, v in model.items()}
  return release


def verify_tables(release: Release) -> None:
  """The stored fixed tables must equal our sin-cos formula (to the source dtype's precision): a mismatch
  means the official layout changed and the recomputed tables would silently differ."""
  for name, (_, d) in fixed_tables(release.config).items():
    if name not in release.ema:
      continue
    side = _square_side(release.ema, name)  # its own grid: max_latent_size may be overridden
    if release.ema.shape(name)[1:] != (d,):
      raise ConversionError(f"{release.ema.what}: {name!r} has shape {release.ema.shape(name)}, expected "
                            f"({side * side}, {d})")
    stored = cast(release.ema.load(name), np.dtype(np.float32))
    want = sincos_2d_table(d, side)
    err = float(np.max(np.abs(stored - want)))
    tol = 1e-2 if release.ema.dtype(name).itemsize == 2 else 1e-5  # bf16/fp16 sources are rounded
    if not err <= tol:
      raise ConversionError(f"{release.ema.what}: {name!r} differs from the 2-D sin-cos table "
                            f"(models/layers.py::sincos_2d_table) by up to {err:.3g} (tolerance {tol}): the "
                            f"official layout may have changed. Pass --no-verify-tables to convert anyway; the "
                            f"table is recomputed, not loaded")


def load_release(release: Release, dtype="float32", *, sharding_fn: Optional[ShardingFn] = None,
                 progress: bool = False, check_tables: bool = True) -> Dict:
  """Reads the planned tensors, one leaf at a time, into our tree (host arrays, or sharded `jax.Array`s with
  `sharding_fn(logical_spec, shape) -> Sharding`)."""
  if check_tables:
    verify_tables(release)
  axes = None
  if sharding_fn is not None:
    axes = flatten(param_logical_axes(release.config))
  kw = dict(logical_axes=axes, sharding_fn=sharding_fn, progress=progress, dtypes=release.dtypes)
  params = materialize(release.plan, release.ema, dtype, desc=release.ema.what, **kw)
  params.update(materialize(release.vae, release.ae, dtype, desc=release.ae.what, **kw))
  return params


# ----------------------------------------------------------------------------------------------------------
# Directories.
# ----------------------------------------------------------------------------------------------------------

def read_json(path: str, what: str) -> Dict:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} is missing: {what}")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ConversionError(f"{path}: not valid JSON ({e})") from e


_LAYOUT = ("a BAGEL release directory holds llm_config.json, vit_config.json, ema.safetensors (or "
           "model.safetensors), ae.safetensors and optionally the tokenizer files")


def open_release(src: str, *, weights: Optional[str] = None, ae: Optional[str] = None, **inspect_kw) -> Release:
  """Plans the conversion of release directory `src`. `weights`: 'ema', 'model' or a file path (default: ema,
  else model); `ae`: a path other than `src/ae.safetensors`."""
  if not os.path.isdir(src):
    raise FileNotFoundError(f"{src} is not a directory: {_LAYOUT}")
  llm_json = read_json(os.path.join(src, LLM_JSON), _LAYOUT)
  vit_json = read_json(os.path.join(src, VIT_JSON), _LAYOUT)
  if weights in (None, "ema", "model"):
    names = [EMA, MODEL] if weights is None else [EMA if weights == "ema" else MODEL]
    found = [os.path.join(src, n) for n in names if os.path.isfile(os.path.join(src, n))]
    if not found:
      raise FileNotFoundError(f"{src}: none of {names} found: {_LAYOUT}")
    weights = found[0]
  ae = ae or os.path.join(src, AE)
  if not os.path.isfile(ae):
    raise FileNotFoundError(f"{ae} is missing (the FLUX autoencoder; BAGEL ships no VAE config, its architecture "
                            f"is read from this file's shapes)")
  files = {n: os.path.join(src, n) for n in (LLM_JSON, VIT_JSON) + TOKENIZER_FILES
           if os.path.isfile(os.path.join(src, n))}
  if inspect_kw.get("special_ids") is None:
    inspect_kw["special_ids"] = special_ids_from_tokenizer(files)
  release = inspect_release(llm_json, vit_json, safetensors_io.open_file(weights),
                            safetensors_io.open_file(ae), **inspect_kw)
  check_special_ids(release.config, src)
  release.source_files = files
  return release


def copy_source_files(files: Mapping[str, str], dst_dir: str) -> None:
  if files:
    os.makedirs(os.path.join(dst_dir, SOURCE_FILES), exist_ok=True)
    for name, path in files.items():
      shutil.copyfile(path, os.path.join(dst_dir, SOURCE_FILES, name))


def save_checkpoint(tmp: str, params, config: config_lib.BagelConfig, files: Mapping[str, str]) -> None:
  check_special_ids(config, "converted checkpoint")
  ckpt_lib.save_params(tmp, params, config)
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_index() == 0:
    copy_source_files(files, tmp)


def convert_bagel(src: str, dst: str, *, dtype="float32", weights: Optional[str] = None, ae: Optional[str] = None,
                  sharding_fn: Optional[ShardingFn] = None, progress: bool = False, overwrite: bool = False,
                  check_tables: bool = True, log: Callable[[str], None] = lambda s: None,
                  **inspect_kw) -> config_lib.BagelConfig:
  """Release directory `src` -> our checkpoint at `dst` (written to a temporary sibling, then renamed)."""
  release = open_release(src, weights=weights, ae=ae, dtype=dtype, **inspect_kw)
  log(f"inferred: {release.summary()}")
  with atomic_output_dir(dst, overwrite) as tmp:
    params = load_release(release, dtype, sharding_fn=sharding_fn, progress=progress, check_tables=check_tables)
    save_checkpoint(tmp, params, release.config, release.source_files)
  return release.config


# ----------------------------------------------------------------------------------------------------------
# Export.
# ----------------------------------------------------------------------------------------------------------

def export_bagel(checkpoint: str, dst: str, *, dtype=None, ae_dtype="float32", step: Optional[int] = None,
                 overwrite: bool = False, progress: bool = False) -> List[str]:
  """Our checkpoint -> an official-format directory: `ema.safetensors` in `dtype` (default: the stored
  dtype) with the fixed tables recomputed in the official layout, `ae.safetensors` (FLUX ships it in fp32; its
  metadata records the VAE scale/shift/groups, which no official file does),
  `llm_config.json`, `vit_config.json` (stored layer count = layers run + 1, which the official loader
  subtracts) and the source's tokenizer files. Returns the names of the files written."""
  params, config, _ = ckpt_lib.load_params(checkpoint, step=step)
  flat = flatten(params)
  plan, vplan = ema_plan(config), vae_plan(config)
  extra = sorted(set(flat) - set(plan) - set(vplan))
  if extra:
    raise ConversionError(f"{checkpoint}: parameters with no official name: {extra[:8]}")
  dt = target_dtype(dtype or config.param_dtype)
  ema_entries = [(name, shape, dt, produce) for name, shape, produce in export_tensors(plan, flat, dt)]
  for name, (side, d) in fixed_tables(config).items():
    ema_entries.append((name, (side * side, d), dt, lambda side=side, d=d: cast(sincos_2d_table(d, side), dt)))
  adt = target_dtype(ae_dtype)
  ae_entries = [(name, shape, adt, produce) for name, shape, produce in export_tensors(vplan, flat, adt)]
  src_dir = os.path.join(checkpoint, SOURCE_FILES)
  kept = {n: os.path.join(src_dir, n) for n in TOKENIZER_FILES + (LLM_JSON, VIT_JSON)
          if os.path.isfile(os.path.join(src_dir, n))}
  base_llm = read_json(kept[LLM_JSON], "") if LLM_JSON in kept else None
  base_vit = read_json(kept[VIT_JSON], "") if VIT_JSON in kept else None
  written = [EMA, AE, LLM_JSON, VIT_JSON]
  with atomic_output_dir(dst, overwrite) as tmp:
    safetensors_io.write_streaming(os.path.join(tmp, EMA), ema_entries, {"format": "pt"}, progress)
    safetensors_io.write_streaming(os.path.join(tmp, AE), ae_entries, {"format": "pt", **vae_metadata(config.vae)},
                                   progress)
    llm_json = llm_config_to_hf(config.llm, base_llm, torch_dtype=dtype_name(dt))
    vit_json = dict(base_vit or {}, **vit_config_to_hf(config.vit))
    for name, value in ((LLM_JSON, llm_json), (VIT_JSON, vit_json)):
      with open(os.path.join(tmp, name), "w") as f:
        json.dump(value, f, indent=2)
    for name in TOKENIZER_FILES:
      if name in kept:
        shutil.copyfile(kept[name], os.path.join(tmp, name))
        written.append(name)
  return written
