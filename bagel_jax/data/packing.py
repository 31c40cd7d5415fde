"""Packing: laid-out samples -> fixed-shape `PackedBatch`es, against every capacity of a `BatchSpec`.

`Prepare` turns one tagged record into a `Prepared` sample (or a `Skipped` one); `PackBatches` packs the
mixture of the source streams into B rows (the official `PackedDataset` algorithm extended to B rows and every
capacity: tokens, ViT tokens, latent tokens, und tokens, CE positions, images, VAE pixel images). Each sample
goes to the fullest row it fits (best fit); a sample that fits no row goes to the overflow buffer; the batch is
emitted when the buffer holds `max_buffer` samples (or the data ends), and the next batch starts with the
buffered samples. A sample that does not fit an empty row is skipped as `too_long`; no sample is ever split
across rows. The buffer is a list of stream indices, so the iterator's state is a small dict and restoring it
re-materialises the buffered samples exactly (see `bagel_jax.data.pipeline`).

Data health: the packer stops with `DataHealthError` (the skip-reason histogram, an example per reason) instead
of spinning on records that are all skipped.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import grain
import numpy as np

from bagel_jax.batch import BatchSpec, PackedBatch
from bagel_jax.data import samples, sources
from bagel_jax.data.config import DataConfig
from bagel_jax.data.sequence import SampleLayout, assemble_batch, layout_sample
from bagel_jax.layout import LayoutConfig
from bagel_jax.data.sources import Skipped
from bagel_jax.data.transforms import SkipSample

NEEDS = ("tokens", "vit_tokens", "latent_tokens", "und_tokens", "ce", "images", "vae_images")


@dataclasses.dataclass
class Prepared:
  """A laid-out sample plus what packing and statistics need."""
  layout: SampleLayout
  kind: str
  source: str
  need: np.ndarray  # per NEEDS


def sample_needs(s: SampleLayout, pixel_mode: bool = True) -> np.ndarray:
  return np.array([len(s), s.num_vit_tokens, s.num_latent_tokens, s.num_und_tokens, s.num_ce, len(s.images),
                   s.num_vae_images if pixel_mode else 0], np.int64)


def spec_capacity(spec: BatchSpec) -> np.ndarray:
  return np.array([spec.seq_len, spec.vit_capacity, spec.latent_capacity, spec.nu, spec.nc, spec.image_capacity,
                   spec.vae_image_capacity if spec.pixel_mode else 0], np.int64)



class Prepare:
  """(source number, index in its stream, record) -> `Prepared` | `Skipped`, a pure function of its input and
  the seed."""

  def __init__(self, tokenizer, scfg: samples.SampleConfig, layout: LayoutConfig, seed: int):
    self.tokenizer, self.scfg, self.layout, self.seed = tokenizer, scfg, layout, int(seed)

  def __call__(self, tagged):
    k, index, record = tagged
    if isinstance(record, Skipped):
      return record
    src = record.get("_source", "") if isinstance(record, dict) else ""
    where = record.get("_where", "") if isinstance(record, dict) else ""
    at = f"{where}: " if where else ""
    rng = np.random.default_rng([self.seed, 1, int(k), int(index)])
    try:
      items = samples.build_items(record, self.tokenizer, self.scfg, rng)
      if not samples.has_loss(items):
        return Skipped("no_loss", f"{at}sample has no CE or MSE target", src)
      lay = layout_sample(items, self.layout)
      kind = record["kind"]
      kind = kind.decode() if isinstance(kind, bytes) else str(kind)
    except SkipSample as e:
      detail = e.detail if where and e.detail.startswith(where) else f"{at}{e.detail}"
      return Skipped(e.reason, detail, src)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError, UnicodeError) as e:
      # a field of a type or shape the record schema does not expect, found deeper than normalize_record looks
      return Skipped("bad_field", f"{at}{type(e).__name__}: {e}", src)
    return Prepared(lay, kind, src, sample_needs(lay, self.scfg.pixel_mode))


class DataHealthError(RuntimeError):
  """The data yields (almost) nothing usable: raised by the packer with the skip-reason histogram and an
  example (`file:line`) per reason, instead of spinning forever on records that are all skipped."""


@dataclasses.dataclass(frozen=True)
class HealthLimits:
  max_tries: int = 1000            # records read in a row without one usable sample
  max_skip_fraction: float = 0.5   # share of records skipped ...
  skip_check_after: int = 1000     # ... checked once this many records were read

  @classmethod
  def from_data_config(cls, dc: DataConfig) -> "HealthLimits":
    return cls(dc.max_tries, dc.max_skip_fraction, dc.skip_check_after)


def health_report(reasons: Mapping[str, int], examples: Mapping[str, str], total: int) -> str:
  """Multi-line 'reason count (share): example' histogram, most frequent first."""
  lines = []
  for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
    lines.append(f"  {reason:<14} {n:>8} ({n / max(total, 1):.0%})  e.g. {examples.get(reason, '')}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Packing.
# ----------------------------------------------------------------------------------------------------------

class PackBatches(grain.IterDataset):
  """Packs the mixture of `streams` (tagged records, see `sources.streams`) into `PackedBatch`es; yields
  (batch, stats delta). `prepare` maps a tagged record to `Prepared` | `Skipped`.

  Not `grain.experimental.FirstFit/BestFitPackIterDataset`: those pack each feature along its leading axis with
  its own budget, but a BAGEL sample also carries per-image metadata (grids, kinds, variable-size pixel arrays
  that become slots of the [NIV, H, W, 3] buffer) that `assemble_batch` needs whole, non-sequence features come
  back as Python lists that break batching, and their state replays the parent from the last emitted batch.
  Packing whole `SampleLayout`s against every capacity at once, with an index-only buffer, avoids all three."""

  def __init__(self, streams: Sequence[grain.MapDataset], weights: Sequence[float], prepare, spec: BatchSpec,
               layout: LayoutConfig, max_buffer: int = 16, health: Optional[HealthLimits] = None):
    self._streams, self._weights, self._prepare = list(streams), list(weights), prepare
    self._source = sources.mix(self._streams, self._weights).map(prepare)
    super().__init__(self._source)
    self._spec, self._layout, self._max_buffer = spec, layout, int(max_buffer)
    self._health = health or HealthLimits()

  @classmethod
  def from_samples(cls, ds: grain.MapDataset, spec: BatchSpec, layout: LayoutConfig, max_buffer: int = 16,
                   health: Optional[HealthLimits] = None):
    """Packs an already prepared MapDataset of `Prepared` | `Skipped` (tests, custom pipelines)."""
    return cls([ds.map_with_index(sources.Tag(0))], [1.0], _untag, spec, layout, max_buffer, health)

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    """Grain calls this in each worker process (slice(worker, None, num_workers)); every stream is sliced."""
    if sequential_slice:
      raise ValueError("PackBatches: sequential worker slicing is not supported (streams are sliced by stride)")
    self._streams = [s.slice(sl) for s in self._streams]
    self._source = sources.mix(self._streams, self._weights).map(self._prepare)
    self._parents = (self._source,)

  def __iter__(self):
    return PackIterator(self._source, self._spec, self._layout, self._max_buffer, self._health)

  def __str__(self):
    return f"PackBatches(B={self._spec.batch_size}, L={self._spec.seq_len}, max_buffer={self._max_buffer})"


def _untag(tagged):
  return tagged[2]


class PackIterator(grain.DatasetIterator):
  """State: {"next": next index to draw, "buffer": buffered indices (oldest first), "batches": emitted}.

  Health: counts (since this iterator started) the records read, skipped by reason and read in a row without a
  usable sample, and raises `DataHealthError` past the `HealthLimits`."""

  def __init__(self, source: grain.MapDataset, spec: BatchSpec, layout: LayoutConfig, max_buffer: int,
               health: Optional[HealthLimits] = None):
    super().__init__()
    self._health = health or HealthLimits()
    self._h_in = 0
    self._h_dry = 0
    self._h_reasons: collections.Counter = collections.Counter()
    self._h_examples: Dict[str, str] = {}
    self._src, self._spec, self._layout, self._max_buffer = source, spec, layout, max_buffer
    self._n = len(source)
    self._cap = spec_capacity(spec)
    self._next = 0
    self._buffer: List[int] = []
    self._cache: Dict[int, Prepared] = {}
    self._batches = 0

  def get_state(self) -> Dict[str, Any]:
    return {"next": self._next, "buffer": list(self._buffer), "batches": self._batches}

  def set_state(self, state: Mapping[str, Any]):
    self._next = int(state["next"])
    self._buffer = [int(i) for i in state["buffer"]]
    self._batches = int(state["batches"])
    self._cache = {}
    for i in self._buffer:
      item = self._src[i]
      if not isinstance(item, Prepared):
        raise ValueError(f"PackIterator.set_state: buffered index {i} is no longer a valid sample "
                         f"({item!r}); the data changed since the checkpoint")
      self._cache[i] = item

  def _unhealthy(self, reason: str, example: str):
    """Counts one skipped record; raises DataHealthError past the limits (never loops forever on bad data)."""
    h = self._health
    self._h_dry += 1
    self._h_reasons[reason] += 1
    self._h_examples.setdefault(reason, example)
    skipped = sum(self._h_reasons.values())
    if self._h_dry >= h.max_tries:
      why = (f"no record yielded a usable sample in the last {self._h_dry} tries (config.data.max_tries="
             f"{h.max_tries})")
    elif self._h_in >= h.skip_check_after and skipped > h.max_skip_fraction * self._h_in:
      why = (f"{skipped / self._h_in:.0%} of the records were skipped (config.data.max_skip_fraction="
             f"{h.max_skip_fraction})")
    else:
      return
    raise DataHealthError(
        f"data: {why}; stopping instead of training on what is left. {self._h_in} records read, {skipped} "
        f"skipped, by reason:\n{health_report(self._h_reasons, self._h_examples, self._h_in)}\n"
        "Fix the records named above (docs/data.md lists what each reason means), or relax the limits with "
        "--config.data.max_tries / --config.data.max_skip_fraction.")

  def _best_row(self, used: np.ndarray, need: np.ndarray) -> Optional[int]:
    ok = np.all(used + need <= self._cap, axis=1)
    if not ok.any():
      return None
    tokens = np.where(ok, used[:, 0], -1)
    return int(np.argmax(tokens))  # fullest row that still fits (best fit); lowest index on ties

  def __next__(self) -> Tuple[PackedBatch, Dict[str, Any]]:
    if self._next >= self._n and not self._buffer:
      raise StopIteration
    b = self._spec.batch_size
    rows: List[List[SampleLayout]] = [[] for _ in range(b)]
    used = np.zeros((b, len(NEEDS)), np.int64)
    delta: Dict[str, Any] = collections.Counter()
    examples: Dict[str, str] = {}
    buffered_before = len(self._buffer)

    def place(p: Prepared, r: int):
      rows[r].append(p.layout)
      used[r] += p.need
      delta["samples_out"] += 1
      delta[f"kind/{p.kind}"] += 1
      delta[f"source/{p.source}"] += 1

    keep = []
    for i in self._buffer:
      p = self._cache[i]
      r = self._best_row(used, p.need)
      if r is None:
        keep.append(i)
      else:
        place(p, r)
        del self._cache[i]
    self._buffer = keep
    while self._next < self._n:
      i = self._next
      self._next += 1
      item = self._src[i]
      delta["samples_in"] += 1
      self._h_in += 1
      if isinstance(item, Skipped):
        delta[f"skipped/{item.reason}"] += 1
        examples.setdefault(item.reason, f"{item.detail} [{item.source}]")
        self._unhealthy(item.reason, examples[item.reason])
        continue
      if np.any(item.need > self._cap):
        delta["skipped/too_long"] += 1
        over = [f"{n} {v}>{c}" for n, v, c in zip(NEEDS, item.need, self._cap) if v > c]
        examples.setdefault("too_long", f"{', '.join(over)} [{item.source}]")
        self._unhealthy("too_long", examples["too_long"])
        continue
      self._h_dry = 0
      r = self._best_row(used, item.need)
      if r is not None:
        place(item, r)
      else:
        self._buffer.append(i)
        self._cache[i] = item
        if len(self._buffer) >= self._max_buffer:
          break
    batch = assemble_batch(rows, self._spec, self._layout)
    self._batches += 1
    delta["batches"] += 1
    delta["buffered"] += len(self._buffer) - buffered_before
    delta["skipped"] = sum(v for k, v in delta.items() if k.startswith("skipped/"))
    for k, name in enumerate(NEEDS):
      delta[f"used/{name}"] = int(used[:, k].sum())
      delta[f"capacity/{name}"] = int(self._cap[k] * b)
    return batch, {"counts": dict(delta), "examples": examples}
