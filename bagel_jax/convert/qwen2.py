"""Qwen2 / BAGEL language-model tensors <-> our `llm` parameter tree.

One table serves HF Qwen2/Qwen2.5 (prefix `model.`, dense) and the BAGEL release (prefix
`language_model.model.`, MoT): a gen-expert tensor is named like its und twin with `_moe_gen` appended to the
module (`self_attn.q_proj_moe_gen`, `input_layernorm_moe_gen`, `norm_moe_gen`) or, for the MLP, to the block
(`mlp_moe_gen.gate_proj`). Hard-routed weights are stacked on a `modality` axis: und = 0, gen = 1.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Dict, Iterator, Mapping, Optional, Tuple

import numpy as np

from bagel_jax.convert.common import (ConversionError, Leaf, Piece, Plan, TensorSource, claim_plan,
                                      export_tensors, flatten, kernel_to_linear, linear_to_kernel, materialize,
                                      single)
from bagel_jax.models import variants
from bagel_jax.models.config import LLMConfig


@dataclasses.dataclass(frozen=True)
class _Entry:
  path: str          # our path under the layer (or llm) node
  block: str         # 'attn' | 'mlp' | 'attn_norm' | 'mlp_norm'
  und: str           # torch name of the und tensor (relative to the layer prefix)
  gen: str           # torch name of the gen tensor
  kind: str          # 'q' | 'kv' | 'o' | 'linear' | 'vector' | 'qkv_bias' | 'kv_bias'


def _layer_entries(cfg: LLMConfig) -> Iterator[_Entry]:
  for p in ("q", "k", "v"):
    kind = "q" if p == "q" else "kv"
    yield _Entry(f"self_attn/{p}_proj/kernel", "attn", f"self_attn.{p}_proj.weight",
                 f"self_attn.{p}_proj_moe_gen.weight", kind)
    yield _Entry(f"self_attn/{p}_proj/bias", "attn", f"self_attn.{p}_proj.bias",
                 f"self_attn.{p}_proj_moe_gen.bias", kind + "_bias")
  yield _Entry("self_attn/o_proj/kernel", "attn", "self_attn.o_proj.weight", "self_attn.o_proj_moe_gen.weight", "o")
  if cfg.qk_norm:
    for p in ("q", "k"):
      yield _Entry(f"self_attn/{p}_norm/scale", "attn", f"self_attn.{p}_norm.weight",
                   f"self_attn.{p}_norm_moe_gen.weight", "vector")
  yield _Entry("input_layernorm/scale", "attn_norm", "input_layernorm.weight", "input_layernorm_moe_gen.weight",
               "vector")
  yield _Entry("post_attention_layernorm/scale", "mlp_norm", "post_attention_layernorm.weight",
               "post_attention_layernorm_moe_gen.weight", "vector")
  for p in ("gate", "up", "down"):
    yield _Entry(f"mlp/{p}_proj/kernel", "mlp", f"mlp.{p}_proj.weight", f"mlp_moe_gen.{p}_proj.weight", "linear")


def _block_experts(cfg: LLMConfig, block: str) -> int:
  """The variant's weight sets of a block: 2 means the official tensor has its `_moe_gen` twin."""
  e = variants.get(cfg.layer_variant).experts
  return {"attn": e.attn, "attn_norm": e.attn, "mlp_norm": e.mlp_norm, "mlp": e.mlp}[block]


def _to_ours(t: np.ndarray, kind: str, cfg: LLMConfig) -> np.ndarray:
  hd = cfg.head_dim
  if kind == "q":
    return linear_to_kernel(t).reshape(cfg.hidden_size, cfg.num_heads, hd)
  if kind == "kv":
    return linear_to_kernel(t).reshape(cfg.hidden_size, cfg.num_kv_heads, hd)
  if kind == "q_bias":
    return np.asarray(t).reshape(cfg.num_heads, hd)
  if kind == "kv_bias":
    return np.asarray(t).reshape(cfg.num_kv_heads, hd)
  if kind == "o":
    return linear_to_kernel(t).reshape(cfg.num_heads, hd, cfg.hidden_size)
  if kind == "linear":
    return linear_to_kernel(t)
  return np.asarray(t)


def _to_torch(a: np.ndarray, kind: str, cfg: LLMConfig) -> np.ndarray:
  if kind in ("q", "kv"):
    return kernel_to_linear(np.asarray(a).reshape(cfg.hidden_size, -1))
  if kind in ("q_bias", "kv_bias"):
    return np.asarray(a).reshape(-1)
  if kind == "o":
    return kernel_to_linear(np.asarray(a).reshape(-1, cfg.hidden_size))
  if kind == "linear":
    return kernel_to_linear(a)
  return np.asarray(a)


