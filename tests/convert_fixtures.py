"""Official-format BAGEL key tables and tiny release directories for the conversion tests.

Written from the key table of the reference (§8: `ema.safetensors` patterns, the `ae.safetensors`
description) rather than from the converter's own mapping, so a naming or layout mistake in the converter
cannot be mirrored here.
"""
import json
import math
import os
from typing import Dict, Tuple

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

Shapes = Dict[str, Tuple[int, ...]]

# The released BAGEL-7B-MoT (reference §8-9).
SEVEN_B = dict(vocab=152064, hidden=3584, layers=28, heads=28, kv_heads=4, head_dim=128, mlp=18944,
               vit_hidden=1152, vit_mlp=4304, vit_heads=16, vit_layers=26, vit_stored_layers=27, patch=14,
               vit_grid=70, latent_channels=64, max_latent=64, variant="mot")
FLUX = dict(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z=16)

# A tiny model with the same structure.
TINY = dict(vocab=256, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, mlp=96, vit_hidden=32, vit_mlp=48,
            vit_heads=2, vit_layers=2, vit_stored_layers=3, patch=4, vit_grid=6, latent_channels=16,
            max_latent=8, variant="mot")
TINY_AE = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z=4)
TINY_SPECIALS = {"<|im_start|>": 1, "<|im_end|>": 2, "<|vision_start|>": 3, "<|vision_end|>": 4}


def ema_shapes(c) -> Shapes:
  """Every key of `ema.safetensors` for dims `c`, pattern by pattern as the reference table lists them."""
  hd, kv = c["head_dim"], c["kv_heads"] * c["head_dim"]
  h, i, v = c["hidden"], c["mlp"], c["vocab"]
  mot, moe = c["variant"] == "mot", c["variant"] in ("moe", "mot")
  t = {"language_model.model.embed_tokens.weight": (v, h)}
  for n in range(c["layers"]):
    L = f"language_model.model.layers.{n}"
    attn_suffixes = ["", "_moe_gen"] if mot else [""]
    for g in attn_suffixes:
      t[f"{L}.self_attn.q_proj{g}.weight"], t[f"{L}.self_attn.q_proj{g}.bias"] = (h, h), (h,)
      t[f"{L}.self_attn.k_proj{g}.weight"], t[f"{L}.self_attn.k_proj{g}.bias"] = (kv, h), (kv,)
      t[f"{L}.self_attn.v_proj{g}.weight"], t[f"{L}.self_attn.v_proj{g}.bias"] = (kv, h), (kv,)
      t[f"{L}.self_attn.o_proj{g}.weight"] = (h, h)
      t[f"{L}.self_attn.q_norm{g}.weight"] = (hd,)
      t[f"{L}.self_attn.k_norm{g}.weight"] = (hd,)
      t[f"{L}.input_layernorm{g}.weight"] = (h,)
      t[f"{L}.post_attention_layernorm{g}.weight"] = (h,)
    for m in (["mlp", "mlp_moe_gen"] if moe else ["mlp"]):
      t[f"{L}.{m}.gate_proj.weight"] = (i, h)
      t[f"{L}.{m}.up_proj.weight"] = (i, h)
      t[f"{L}.{m}.down_proj.weight"] = (h, i)
  t["language_model.model.norm.weight"] = (h,)
  if moe:
    t["language_model.model.norm_moe_gen.weight"] = (h,)
  t["language_model.lm_head.weight"] = (v, h)
  t["time_embedder.mlp.0.weight"], t["time_embedder.mlp.0.bias"] = (h, 256), (h,)
  t["time_embedder.mlp.2.weight"], t["time_embedder.mlp.2.bias"] = (h, h), (h,)
  t["vae2llm.weight"], t["vae2llm.bias"] = (h, c["latent_channels"]), (h,)
  t["llm2vae.weight"], t["llm2vae.bias"] = (c["latent_channels"], h), (c["latent_channels"],)
  t["latent_pos_embed.pos_embed"] = (c["max_latent"] ** 2, h)
  t["vit_pos_embed.pos_embed"] = (c["vit_grid"] ** 2, h)
  vd, vf = c["vit_hidden"], c["vit_mlp"]
  t["connector.fc1.weight"], t["connector.fc1.bias"] = (h, vd), (h,)
  t["connector.fc2.weight"], t["connector.fc2.bias"] = (h, h), (h,)
  e = "vit_model.vision_model.embeddings"
  t[f"{e}.patch_embedding.weight"] = (vd, c["patch"] * c["patch"] * 3)
  t[f"{e}.patch_embedding.bias"] = (vd,)
  t[f"{e}.position_embedding.weight"] = (c["vit_grid"] ** 2, vd)
  for j in range(c["vit_layers"]):
    E = f"vit_model.vision_model.encoder.layers.{j}"
    for p in ("q", "k", "v", "out"):
      t[f"{E}.self_attn.{p}_proj.weight"], t[f"{E}.self_attn.{p}_proj.bias"] = (vd, vd), (vd,)
    for ln in ("layer_norm1", "layer_norm2"):
      t[f"{E}.{ln}.weight"], t[f"{E}.{ln}.bias"] = (vd,), (vd,)
    t[f"{E}.mlp.fc1.weight"], t[f"{E}.mlp.fc1.bias"] = (vf, vd), (vf,)
    t[f"{E}.mlp.fc2.weight"], t[f"{E}.mlp.fc2.bias"] = (vd, vf), (vd,)
  t["vit_model.vision_model.post_layernorm.weight"] = (vd,)
  t["vit_model.vision_model.post_layernorm.bias"] = (vd,)
  return t


