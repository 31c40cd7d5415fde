"""`bagel-convert bagel` / `export`: official release format <-> our checkpoint.

The release directories are written by `convert_fixtures` from the reference's key table (not from the
converter's mapping): round trips are byte-identical, layouts are checked against the PyTorch formulas, the
converted model runs, the 7B key table converts shape-only to exactly `bagel_7b`, and bad input fails cleanly.
"""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import convert_fixtures as fx
from bagel_jax import checkpoint as ckpt_lib
from bagel_jax.convert import bagel as bagel_conv
from bagel_jax.convert.cli import main
from bagel_jax.convert.common import ConversionError, ShapeOnlySource, flatten
from bagel_jax.data.examples import batch_spec_for, random_batch
from bagel_jax.models import bagel as bagel_lib
from bagel_jax.models import config as config_lib
from bagel_jax.models.layers import gelu_tanh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tensors(path):
  """name -> (dtype code, shape, raw bytes), independent of numpy's bf16 support."""
  with open(path, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(n))
    data = f.read()
  header.pop("__metadata__", None)
  return {k: (v["dtype"], tuple(v["shape"]), data[v["data_offsets"][0]:v["data_offsets"][1]])
          for k, v in header.items()}


def _f32(path, name):
  with safe_open(path, "np") as f:  # ml_dtypes is imported, so numpy knows bfloat16 here
    return f.get_tensor(name).astype(np.float32)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  return fx.write_release(str(tmp_path_factory.mktemp("release") / "BAGEL-tiny"))


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory):
  dst = str(tmp_path_factory.mktemp("ours") / "ckpt")
  assert main(["bagel", "--src", release, "--dst", dst, "--quiet"]) == 0
  return dst


def test_inferred_config(converted):
  cfg = ckpt_lib.read_model_config(converted)
  t = fx.TINY
  assert cfg.llm.layer_variant == "mot" and cfg.llm.qk_norm
  assert (cfg.llm.vocab_size, cfg.llm.hidden_size, cfg.llm.num_layers) == (t["vocab"], t["hidden"], t["layers"])
  assert cfg.vit.num_layers == t["vit_stored_layers"] - 1 == t["vit_layers"]
  assert cfg.vit.max_patches_per_side == t["vit_grid"] and cfg.max_latent_size == t["max_latent"]
  assert (cfg.vae.ch, cfg.vae.ch_mult, cfg.vae.num_res_blocks, cfg.vae.z_channels) == (32, (1, 2), 1, 4)
  assert (cfg.vae.scale_factor, cfg.vae.shift_factor) == (0.3611, 0.1159)
  assert cfg.latent_patch_size == 2 and cfg.param_dtype == "float32"
  assert (cfg.llm.bos_token_id, cfg.llm.eos_token_id, cfg.llm.vision_start_token_id,
          cfg.llm.vision_end_token_id) == (1, 2, 3, 4)  # from tokenizer.json
  assert sorted(os.listdir(os.path.join(converted, bagel_conv.SOURCE_FILES))) == [
      "llm_config.json", "tokenizer.json", "vit_config.json"]


def test_round_trip_is_byte_identical(release, converted, tmp_path):
  out = str(tmp_path / "exported")
  assert main(["export", "--checkpoint", converted, "--dst", out, "--dtype", "bfloat16", "--quiet"]) == 0
  for name in ("ema.safetensors", "ae.safetensors"):  # bf16 ema (as released), fp32 ae (as FLUX ships it)
    want, got = _tensors(os.path.join(release, name)), _tensors(os.path.join(out, name))
    assert sorted(got) == sorted(want), set(got) ^ set(want)
    for k in want:
      assert got[k] == want[k], k
  # fixed tables included, recomputed in the official layout
  assert _tensors(os.path.join(out, "ema.safetensors"))["latent_pos_embed.pos_embed"][1] == (64, 64)
  with open(os.path.join(out, "vit_config.json")) as f:
    assert json.load(f)["num_hidden_layers"] == fx.TINY["vit_stored_layers"]
  with open(os.path.join(out, "llm_config.json")) as f:
    llm = json.load(f)
  src = fx.llm_config_json(fx.TINY)
  assert {k: llm[k] for k in src} == src and llm["layer_module"] == "Qwen2MoTDecoderLayer"
  with open(os.path.join(out, "tokenizer.json")) as a, open(os.path.join(release, "tokenizer.json")) as b:
    assert a.read() == b.read()


