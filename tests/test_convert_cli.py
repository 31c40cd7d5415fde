"""`bagel-convert qwen2 / siglip / flux-ae / export` end to end, through the CLI, on tiny random PyTorch models
saved the way their libraries save them (`save_pretrained`, sharded with an index for Qwen2).

Every checkpoint is read back with `bagel_jax.checkpoint` (what `bagel-train` / `bagel-sample` restore) and its
modules are compared with the PyTorch model's outputs: Qwen2 logits, SigLIP last hidden state, FLUX AE encoder
mean and decoder output, each to <= 1e-4 in fp32. The BFL `ae.safetensors` is built from the diffusers model
by a renaming written here from the FLUX naming (not the converter's table).
"""
import copy
import importlib.metadata
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from bagel_jax import checkpoint as ckpt_lib
from bagel_jax.convert import components
from bagel_jax.convert.cli import main
from bagel_jax.convert.common import flatten
from bagel_jax.models import bagel as bagel_lib
from bagel_jax.models.flux_vae import FluxAutoEncoder
from bagel_jax.models.qwen2 import Qwen2LM
from bagel_jax.models.siglip import SiglipViT, patch_position_ids, patchify

torch = pytest.importorskip("torch", reason="CLI parity tests need the torch extra: pip install -e '.[torch]'")
transformers = pytest.importorskip("transformers", reason="CLI parity tests need the torch extra")
diffusers = pytest.importorskip("diffusers", reason="CLI parity tests need the torch extra")

pytestmark = pytest.mark.torch

VOCAB = 97
SPECIALS = {"<|im_start|>": 5, "<|im_end|>": 6, "<|vision_start|>": 7, "<|vision_end|>": 8}


def _perturb(model, scale=0.1):
  """Non-trivial norms and biases, so a swapped scale/bias or a dropped bias shows."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith(".bias"):
        p.add_(scale * torch.randn_like(p))


def _convert(*argv):
  assert main(list(argv) + ["--quiet"]) == 0


def _fails(capsys, argv, dst):
  with pytest.raises(SystemExit) as e:
    main(argv + ["--dst", dst, "--quiet"])
  assert e.value.code == 1
  parent = os.path.dirname(dst)
  assert not os.path.exists(dst) and not [n for n in os.listdir(parent) if n.endswith(".partial")]
  return capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# Source models.
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
  """A tiny random Qwen2ForCausalLM saved in 14 shards + model.safetensors.index.json, with a
  tokenizer_config.json naming BAGEL's four special tokens."""
  cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
                                 tie_word_embeddings=False, max_position_embeddings=256)
  cfg._attn_implementation = "eager"
  torch.manual_seed(0)
  model = transformers.Qwen2ForCausalLM(cfg).eval()
  _perturb(model)
  path = str(tmp_path_factory.mktemp("hf") / "qwen2")
  model.save_pretrained(path, max_shard_size="20KB")
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"added_tokens_decoder": {str(i): {"content": s, "special": True} for s, i in SPECIALS.items()}}, f)
  return model, path


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
  """A tiny random SiglipVisionModel (3 layers, 4x4 patches of 8 px, with its pooling head) saved as is."""
  cfg = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                        num_attention_heads=2, patch_size=8, image_size=32, layer_norm_eps=1e-6)
  cfg._attn_implementation = "eager"
  torch.manual_seed(1)
  model = transformers.SiglipVisionModel(cfg).eval()
  _perturb(model)
  path = str(tmp_path_factory.mktemp("hf") / "siglip")
  model.save_pretrained(path)
  return model, path


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory):
  """A tiny random diffusers AutoencoderKL in FLUX's layout (no quant convs, 32 GroupNorm groups, FLUX's
  scale/shift), saved as a diffusers directory and, renamed, as a BFL `ae.safetensors`."""
  torch.manual_seed(2)
  model = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
      up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
      norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
      use_post_quant_conv=False).eval()
  _perturb(model, 0.2)
  root = tmp_path_factory.mktemp("ae")
  model.save_pretrained(str(root / "diffusers"))
  bfl = str(root / "ae.safetensors")
  save_file({_bfl_name(k, 2): _bfl_value(k, v.numpy()) for k, v in model.state_dict().items()}, bfl,
            metadata={"format": "pt"})
  return model, str(root / "diffusers"), bfl


