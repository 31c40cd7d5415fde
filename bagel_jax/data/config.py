"""The data configuration: which sources, mixed how, transformed how, packed how.

`DataConfig` is a frozen dataclass; `DataConfig.from_config(config.data)` reads the same fields from an
`ml_collections.ConfigDict` (unknown keys fail naming the key). `synthetic_mixture()` is the ready mixture of
the built-in synthetic tasks for tiny CPU runs (gen:und 4:1 by default, as in the paper's ablations);
`stage_weights()` turns the paper's Table 3 category ratios into per-source weights.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from bagel_jax.data import synthetic
from bagel_jax.data.samples import GEN_KINDS

SOURCE_TYPES = ("synthetic", "tfds", "jsonl", "parquet", "tar")
# Table 3 data categories (a recipe's `config.stage_mix.ratios`, experiments/bagel_7b/) and the synthetic task of each.
SYNTHETIC_CATEGORY = {"text": "text", "t2i": "t2i", "words": "t2i", "think_t2i": "t2i", "caption": "i2t",
                      "vqa": "i2t", "think_vqa": "interleaved_und", "video": "video", "next_frame": "video",
                      "edit": "web"}
GEN_CATEGORIES = ("t2i", "video", "web")
T2I_VARIANT_TASKS = ("t2i", "caption", "think_t2i")  # the synthetic tasks that draw a T2I scene kind


@dataclasses.dataclass(frozen=True)
class SourceConfig:
  """One data source. `path`: manifest file (jsonl/parquet), tar shards (comma-separated or a glob) or the TFDS
  dataset name (e.g. 'bagel_synthetic/small'). `group`: 'gen' or 'und' (for `gen_und`); synthetic sources infer
  it from the task. `variants`: for a synthetic t2i/caption/think_t2i source, the scene kinds it draws
  (a subset of `synthetic.T2I_VARIANTS`; empty = all)."""
  name: str
  type: str
  weight: float = 1.0
  path: str = ""
  split: str = "train"
  data_dir: str = ""
  task: str = ""
  num_records: int = 1_000_000
  group: str = ""
  variants: Tuple[str, ...] = ()

  def __post_init__(self):
    if self.type not in SOURCE_TYPES:
      raise ValueError(f"SourceConfig({self.name}).type={self.type!r} is not one of {SOURCE_TYPES}")
    if self.weight < 0:
      raise ValueError(f"SourceConfig({self.name}).weight={self.weight} must be >= 0")
    if self.type == "synthetic" and self.task not in synthetic.TASKS:
      raise ValueError(f"SourceConfig({self.name}).task={self.task!r} is not one of {synthetic.TASKS}")
    if self.type in ("tfds", "jsonl", "parquet", "tar") and not self.path:
      raise ValueError(f"SourceConfig({self.name}) of type {self.type!r} needs a path")
    if self.group not in ("", "gen", "und"):
      raise ValueError(f"SourceConfig({self.name}).group={self.group!r} must be 'gen', 'und' or ''")
    if self.variants:
      object.__setattr__(self, "variants", tuple(self.variants))  # a config list -> the frozen field's tuple
      if self.type != "synthetic" or self.task not in T2I_VARIANT_TASKS:
        raise ValueError(f"SourceConfig({self.name}).variants={list(self.variants)} applies only to synthetic "
                         f"tasks {T2I_VARIANT_TASKS}, not type={self.type!r} task={self.task!r}")
      synthetic.check_t2i_variants(self.variants, f"SourceConfig({self.name}).variants")

  @property
  def resolved_group(self) -> str:
    if self.group:
      return self.group
    if self.type == "synthetic":
      return "gen" if self.task in synthetic.GEN_TASKS else "und"
    return ""


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Everything the pipeline needs besides the model's `BatchSpec`/`LayoutConfig`.

  gen_size / und_size: (min short edge, max long edge) in pixels of VAE / ViT images (Table 3 'resolution').
  gen_und: if > 0, source weights are rescaled so that total gen weight : total und weight = gen_und.
  max_buffer: overflow buffer of the packer (samples that did not fit the batch being built).
  num_workers: Grain worker processes (0 = in-process, with `prefetch` batches of thread prefetch).
  num_epochs: 0 = repeat every source forever; n = n passes (finite pipelines, evaluation, tests).
  validate: run `batch.validate()` on every batch (debug mode).
  Data health (the packer stops with `DataHealthError`, showing the skip-reason histogram and an example per
  reason, instead of spinning on unusable data): max_tries = records read in a row without one usable sample;
  max_skip_fraction = share of records skipped, checked once `skip_check_after` records were read (1.0: never).
  """
  sources: Tuple[SourceConfig, ...]
  seed: int = 0
  gen_und: float = 0.0
  gen_size: Tuple[int, int] = (32, 32)
  und_size: Tuple[int, int] = (32, 64)
  gen_max_pixels: int = 0
  und_max_pixels: int = 0
  text_dropout: float = 0.1
  vit_dropout: float = 0.5
  vae_dropout: float = 0.1
  edit_vit: bool = True
  tokenizer: str = ""
  image_size: int = 32
  num_frames: int = 4
  max_buffer: int = 16
  num_workers: int = 0
  worker_buffer: int = 2
  prefetch: int = 2
  num_epochs: int = 0
  shuffle: bool = True
  validate: bool = False
  max_tries: int = 1000
  max_skip_fraction: float = 0.5
  skip_check_after: int = 1000

  def __post_init__(self):
    if not self.sources:
      raise ValueError("DataConfig.sources is empty")
    names = [s.name for s in self.sources]
    if len(set(names)) != len(names):
      raise ValueError(f"DataConfig.sources: duplicate names {names}")
    if sum(s.weight for s in self.sources) <= 0:
      raise ValueError("DataConfig.sources: weights sum to 0")
    if self.gen_und < 0:
      raise ValueError(f"DataConfig.gen_und={self.gen_und} must be >= 0")
    if not 0.0 < self.max_skip_fraction <= 1.0:
      raise ValueError(f"DataConfig.max_skip_fraction={self.max_skip_fraction} must be in (0, 1]")
    for name in ("max_buffer", "worker_buffer", "max_tries", "skip_check_after"):
      if getattr(self, name) < 1:
        raise ValueError(f"DataConfig.{name} must be >= 1")
    for name in ("num_workers", "prefetch", "num_epochs"):
      if getattr(self, name) < 0:
        raise ValueError(f"DataConfig.{name} must be >= 0")
    for name in ("gen_size", "und_size"):
      lo, hi = getattr(self, name)
      if not 0 < lo <= hi:
        raise ValueError(f"DataConfig.{name}={(lo, hi)} must be (min short edge, max long edge) with 0 < min <= max")

  def weights(self) -> Dict[str, float]:
    """Per-source sampling weights, after the gen:und rescaling."""
    w = {s.name: float(s.weight) for s in self.sources}
    if not self.gen_und:
      return w
    groups = {s.name: s.resolved_group for s in self.sources}
    missing = [n for n, g in groups.items() if not g and w[n] > 0]
    if missing:
      raise ValueError(f"DataConfig.gen_und needs a group ('gen'/'und') for sources {missing}")
    gen = sum(v for n, v in w.items() if groups[n] == "gen")
    und = sum(v for n, v in w.items() if groups[n] == "und")
    if not gen or not und:
      raise ValueError(f"DataConfig.gen_und={self.gen_und}: needs both gen and und sources with weight > 0")
    return {n: (v / gen * self.gen_und if groups[n] == "gen" else v / und) for n, v in w.items()}

  def replace(self, **kw) -> "DataConfig":
    return dataclasses.replace(self, **kw)

  @classmethod
  def from_config(cls, c: Mapping[str, Any]) -> "DataConfig":
    """From a ConfigDict/dict with the field names above; `sources` is a list/tuple whose entries are dicts
    (SourceConfig fields) or strings (`source_from_string`: 'PATH' or 'TYPE:PATH', what
    `--config.data.sources=...` takes on the command line). `source` (the trainer's selector) is ignored;
    `source='synthetic'` without `sources` gives the built-in synthetic tasks: `synthetic_mixture()`, or with
    `ratios` (a stage's Table 3 category ratios, the tiny recipes' `stage_mix.ratios`)
    `synthetic_stage_mixture(ratios)`. With `sources`, `ratios` is not used."""
    d = dict(c.to_dict() if hasattr(c, "to_dict") else c)
    selector = d.pop("source", None)
    ratios = d.pop("ratios", None)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(f"config.data: unknown keys {unknown} (known: {sorted(fields | {'source', 'ratios'})})")
    srcs = d.pop("sources", None)
    if not srcs:
      if selector not in (None, "synthetic"):
        raise ValueError(f"config.data.source={selector!r} needs config.data.sources")
      size = int(d.get("image_size", 32))
      base = synthetic_stage_mixture(ratios, image_size=size) if ratios else synthetic_mixture(image_size=size)
      d = {**{k: getattr(base, k) for k in ("gen_und", "gen_size", "und_size")}, **d}
      srcs = [dataclasses.asdict(s) for s in base.sources]
    if isinstance(srcs, (str, dict)) or hasattr(srcs, "to_dict"):
      srcs = [srcs]
    sources = []
    names = set()
    for i, s in enumerate(srcs):
      if isinstance(s, str):
        sources.append(source_from_string(s, i, names))
        names.add(sources[-1].name)
        continue
      if not isinstance(s, Mapping) and not hasattr(s, "to_dict"):
        raise ValueError(f"config.data.sources[{i}]={s!r}: expected a dict of SourceConfig fields or a "
                         f"'[TYPE:]PATH' string")
      s = dict(s.to_dict() if hasattr(s, "to_dict") else s)
      bad = sorted(set(s) - {f.name for f in dataclasses.fields(SourceConfig)})
      if bad:
        raise ValueError(f"config.data.sources[{i}]: unknown keys {bad}")
      sources.append(SourceConfig(**s))
      names.add(sources[-1].name)
    for k in ("gen_size", "und_size"):
      if k in d:
        d[k] = tuple(int(x) for x in d[k])
    return cls(sources=tuple(sources), **d)