def _torch_shape(kind: str, cfg: LLMConfig, path: str) -> Tuple[int, ...]:
  d, hd = cfg.hidden_size, cfg.head_dim
  f = cfg.intermediate_size
  return {
      "q": (cfg.num_heads * hd, d), "kv": (cfg.num_kv_heads * hd, d), "q_bias": (cfg.num_heads * hd,),
      "kv_bias": (cfg.num_kv_heads * hd,), "o": (d, cfg.num_heads * hd),
      "linear": (d, f) if "down_proj" in path else (f, d),
      "vector": (hd,) if "_norm/" in path and "self_attn" in path else (d,),
  }[kind]


def _our_shape(kind: str, cfg: LLMConfig, path: str) -> Tuple[int, ...]:
  d, hd, nh, nkv = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
  if kind == "linear":
    return _torch_shape(kind, cfg, path)[::-1]
  return {"q": (d, nh, hd), "kv": (d, nkv, hd), "q_bias": (nh, hd), "kv_bias": (nkv, hd), "o": (nh, hd, d),
          "vector": _torch_shape(kind, cfg, path)}[kind]


def llm_plan(cfg: LLMConfig, *, src: Optional[TensorSource] = None, prefix: str = "model.",
             lm_head: str = "lm_head.weight", scan_layers: bool = True, qk_norm_default_ones: bool = True,
             gen_from_und: bool = False, tie_fallback: bool = True) -> Plan:
  """Our `llm` paths -> official tensor names and layouts for `cfg.layer_variant`.

  Choices that depend on what the source holds are made against `src` (no src: the full official naming,
  as exported): a missing QK-norm (plain Qwen2/Qwen2.5) becomes ones as the official loader leaves it
  (`qk_norm_default_ones`); a missing gen-expert twin is read from its und tensor, the official
  `copy_init_moe` (`gen_from_und`); a missing `lm_head` reuses the embedding of a tied checkpoint
  (`tie_fallback`; BAGEL unties it). Anything else missing is left for `claim_plan` to report.
  """
  if variants.get(cfg.layer_variant).official_layer is None:
    raise ConversionError(f"{cfg.layer_variant} has no released checkpoint naming to convert from or to")
  has = (lambda n: True) if src is None else (lambda n: n in src)
  plan: Plan = {}
  d, v = cfg.hidden_size, cfg.vocab_size
  plan["embed_tokens/embedding"] = single(prefix + "embed_tokens.weight", (v, d), (v, d))

  def piece(index, name, und_name, kind, shape, gen=False, qk_norm=False):
    to_ours = lambda t: _to_ours(t, kind, cfg)
    to_src = lambda a: _to_torch(a, kind, cfg)
    if has(name):
      return Piece(index, name, shape, to_ours, to_src)
    if gen and gen_from_und and has(und_name):
      return Piece(index, und_name, shape, to_ours, None)
    if qk_norm and qk_norm_default_ones:
      return Piece(index, None, shape, fill=1.0)
    return Piece(index, name, shape, to_ours, to_src)  # claim_plan reports it missing

  for e in _layer_entries(cfg):
    n = _block_experts(cfg, e.block)
    src_shape, ours = _torch_shape(e.kind, cfg, e.path), _our_shape(e.kind, cfg, e.path)
    qk = e.path.startswith("self_attn/") and "_norm/" in e.path
    per_layer = []
    for i in range(cfg.num_layers):
      base = f"{prefix}layers.{i}."
      pieces = []
      for x in range(n):
        idx = ((i,) if scan_layers else ()) + ((x,) if n == 2 else ())
        pieces.append(piece(idx, base + (e.gen if x else e.und), base + e.und, e.kind, src_shape, x == 1, qk))
      per_layer.append(pieces)
    stack = (n,) if n == 2 else ()
    if scan_layers:
      plan["layers/" + e.path] = Leaf((cfg.num_layers,) + stack + ours, tuple(p for ps in per_layer for p in ps))
    else:
      for i, ps in enumerate(per_layer):
        plan[f"layers_{i}/" + e.path] = Leaf(stack + ours, tuple(ps))

  n_final = variants.get(cfg.layer_variant).experts.final_norm
  norms = [piece((0,) if n_final == 2 else (), prefix + "norm.weight", "", "vector", (d,))]
  if n_final == 2:
    norms.append(piece((1,), prefix + "norm_moe_gen.weight", prefix + "norm.weight", "vector", (d,), gen=True))
  plan["norm/scale"] = Leaf(((2,) if n_final == 2 else ()) + (d,), tuple(norms))
  if has(lm_head) or not tie_fallback:
    plan["lm_head/kernel"] = single(lm_head, (v, d), (d, v), linear_to_kernel, kernel_to_linear)
  else:
    plan["lm_head/kernel"] = Leaf((d, v), (Piece((), prefix + "embed_tokens.weight", (v, d), linear_to_kernel,
                                                 None),))
  return plan