def test_bf16_target_round_trip(release, tmp_path):
  dst, out = str(tmp_path / "ckpt"), str(tmp_path / "exported")
  assert main(["bagel", "--src", release, "--dst", dst, "--dtype", "bfloat16", "--quiet"]) == 0
  params, cfg, _ = ckpt_lib.load_params(dst)
  assert cfg.param_dtype == "bfloat16"
  want = flatten(bagel_lib.abstract_params(cfg))  # the model keeps norm scales and the frozen VAE in fp32
  assert {k: np.dtype(v.dtype) for k, v in flatten(params).items()} == {k: np.dtype(v.dtype) for k, v in want.items()}
  assert np.dtype(params["llm"]["lm_head"]["kernel"].dtype) == np.dtype(ml_dtypes.bfloat16)
  assert main(["export", "--checkpoint", dst, "--dst", out, "--quiet"]) == 0  # default: the stored dtype
  want, got = _tensors(os.path.join(release, "ema.safetensors")), _tensors(os.path.join(out, "ema.safetensors"))
  assert got == want


def test_layouts_follow_pytorch_formulas(release, converted):
  """Square weights would survive a round trip with a missing transpose: check them against y = x W^T + b."""
  params, cfg, _ = ckpt_lib.load_params(converted)
  ema = os.path.join(release, "ema.safetensors")
  w = lambda n: _f32(ema, n)
  rng = np.random.default_rng(0)
  d, hd = cfg.llm.hidden_size, cfg.llm.head_dim
  x = rng.standard_normal((3, d)).astype(np.float32)
  layers = params["llm"]["layers"]
  for expert, suffix in ((0, ""), (1, "_moe_gen")):
    q = np.einsum("td,dhk->thk", x, np.asarray(layers["self_attn"]["q_proj"]["kernel"][1, expert]))
    q = q + np.asarray(layers["self_attn"]["q_proj"]["bias"][1, expert])
    want = x @ w(f"language_model.model.layers.1.self_attn.q_proj{suffix}.weight").T + \
        w(f"language_model.model.layers.1.self_attn.q_proj{suffix}.bias")
    np.testing.assert_allclose(q.reshape(3, -1), want, atol=1e-5)
    attn = rng.standard_normal((3, cfg.llm.num_heads, hd)).astype(np.float32)
    o = np.einsum("thk,hkd->td", attn, np.asarray(layers["self_attn"]["o_proj"]["kernel"][1, expert]))
    np.testing.assert_allclose(o, attn.reshape(3, -1) @ w(f"language_model.model.layers.1.self_attn.o_proj{suffix}"
                                                          ".weight").T, atol=1e-5)
  np.testing.assert_array_equal(params["llm"]["norm"]["scale"][1], w("language_model.model.norm_moe_gen.weight"))
  # connector: fc2(gelu_tanh(fc1 x)) with PyTorch-layout weights
  xv = rng.standard_normal((3, cfg.vit.hidden_size)).astype(np.float32)
  got = bagel_lib.Connector(cfg.vit.hidden_size, d, "float32", "float32").apply(
      {"params": params["connector"]}, jnp.asarray(xv))
  h = np.asarray(gelu_tanh(jnp.asarray(xv @ w("connector.fc1.weight").T + w("connector.fc1.bias"))))
  np.testing.assert_allclose(np.asarray(got), h @ w("connector.fc2.weight").T + w("connector.fc2.bias"), atol=1e-4)
  # timestep MLP, the latent projections, the ViT patch embedding [hidden, p*p*c] and a square ViT projection
  t = jnp.asarray([0.0, 0.3, 1.0])
  got = bagel_lib.TimestepEmbedder(d, "float32", "float32").apply({"params": params["time_embedder"]}, t)
  f = np.asarray(bagel_lib.timestep_embedding(t))
  h = f @ w("time_embedder.mlp.0.weight").T + w("time_embedder.mlp.0.bias")
  h = h / (1 + np.exp(-h))
  np.testing.assert_allclose(np.asarray(got), h @ w("time_embedder.mlp.2.weight").T + w("time_embedder.mlp.2.bias"),
                             atol=1e-4)
  for name in ("vae2llm", "llm2vae"):
    np.testing.assert_array_equal(params[name]["kernel"], w(f"{name}.weight").T)
  np.testing.assert_array_equal(params["vit"]["embeddings"]["patch_embedding"]["kernel"],
                                w("vit_model.vision_model.embeddings.patch_embedding.weight").T)
  vq = np.asarray(params["vit"]["encoder"]["layers"]["self_attn"]["q_proj"]["kernel"][1])
  np.testing.assert_allclose(xv @ vq.reshape(cfg.vit.hidden_size, -1),
                             xv @ w("vit_model.vision_model.encoder.layers.1.self_attn.q_proj.weight").T, atol=1e-5)
  # AE: conv [O, I, kh, kw] -> [kh, kw, I, O]
  ae = os.path.join(release, "ae.safetensors")
  np.testing.assert_array_equal(params["vae"]["encoder"]["mid"]["attn_1"]["q"]["kernel"][0, 0],
                                _f32(ae, "encoder.mid.attn_1.q.weight")[:, :, 0, 0].T)
  np.testing.assert_array_equal(params["vae"]["decoder"]["up_1"]["block_0"]["conv1"]["kernel"],
                                _f32(ae, "decoder.up.1.block.0.conv1.weight").transpose(2, 3, 1, 0))


