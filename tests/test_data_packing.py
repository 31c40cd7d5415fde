"""Packing: no sample split across rows, every BatchSpec capacity respected, `validate()` on every batch of the
synthetic mix, the count identity (in = out + skipped + buffered), fill ratio, mixture ratios and sharding."""
import numpy as np
import pytest

import grain
from bagel_jax import batch as batch_lib
from bagel_jax.batch import PAD, TEXT
from bagel_jax.data import packing, pipeline
from bagel_jax.data.config import DataConfig, SourceConfig, synthetic_mixture
from bagel_jax.data.examples import batch_spec_for
from bagel_jax.data.sequence import Text, layout_sample
from bagel_jax.layout import LayoutConfig
from bagel_jax.data.sources import Skipped
from bagel_jax.kernels.mask import CAUSAL
from bagel_jax.models.config import tiny

CFG = tiny()
LAYOUT = LayoutConfig.from_model_config(CFG)
BOS, EOS, VS, VE = 1, 2, 3, 4


def spec(b=2, l=256, vit=64, lat=128, img=16, vae=10, und=None):
  return batch_spec_for(CFG, batch_size=b, seq_len=l, vit_capacity=vit, latent_capacity=lat, image_capacity=img,
                        und_capacity=und, pixel_images=vae, pixel_size=32)


