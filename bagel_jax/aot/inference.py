"""Inference steps compiled for a TPU topology: a denoising step (the model's forward over rows of one prompt +
one noisy latent image, velocity of every latent token) and a text decode step (one token per row against a KV
cache, through `kernels.ops.cached_attention`)."""
from __future__ import annotations

import copy
import time
from typing import Any, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from bagel_jax.aot import costs, libtpu, rows as rows_lib, training
from bagel_jax.kernels import mask as mask_lib, ops
from bagel_jax.models import bagel as bagel_lib
from bagel_jax.models.routing import take_rows
from bagel_jax.parallel import mesh as mesh_lib, rules as rules_lib
from bagel_jax.parallel import topology as topology_lib
from bagel_jax.train import config as train_config, flops as flops_lib


def _inference_params(model_cfg, mesh, rules, dtype):
  abstract = bagel_lib.abstract_params(model_cfg)
  shardings = rules_lib.logical_to_sharding(bagel_lib.param_logical_axes(model_cfg), abstract, mesh, rules)
  return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, dtype, sharding=sh), abstract, shardings)


def _denoise_fn(model_cfg):

  def velocity(module, batch):
    t = jax.nn.sigmoid(batch["latent_t_logit"])
    emb = module.embed_latents(batch["latent_x0"].astype(model_cfg.dtype), t, batch["latent_pos"])
    h, _ = module.hidden_states(batch, emb)
    return module.velocity(take_rows(h, batch["latent_dest"]))

  def step(params, batch):
    return bagel_lib.Bagel(model_cfg).apply({"params": params}, batch, method=velocity)

  return step


def _rms(x, w, eps):
  x32 = x.astype(jnp.float32)
  return (x32 * jnp.reciprocal(jnp.sqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps)) * w).astype(x.dtype)


def decode_weights_abstract(model_cfg, dtype, sharding):
  """Und-expert decoder weights stacked over layers (what text decoding reads), as ShapeDtypeStructs."""
  lc = model_cfg.llm
  d, h, kv, dh, f, n = lc.hidden_size, lc.num_heads, lc.num_kv_heads, lc.head_dim, lc.intermediate_size, lc.num_layers
  shapes = dict(wq=(n, d, h * dh), bq=(n, h * dh), wk=(n, d, kv * dh), bk=(n, kv * dh), wv=(n, d, kv * dh),
                bv=(n, kv * dh), wo=(n, h * dh, d), wg=(n, d, f), wu=(n, d, f), wd=(n, f, d), ln1=(n, d), ln2=(n, d),
                qn=(n, dh), kn=(n, dh))
  out = {k: jax.ShapeDtypeStruct(v, dtype, sharding=sharding) for k, v in shapes.items()}
  out["final_norm"] = jax.ShapeDtypeStruct((d,), dtype, sharding=sharding)
  out["lm_head"] = jax.ShapeDtypeStruct((d, lc.vocab_size), dtype, sharding=sharding)
  return out


def _decode_fn(model_cfg):
  """One decoding step: x [B, 1, D] (embedded token) through every layer against the cache, logits out.
  Mirrors the Qwen2 layer (RMSNorm, QK-norm, RoPE omitted: elementwise) with the cached Pallas attention."""
  lc = model_cfg.llm
  h_, kv_, dh, eps = lc.num_heads, lc.num_kv_heads, lc.head_dim, lc.rms_norm_eps

  def step(w, x, k_cache, v_cache, q_meta, cache_meta):
    b = x.shape[0]
    qm = mask_lib.TokenMeta(*q_meta)
    cm = mask_lib.TokenMeta(*cache_meta)

    def layer(hid, xs):
      lw, kc, vc = xs
      hn = _rms(hid, lw["ln1"], eps)
      q = (hn @ lw["wq"] + lw["bq"]).reshape(b, 1, h_, dh)
      k = (hn @ lw["wk"] + lw["bk"]).reshape(b, 1, kv_, dh)
      v = (hn @ lw["wv"] + lw["bv"]).reshape(b, 1, kv_, dh)
      q, k = _rms(q, lw["qn"], eps), _rms(k, lw["kn"], eps)
      o = ops.cached_attention(q, k, v, qm, kc, vc, cm)
      hid = hid + o.reshape(b, 1, h_ * dh) @ lw["wo"]
      hn = _rms(hid, lw["ln2"], eps)
      hid = hid + (jax.nn.silu(hn @ lw["wg"]) * (hn @ lw["wu"])) @ lw["wd"]
      return hid, (k, v)

    layer_w = {k: v for k, v in w.items() if k not in ("final_norm", "lm_head")}
    hid, new_kv = jax.lax.scan(layer, x, (layer_w, k_cache, v_cache))
    logits = jnp.einsum("bld,dv->blv", _rms(hid, w["final_norm"], eps), w["lm_head"],
                        preferred_element_type=jnp.float32)
    return logits, new_kv

  return step