def test_converted_model_runs_packed_forward(converted):
  params, cfg, _ = ckpt_lib.load_params(converted)
  spec = batch_spec_for(cfg, batch_size=2, seq_len=96, vit_capacity=24, latent_capacity=32, image_capacity=6)
  batch = {k: jnp.asarray(v) for k, v in random_batch(cfg, spec, seed=1).items()}
  assert (np.asarray(batch["mse_weight"]) > 0).any() and (np.asarray(batch["ce_weight"]) > 0).any()
  loss, metrics = jax.jit(lambda p, b: bagel_lib.loss_fn(p, b, jax.random.key(0), cfg))(params, batch)
  assert np.isfinite(float(loss)) and float(metrics["ce"]) > 0 and float(metrics["mse"]) > 0


@pytest.mark.torch
def test_both_experts_match_a_torch_decoder(release, converted):
  """Each expert of the converted MoT equals a PyTorch QK-norm decoder (transformers Qwen3 with q/k/v biases and
  a zero o_proj bias: BAGEL's layer) loaded with that expert's official tensors."""
  torch = pytest.importorskip("torch", reason="parity tests need the torch extra")
  transformers = pytest.importorskip("transformers", reason="parity tests need the torch extra")
  from bagel_jax.models.qwen2 import Qwen2LM  # pylint: disable=import-outside-toplevel
  params, cfg, _ = ckpt_lib.load_params(converted)
  c = fx.TINY
  hf_cfg = transformers.Qwen3Config(vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["mlp"],
                                    num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
                                    num_key_value_heads=c["kv_heads"], head_dim=c["head_dim"], attention_bias=True,
                                    rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False)
  hf_cfg._attn_implementation = "eager"
  ema = os.path.join(release, "ema.safetensors")
  ids = np.random.default_rng(0).integers(0, c["vocab"], (1, 17))
  for expert in (0, 1):
    model = transformers.Qwen3ForCausalLM(hf_cfg).eval()
    state = {}
    for k in model.state_dict():
      if k.endswith("o_proj.bias"):
        state[k] = torch.zeros(c["hidden"])
        continue
      name = "language_model." + k
      if expert and ".layers." in k:
        name = name.replace(".mlp.", ".mlp_moe_gen.")
        for m in ("_proj.", "_norm.", "_layernorm."):
          if ".mlp_moe_gen." not in name:
            name = name.replace(m, m[:-1] + "_moe_gen.")
      elif expert and k == "model.norm.weight":
        name = "language_model.model.norm_moe_gen.weight"
      state[k] = torch.tensor(_f32(ema, name))
    model.load_state_dict(state)
    with torch.no_grad():
      want = model(torch.tensor(ids)).logits.numpy()
    # our text path routes every token to the und expert: put the expert under test there
    llm = jax.tree.map(lambda a: a, params["llm"])
    if expert:
      axes = flatten(bagel_lib.param_logical_axes(cfg)["llm"])
      flat = flatten(llm)
      for path, spec in axes.items():
        if "modality" in tuple(spec):
          flat[path] = np.flip(np.asarray(flat[path]), axis=tuple(spec).index("modality"))
      from bagel_jax.convert.common import unflatten  # pylint: disable=import-outside-toplevel
      llm = unflatten(flat)
    got = Qwen2LM(cfg).apply({"params": llm}, jnp.asarray(ids), method=Qwen2LM.text_logits)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0, err_msg=f"expert {expert}")


# ----------------------------------------------------------------------------------------------------------
# Shape-only conversion of the 7B release and of the other variants.
# ----------------------------------------------------------------------------------------------------------

def _inspect(c, ae=fx.FLUX, **kw):
  ema = ShapeOnlySource(fx.ema_shapes(c), what="ema.safetensors (shapes only)")
  aes = ShapeOnlySource(fx.ae_shapes(ae), what="ae.safetensors (shapes only)")
  return bagel_conv.inspect_release(fx.llm_config_json(c), fx.vit_config_json(c), ema, aes, **kw), ema


