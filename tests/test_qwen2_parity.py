"""Numerical parity of our decoder with `transformers` Qwen2 (torch CPU, fp32).

HF Qwen2 has no QK-norm; BAGEL adds it. Our model runs with `qk_norm=False` here (a documented config flag),
everything else (RMSNorm cast order, split-half RoPE with theta 1e6, GQA, biases, SwiGLU, untied head) is the
same code path the MoT model uses.
"""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from bagel_jax.convert.common import TensorSource
from bagel_jax.convert.qwen2 import llm_config_from_hf, llm_from_torch, llm_to_torch
from bagel_jax.models import config as config_lib
from bagel_jax.models.bagel import expand_to_variant
from bagel_jax.models.qwen2 import Qwen2LM

torch = pytest.importorskip("torch", reason="parity tests need the torch extra: pip install -e '.[torch]'")
transformers = pytest.importorskip("transformers", reason="parity tests need the torch extra")

pytestmark = pytest.mark.torch


def _hf_model(seed=0, tie=False):
  cfg = transformers.Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
                                 tie_word_embeddings=tie, max_position_embeddings=256)
  cfg._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = transformers.Qwen2ForCausalLM(cfg).eval()
  with torch.no_grad():  # non-trivial norms and biases so their layouts are exercised
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or name.endswith(".bias"):
        p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("norm.weight") else 0.0))
  return model, cfg


def _ours(hf_cfg, state, variant="dense"):
  llm = llm_config_from_hf(hf_cfg.to_dict(), layer_variant="dense", qk_norm=False)
  bagel_cfg = dataclasses.replace(config_lib.tiny(), llm=llm)
  params = llm_from_torch(TensorSource(state, what="qwen2"), llm)
  if variant != "dense":
    bagel_cfg = bagel_cfg.replace_llm(layer_variant=variant)
    params = expand_to_variant({"llm": params}, bagel_cfg)["llm"]
  return bagel_cfg, params


def _state(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("variant", ["dense", "mot"])
def test_logits_match_transformers(variant):
  model, hf_cfg = _hf_model()
  ids = np.random.default_rng(0).integers(0, 97, (2, 33))
  with torch.no_grad():
    want = model(torch.tensor(ids)).logits.numpy()
  cfg, params = _ours(hf_cfg, _state(model), variant)
  got = Qwen2LM(cfg).apply({"params": params}, jnp.asarray(ids), method=Qwen2LM.text_logits)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


def test_tied_checkpoint_unties_head():
  model, hf_cfg = _hf_model(tie=True)
  state = _state(model)
  state.pop("lm_head.weight", None)
  ids = np.arange(20)[None] % 97
  with torch.no_grad():
    want = model(torch.tensor(ids)).logits.numpy()
  cfg, params = _ours(hf_cfg, state)
  np.testing.assert_array_equal(params["lm_head"]["kernel"], params["embed_tokens"]["embedding"].T)
  got = Qwen2LM(cfg).apply({"params": params}, jnp.asarray(ids), method=Qwen2LM.text_logits)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


def test_round_trip_and_strictness():
  model, hf_cfg = _hf_model()
  state = _state(model)
  cfg, params = _ours(hf_cfg, state)
  back = llm_to_torch(params, cfg.llm)
  assert set(back) == set(state)
  for k in state:
    np.testing.assert_array_equal(back[k], state[k], err_msg=k)
  bad = dict(state)
  bad["model.layers.1.mlp.up_proj.weight"] = bad["model.layers.1.mlp.up_proj.weight"][:, :-1]
  with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*\(96, 63\).*\(96, 64\)"):
    _ours(hf_cfg, bad)
  extra = dict(state, **{"model.layers.0.unexpected.weight": np.zeros(3)})
  src = TensorSource(extra)
  llm_from_torch(src, cfg.llm)
  with pytest.raises(ValueError, match="unexpected"):
    src.finish()
