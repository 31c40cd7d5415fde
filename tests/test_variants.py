"""The layer-variant registry: each variant module owns its expert counts, FLOPs formula and conversion names,
and a fifth variant is one new module plus one registry line (docs/architecture.md)."""
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bagel_jax.convert import qwen2 as convert_qwen2
from bagel_jax.convert.common import ConversionError
from bagel_jax.data import examples
from bagel_jax.inference import contexts as ctx_lib
from bagel_jax.layout import SpecialTokens
from bagel_jax.models import bagel as bagel_lib
from bagel_jax.models import config as config_lib
from bagel_jax.models import variants
from bagel_jax.train import flops as flops_lib


def test_each_variant_owns_its_facts():
  e = {n: variants.get(n).experts for n in variants.NAMES}
  assert (e["dense"].most, e["moe"].most, e["mot"].most, e["moe_topk"].most) == (1, 2, 2, 1)
  assert e["mot"].attn == 2 and e["moe"].attn == 1 and e["moe"].mlp == 2
  for n in variants.NAMES:  # the parameter tree stacks what the variant says
    p = bagel_lib.abstract_params(config_lib.tiny(n))["llm"]
    assert p["layers"]["self_attn"]["q_proj"]["kernel"].ndim == 4 + (e[n].attn == 2)
    assert p["norm"]["scale"].ndim == 1 + (e[n].final_norm == 2)
  hf = convert_qwen2.llm_config_to_hf(config_lib.tiny("moe").llm)
  assert hf["layer_module"] == "Qwen2MoEDecoderLayer"
  with pytest.raises(ConversionError, match="moe_topk has no released checkpoint naming"):
    convert_qwen2.llm_plan(config_lib.tiny("moe_topk").llm)
  with pytest.raises(ValueError, match="layer_variant='sparse'"):
    config_lib.tiny("sparse")


FIFTH = '''
"""fifth: a toy variant for the registry test (moe's layer, with FLOPs that count both FFNs)."""
from bagel_jax.models.variants import Experts, Variant, moe

VARIANT = Variant("fifth", Experts(attn=1, mlp_norm=1, mlp=2, final_norm=2), None,
                  lambda lc: 2 * moe.VARIANT.mlp_params(lc), moe.post_attention)
'''


def test_a_fifth_variant_is_one_module_and_one_registry_line(tmp_path, monkeypatch):
  (tmp_path / "fifth_variant.py").write_text(textwrap.dedent(FIFTH))
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.setitem(variants.REGISTRY, "fifth", "fifth_variant")  # the one registry line
  monkeypatch.delitem(variants._LOADED, "fifth", raising=False)  # pylint: disable=protected-access
  cfg = config_lib.tiny("fifth", attention_impl="reference")
  assert cfg.llm.num_modality_experts == 2
  params = bagel_lib.init_params(cfg, jax.random.key(0))
  spec = examples.batch_spec_for(cfg, batch_size=1, seq_len=96)
  batch = {k: jnp.asarray(v) for k, v in examples.random_batch(cfg, spec, seed=1).items()}
  loss, _ = bagel_lib.loss_fn(params, batch, jax.random.key(0), cfg)
  assert np.isfinite(float(loss))
  moe = config_lib.tiny("moe")
  f5, fm = flops_lib.step_flops(batch, cfg), flops_lib.step_flops(batch, moe)
  assert f5["llm_matmul"] > fm["llm_matmul"] and f5["llm_attention"] == fm["llm_attention"]
  # cached decoding runs the same layer
  sp = SpecialTokens.from_llm_config(cfg.llm)
  ctx = ctx_lib.Context.empty(cfg, 1, 32).append(params, cfg, ctx_lib.text_block([[7, 8, 9]], sp))
  assert int(ctx.lengths[0]) == 5
  del sys.modules["fifth_variant"]
