"""What the training loop iterates: host-local `PackedBatch`es from a checkpointable iterator, assembled into
global sharded arrays.

Every input iterator offers `next()`, `get_state() -> bytes`, `set_state(bytes)` and `start_prefetch()`, the
protocol `grain.checkpoint.CheckpointSave/Restore` uses for non-Grain iterators, so its position is saved in
the same Orbax step as the model.
"""
from __future__ import annotations

import json
from typing import Any, Dict

import jax
import numpy as np

from bagel_jax import batch as batch_lib
from bagel_jax.data import examples, pipeline
from bagel_jax.layout import LayoutConfig
from bagel_jax.models.config import BagelConfig
from bagel_jax.parallel import rules as rules_lib
from bagel_jax.train.config import RunConfig


class RandomInput:
  """Random packed batches of every sample kind, a pure function of (seed, process, batch index): exactly
  resumable. For smoke runs, tests and benchmarks; real runs use the Grain pipeline."""

  def __init__(self, model_cfg: BagelConfig, spec: batch_lib.BatchSpec, seed: int, process_index: int = 0):
    self.model_cfg, self.spec, self.seed, self.process = model_cfg, spec, seed, process_index
    self.index = 0
    self.stats: Dict[str, float] = {}

  def __iter__(self):
    return self

  def __next__(self):
    seed = int(np.random.SeedSequence([self.seed, self.process, self.index]).generate_state(1)[0])
    b = examples.random_batch(self.model_cfg, self.spec, seed=seed)
    self.index += 1
    return b

  def get_state(self) -> bytes:
    return json.dumps({"index": self.index, "seed": self.seed, "process": self.process}).encode()

  def set_state(self, state: bytes):
    s = json.loads(state)
    if s["seed"] != self.seed:
      raise ValueError(f"data iterator state was saved with seed {s['seed']}, config has {self.seed}")
    self.index = int(s["index"])

  def start_prefetch(self):
    pass

  def close(self):
    pass


def make_input(run: RunConfig, local_spec: batch_lib.BatchSpec, process_index: int, process_count: int):
  """The host-local iterator of `run.source`: random batches, or the Grain pipeline over `run.data` (its
  sources opened once and checked against the batch)."""
  if run.source == "random":
    return RandomInput(run.model, local_spec, run.data_seed, process_index)
  if run.data is None:
    raise ValueError(f"config.data.source={run.source!r}: the data config was not resolved (resolve(with_data=True))")
  return pipeline.make_training_input(run.data, local_spec, LayoutConfig.from_model_config(run.model),
                                      vocab_size=run.model.llm.vocab_size, process_index=process_index,
                                      process_count=process_count)


def to_global(local_batch: Dict[str, np.ndarray], mesh) -> Dict[str, Any]:
  """Host-local rows -> global jax.Arrays sharded over the batch axes (one call per process, multi-host safe)."""
  out = {}
  for k, v in local_batch.items():
    sharding = rules_lib.batch_sharding(mesh, np.ndim(v))
    out[k] = jax.make_array_from_process_local_data(sharding, np.asarray(v))
  return out