def llm_from_torch(src: TensorSource, cfg: LLMConfig, *, prefix: str = "model.", lm_head: str = "lm_head.weight",
                   scan_layers: bool = True, dtype=np.float32, qk_norm_default_ones: bool = True,
                   gen_from_und: bool = False) -> Dict:
  """Reads an LLM with `cfg.layer_variant`'s naming from `src` into our `llm` subtree (see `llm_plan`); does
  not call `src.finish()`, so whole-model converters can share one source."""
  plan = llm_plan(cfg, src=src, prefix=prefix, lm_head=lm_head, scan_layers=scan_layers,
                  qk_norm_default_ones=qk_norm_default_ones, gen_from_und=gen_from_und)
  claim_plan(plan, src)
  src.ignore(*[k for k in src.keys() if k.endswith("rotary_emb.inv_freq")])
  return materialize(plan, src, dtype)


def llm_to_torch(llm: Mapping, cfg: LLMConfig, *, prefix: str = "model.", lm_head: str = "lm_head.weight",
                 scan_layers: bool = True) -> Dict[str, np.ndarray]:
  """The reverse of `llm_from_torch` (official naming, PyTorch layouts)."""
  plan = llm_plan(cfg, prefix=prefix, lm_head=lm_head, scan_layers=scan_layers)
  return {name: produce() for name, _, produce in export_tensors(plan, flatten(llm))}


def infer_variant(names, prefix: str) -> str:
  """dense / moe / mot from the keys present: gen-expert attention or layer norms -> mot, only a gen MLP
  (and final norm) -> moe, no `_moe_gen` tensor -> dense (reference §1.3)."""
  layer = re.compile(re.escape(prefix) + r"layers\.\d+\.(.*)$")
  mot = moe = False
  for n in names:
    m = layer.match(n)
    if not m:
      continue
    rest = m.group(1)
    if rest.startswith("mlp_moe_gen."):
      moe = True
    elif "_moe_gen" in rest:
      mot = True
  return "mot" if mot else "moe" if moe else "dense"


def llm_config_from_hf(hf: Mapping, *, layer_variant: str = "dense", qk_norm: Optional[bool] = None,
                       **overrides) -> LLMConfig:
  """LLMConfig from an HF Qwen2 `config.json` / BAGEL `llm_config.json` dict.

  RoPE theta is read from `rope_theta` (transformers 4, BAGEL) or `rope_parameters` (transformers 5), with
  Qwen2Config's default 10000 when neither is given; RoPE scaling and sliding-window attention are not
  implemented and raise rather than convert into a model that computes something else."""
  missing = [k for k in ("num_attention_heads", "hidden_size", "vocab_size", "num_hidden_layers",
                         "intermediate_size") if k not in hf]
  if missing:
    raise ConversionError(f"Qwen2 config lacks {missing}")
  if hf.get("hidden_act", "silu") != "silu":
    raise ConversionError(f"Qwen2 config hidden_act={hf['hidden_act']!r}: only silu (SwiGLU) is implemented")
  if hf.get("use_sliding_window"):
    raise ConversionError("Qwen2 config use_sliding_window=true: sliding-window attention is not implemented")
  rope = dict(hf.get("rope_parameters") or {})
  scaling = hf.get("rope_scaling") or {}
  rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
  if rope_type != "default":
    raise ConversionError(f"Qwen2 config rope type {rope_type!r}: only plain RoPE is implemented")
  theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
  heads = int(hf["num_attention_heads"])
  d = int(hf["hidden_size"])
  kw = dict(vocab_size=int(hf["vocab_size"]), hidden_size=d, num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads, num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or d // heads), intermediate_size=int(hf["intermediate_size"]),
            rope_theta=float(theta), rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            qk_norm=bool(hf.get("qk_norm", False)) if qk_norm is None else qk_norm, layer_variant=layer_variant)
  kw.update(overrides)
  return LLMConfig(**kw)


# Qwen2.5-7B-Instruct's config.json as BAGEL ships it in llm_config.json (reference §8), for the fields our
# config does not carry.
_QWEN25_DEFAULTS = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu",
                        attention_dropout=0.0, initializer_range=0.02, max_position_embeddings=32768,
                        sliding_window=131072, use_sliding_window=False, use_cache=True, bos_token_id=151643,
                        eos_token_id=151645)


def llm_config_to_hf(cfg: LLMConfig, base: Optional[Mapping] = None, torch_dtype: str = "bfloat16") -> Dict:
  """BAGEL's `llm_config.json` for `cfg`: the source's own file (`base`) with our architecture fields written
  over it, or Qwen2.5's defaults. `layer_module` is set so the official training code builds the right
  variant (its inference code forces MoT)."""
  layer_module = variants.get(cfg.layer_variant).official_layer
  if layer_module is None:
    raise ConversionError(f"layer_variant {cfg.layer_variant!r} has no official layer module")
  out = dict(_QWEN25_DEFAULTS, max_window_layers=cfg.num_layers)
  out.update(base or {})
  out.update(torch_dtype=torch_dtype, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
             num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
             intermediate_size=cfg.intermediate_size, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
             qk_norm=cfg.qk_norm, tie_word_embeddings=False, layer_module=layer_module)
  if cfg.head_dim * cfg.num_heads != cfg.hidden_size or "head_dim" in out:
    out["head_dim"] = cfg.head_dim  # the official Qwen2 code derives hidden_size // heads; newer HF reads this
  return out
