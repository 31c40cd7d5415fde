"""The synthetic data as sources: `SyntheticSource`, the Grain random-access source (procedural, any length),
and `BagelSynthetic`, the TFDS builder that writes the same records to ArrayRecord, read back with
`tfds.data_source` like real data (importable without TensorFlow)."""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, Sequence, Tuple

import numpy as np

from bagel_jax.data.synthetic.scenes import encode_png
from bagel_jax.data.synthetic.tasks import T2I_VARIANTS, TASKS, check_t2i_variants, make_example, record_rng

class SyntheticSource:
  """Grain `RandomAccessDataSource` of one synthetic task: record i is a pure function of
  (seed, split, task, i), generated on access (nothing stored)."""

  def __init__(self, task: str, split: str = "train", num_records: int = 1_000_000, image_size: int = 32,
               seed: int = 0, num_frames: int = 4, t2i_variants: Sequence[str] = T2I_VARIANTS):
    if task not in TASKS:
      raise ValueError(f"SyntheticSource: unknown task {task!r}; choose one of {TASKS}")
    self.t2i_variants = check_t2i_variants(t2i_variants, f"SyntheticSource({task})")
    record_rng(seed, split, task, 0)  # validates the split
    self.task, self.split, self.num_records = task, split, int(num_records)
    self.image_size, self.seed, self.num_frames = int(image_size), int(seed), int(num_frames)

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, index: int) -> Dict[str, Any]:
    index = int(index)
    if not 0 <= index < self.num_records:
      raise IndexError(f"SyntheticSource({self.task}): index {index} outside [0, {self.num_records})")
    return make_example(self.task, record_rng(self.seed, self.split, self.task, index), self.image_size,
                        self.num_frames, self.t2i_variants)

  def __repr__(self) -> str:
    return (f"SyntheticSource(task={self.task!r}, split={self.split!r}, n={self.num_records}, "
            f"size={self.image_size}, seed={self.seed})")


# ----------------------------------------------------------------------------------------------------------
# TFDS builder (ArrayRecord), importable without TensorFlow.
# ----------------------------------------------------------------------------------------------------------

def _make_tfds_builder_class():
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  @dataclasses.dataclass
  class SyntheticConfig(tfds.core.BuilderConfig):
    tasks: Tuple[str, ...] = TASKS
    train_per_task: int = 2000
    test_per_task: int = 200
    image_size: int = 32
    seed: int = 0

  class BagelSynthetic(tfds.core.GeneratorBasedBuilder):
    """The built-in synthetic records in the source format: kind, texts, PNG-encoded images, JSON meta."""
    name = "bagel_synthetic"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Shapes x GenEval colours: T2I, caption, VQA, edit, video, words, text, think."}
    BUILDER_CONFIGS = [
        SyntheticConfig(name="default", description="2,000 train / 200 test records per task, 32 px."),
        SyntheticConfig(name="small", description="64 train / 16 test records per task (tests).",
                        train_per_task=64, test_per_task=16),
    ]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):  # pylint: disable=invalid-overridden-method
      # Nothing to download, so no checksums file next to the code. (TFDS 4.9.10's lookup for a builder inside a
      # package also needs `importlib_resources`, which it only declares for Python < 3.9.)
      return None

    def _info(self):
      return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
          "kind": tfds.features.Text(),
          "texts": tfds.features.Sequence(tfds.features.Text()),
          "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
          "meta": tfds.features.Text(),
      }), description="Procedural multimodal data for CPU-scale BAGEL runs (bagel_jax.data.synthetic).")

    def _split_generators(self, dl_manager):
      del dl_manager
      c = self.builder_config
      return {"train": self._generate_examples("train", c.train_per_task),
              "test": self._generate_examples("test", c.test_per_task)}

    def _generate_examples(self, split, n):
      c = self.builder_config
      for task in c.tasks:
        src = SyntheticSource(task, split, n, c.image_size, c.seed)
        for i in range(n):
          r = src[i]
          yield f"{task}/{i}", dict(kind=r["kind"], texts=list(r["texts"]),
                                    images=[encode_png(im) for im in r["images"]],
                                    meta=json.dumps(r["meta"], sort_keys=True))

  return BagelSynthetic


_BUILDER = None


def tfds_builder_class():
  """The `bagel_synthetic` builder class; defining it registers it with TFDS (done once, on first call)."""
  global _BUILDER
  if _BUILDER is None:
    _BUILDER = _make_tfds_builder_class()
  return _BUILDER


def tfds_builder(data_dir: str, config: str = "small", **kw):
  """A `bagel_synthetic` builder writing ArrayRecord shards under `data_dir` on `.download_and_prepare()`;
  read them back with `tfds.data_source("bagel_synthetic/<config>", split=..., data_dir=data_dir)`."""
  return tfds_builder_class()(data_dir=data_dir, config=config, file_format="array_record", **kw)