def test_seven_b_release_converts_shape_only_to_bagel_7b():
  shapes = fx.ema_shapes(fx.SEVEN_B)
  assert sum(int(np.prod(s)) for s in shapes.values()) == 14_607_260_128  # reference §9: 14.607B
  release, ema = _inspect(fx.SEVEN_B)  # a ShapeOnlySource raises on any read: nothing is allocated
  assert release.config == config_lib.bagel_7b()
  assert not ema.unused() and ema.ignored == {"latent_pos_embed.pos_embed", "vit_pos_embed.pos_embed"}
  ours = flatten(release.abstract())
  want = flatten(bagel_lib.abstract_params(config_lib.bagel_7b()))
  assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in want.items()}
  tables = 64 * 64 * 3584 + 70 * 70 * 3584
  no_vae = sum(int(np.prod(v.shape)) for k, v in ours.items() if not k.startswith("vae/"))
  assert no_vae + tables == 14_607_260_128
  llm = sum(int(np.prod(v.shape)) for k, v in ours.items() if k.startswith("llm/"))
  assert llm == 14_141_252_608
  vae = sum(int(np.prod(v.shape)) for k, v in ours.items() if k.startswith("vae/"))
  assert abs(vae - 83.82e6) < 0.01e6
  # export writes back exactly the release's key table
  assert bagel_conv.release_shapes(release.config) == {"ema": shapes, "ae": fx.ae_shapes(fx.FLUX)}


@pytest.mark.parametrize("variant", ["dense", "moe"])
def test_variant_inferred_from_keys(variant):
  release, ema = _inspect(dict(fx.TINY, variant=variant), fx.TINY_AE)
  assert release.config.llm.layer_variant == variant and release.file_variant == variant
  assert not ema.unused()
  assert bagel_conv.release_shapes(release.config)["ema"] == fx.ema_shapes(dict(fx.TINY, variant=variant))


def test_variant_override_only_adds_experts():
  release, _ = _inspect(dict(fx.TINY, variant="dense"), fx.TINY_AE, variant="mot")
  assert release.config.llm.layer_variant == "mot"
  q = release.plan["llm/layers/self_attn/q_proj/kernel"].pieces
  assert [p.name for p in q[:2]] == ["language_model.model.layers.0.self_attn.q_proj.weight"] * 2  # copy_init_moe
  with pytest.raises(ConversionError, match="drop the trained generation expert"):
    _inspect(fx.TINY, fx.TINY_AE, variant="dense")


def test_overrides_and_missing_table(tmp_path):
  c = dict(fx.TINY)
  release, _ = _inspect(c, fx.TINY_AE, vit_layers=1, max_latent_size=4)
  assert release.config.vit.num_layers == 1 and release.config.max_latent_size == 4
  shapes = fx.ema_shapes(c)
  del shapes["latent_pos_embed.pos_embed"]
  ema = ShapeOnlySource(shapes)
  with pytest.raises(ConversionError, match="max_latent_size"):
    bagel_conv.inspect_release(fx.llm_config_json(c), fx.vit_config_json(c), ema, ShapeOnlySource(fx.ae_shapes(fx.TINY_AE)))


# ----------------------------------------------------------------------------------------------------------
# Bad input: a clear error and nothing at the destination.
# ----------------------------------------------------------------------------------------------------------

def _fails(capsys, src, dst, *extra):
  with pytest.raises(SystemExit) as e:
    main(["bagel", "--src", src, "--dst", dst, "--quiet", *extra])
  assert e.value.code == 1
  assert not os.path.exists(dst) and not os.path.exists(os.path.join(os.path.dirname(dst), ".ckpt.partial"))
  return capsys.readouterr().err


def _copy_release(release, tmp_path):
  import shutil  # pylint: disable=import-outside-toplevel
  src = str(tmp_path / "src")
  shutil.copytree(release, src)
  return src


def _rewrite(path, change):
  with safe_open(path, "np") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  change(tensors)
  save_file(tensors, path)