def check_rows_whole(b, sp):
  """Every document of every row is a complete sample: contiguous, RoPE restarting, every split bracketed
  by its start/end token; every per-row capacity respected. Returns the number of documents."""
  n_docs = 0
  for r in range(sp.batch_size):
    mod, doc, split = b["modality"][r], b["document"][r], b["split"][r]
    ids, mode = b["text_ids"][r], b["split_mode"][r]
    real = mod != PAD
    n = int(real.sum())
    assert np.all(real[:n]) and not np.any(real[n:])  # padding only at the end
    for d in range(1, int(b["num_documents"][r]) + 1):
      pos = np.nonzero(doc == d)[0]
      assert len(pos) and np.all(np.diff(pos) == 1), "document not contiguous"
      p = b["position"][r, pos]
      # RoPE restarts per sample (above 0 only when CFG-dropped conditions lead it) and never decreases
      assert p[0] <= 2 * 3 and np.all(np.diff(p) >= 0)
      for s in np.unique(split[pos]):
        sp_pos = np.nonzero(split == s)[0]
        first, last = ids[sp_pos[0]], ids[sp_pos[-1]]
        if mode[sp_pos[0]] == CAUSAL:
          assert (first, last) == (BOS, EOS)
        else:
          assert mod[sp_pos[0]] == TEXT and first == VS and last == VE
      n_docs += 1
    # capacities (the buffers have fixed shapes; these are the row's real counts)
    assert n <= sp.seq_len
    assert (b["vit_image"][r] > 0).sum() <= sp.vit_capacity and (b["latent_image"][r] > 0).sum() <= sp.latent_capacity
    assert (real & (mod != 2)).sum() <= sp.nu and b["num_ce"][r] <= sp.nc
    n_img = len(np.unique(np.r_[b["vit_image"][r], b["latent_image"][r]])) - 1
    assert n_img <= sp.image_capacity
    assert len(np.unique(b["latent_src"][r][b["latent_src"][r] >= 0] // (sp.latent_grid ** 2))) <= \
        sp.vae_image_capacity
  return n_docs


def run(dc, sp, n, seed=0, **kw):
  it = pipeline.make_pipeline(dc, sp, LAYOUT, seed=seed, **kw)
  docs = 0
  batches = []
  for _ in range(n):
    b = next(it)
    batch_lib.validate(b, sp)
    docs += check_rows_whole(b, sp)
    batches.append(b)
  s = it.stats
  it.close()
  assert docs == s["samples_out"]
  assert s["samples_in"] == s["samples_out"] + s["skipped"] + s["buffered"]
  return batches, s, it


def test_synthetic_mix_100_batches_validate():
  sp = spec(b=2, l=256, vit=96, lat=160, und=160)  # und capacity below L: a MoT-style routing budget
  _, s, it = run(synthetic_mixture(prefetch=0), sp, 100)
  print("\n" + it.stats_line())
  assert s["fill"] > 0.85 and s["skipped"] == 0
  assert s["fill/und_tokens"] <= 1.0 and s["fill/latent_tokens"] <= 1.0


def test_synthetic_mix_1000_batches_validate():
  sp = spec(b=2, l=256, vit=96, lat=160)
  _, s, it = run(synthetic_mixture(prefetch=2), sp, 1000, seed=1)
  print("\n" + it.stats_line())
  assert s["batches"] == 1000 and s["fill"] > 0.85


def test_fill_ratio_t2i_vqa_edit_at_1024():
  """The benchmark's mix at L = 1,024 with capacities that leave tokens as the binding budget."""
  dc = synthetic_mixture(["t2i", "vqa", "edit"], gen_und=0.0, weights=dict(t2i=2.0, vqa=1.0, edit=1.0), prefetch=0)
  sp = spec(b=2, l=1024, vit=384, lat=576, img=72, vae=48)
  _, s, it = run(dc, sp, 12)
  print(f"\nfill at L=1024: {s['fill']:.4f} " + it.stats_line())
  assert s["fill"] >= 0.95


def _prepared(n_tokens, kind="text"):
  lay = layout_sample([Text([7] * (n_tokens - 2), loss=True)], LAYOUT)
  return packing.Prepared(lay, kind, "hand", packing.sample_needs(lay))


def _pack(items, sp, max_buffer=4):
  return packing.PackBatches.from_samples(grain.MapDataset.source(items), sp, LAYOUT, max_buffer)


def test_packer_best_fit_buffer_and_too_long():
  """Hand-sized samples: best fit picks the fullest row that fits, overflow waits in the buffer and is placed
  first in the next batch, a sample larger than a row is skipped as too_long, nothing is split or lost."""
  sp = spec(b=2, l=32)
  items = [_prepared(20), _prepared(20), _prepared(10), Skipped("decode_error", "x"), _prepared(40),
           _prepared(12), _prepared(8), _prepared(8), _prepared(8), _prepared(8), _prepared(5)]
  it = iter(_pack(items, sp, max_buffer=2))
  b1, d1 = next(it)
  # 20 -> row 0, 20 -> row 1, 10 -> row 0 (30), 12 -> row 1 (32), 8 -> buffer, 8 -> buffer full: emit
  assert b1["num_tokens"].tolist() == [30, 32]
  assert d1["counts"]["skipped/decode_error"] == 1 and d1["counts"]["skipped/too_long"] == 1
  assert d1["counts"]["buffered"] == 2 and it.get_state()["buffer"] == [6, 7]
  b2, d2 = next(it)
  # buffer first (8, 8), then 8, 8 all go to the fullest row that fits (row 0: 32), 5 opens row 1
  assert b2["num_tokens"].tolist() == [32, 5] and d2["counts"]["buffered"] == -2
  with pytest.raises(StopIteration):
    next(it)
  c = {k: d1["counts"].get(k, 0) + d2["counts"].get(k, 0) for k in set(d1["counts"]) | set(d2["counts"])}
  assert c["samples_in"] == len(items) == c["samples_out"] + c["skipped"] and c["samples_out"] == 9


def test_every_capacity_binds_not_only_tokens():
  """Tight ViT / latent / image / VAE-image capacities: validate() and the per-row counts still hold."""
  for kw in (dict(vit=20), dict(lat=40), dict(img=3), dict(vae=2), dict(und=80)):
    sp = spec(b=2, l=256, **kw)
    _, s, _ = run(synthetic_mixture(prefetch=0), sp, 5)
    assert s["samples_out"] > 0


def test_deterministic_mixture_ratio_and_seed():
  sp = spec(b=2, l=256, vit=96, lat=160)
  a, sa, _ = run(synthetic_mixture(prefetch=0), sp, 30, seed=3)
  b, _, _ = run(synthetic_mixture(prefetch=0), sp, 3, seed=3)
  c, _, _ = run(synthetic_mixture(prefetch=0), sp, 3, seed=4)
  for x, y in zip(a[:3], b):
    assert all(np.array_equal(x[k], y[k]) for k in x)
  assert not np.array_equal(a[0]["text_ids"], c[0]["text_ids"])
  gen = sum(v for k, v in sa.items() if k.startswith("kind/") and k[5:] in ("t2i", "edit", "video", "next_frame",
                                                                           "think_t2i"))
  und = sum(v for k, v in sa.items() if k.startswith("kind/") and k[5:] in ("vqa", "caption", "text", "think_vqa"))
  assert 3.5 < gen / und < 4.5  # gen:und 4:1 (by samples)


def test_process_shards_partition_the_stream():
  """Two hosts' shards together hold exactly the single-host samples (finite data, one epoch)."""
  dc = synthetic_mixture(["t2i", "vqa"], gen_und=0.0, num_records=40, num_epochs=1, prefetch=0)
  sp = spec(b=2, l=256, vit=96, lat=160)

  def drain(pidx, pcount):
    it = pipeline.make_pipeline(dc, sp, LAYOUT, seed=0, process_index=pidx, process_count=pcount)
    ids = []
    for b in it:
      for r in range(sp.batch_size):
        for d in range(1, b["num_documents"][r] + 1):
          in_doc = np.nonzero(b["document"][r] == d)[0]
          lat = np.isin(b["latent_dest"][r], in_doc)
          vit = np.isin(b["vit_dest"][r], in_doc)
          ids.append(b["text_ids"][r][in_doc].tobytes() + b["latent_t_logit"][r][lat].tobytes() +
                     b["vit_patches"][r][vit].tobytes())
    return it.stats, ids

  s, whole = drain(0, 1)
  s0, p0 = drain(0, 2)
  s1, p1 = drain(1, 2)
  # t2i:vqa = 4:3 mixing of two 40-record epochs ends when t2i runs out: 70 samples
  assert s["samples_out"] == 70 == s0["samples_out"] + s1["samples_out"] and s["skipped"] == 0
  assert sorted(p0 + p1) == sorted(whole) and not set(p0) & set(p1)


def test_source_config_errors_name_the_field():
  with pytest.raises(ValueError, match="task"):
    SourceConfig("x", "synthetic", task="nope")
  with pytest.raises(ValueError, match="needs a path"):
    SourceConfig("x", "jsonl")
  with pytest.raises(ValueError, match="unknown keys"):
    DataConfig.from_config({"source": "synthetic", "bogus": 1})
  with pytest.raises(ValueError, match="vae_image_size"):
    pipeline.make_pipeline(synthetic_mixture(image_size=64), spec(), LAYOUT)
  with pytest.raises(ValueError, match="special ids"):
    from bagel_jax.layout import SpecialTokens
    pipeline.make_pipeline(synthetic_mixture(), spec(), LayoutConfig(SpecialTokens(151644, 151645, 151652, 151653),
                                                                     8, 16))