def analyse_inference(config, topology: str, num_slices: int = 1, cache_len: int = 8192, px: int = 1024,
                      rows_per_chip: int = 1, effort: str = libtpu.CHECK_EFFORT) -> Dict[str, Any]:
  """Denoise and decode steps on the config's mesh, bf16 weights. Denoise: FSDP-sharded weights as in
  training (the model's forward, both experts); decode: und-expert weights replicated on every chip, rows
  sharded over all chips (plain data-parallel serving), KV cache of `cache_len` tokens per row."""
  gen, _, _ = topology_lib.parse(topology)
  chip = topology_lib.CHIPS[gen]
  devices = libtpu.topology_devices(topology, num_slices)
  n_dev = len(devices)
  c = copy.deepcopy(config)
  with c.unlocked():
    c.model.dtype = "bfloat16"
    c.model.remat_policy = "none"
  model_cfg = train_config.model_config(c)
  mesh = mesh_lib.create_mesh(dict(c.mesh.ici), dict(c.mesh.dcn), devices)
  rules = rules_lib.rules_for_mesh(rules_lib.get_rules(c.mesh.rules), mesh)
  options = libtpu.compiler_options(topology, effort)
  out: Dict[str, Any] = {}

  rates = costs.Rates.for_chip(chip)

  def finish(name, compiled, seconds, model_flops, tokens, **extra):
    mem = costs.memory(compiled)
    text = compiled.as_text()
    ex = training.executed_costs(text, costs.cost(compiled), rates, model_flops, n_dev, tokens)
    out[name] = dict(compile_seconds=round(seconds, 1),
                     memory_per_chip=dict(mem, hbm_bytes=chip.hbm_bytes,
                                          fraction_of_hbm=mem["total_bytes"] / chip.hbm_bytes),
                     model_flops_per_step=model_flops, tokens_per_step=tokens, kernels=costs.kernels(text),
                     compiled=ex["compiled"], **extra)
    rl = ex["roofline"]
    out[name]["roofline"] = dict(step_seconds=rl["step_seconds_overlapped"], limited_by=rl["limited_by"],
                                 mfu_estimate=rl["mfu_estimate_overlapped"],
                                 mfu_upper_bound_compute_only=rl["mfu_upper_bound_compute_only"],
                                 hbm_seconds=rl["hbm_seconds"], collective_seconds=rl["collective_seconds"],
                                 assumptions=rl["assumptions"])
    return out[name]["roofline"]["step_seconds"]

  # Denoise: the model's forward over rows of prompt + noisy image; weights FSDP-sharded as in training, so
  # every step all-gathers them.
  rows = n_dev * rows_per_chip
  spec, one = rows_lib.denoise_batch(model_cfg, rows, px=px)
  batch = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), spec.abstract(),
                       rules_lib.batch_shardings(mesh, spec.abstract()))
  fl = flops_lib.step_flops(one, model_cfg)
  fwd_flops = (fl["llm_matmul"] + fl["llm_attention"] + fl["latent_io"]) / 3 * rows
  params = _inference_params(model_cfg, mesh, rules, jnp.bfloat16)
  # The row's tile fractions are computed on the host, before the TPU topology's mesh becomes the default: under
  # it the metadata's jnp ops would be placed on devices this process cannot run.
  fractions = rows_lib.tile_fractions(one)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules), ops.assume_tile_fraction(fractions):
    t0 = time.time()
    compiled = jax.jit(_denoise_fn(model_cfg)).lower(params, batch).compile(compiler_options=options)
    sec = time.time() - t0
  step_t = finish("denoise_step", compiled, sec, fwd_flops, int(fl["tokens"]) * rows, image_px=px, rows=rows)
  out["denoise_step"]["roofline"]["images_per_second_per_chip"] = rows_per_chip / step_t

  # Decode: replicated und weights, rows over every device.
  lc = model_cfg.llm
  dmesh = jax.sharding.Mesh(np.asarray(devices).reshape(-1), ("data",))
  rep = NamedSharding(dmesh, P())
  rows_spec = NamedSharding(dmesh, P("data"))
  cache_spec = NamedSharding(dmesh, P(None, "data"))
  w = decode_weights_abstract(model_cfg, jnp.bfloat16, rep)
  x = jax.ShapeDtypeStruct((rows, 1, lc.hidden_size), jnp.bfloat16, sharding=rows_spec)
  kc = jax.ShapeDtypeStruct((lc.num_layers, rows, cache_len, lc.num_kv_heads, lc.head_dim), jnp.bfloat16,
                            sharding=cache_spec)
  qm = tuple(jax.ShapeDtypeStruct((rows, 1), jnp.int32, sharding=rows_spec) for _ in range(4))
  cm = tuple(jax.ShapeDtypeStruct((rows, cache_len), jnp.int32, sharding=rows_spec) for _ in range(4))
  with jax.set_mesh(dmesh):
    t0 = time.time()
    compiled = jax.jit(_decode_fn(model_cfg)).lower(w, x, kc, kc, qm, cm).compile(compiler_options=options)
    sec = time.time() - t0
  per_tok = 2 * (flops_lib.llm_layer_params(model_cfg) * lc.num_layers + lc.hidden_size * lc.vocab_size)
  attn = 4 * lc.num_heads * lc.head_dim * cache_len * lc.num_layers
  weight_bytes = sum(int(np.prod(a.shape)) * 2 for a in jax.tree.leaves(w))
  cache_bytes = 2 * lc.num_layers * (rows // n_dev) * cache_len * lc.num_kv_heads * lc.head_dim * 2
  step_t = finish("decode_step", compiled, sec, (per_tok + attn) * rows, rows, cache_len=cache_len, rows=rows,
                  weights_bytes_per_chip=weight_bytes,
                  analytic_bytes_per_chip=dict(weights=weight_bytes, kv_cache=cache_bytes,
                                               note="what a decode step must read once: the und-expert weights "
                                                    "and each row's cache (cross-check of bytes_per_chip)"))
  out["decode_step"]["roofline"]["tokens_per_second_per_chip"] = (rows / n_dev) / step_t
  return out
