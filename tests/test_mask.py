"""The generalized causal mask (reference §4.2) on a hand-written packed row, and invisibility by gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bagel_jax import batch as batch_lib
from bagel_jax.data.examples import batch_spec_for, hand_written_batch
from bagel_jax.kernels import mask as mask_lib
from bagel_jax.models import config as config_lib
from bagel_jax.models.qwen2 import Qwen2LM
from bagel_jax.models.routing import Routing

CFG = config_lib.tiny("mot")
SPEC = batch_spec_for(CFG, batch_size=2, seq_len=64)

# The hand-written row, described independently of the layout code: (document, tokens, mode) per split.
# doc 1: text(4 ids) -> noisy VAE 2x3 -> its clean copy -> text(3 ids, loss); doc 2: ViT 2x2 -> text(5, loss);
# doc 3: text(6, loss). Texts add <|im_start|>/<|im_end|>, images <|vision_start|>/<|vision_end|>.
SPLITS = [(1, 6, "causal"), (1, 8, "noise"), (1, 8, "full"), (1, 5, "causal"),
          (2, 6, "full"), (2, 7, "causal"),
          (3, 8, "causal")]


def _expand():
  doc, split, mode = [], [], []
  for s, (d, n, m) in enumerate(SPLITS, start=1):
    doc += [d] * n
    split += [s] * n
    mode += [m] * n
  return doc, split, mode


def _brute_force_mask(n_total):
  """Direct transcription of the §4.2 formula with Python loops."""
  doc, split, mode = _expand()
  pad = n_total - len(doc)
  doc, split, mode = doc + [0] * pad, split + [0] * pad, mode + ["causal"] * pad
  m = np.zeros((n_total, n_total), bool)
  for q in range(n_total):
    for k in range(n_total):
      if doc[q] == 0 or doc[q] != doc[k]:
        continue
      visible = k <= q or (split[q] == split[k] and mode[q] in ("full", "noise"))
      hidden_noise = mode[k] == "noise" and split[q] != split[k]
      m[q, k] = visible and not hidden_noise
  return m


@pytest.fixture(scope="module")
def batch():
  b = hand_written_batch(CFG, SPEC)
  batch_lib.validate(b, SPEC)
  return b


def test_layout_matches_description(batch):
  doc, split, mode = _expand()
  n = len(doc)
  codes = {"causal": mask_lib.CAUSAL, "full": mask_lib.FULL, "noise": mask_lib.NOISE}
  np.testing.assert_array_equal(batch["document"][0, :n], doc)
  np.testing.assert_array_equal(batch["split"][0, :n], split)
  np.testing.assert_array_equal(batch["split_mode"][0, :n], [codes[m] for m in mode])
  assert np.all(batch["modality"][0, n:] == batch_lib.PAD)
  # RoPE: text advances per token, each image block shares one id, the noisy image does not advance it.
  np.testing.assert_array_equal(batch["position"][0, :n],
                                list(range(6)) + [6] * 8 + [6] * 8 + list(range(7, 12))
                                + [0] * 6 + list(range(1, 8)) + list(range(8)))


def test_materialised_mask_equals_brute_force(batch):
  meta = mask_lib.TokenMeta.from_row(batch["document"], batch["split"], batch["split_mode"])
  got = np.asarray(mask_lib.materialize(meta, meta))[0]
  np.testing.assert_array_equal(got, _brute_force_mask(SPEC.seq_len))


def test_mask_properties(batch):
  meta = mask_lib.TokenMeta.from_row(batch["document"], batch["split"], batch["split_mode"])
  m = np.asarray(mask_lib.materialize(meta, meta))[0]
  doc, split, mode = (np.asarray(a[0]) for a in (batch["document"], batch["split"], batch["split_mode"]))
  noise = mode == mask_lib.NOISE
  # noisy tokens are invisible to every other split
  assert not m[:, noise][split[:, None] != split[noise][None, :]].any()
  # documents never see each other
  assert not m[doc[:, None] != doc[None, :]].any()
  # padding sees nothing and is seen by nothing
  pad = doc == 0
  assert not m[pad].any() and not m[:, pad].any()
  # every real token sees itself
  assert np.all(np.diag(m)[~pad])
  # the clean copy and later text see the context before the noisy image but not the noisy image
  assert m[16, 0] and not m[16, 7] and m[22, 16] and not m[22, 8]


def test_text_output_has_no_gradient_from_later_or_hidden_tokens(batch):
  """Causality and invisibility end to end through the decoder stack: d h[q] / d x[k] = 0 where the mask
  says k is invisible to q, and non-zero for a visible k."""
  b = {k: jnp.asarray(v) for k, v in batch.items()}
  model = Qwen2LM(CFG)
  meta = mask_lib.TokenMeta.from_row(b["document"], b["split"], b["split_mode"])
  routing = Routing.from_batch(b)
  x = jax.random.normal(jax.random.key(0), b["modality"].shape + (CFG.llm.hidden_size,))
  params = model.init(jax.random.key(1), x, routing, b["position"], meta)

  def out_at(x, q):
    h, _ = model.apply(params, x, routing, b["position"], meta)
    return jnp.sum(h[0, q] * jnp.arange(1, h.shape[-1] + 1))

  split = np.asarray(batch["split"][0])
  mode = np.asarray(batch["split_mode"][0])
  for q in (3, 24, 35, 41):  # text tokens: doc 1 first text, doc 1 last text, doc 2 text, doc 3 text
    assert batch["modality"][0, q] == batch_lib.TEXT and mode[q] == mask_lib.CAUSAL
    g = np.abs(np.asarray(jax.grad(out_at)(x, q))[0]).sum(-1)
    later = np.arange(SPEC.seq_len) > q
    hidden_noise = (mode == mask_lib.NOISE) & (split != split[q])
    assert g[later].max() == 0.0, f"token {q} depends on a later token"
    assert g[hidden_noise].max() == 0.0, f"token {q} depends on a noisy token"
    assert g[q] > 0 and g[max(0, q - 1)] > 0
  assert np.abs(np.asarray(jax.grad(out_at)(x, 1))[1]).sum() == 0.0  # row 1 is padding only