FILE_TYPES = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".tar": "tar"}


def source_from_string(spec: str, index: int = 0, taken=()) -> SourceConfig:
  """'PATH' or 'TYPE:PATH' -> SourceConfig (weight 1). TYPE is inferred from the extension when omitted
  (.jsonl, .parquet, .tar or a tar glob); the name is the file's stem (made unique); the group ('gen'/'und',
  needed by `gen_und`) is read from the first record's kind for JSONL manifests."""
  import os  # pylint: disable=import-outside-toplevel
  kind, sep, rest = spec.partition(":")
  if sep and kind in SOURCE_TYPES and kind != "synthetic":
    typ, path = kind, rest
  else:
    path = spec
    ext = os.path.splitext(path.split(",")[0])[1].lower()
    if ext not in FILE_TYPES:
      raise ValueError(f"config.data.sources[{index}]={spec!r}: cannot tell the source type from the extension; "
                       f"write TYPE:PATH with TYPE one of {[t for t in SOURCE_TYPES if t != 'synthetic']}")
    typ = FILE_TYPES[ext]
  stem = os.path.splitext(os.path.basename(path.split(",")[0]))[0].replace("*", "") or f"source{index}"
  name, k = stem, 1
  while name in taken:
    k += 1
    name = f"{stem}_{k}"
  return SourceConfig(name=name, type=typ, path=path, group=_first_group(typ, path))