def _bfl_name(name, levels):
  """diffusers AutoencoderKL name -> FLUX (BFL) name."""
  mid_attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
  name = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m.group(1)) + 1}", name)
  name = re.sub(r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)",
                lambda m: "mid.attn_1." + mid_attn[m.group(1)], name)
  name = re.sub(r"down_blocks\.(\d+)", r"down.\1", name)
  name = re.sub(r"up_blocks\.(\d+)", lambda m: f"up.{levels - 1 - int(m.group(1))}", name)
  name = name.replace(".resnets.", ".block.").replace("samplers.0.", "sample.")
  return name.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")


def _bfl_value(name, value):
  if "attentions" in name and name.endswith(".weight") and "group_norm" not in name:
    return np.ascontiguousarray(value[:, :, None, None])  # Linear [C, C] -> 1x1 conv [C, C, 1, 1]
  return value


# ----------------------------------------------------------------------------------------------------------
# Our side.
# ----------------------------------------------------------------------------------------------------------

def _restore(path):
  """What bagel-train / bagel-sample do: the saved config, then the params against its abstract tree."""
  cfg = ckpt_lib.read_model_config(path)
  params, cfg2, step = ckpt_lib.load_params(path, cfg)
  assert cfg2 == cfg and step == 0
  return params, cfg


def _assert_same(got, want, skip=()):
  a = {k: v for k, v in flatten(got).items() if not k.startswith(skip)}
  b = {k: v for k, v in flatten(want).items() if not k.startswith(skip)}
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


@pytest.fixture(scope="module")
def base(qwen, siglip, tmp_path_factory):
  """The paper's starting point in one command: Qwen2 (MoT, QK-norm) + SigLIP; the connector, timestep MLP,
  latent projections and the VAE initialised from the tiny preset. The other tests convert `--into` it, so
  only this conversion pays for compiling a random init."""
  dst = str(tmp_path_factory.mktemp("ours") / "base")
  _convert("qwen2", "--src", qwen[1], "--vit", siglip[1], "--dst", dst, "--preset", "tiny")
  return dst


def _logits(params, cfg, ids):
  f = jax.jit(lambda p, i: Qwen2LM(cfg).apply({"params": p}, i, method=Qwen2LM.text_logits))
  return np.asarray(f(params["llm"], jnp.asarray(ids)))


def test_console_script_is_installed():
  eps = importlib.metadata.entry_points(group="console_scripts", name="bagel-convert")
  assert [e.value for e in eps] == ["bagel_jax.convert.cli:main"]


def test_starting_point_copies_the_gen_expert_and_starts_qk_norm_at_ones(qwen, siglip, base):
  """Default variant mot with QK-norm (Qwen2.5 has none: ones, as the official loader leaves them), the gen
  expert a copy of the und one (copy_init_moe); SigLIP runs stored - 1 layers; the rest initialised."""
  params, cfg = _restore(base)
  assert cfg.llm.layer_variant == "mot" and cfg.llm.qk_norm and cfg.param_dtype == "float32"
  assert (cfg.llm.vocab_size, cfg.vit.num_layers, cfg.vit.hidden_size) == (VOCAB, 2, 32)
  assert (cfg.llm.bos_token_id, cfg.llm.eos_token_id, cfg.llm.vision_start_token_id,
          cfg.llm.vision_end_token_id) == tuple(SPECIALS.values())  # from tokenizer_config.json
  assert cfg.llm.rope_theta == 1e6 and cfg.llm.rms_norm_eps == 1e-6
  assert sorted(os.listdir(os.path.join(base, "source_files"))) == ["generation_config.json", "tokenizer_config.json"]
  llm = params["llm"]
  axes = flatten(bagel_lib.param_logical_axes(cfg)["llm"])
  stacked = [p for p, spec in axes.items() if "modality" in tuple(spec)]
  assert len(stacked) == 15  # q/k/v kernels and biases, o, q/k norms, 2 layer norms, 3 MLP kernels, final norm
  for path, value in flatten(llm).items():
    if path in stacked:
      ax = tuple(axes[path]).index("modality")
      np.testing.assert_array_equal(np.take(value, 0, ax), np.take(value, 1, ax), err_msg=path)
  for n in ("q_norm", "k_norm"):
    assert np.all(np.asarray(llm["layers"]["self_attn"][n]["scale"]) == 1.0)
  sd = {k: v.numpy() for k, v in qwen[0].state_dict().items()}
  np.testing.assert_array_equal(llm["layers"]["mlp"]["up_proj"]["kernel"][1, 0],
                                sd["model.layers.1.mlp.up_proj.weight"].T)
  np.testing.assert_array_equal(llm["lm_head"]["kernel"], sd["lm_head.weight"].T)
  vit_sd = siglip[0].state_dict()
  np.testing.assert_array_equal(params["vit"]["post_layernorm"]["scale"], vit_sd["vision_model.post_layernorm.weight"]
                                if "vision_model.post_layernorm.weight" in vit_sd else vit_sd["post_layernorm.weight"])
  assert np.all(np.asarray(params["llm2vae"]["kernel"]) == 0)  # initialised as the official model does
  assert np.std(np.asarray(params["connector"]["fc1"]["kernel"])) > 0


