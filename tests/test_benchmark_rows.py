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