def _first_group(typ: str, path: str) -> str:
  """'gen' or 'und' from the kind of the first parsable record of a JSONL manifest ('' otherwise)."""
  import json  # pylint: disable=import-outside-toplevel
  if typ != "jsonl":
    return ""
  try:
    with open(path, "rb") as f:
      for _, line in zip(range(100), f):
        try:
          kind = json.loads(line).get("kind")
        except (ValueError, AttributeError, RecursionError):
          continue
        if isinstance(kind, str):
          return "gen" if kind in GEN_KINDS else "und"
  except OSError:
    pass
  return ""


DEFAULT_SYNTHETIC_WEIGHTS = {
    # gen tasks (relative weights within gen)
    "t2i": 4.0, "edit": 2.0, "video": 1.0, "next_frame": 1.0, "words": 1.0, "think_t2i": 1.0,
    # und tasks (relative weights within und)
    "vqa": 3.0, "caption": 2.0, "text": 1.0, "think_vqa": 1.0,
}


def synthetic_mixture(tasks: Optional[Sequence[str]] = None, *, gen_und: float = 4.0, image_size: int = 32,
                      weights: Optional[Mapping[str, float]] = None, split: str = "train",
                      num_records: int = 1_000_000, **kw) -> DataConfig:
  """The built-in synthetic mix (T2I, VQA, edit, video, text, ... ) for tiny CPU runs, gen:und = 4:1 by default.
  32 px images: 4x4 latent tokens for the tiny VAE (8 px per token) and 4x4 ViT patches (8 px)."""
  tasks = tuple(tasks or DEFAULT_SYNTHETIC_WEIGHTS)
  weights = dict(DEFAULT_SYNTHETIC_WEIGHTS, **(weights or {}))
  sources = tuple(SourceConfig(name=t, type="synthetic", task=t, weight=float(weights.get(t, 1.0)), split=split,
                               num_records=num_records) for t in tasks)
  kw.setdefault("gen_size", (image_size, image_size))
  kw.setdefault("und_size", (image_size, image_size))
  return DataConfig(sources=sources, gen_und=gen_und, image_size=image_size, **kw)


def stage_weights(ratios: Mapping[str, float], categories: Mapping[str, str]) -> Dict[str, float]:
  """Table 3 category ratios (text, t2i, i2t, interleaved_und, video, web) -> per-source weights: each category's
  ratio is split equally over its sources; `categories` maps source name -> category."""
  unknown = sorted(set(categories.values()) - set(ratios))
  if unknown:
    raise ValueError(f"stage_weights: categories {unknown} are not in the stage ratios {sorted(ratios)}")
  count: Dict[str, int] = {}
  for cat in categories.values():
    count[cat] = count.get(cat, 0) + 1
  return {name: float(ratios[cat]) / count[cat] for name, cat in categories.items()}


def synthetic_stage_mixture(ratios: Mapping[str, float], **kw) -> DataConfig:
  """The synthetic tasks weighted by a Table 3 stage (no gen:und rescaling); tasks of weight 0 are dropped."""
  w = stage_weights(ratios, SYNTHETIC_CATEGORY)
  tasks = [t for t in DEFAULT_SYNTHETIC_WEIGHTS if w[t] > 0]
  return synthetic_mixture(tasks, gen_und=0.0, weights={t: w[t] for t in tasks}, **kw)