@pytest.mark.parametrize("variant", ["dense", "mot"])
def test_qwen2_sharded_logits_match_transformers(qwen, base, tmp_path, variant):
  model, src = qwen
  assert os.path.isfile(os.path.join(src, "model.safetensors.index.json"))
  assert len([n for n in os.listdir(src) if n.endswith(".safetensors")]) > 1
  dst = str(tmp_path / "ckpt")
  _convert("qwen2", "--src", src, "--dst", dst, "--into", base, "--variant", variant, "--no-qk-norm")
  params, cfg = _restore(dst)
  assert cfg.llm.layer_variant == variant and not cfg.llm.qk_norm
  ids = np.random.default_rng(0).integers(0, VOCAB, (2, 29))
  with torch.no_grad():
    want = model(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(_logits(params, cfg, ids), want, atol=1e-4, rtol=0)


def test_qwen2_bf16_source_to_fp32_and_bf16(qwen, base, tmp_path):
  """bf16 -> fp32 widens exactly; bf16 -> bf16 copies; the model keeps norm scales in fp32 either way."""
  src = str(tmp_path / "qwen2_bf16")
  bf16 = copy.deepcopy(qwen[0]).to(torch.bfloat16)
  bf16.save_pretrained(src)
  want = bf16.state_dict()["model.embed_tokens.weight"].float().numpy()
  for dtype in ("float32", "bfloat16"):
    dst = str(tmp_path / dtype)
    mesh = ["--mesh", "fsdp=1"] if dtype == "bfloat16" else []  # leaves placed as jax.Arrays on a mesh
    _convert("qwen2", "--src", src, "--dst", dst, "--into", base, "--dtype", dtype, *mesh)
    params, cfg = _restore(dst)
    assert cfg.param_dtype == dtype
    emb = params["llm"]["embed_tokens"]["embedding"]
    assert np.dtype(emb.dtype) == np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
    np.testing.assert_array_equal(np.asarray(emb, np.float32), want)
    assert np.dtype(params["llm"]["norm"]["scale"].dtype) == np.float32


def test_qwen2_moe_plan_copies_only_the_mlp(qwen):
  _, src = qwen
  part = components.qwen2_part(src, variant="moe")  # plans from the headers; reads no data
  up = part.plan["llm/layers/mlp/up_proj/kernel"]
  assert up.shape == (2, 2, 64, 96)
  assert [p.name for p in up.pieces[:2]] == ["model.layers.0.mlp.up_proj.weight"] * 2
  assert part.plan["llm/layers/self_attn/q_proj/kernel"].shape == (2, 64, 4, 16)  # attention shared
  assert [p.name for p in part.plan["llm/norm/scale"].pieces] == ["model.norm.weight"] * 2
  assert not part.src.unused()


def test_siglip_last_hidden_state(siglip, base, tmp_path):
  model, src = siglip
  dst = str(tmp_path / "ckpt")
  _convert("siglip", "--src", src, "--dst", dst, "--into", base, "--vit-layers", "3")
  params, cfg = _restore(dst)
  assert (cfg.vit.hidden_size, cfg.vit.num_layers, cfg.vit.patch_size, cfg.vit.max_patches_per_side) == (32, 3, 8, 4)
  _assert_same(params, _restore(base)[0], skip=("vit/",))
  image = np.random.default_rng(3).uniform(-1, 1, (32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    want = model(pixel_values=torch.tensor(image.transpose(2, 0, 1)[None])).last_hidden_state.numpy()[0]
  vit = SiglipViT(cfg.vit, scan_layers=cfg.scan_layers)
  got = jax.jit(lambda p, *a: vit.apply({"params": p}, *a))(
      params["vit"], jnp.asarray(patchify(image, 8))[None], jnp.asarray(patch_position_ids(4, 4, 4))[None],
      jnp.ones((1, 16), jnp.int32))
  np.testing.assert_allclose(np.asarray(got)[0], want, atol=1e-4, rtol=0)


def _check_ae(params, cfg, model, seed=4):
  x = np.random.default_rng(seed).uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)
  with torch.no_grad():
    mean_ref = model.encode(torch.tensor(x)).latent_dist.mean.numpy()
    z = np.random.default_rng(seed + 1).normal(size=mean_ref.shape).astype(np.float32)
    dec_ref = model.decode(torch.tensor(z)).sample.numpy()
  vae = FluxAutoEncoder(cfg.vae)
  mean = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=FluxAutoEncoder.encode_moments)[0])(
      params["vae"], jnp.asarray(x.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(np.asarray(mean).transpose(0, 3, 1, 2), mean_ref, atol=1e-4, rtol=0)
  dec = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=lambda m, z: m.decoder(z)))(
      params["vae"], jnp.asarray(z.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(np.asarray(dec).transpose(0, 3, 1, 2), dec_ref, atol=1e-4, rtol=0)


def test_flux_ae_bfl_file(autoencoder, base, tmp_path, capsys):
  """BFL naming, no config: the architecture is inferred from the shapes (the base's VAE is a different one),
  scale/shift are FLUX's; progress is shown."""
  model, _, bfl = autoencoder
  dst = str(tmp_path / "ckpt")
  assert ckpt_lib.read_model_config(base).vae.ch_mult == (1, 2, 2)
  assert main(["flux-ae", "--src", bfl, "--dst", dst, "--into", base]) == 0
  out = capsys.readouterr()
  assert "ae.safetensors" in out.err and "B/s" in out.err  # the tqdm byte bar
  assert "wrote" in out.out
  params, cfg = _restore(dst)
  v = cfg.vae
  assert (v.ch, v.ch_mult, v.num_res_blocks, v.z_channels, v.num_groups) == (32, (1, 2), 1, 4, 32)
  assert (v.scale_factor, v.shift_factor) == (0.3611, 0.1159)
  _assert_same(params, _restore(base)[0], skip=("vae/",))
  _check_ae(params, cfg, model)


def test_flux_ae_diffusers_dir(autoencoder, base, tmp_path):
  """diffusers naming, architecture and scale/shift from its config.json."""
  model, ddir, _ = autoencoder
  dst = str(tmp_path / "ckpt")
  _convert("flux-ae", "--src", ddir, "--dst", dst, "--into", base)
  params, cfg = _restore(dst)
  v = cfg.vae
  assert (v.ch, v.ch_mult, v.num_res_blocks, v.z_channels, v.scale_factor, v.shift_factor) == (
      32, (1, 2), 1, 4, 0.3611, 0.1159)
  _check_ae(params, cfg, model)


def test_export_and_reconvert(qwen, base, tmp_path):
  """Export writes the official naming (both experts carry the HF weights) and converts back identically, the
  base's non-FLUX VAE (8 GroupNorm groups) included: the export records what shapes cannot tell."""
  model, _ = qwen
  out, again = str(tmp_path / "release"), str(tmp_path / "again")
  _convert("export", "--checkpoint", base, "--dst", out)
  assert {"ema.safetensors", "ae.safetensors", "llm_config.json", "vit_config.json",
          "tokenizer_config.json"} <= set(os.listdir(out))
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  with safe_open(os.path.join(out, "ema.safetensors"), "np") as f:
    names = set(f.keys())
    for k, v in sd.items():
      name = "language_model." + k
      np.testing.assert_array_equal(f.get_tensor(name), v, err_msg=name)
      if ".layers." in k:
        gen = name.replace(".mlp.", ".mlp_moe_gen.") if ".mlp." in k else re.sub(
            r"\.(q_proj|k_proj|v_proj|o_proj|input_layernorm|post_attention_layernorm)\.", r".\1_moe_gen.", name)
        np.testing.assert_array_equal(f.get_tensor(gen), v, err_msg=gen)
    assert np.all(f.get_tensor("language_model.model.layers.0.self_attn.q_norm_moe_gen.weight") == 1.0)
  assert "language_model.model.norm_moe_gen.weight" in names and "latent_pos_embed.pos_embed" in names
  with open(os.path.join(out, "llm_config.json")) as f:
    assert json.load(f)["layer_module"] == "Qwen2MoTDecoderLayer"
  with safe_open(os.path.join(out, "ae.safetensors"), "np") as f:
    assert json.loads(f.metadata()["bagel_jax.vae"])["num_groups"] == 8
  _convert("bagel", "--src", out, "--dst", again)
  back, cfg2 = _restore(again)
  params, cfg = _restore(base)
  assert cfg2 == cfg
  _assert_same(back, params)


# ----------------------------------------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------------------------------------

def _copy(src, tmp_path):
  dst = str(tmp_path / "src")
  shutil.copytree(src, dst)
  return dst


def test_qwen2_unexpected_tensor_in_a_shard(qwen, tmp_path, capsys):
  src = _copy(qwen[1], tmp_path)
  with open(os.path.join(src, "model.safetensors.index.json")) as f:
    index = json.load(f)
  shard = index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
  path = os.path.join(src, shard)
  with safe_open(path, "np") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  tensors["model.layers.1.mlp.extra_proj.weight"] = np.zeros((2, 3), np.float32)
  save_file(tensors, path)
  argv = ["qwen2", "--src", src, "--preset", "tiny"]
  err = _fails(capsys, argv, str(tmp_path / "ckpt"))
  assert "not indexed" in err and "extra_proj" in err  # the index no longer describes the shards
  index["weight_map"]["model.layers.1.mlp.extra_proj.weight"] = shard
  with open(os.path.join(src, "model.safetensors.index.json"), "w") as f:
    json.dump(index, f)
  err = _fails(capsys, argv, str(tmp_path / "ckpt"))
  assert "unexpected" in err and "model.layers.1.mlp.extra_proj.weight (2, 3)" in err


def test_qwen2_missing_shard_wrong_shape_and_missing_config(qwen, tmp_path, capsys):
  src = _copy(qwen[1], tmp_path)
  argv = ["qwen2", "--src", src, "--preset", "tiny"]
  with open(os.path.join(src, "model.safetensors.index.json")) as f:
    shards = sorted(set(json.load(f)["weight_map"].values()))
  name = "model.layers.0.mlp.down_proj.weight"
  path = [os.path.join(src, s) for s in shards if name in safe_open(os.path.join(src, s), "np").keys()][0]
  with safe_open(path, "np") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  tensors[name] = tensors[name][:-1].copy()
  save_file(tensors, path)
  err = _fails(capsys, argv, str(tmp_path / "ckpt"))
  assert name in err and "(63, 96)" in err and "(64, 96)" in err
  os.remove(os.path.join(src, shards[0]))
  err = _fails(capsys, argv, str(tmp_path / "ckpt"))
  assert shards[0] in err
  os.remove(os.path.join(src, "config.json"))
  err = _fails(capsys, argv, str(tmp_path / "ckpt"))
  assert "config.json" in err


def test_export_of_a_missing_checkpoint(tmp_path, capsys):
  with pytest.raises(SystemExit):
    main(["export", "--checkpoint", str(tmp_path / "nope"), "--dst", str(tmp_path / "out"), "--quiet"])
  assert "model_config.json" in capsys.readouterr().err and not os.path.exists(tmp_path / "out")
