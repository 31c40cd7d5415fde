"""The BAGEL composite: MoT/dense equivalence, expert learning, losses, parameter counts, bad input."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bagel_jax import batch as batch_lib
from bagel_jax.data.examples import batch_spec_for, hand_written_batch, random_batch
from bagel_jax.data.sequence import Text, assemble_batch, layout_sample
from bagel_jax.layout import LayoutConfig
from bagel_jax.models import bagel as bagel_lib
from bagel_jax.models import config as config_lib
from bagel_jax.models.qwen2 import Qwen2LM


def _jnp(b):
  return {k: jnp.asarray(v) for k, v in b.items()}


@pytest.fixture(scope="module")
def mixed_batch():
  cfg = config_lib.tiny("mot")
  spec = batch_spec_for(cfg, batch_size=2, seq_len=128)
  b = random_batch(cfg, spec, seed=3)
  batch_lib.validate(b, spec)
  assert (b["modality"] == batch_lib.VIT).any() and (b["mse_weight"] > 0).any() and (b["ce_weight"] > 0).any()
  return _jnp(b)


@jax.jit(static_argnums=0)
def _sums_jit(cfg, params, batch, rng):
  return bagel_lib.Bagel(cfg).apply({"params": params}, batch, rng, 1.0)


def _sums(cfg, params, batch, seed=0):
  return _sums_jit(cfg, params, batch, jax.random.key(seed))


@pytest.mark.parametrize("variant", ["mot", "moe"])
def test_copied_experts_equal_dense(variant, mixed_batch):
  dense_cfg = config_lib.tiny("dense")
  dense = bagel_lib.init_params(dense_cfg, jax.random.key(0))
  dense["llm2vae"] = jax.tree.map(lambda x: x + 0.01, dense["llm2vae"])  # non-zero velocity head
  cfg = config_lib.tiny(variant)
  expanded = bagel_lib.expand_to_variant(dense, cfg)
  want, got = _sums(dense_cfg, dense, mixed_batch), _sums(cfg, expanded, mixed_batch)
  for k in ("ce_sum", "mse_sum", "ce_count", "mse_count"):
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, err_msg=k)
  # init_gen_from_und on independently initialised experts gives the same result
  own = bagel_lib.init_params(cfg, jax.random.key(0))
  up = own["llm"]["layers"]["mlp"]["up_proj"]["kernel"]
  assert not np.allclose(up[:, 0], up[:, 1])
  copied = bagel_lib.init_gen_from_und(own, cfg)
  np.testing.assert_array_equal(copied["llm"]["layers"]["mlp"]["up_proj"]["kernel"][:, 1],
                                own["llm"]["layers"]["mlp"]["up_proj"]["kernel"][:, 0])


def test_capacity_routing_equals_dense_routing(mixed_batch):
  cfg = config_lib.tiny("mot")
  params = bagel_lib.init_params(cfg, jax.random.key(1))
  a = _sums(cfg, params, mixed_batch)
  b = _sums(cfg.replace(routing="dense"), params, mixed_batch)
  for k in ("ce_sum", "mse_sum"):
    np.testing.assert_allclose(a[k], b[k], rtol=2e-5, err_msg=k)
  assert float(a["routing_dropped"]) == 0.0


def test_scan_equals_unrolled(mixed_batch):
  cfg = config_lib.tiny("mot")
  params = bagel_lib.init_params(cfg, jax.random.key(2))
  unrolled_cfg = cfg.replace(scan_layers=False)
  unrolled = dict(params)
  unrolled["llm"] = dict(params["llm"])
  layers = unrolled["llm"].pop("layers")
  for i in range(cfg.llm.num_layers):
    unrolled["llm"][f"layers_{i}"] = jax.tree.map(lambda x: x[i], layers)
  vit_layers = unrolled["vit"] = dict(params["vit"])
  enc = dict(vit_layers["encoder"])
  stacked = enc.pop("layers")
  for i in range(cfg.vit.num_layers):
    enc[f"layers_{i}"] = jax.tree.map(lambda x: x[i], stacked)
  vit_layers["encoder"] = enc
  a, b = _sums(cfg, params, mixed_batch), _sums(unrolled_cfg, unrolled, mixed_batch)
  np.testing.assert_allclose(a["ce_sum"], b["ce_sum"], rtol=1e-5)
  np.testing.assert_allclose(a["mse_sum"], b["mse_sum"], rtol=1e-5)


def _remat_grads(cfg, batch):
  params = bagel_lib.init_params(cfg, jax.random.key(4))
  params["llm2vae"] = jax.tree.map(lambda x: x + 0.05, params["llm2vae"])
  return jax.jit(jax.grad(lambda p: bagel_lib.loss_fn(p, batch, jax.random.key(0), cfg)[0]))(params)


@pytest.fixture(scope="module")
def no_remat_grads(mixed_batch):
  return _remat_grads(config_lib.tiny("mot"), mixed_batch)


@pytest.mark.parametrize("policy", ["nothing_saveable", "offload_layer_inputs"])
def test_remat_policies_keep_gradients(policy, mixed_batch, no_remat_grads):
  """Remat only moves work (recompute) and memory (host offload of layer inputs); gradients stay the same."""
  want = no_remat_grads
  got = _remat_grads(config_lib.tiny("mot").replace(remat_policy=policy), mixed_batch)
  for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_one_step_updates_both_experts_differently(mixed_batch):
  cfg = config_lib.tiny("mot")
  params = bagel_lib.init_gen_from_und(bagel_lib.init_params(cfg, jax.random.key(0)), cfg)
  params["llm2vae"] = jax.tree.map(lambda x: x + 0.05, params["llm2vae"])
  grads = jax.grad(lambda p: bagel_lib.loss_fn(p, mixed_batch, jax.random.key(0), cfg)[0])(params)
  opt = optax.adam(1e-2)
  updates, _ = opt.update(grads, opt.init(params), params)
  new = optax.apply_updates(params, updates)
  for path in (("layers", "self_attn", "q_proj", "kernel"), ("layers", "mlp", "down_proj", "kernel"),
               ("layers", "input_layernorm", "scale"), ("norm", "scale")):
    old_leaf, new_leaf = jax.device_get(params["llm"]), jax.device_get(new["llm"])
    for k in path:
      old_leaf, new_leaf = old_leaf[k], new_leaf[k]
    ax = 1 if path[0] == "layers" else 0
    und_o, gen_o = np.take(old_leaf, 0, ax), np.take(old_leaf, 1, ax)
    und_n, gen_n = np.take(new_leaf, 0, ax), np.take(new_leaf, 1, ax)
    np.testing.assert_array_equal(und_o, gen_o)  # started as copies
    assert not np.allclose(und_n, und_o) and not np.allclose(gen_n, gen_o), path
    assert not np.allclose(und_n, gen_n), path


def test_ce_equals_hand_computation():
  cfg = config_lib.tiny("mot")
  params = bagel_lib.init_params(cfg, jax.random.key(4))
  ids = [7, 11, 13, 17, 19]
  layout = LayoutConfig.from_model_config(cfg)
  spec = batch_spec_for(cfg, batch_size=1, seq_len=16)
  b = _jnp(assemble_batch([[layout_sample([Text(ids, loss=True)], layout)]], spec, layout))
  sums = _sums(cfg, params, b)
  tokens = [cfg.llm.bos_token_id] + ids + [cfg.llm.eos_token_id]
  logits = Qwen2LM(cfg).apply({"params": params["llm"]}, jnp.asarray([tokens]), method=Qwen2LM.text_logits)
  logp = jax.nn.log_softmax(np.asarray(logits[0], np.float64), axis=-1)
  labels = ids + [cfg.llm.eos_token_id]
  want = -sum(float(logp[j, labels[j]]) for j in range(len(labels)))
  assert float(sums["ce_count"]) == len(labels)
  np.testing.assert_allclose(float(sums["ce_sum"]), want, rtol=1e-5)


def test_rectified_flow_formulas():
  x0 = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 3)), jnp.float32)
  eps = jnp.asarray(np.random.default_rng(1).normal(size=(1, 4, 3)), jnp.float32)
  t_logit = jnp.asarray([[0.0, 1.0, -jnp.inf, 2.0]])
  x_t, t, target = bagel_lib.noise_latents(x0, t_logit, eps, 1.0)
  sig = 1 / (1 + np.exp(-np.asarray([0.0, 1.0, -np.inf, 2.0])))
  np.testing.assert_allclose(t[0], sig, rtol=1e-6)
  np.testing.assert_allclose(x_t[0], (1 - sig[:, None]) * x0[0] + sig[:, None] * eps[0], rtol=1e-6)
  np.testing.assert_array_equal(x_t[0, 2], x0[0, 2])  # clean image: t = 0
  np.testing.assert_allclose(target, eps - x0)
  # shift: s=1 identity; s=4 maps 0.5 -> 0.8
  u = jnp.linspace(0, 1, 11)
  np.testing.assert_allclose(bagel_lib.shift_timesteps(u, 1.0), u, atol=1e-7)
  np.testing.assert_allclose(bagel_lib.shift_timesteps(0.5, 4.0), 0.8, rtol=1e-6)


def test_mse_uses_target_eps_minus_x0(mixed_batch):
  """llm2vae starts at zero, so the predicted velocity is 0 and the MSE is mean((eps - x0)^2) over noisy tokens,
  with eps drawn from the step rng exactly as the model does."""
  cfg = config_lib.tiny("mot")
  params = bagel_lib.init_params(cfg, jax.random.key(5))
  rng = jax.random.key(9)
  sums = _sums(cfg, params, mixed_batch, seed=9)
  x0 = np.asarray(mixed_batch["latent_x0"])
  eps = np.asarray(jax.random.normal(jax.random.split(rng)[1], x0.shape))
  w = np.take_along_axis(np.asarray(mixed_batch["mse_weight"]), np.maximum(np.asarray(mixed_batch["latent_dest"]), 0),
                         axis=1) * (np.asarray(mixed_batch["latent_image"]) > 0)
  want = float(np.sum(np.mean((eps - x0) ** 2, -1) * w))
  np.testing.assert_allclose(float(sums["mse_sum"]), want, rtol=1e-5)
  assert float(sums["mse_count"]) == float(np.sum(np.asarray(mixed_batch["num_mse"])))


def test_loss_normalisation_is_global_token_mean():
  sums = dict(ce_sum=jnp.asarray(6.0), ce_count=jnp.asarray(3.0), mse_sum=jnp.asarray(2.0),
              mse_count=jnp.asarray(8.0))
  out = bagel_lib.normalize_losses(sums, 0.25, 1.0)
  np.testing.assert_allclose([out["ce"], out["mse"], out["loss"]], [2.0, 0.25, 0.75])
  empty = bagel_lib.normalize_losses(dict(sums, ce_count=jnp.asarray(0.0), ce_sum=jnp.asarray(0.0)), 1, 1)
  assert float(empty["ce"]) == 0.0


def test_moe_topk_trains_router(mixed_batch):
  cfg = config_lib.tiny("moe_topk")
  params = bagel_lib.init_params(cfg, jax.random.key(0))
  (loss, metrics), grads = jax.value_and_grad(
      lambda p: bagel_lib.loss_fn(p, mixed_batch, jax.random.key(0), cfg), has_aux=True)(params)
  assert np.isfinite(float(loss)) and float(metrics["router_aux_loss"]) > 0
  assert float(jnp.abs(grads["llm"]["layers"]["mlp"]["router"]).sum()) > 0


def test_freeze_und_trains_only_the_gen_expert(mixed_batch):
  cfg = config_lib.tiny("mot", freeze_und=True)
  params = bagel_lib.init_params(cfg, jax.random.key(0))
  params["llm2vae"] = jax.tree.map(lambda x: x + 0.05, params["llm2vae"])
  grads = jax.grad(lambda p: bagel_lib.loss_fn(p, mixed_batch, jax.random.key(0), cfg)[0])(params)
  q = grads["llm"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert float(jnp.abs(q[:, 0]).sum()) == 0.0 and float(jnp.abs(q[:, 1]).sum()) > 0
  assert float(jnp.abs(grads["llm"]["embed_tokens"]["embedding"]).sum()) == 0.0
  assert float(jnp.abs(grads["connector"]["fc1"]["kernel"]).sum()) == 0.0
  assert float(jnp.abs(grads["vae2llm"]["kernel"]).sum()) > 0


def test_pixel_mode_encodes_with_the_frozen_vae():
  cfg = config_lib.tiny("mot")
  spec = batch_spec_for(cfg, batch_size=1, seq_len=96, pixel_images=4, pixel_size=32)
  b = hand_written_batch(cfg, spec)
  batch_lib.validate(b, spec)
  params = bagel_lib.init_params(cfg, jax.random.key(0))
  params["llm2vae"] = jax.tree.map(lambda x: x + 0.05, params["llm2vae"])
  fn = lambda p: bagel_lib.loss_fn(p, _jnp(b), jax.random.key(0), cfg)[0]
  loss, grads = jax.value_and_grad(fn)(params)
  assert np.isfinite(float(loss))
  assert all(float(jnp.abs(g).sum()) == 0.0 for g in jax.tree.leaves(grads["vae"]))


# -- parameter counts of the released model -------------------------------------------------------------------

def test_bagel_7b_parameter_counts():
  cfg = config_lib.bagel_7b("mot")
  p = bagel_lib.abstract_params(cfg)
  count = bagel_lib.count_params
  llm = p["llm"]
  gen = sum(int(np.prod(x.shape[:1] + x.shape[2:])) for x in jax.tree.leaves(llm["layers"])
            if len(x.shape) >= 2 and x.shape[1] == 2) + 3584
  assert count(llm) == 14_141_252_608
  assert count(llm) - gen == 7_615_623_680  # und path: embed + 28 layers + norm + lm_head
  assert gen == 6_525_628_928               # gen expert: 28 layers + norm_moe_gen
  assert count(p["vit"]) == 402_552_736
  assert count(p["connector"]) == 16_980_992
  assert count(p["time_embedder"]) == 13_769_728
  assert count(p["vae2llm"]) + count(p["llm2vae"]) == 462_400
  assert abs(count(p["vae"]) - 83.82e6) < 0.05e6
  tables = 70 * 70 * 3584 + 64 * 64 * 3584  # fixed sin-cos tables stored in ema.safetensors
  total = count(p) - count(p["vae"]) + tables
  assert round(total / 1e9, 3) == 14.607
  # issue #236: the release loaded without the generation modules reports exactly 14.578347936B
  gen_modules = count(p["time_embedder"]) + count(p["vae2llm"]) + count(p["llm2vae"]) + 64 * 64 * 3584
  assert total - gen_modules == 14_578_347_936


# -- bad input ------------------------------------------------------------------------------------------------

def _valid_batch():
  cfg = config_lib.tiny("mot")
  spec = batch_spec_for(cfg, batch_size=1, seq_len=64)
  return hand_written_batch(cfg, spec), spec


def test_validate_accepts_good_batches():
  b, spec = _valid_batch()
  batch_lib.validate(b, spec)
  batch_lib.validate(spec.empty(), spec)


@pytest.mark.parametrize("corrupt, match", [
    (lambda b: b["vit_dest"].__setitem__((0, 0), 64), r"vit_dest \(row 0\)"),
    (lambda b: (b["ce_weight"].__setitem__((0, 60), 1.0), b["ce_target"].__setitem__((0, 60), 5)),
     r"ce_weight \(row 0\): CE target on padding"),
    (lambda b: b["image_grid"].__setitem__((0, 0), (3, 3)), r"image_grid \(row 0\): image 1 has 6 tokens"),
    (lambda b: b["document"].__setitem__((0, 60), 2), r"document \(row 0\)"),
    (lambda b: b["expert"].__setitem__((0, 7), 0), r"expert \(row 0\)"),
    (lambda b: b["split"].__setitem__((0, 3), 5), r"split \(row 0\)"),
    (lambda b: b.pop("latent_x0"), r"latent_x0: missing field"),
    (lambda b: b.__setitem__("position", b["position"].astype(np.float32)), r"position: dtype"),
])
def test_validate_names_the_bad_field(corrupt, match):
  b, spec = _valid_batch()
  corrupt(b)
  with pytest.raises(ValueError, match=match):
    batch_lib.validate(b, spec)


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="layer_variant"):
    config_lib.tiny("sparse")
  with pytest.raises(ValueError, match="num_kv_heads"):
    dataclasses.replace(config_lib.tiny().llm, num_kv_heads=3)
  with pytest.raises(ValueError, match="attention_impl"):
    config_lib.tiny(attention_impl="flash")
  with pytest.raises(ValueError, match="freeze_und"):
    config_lib.tiny("dense", freeze_und=True)