def test_truncated_file(release, tmp_path, capsys):
  src = _copy_release(release, tmp_path)
  path = os.path.join(src, "ema.safetensors")
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(size // 2)
  err = _fails(capsys, src, str(tmp_path / "ckpt"))
  assert "ema.safetensors" in err and "truncated" in err


@pytest.mark.parametrize("missing", ["llm_config.json", "vit_config.json", "ae.safetensors", "ema.safetensors"])
def test_missing_file(release, tmp_path, capsys, missing):
  src = _copy_release(release, tmp_path)
  os.remove(os.path.join(src, missing))
  err = _fails(capsys, src, str(tmp_path / "ckpt"))
  assert missing in err


def test_wrong_shape_names_tensor_and_shapes(release, tmp_path, capsys):
  src = _copy_release(release, tmp_path)
  name = "language_model.model.layers.1.mlp_moe_gen.up_proj.weight"
  _rewrite(os.path.join(src, "ema.safetensors"), lambda t: t.update({name: t[name][:, :-1].copy()}))
  err = _fails(capsys, src, str(tmp_path / "ckpt"))
  assert name in err and "(96, 63)" in err and "(96, 64)" in err


def test_unknown_and_missing_keys(release, tmp_path, capsys):
  src = _copy_release(release, tmp_path)
  _rewrite(os.path.join(src, "ema.safetensors"),
           lambda t: t.update({"language_model.model.layers.0.self_attn.extra_proj.weight": np.zeros((2, 3),
                                                                                                      np.float32)}))
  err = _fails(capsys, src, str(tmp_path / "ckpt"))
  assert "unexpected" in err and "extra_proj.weight (2, 3)" in err
  src2 = str(tmp_path / "src2")
  fx.write_release(src2)
  _rewrite(os.path.join(src2, "ae.safetensors"), lambda t: t.pop("decoder.mid.attn_1.q.bias"))
  err = _fails(capsys, src2, str(tmp_path / "ckpt"))
  assert "missing tensor 'decoder.mid.attn_1.q.bias'" in err


def test_error_while_writing_leaves_nothing(release, tmp_path, capsys):
  """A bad fixed table is only found once data is read, inside the temporary output directory."""
  src = _copy_release(release, tmp_path)
  _rewrite(os.path.join(src, "ema.safetensors"),
           lambda t: t.update({"vit_pos_embed.pos_embed": t["vit_pos_embed.pos_embed"][:, ::-1].copy()}))
  err = _fails(capsys, src, str(tmp_path / "ckpt"))
  assert "vit_pos_embed.pos_embed" in err and "sin-cos" in err
  assert sorted(os.listdir(tmp_path)) == ["src"]
  dst = str(tmp_path / "ckpt")
  assert main(["bagel", "--src", src, "--dst", dst, "--quiet", "--no-verify-tables"]) == 0


def test_existing_destination(release, tmp_path, capsys):
  dst = str(tmp_path / "ckpt")
  assert main(["bagel", "--src", release, "--dst", dst, "--quiet"]) == 0
  with pytest.raises(SystemExit):
    main(["bagel", "--src", release, "--dst", dst, "--quiet"])
  assert "already exists" in capsys.readouterr().err
  assert main(["bagel", "--src", release, "--dst", dst, "--quiet", "--overwrite", "--max-latent-size", "4"]) == 0
  assert ckpt_lib.read_model_config(dst).max_latent_size == 4
  assert sorted(os.listdir(tmp_path)) == ["ckpt"]


# ----------------------------------------------------------------------------------------------------------
# Sharded placement (fake CPU devices, in a subprocess) without torch.
# ----------------------------------------------------------------------------------------------------------

MESH_SCRIPT = """
import json, sys
sys.modules["torch"] = None  # TPU hosts have no torch: bf16 must be read without it
import jax, numpy as np
from bagel_jax.convert import bagel as bagel_conv
from bagel_jax.convert.cli import _sharding_fn, main
from bagel_jax import checkpoint as ckpt_lib
src, dst, ref = sys.argv[1:4]
release = bagel_conv.open_release(src)
params = bagel_conv.load_release(release, sharding_fn=_sharding_fn("fsdp=4", "default"))
emb = params["llm"]["embed_tokens"]["embedding"]
main(["bagel", "--src", src, "--dst", dst, "--mesh", "fsdp=2,tensor=2", "--quiet"])
got, _, _ = ckpt_lib.load_params(dst)
want, _, _ = ckpt_lib.load_params(ref)
same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
same_direct = all(np.array_equal(np.asarray(a), np.asarray(b))
                  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want)))
print(json.dumps(dict(spec=str(emb.sharding.spec), shards=len(emb.addressable_shards),
                      shard_shape=list(emb.addressable_shards[0].data.shape), same=same, same_direct=same_direct)))
"""


def test_sharded_placement_without_torch(release, converted, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  r = subprocess.run([sys.executable, "-c", textwrap.dedent(MESH_SCRIPT), release, str(tmp_path / "ckpt"), converted],
                     env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out["spec"] == "P('tensor', 'fsdp')" and out["shards"] == 4  # tensor=1 on this mesh
  assert out["shard_shape"] == [fx.TINY["vocab"], fx.TINY["hidden"] // 4]
  assert out["same"] and out["same_direct"]
