"""The rows the CPU benchmarks time are what their docs say (full rows, exact capacities)."""
from bagel_jax import batch as batch_lib
from bagel_jax.data import examples
from bagel_jax.models import bagel as bagel_lib
from bagel_jax.models import config as config_lib
from benchmarks import train_step


def test_official_small_row_and_model():
  c = config_lib.official_small("mot")
  batch, spec = train_step.official_small_row(c)
  batch_lib.validate(batch, spec)
  assert int((batch["modality"] != batch_lib.PAD).sum()) == 2048
  assert int((batch["ce_weight"] > 0).sum()) == 451 and int((batch["mse_weight"] > 0).sum()) == 1024
  assert int((batch["vit_image"] > 0).sum()) == 256 and int(batch["num_documents"][0]) == 9
  shapes = bagel_lib.abstract_params(c)
  assert bagel_lib.count_params({k: v for k, v in shapes.items() if k != "vae"}) == 51_916_608


def test_small_benchmark_rows_are_full():
  """The small preset's benchmark rows fill their 2,048 tokens (they were 42% full when the image cap ended
  them: random samples are ~19 tokens with <= 4x4-token images)."""
  c = train_step.small_config("mot")
  m = config_lib.small("mot")
  b = c.batch
  spec = examples.batch_spec_for(m, batch_size=1, seq_len=b.seq_len, vit_capacity=b.vit_capacity,
                                 latent_capacity=b.latent_capacity, image_capacity=b.image_capacity,
                                 und_capacity=b.und_capacity)
  batch = examples.random_batch(m, spec, seed=0)
  assert int((batch["modality"] != batch_lib.PAD).sum()) >= 0.95 * b.seq_len


def test_stage_rows_come_from_the_real_packer_with_random_boundaries():
  """The AOT tool's and the kernel benchmark's rows: the stage mix's samples packed by the pipeline's packer
  (same seed, same rows), nearly full, with document boundaries off the 512-token tile grid."""
  import numpy as np
  from benchmarks import attention_kernel as ak
  cfg = config_lib.bagel_7b()
  a, batch = ak.stage_rows(cfg, "pretrain", 8192, 4, seed=3)
  b, _ = ak.stage_rows(cfg, "pretrain", 8192, 4, seed=3)
  np.testing.assert_array_equal(a.document, b.document)
  assert (a.document > 0).mean() > 0.9
  starts = [i for r in a.document for i in np.flatnonzero(np.diff(np.r_[0, r]) != 0) if r[i] > 0]
  assert len(starts) > 8 and any(s % 512 for s in starts), starts
  assert int(batch["num_documents"].sum()) == len(starts)


def test_stage_mix_draws_kinds_by_the_stage_ratios():
  from bagel_jax.aot import rows
  from experiments.bagel_7b import pretrain
  c = pretrain.get_config("variant=mot,topology=v5p-256")
  m = config_lib.bagel_7b()
  mix = rows.StageMix.from_config(c)
  assert mix.ratios == dict(text=0.05, t2i=0.6, i2t=0.1, interleaved_und=0.1, video=0.1, web=0.05)
  stream = rows.stage_samples(m, mix, examples.batch_spec_for(m, batch_size=1, seq_len=36864), seed=0)
  kinds = [next(stream).kind for _ in range(4000)]
  for k, r in mix.ratios.items():
    assert abs(kinds.count(k) / len(kinds) - r) < 0.03, (k, kinds.count(k) / len(kinds), r)
