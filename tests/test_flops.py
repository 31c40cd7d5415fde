"""Model-FLOPs accounting (shared by the training logger and the AOT/MFU report)."""
import numpy as np
import pytest

from bagel_jax.data.examples import batch_spec_for, hand_written_batch, random_batch
from bagel_jax.kernels import mask as mask_lib
from bagel_jax.models import config as config_lib
from bagel_jax.train import flops as flops_lib

CFG = config_lib.tiny("mot")


@pytest.mark.parametrize("seed", range(4))
def test_allowed_pairs_equal_the_materialised_mask(seed):
  spec = batch_spec_for(CFG, batch_size=3, seq_len=96)
  b = random_batch(CFG, spec, seed=seed)
  meta = mask_lib.TokenMeta.from_row(b["document"], b["split"], b["split_mode"])
  dense = np.asarray(mask_lib.materialize(meta, meta)).sum(axis=(1, 2))
  np.testing.assert_array_equal(flops_lib.allowed_pairs_per_row(b["document"], b["split"], b["split_mode"]), dense)


def test_step_flops_hand_count_on_the_tiny_preset():
  """The hand-written row: 48 tokens, 4 ViT tokens, 12 latent tokens (noisy 2x3 + clean copy), 13 CE labels."""
  spec = batch_spec_for(CFG, batch_size=1, seq_len=64)
  b = hand_written_batch(CFG, spec)
  got = flops_lib.step_flops(b, CFG)
  d, hq, hkv, dh, f, n_layers, v = 64, 4, 2, 16, 128, 2, 512
  per_layer = d * hq * dh + 2 * d * hkv * dh + hq * dh * d + 3 * d * f  # q, k, v, o, gate/up/down
  assert per_layer == 36_864
  tokens, ce, latents, vit_tokens = 48, 4 + 6 + 7, 12, 4
  assert got["tokens"] == tokens
  # allowed pairs of the three documents, counted by split (see tests/test_mask.py for the layout):
  # doc1: text 6 causal (21) | noise 8 sees text+self (8*(6+8)=112) | clean 8 sees text+self (8*14=112)
  #       | text 5 causal after text+clean (5*14 + 15 = 85); doc2: ViT 6 full (36) | text 7 (7*6+28=70);
  # doc3: text 8 causal (36)
  pairs = 21 + 112 + 112 + 85 + 36 + 70 + 36
  assert got["attention_pairs"] == pairs
  assert got["llm_matmul"] == 3 * 2 * per_layer * n_layers * tokens
  assert got["llm_attention"] == 3 * 4 * hq * dh * pairs * n_layers
  assert got["lm_head"] == 3 * 2 * d * v * ce
  vd, vf = 32, 64
  assert got["vit"] == 3 * (2 * (4 * vd * vd + 2 * vd * vf) * vit_tokens + 4 * vd * vit_tokens ** 2) * 1
  assert got["latent_io"] == 3 * 2 * (2 * 16 * d + 256 * d + d * d) * latents
  assert got["total"] == pytest.approx(sum(v for k, v in got.items() if k not in ("total", "tokens",
                                                                                   "attention_pairs")))


def test_mfu_uses_the_peak_table():
  assert flops_lib.mfu(459e12 * 4 * 0.5, 1.0, 4, "TPU v5p") == pytest.approx(0.5)
  assert np.isnan(flops_lib.mfu(1e12, 1.0, 1, "cpu"))
