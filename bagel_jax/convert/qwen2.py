"""Qwen2 / BAGEL language-model tensors <-> our `llm` parameter tree.

One table serves HF Qwen2/Qwen2.5 (prefix `model.`, dense) and the BAGEL release (prefix
`language_model.model.`, MoT): a gen-expert tensor is named like its und twin with `_moe_gen` appended to the
module (`self_attn.q_proj_moe_gen`, `input_layernorm_moe_gen`, `norm_moe_gen`) or, for the MLP, to the block
(`mlp_moe_gen.gate_proj`). Hard-routed weights are stacked on a `modality` axis: und = 0, gen = 1.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterator, Mapping, Optional, Tuple

import numpy as np

from bagel_jax.convert.common import TensorSource, get_path, kernel_to_linear, linear_to_kernel, set_path
from bagel_jax.models.config import LLMConfig
from bagel_jax.models.qwen2 import expert_counts


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
  n = expert_counts(cfg.layer_variant)
  if block in ("attn", "attn_norm"):
    return n["attn"]
  if block == "mlp_norm":
    return 2 if cfg.layer_variant == "mot" else 1
  return n["mlp"]


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


def llm_from_torch(src: TensorSource, cfg: LLMConfig, *, prefix: str = "model.", lm_head: str = "lm_head.weight",
                   scan_layers: bool = True, dtype=np.float32, qk_norm_default_ones: bool = True) -> Dict:
  """Reads an LLM with `cfg.layer_variant`'s naming from `src` into our `llm` subtree.

  A missing q/k-norm (plain Qwen2/Qwen2.5 checkpoints) is initialised to ones, as the official loader does.
  A missing `lm_head` falls back to the embedding (tied checkpoints; BAGEL unties it).
  """
  if cfg.layer_variant == "moe_topk":
    raise ValueError("moe_topk has no released checkpoint naming to convert from")
  out: Dict = {}
  embedding = src.take(prefix + "embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size)).astype(dtype)
  set_path(out, "embed_tokens/embedding", embedding)
  per_layer: Dict[str, list] = {}
  for i in range(cfg.num_layers):
    base = f"{prefix}layers.{i}."
    for e in _layer_entries(cfg):
      n = _block_experts(cfg, e.block)
      shape = _torch_shape(e.kind, cfg, e.path)
      vals = []
      for name in ([e.und, e.gen] if n == 2 else [e.und]):
        full = base + name
        if full not in src and e.kind == "vector" and "_norm" in e.path and qk_norm_default_ones:
          vals.append(np.ones(shape, dtype))  # qk-norm absent in Qwen2.5
          continue
        vals.append(_to_ours(src.take(full, shape), e.kind, cfg).astype(dtype))
      per_layer.setdefault(e.path, []).append(np.stack(vals) if n == 2 else vals[0])
  for path, vals in per_layer.items():
    if scan_layers:
      set_path(out, "layers/" + path, np.stack(vals))
    else:
      for i, v in enumerate(vals):
        set_path(out, f"layers_{i}/" + path, v)
  n_final = expert_counts(cfg.layer_variant)["final_norm"]
  norms = [src.take(prefix + "norm.weight", (cfg.hidden_size,))]
  if n_final == 2:
    norms.append(src.take(prefix + "norm_moe_gen.weight", (cfg.hidden_size,)))
  set_path(out, "norm/scale", (np.stack(norms) if n_final == 2 else norms[0]).astype(dtype))
  head = src.take(lm_head, (cfg.vocab_size, cfg.hidden_size)) if lm_head in src else embedding
  set_path(out, "lm_head/kernel", linear_to_kernel(head).astype(dtype))
  src.ignore(*[k for k in src.keys() if k.endswith("rotary_emb.inv_freq")])
  return out


def llm_to_torch(llm: Mapping, cfg: LLMConfig, *, prefix: str = "model.", lm_head: str = "lm_head.weight",
                 scan_layers: bool = True) -> Dict[str, np.ndarray]:
  """The reverse of `llm_from_torch` (official naming, PyTorch layouts)."""
  out = {prefix + "embed_tokens.weight": np.asarray(get_path(llm, "embed_tokens/embedding"))}
  for i in range(cfg.num_layers):
    base = f"{prefix}layers.{i}."
    for e in _layer_entries(cfg):
      arr = (np.asarray(get_path(llm, "layers/" + e.path))[i] if scan_layers
             else np.asarray(get_path(llm, f"layers_{i}/" + e.path)))
      if _block_experts(cfg, e.block) == 2:
        out[base + e.und] = _to_torch(arr[0], e.kind, cfg)
        out[base + e.gen] = _to_torch(arr[1], e.kind, cfg)
      else:
        out[base + e.und] = _to_torch(arr, e.kind, cfg)
  norm = np.asarray(get_path(llm, "norm/scale"))
  if expert_counts(cfg.layer_variant)["final_norm"] == 2:
    out[prefix + "norm.weight"], out[prefix + "norm_moe_gen.weight"] = norm[0], norm[1]
  else:
    out[prefix + "norm.weight"] = norm
  out[lm_head] = kernel_to_linear(np.asarray(get_path(llm, "lm_head/kernel")))
  return out


def llm_config_from_hf(hf: Mapping, *, layer_variant: str = "dense", qk_norm: Optional[bool] = None,
                       **overrides) -> LLMConfig:
  """LLMConfig from an HF Qwen2 `config.json` / BAGEL `llm_config.json` dict."""
  heads = int(hf["num_attention_heads"])
  d = int(hf["hidden_size"])
  kw = dict(vocab_size=int(hf["vocab_size"]), hidden_size=d, num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads, num_kv_heads=int(hf.get("num_key_value_heads", heads)),
            head_dim=int(hf.get("head_dim") or d // heads), intermediate_size=int(hf["intermediate_size"]),
            rope_theta=float(hf.get("rope_theta", 1e6)), rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            qk_norm=bool(hf.get("qk_norm", False)) if qk_norm is None else qk_norm, layer_variant=layer_variant)
  kw.update(overrides)
  return LLMConfig(**kw)