def ae_shapes(a) -> Shapes:
  """FLUX AE keys (BFL naming) from the reference's description of `ae.safetensors`."""
  ch, mult, nrb, z = a["ch"], a["ch_mult"], a["num_res_blocks"], a["z"]
  t: Shapes = {}

  def conv(name, cout, cin, k=3):
    t[f"{name}.weight"], t[f"{name}.bias"] = (cout, cin, k, k), (cout,)

  def norm(name, c):
    t[f"{name}.weight"], t[f"{name}.bias"] = (c,), (c,)

  def resblock(name, cin, cout):
    norm(f"{name}.norm1", cin)
    conv(f"{name}.conv1", cout, cin)
    norm(f"{name}.norm2", cout)
    conv(f"{name}.conv2", cout, cout)
    if cin != cout:
      conv(f"{name}.nin_shortcut", cout, cin, 1)

  def mid(name, c):
    resblock(f"{name}.block_1", c, c)
    norm(f"{name}.attn_1.norm", c)
    for p in ("q", "k", "v", "proj_out"):
      conv(f"{name}.attn_1.{p}", c, c, 1)
    resblock(f"{name}.block_2", c, c)

  conv("encoder.conv_in", ch, 3)
  cin = ch
  for lvl, m in enumerate(mult):
    for b in range(nrb):
      resblock(f"encoder.down.{lvl}.block.{b}", cin, ch * m)
      cin = ch * m
    if lvl < len(mult) - 1:
      conv(f"encoder.down.{lvl}.downsample.conv", cin, cin)
  mid("encoder.mid", cin)
  norm("encoder.norm_out", cin)
  conv("encoder.conv_out", 2 * z, cin)

  top = ch * mult[-1]
  conv("decoder.conv_in", top, z)
  mid("decoder.mid", top)
  cin = top
  for lvl in reversed(range(len(mult))):
    for b in range(nrb + 1):
      resblock(f"decoder.up.{lvl}.block.{b}", cin, ch * mult[lvl])
      cin = ch * mult[lvl]
    if lvl > 0:
      conv(f"decoder.up.{lvl}.upsample.conv", cin, cin)
  norm("decoder.norm_out", cin)
  conv("decoder.conv_out", 3, cin)
  return t


def llm_config_json(c) -> dict:
  return dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu", hidden_size=c["hidden"],
              intermediate_size=c["mlp"], num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
              num_key_value_heads=c["kv_heads"], max_position_embeddings=32768, max_window_layers=c["layers"],
              rms_norm_eps=1e-6, rope_theta=1e6, sliding_window=131072, tie_word_embeddings=False,
              bos_token_id=151643, eos_token_id=151645, qk_norm=True, torch_dtype="bfloat16",
              vocab_size=c["vocab"])


def vit_config_json(c) -> dict:
  return dict(hidden_size=c["vit_hidden"], intermediate_size=c["vit_mlp"], num_attention_heads=c["vit_heads"],
              num_hidden_layers=c["vit_stored_layers"], patch_size=c["patch"], image_size=c["patch"] * c["vit_grid"],
              num_channels=3)


def sincos_table(dim: int, side: int) -> np.ndarray:
  """MAE's get_2d_sincos_pos_embed, as the official PositionEmbedding fills its buffer (fp64 -> fp32)."""
  def one_d(d, pos):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  gh, gw = np.meshgrid(np.arange(side, dtype=np.float32), np.arange(side, dtype=np.float32), indexing="xy")
  grid = np.stack([gh, gw], axis=0).reshape(2, 1, side, side)  # grid[0] = w (column), grid[1] = h (row)
  return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1).astype(np.float32)


def random_tensors(shapes: Shapes, seed: int, dtype) -> Dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in sorted(shapes.items()):
    if "norm" in name and name.endswith(".weight"):  # RMS/Layer/GroupNorm scales around 1
      value = 1.0 + 0.1 * rng.standard_normal(shape)
    else:
      value = rng.standard_normal(shape) / math.sqrt(shape[-1] if len(shape) > 1 else 8)
    out[name] = value.astype(np.float32).astype(dtype)
  return out


def write_release(directory: str, c=None, a=None, seed: int = 0, ema_dtype=ml_dtypes.bfloat16,
                  ae_dtype=np.float32, tokenizer: bool = True, ema_name: str = "ema.safetensors"):
  """A random tiny release: bf16 `ema.safetensors` (as released), fp32 `ae.safetensors` (as FLUX ships it),
  the two JSON configs and a tokenizer.json naming the four special tokens."""
  c, a = c or TINY, a or TINY_AE
  os.makedirs(directory, exist_ok=True)
  ema = random_tensors(ema_shapes(c), seed, ema_dtype)
  ema["latent_pos_embed.pos_embed"] = sincos_table(c["hidden"], c["max_latent"]).astype(ema_dtype)
  ema["vit_pos_embed.pos_embed"] = sincos_table(c["hidden"], c["vit_grid"]).astype(ema_dtype)
  save_file(ema, os.path.join(directory, ema_name), metadata={"format": "pt"})
  save_file(random_tensors(ae_shapes(a), seed + 1, ae_dtype), os.path.join(directory, "ae.safetensors"),
            metadata={"format": "pt"})
  with open(os.path.join(directory, "llm_config.json"), "w") as f:
    json.dump(llm_config_json(c), f)
  with open(os.path.join(directory, "vit_config.json"), "w") as f:
    json.dump(vit_config_json(c), f)
  if tokenizer:
    with open(os.path.join(directory, "tokenizer.json"), "w") as f:
      json.dump({"added_tokens": [{"id": i, "content": s, "special": True} for s, i in TINY_SPECIALS.items()],
                 "model": {"type": "BPE", "vocab": {}}}, f)
  return directory
