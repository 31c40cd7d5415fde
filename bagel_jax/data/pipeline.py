"""The Grain input pipeline: sources -> mixture -> laid-out samples -> multi-capacity packing -> `PackedBatch`es.

    per source: MapDataset.source(src).shuffle(seed).repeat()     # each source reshuffled every epoch
                .map_with_index(Tag)[process_index::process_count] # this host's shard of every source
    MapDataset.mix(streams, weights).map(Prepare(...))             # record -> items (CFG dropout, t-logits)
                                                                   #   -> SampleLayout
    PackBatches(streams, weights, ...)                             # IterDataset: B rows of L tokens -> PackedBatch
      .mp_prefetch(MultiprocessingOptions(n))                      # worker processes, each packing its own
                                                                   #   slice of every stream
      or ThreadPrefetchIterDataset(prefetch)                       # (0 workers) background thread

Why the per-sample map stays on the random-access `MapDataset` (not after `to_iter_dataset`): the packer's
overflow buffer is then a list of *indices*. Its checkpoint state is a small dict (next index, buffered indices,
batch count), and restoring re-materialises the buffered samples from their indices, which are pure functions
of (seed, source, index in the source's stream): the restored iterator yields exactly the batches that would
have come next, with no replay. Why streams are sharded before mixing: the mixture's fixed interleaving
pattern, sliced with a stride, could hand one host (or worker) a single task; slicing each source keeps every
shard's mixture exact, and a sample's content independent of the number of hosts and workers.

Packing (`PackBatches`): the official `PackedDataset` algorithm (overflow buffer, buffered samples first,
yield when full) extended to B rows and every capacity of the `BatchSpec` (tokens, ViT tokens, latent tokens,
und tokens, CE positions, images, VAE pixel images). Each sample goes to the fullest row it fits (best fit);
a sample that fits no row goes to the buffer; the batch is emitted when the buffer holds `max_buffer` samples
(or the data ends), and the next batch starts with the buffered samples. A sample that does not fit an empty
row is skipped as `too_long`; no sample is ever split across rows. At the end of finite data (`num_epochs` > 0)
the last batch may hold empty (all-padding) rows, and is all padding only if every remaining record was skipped.

Statistics: every batch carries the counts of what its worker consumed since the previous batch; the
`DataIterator` sums them, so `samples_in == samples_out + skipped + buffered` holds at every step and the
counters survive checkpoints. `DataIterator.stats` gives samples/s, tokens/s, fill ratio and `skipped/<reason>`.

Entry points: `make_pipeline` (library), `make_training_input` / `max_sample_requirements` (the trainer's
hooks, reading `config.data`), `make_global_batch` (multi-host assembly into sharded `jax.Array`s).
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import sys
import time
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import grain
import numpy as np

from bagel_jax import batch as batch_lib
from bagel_jax.batch import BatchSpec, PackedBatch
from bagel_jax.data import samples, sources, tokenizer as tok_lib, transforms as tf
from bagel_jax.data.config import DataConfig
from bagel_jax.data.sequence import LayoutConfig, SampleLayout, assemble_batch, layout_sample
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


def sample_config(dc: DataConfig, spec: BatchSpec, layout: LayoutConfig, *, no_dropout: bool = False
                  ) -> samples.SampleConfig:
  """Transforms and dropout for this batch spec: the ViT patch comes from `vit_patch_dim`, the VAE stride from
  `latent_downsample`, the grid limits from `layout`."""
  patch = math.isqrt(spec.vit_patch_dim // 3)
  if patch * patch * 3 != spec.vit_patch_dim:
    raise ValueError(f"BatchSpec.vit_patch_dim={spec.vit_patch_dim} is not patch*patch*3")
  f = spec.latent_downsample
  gen_lo, gen_hi = dc.gen_size
  und_lo, und_hi = dc.und_size
  if spec.pixel_mode and gen_hi > spec.vae_image_size:
    raise ValueError(f"config.data.gen_size max {gen_hi} px exceeds config.batch.vae_image_size "
                     f"{spec.vae_image_size} (the padded VAE buffer)")
  for name, v, stride in (("gen_size", gen_hi, f), ("und_size", und_hi, patch)):
    if v % stride:
      raise ValueError(f"config.data.{name} max {v} px is not a multiple of the stride {stride}")
  t = tf.ImageTransforms(
      vit=tf.ResizeRule(und_hi, und_lo, patch, dc.und_max_pixels or und_hi * und_hi),
      vae=tf.ResizeRule(gen_hi, gen_lo, f, dc.gen_max_pixels or gen_hi * gen_hi),
      patch=patch, vit_max_side=layout.vit_side, latent_downsample=f, latent_max_side=layout.latent_side)
  p = (0.0, 0.0, 0.0) if no_dropout else (dc.text_dropout, dc.vit_dropout, dc.vae_dropout)
  return samples.SampleConfig(t, pixel_mode=spec.pixel_mode, vae_image_size=spec.vae_image_size,
                              text_dropout=p[0], vit_dropout=p[1], vae_dropout=p[2], edit_vit=dc.edit_vit)


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


# ----------------------------------------------------------------------------------------------------------
# The host iterator the trainer holds.
# ----------------------------------------------------------------------------------------------------------

class DataIterator:
  """Host-local `PackedBatch` iterator with `get_state() -> bytes` / `set_state(bytes)` (the protocol
  `grain.checkpoint.CheckpointSave/Restore` uses), `stats`, `stats_line()` and `close()`."""

  def __init__(self, dataset: grain.IterDataset, spec: BatchSpec, *, validate: bool = False, fingerprint: str = "",
               warn: bool = True):
    self._ds, self.spec, self.validate, self.fingerprint, self.warn = dataset, spec, validate, fingerprint, warn
    self._it = iter(dataset)
    self.counters: collections.Counter = collections.Counter()
    self.examples: Dict[str, str] = {}
    self._t0: Optional[float] = None
    self._wait = 0.0
    self._window = collections.deque(maxlen=32)  # (time, samples_out, tokens) for rates

  def __iter__(self) -> Iterator[PackedBatch]:
    return self

  def __next__(self) -> PackedBatch:
    t = time.perf_counter()
    if self._t0 is None:
      self._t0 = t
      self._window.append((t, 0, 0))
    batch, delta = next(self._it)
    now = time.perf_counter()
    self._wait += now - t
    self.counters.update(delta["counts"])
    for reason, ex in delta["examples"].items():
      if reason not in self.examples:
        self.examples[reason] = ex
        if self.warn:
          print(f"WARNING data: first record skipped as {reason}: {ex}", file=sys.stderr, flush=True)
    self._window.append((now, self.counters["samples_out"], self.counters["used/tokens"]))
    if self.validate:
      batch_lib.validate(batch, self.spec)
    return batch

  def get_state(self) -> bytes:
    return json.dumps({"version": 1, "fingerprint": self.fingerprint, "grain": self._it.get_state(),
                       "counters": dict(self.counters), "examples": self.examples}).encode()

  def set_state(self, state: Union[bytes, str]):
    s = json.loads(state)
    if s.get("fingerprint") != self.fingerprint:
      raise ValueError("data iterator state was saved for a different data config / batch spec / process layout "
                       f"(fingerprint {s.get('fingerprint')} != {self.fingerprint})")
    self._it.set_state(s["grain"])
    self.counters = collections.Counter(s["counters"])
    self.examples = dict(s["examples"])
    self._t0, self._wait = None, 0.0
    self._window.clear()

  def start_prefetch(self):
    if hasattr(self._it, "start_prefetch"):
      self._it.start_prefetch()

  def close(self):
    if hasattr(self._it, "close"):
      self._it.close()

  @property
  def stats(self) -> Dict[str, float]:
    """samples/s and tokens/s (recent window), fill ratios, counters; all floats (the trainer logs them)."""
    c = self.counters
    out: Dict[str, float] = {}
    if len(self._window) >= 2:
      (t0, s0, k0), (t1, s1, k1) = self._window[0], self._window[-1]
      dt = max(t1 - t0, 1e-9)
      out["samples_per_s"] = (s1 - s0) / dt
      out["tokens_per_s"] = (k1 - k0) / dt
    for name in NEEDS:
      if c.get(f"capacity/{name}"):
        out[f"fill/{name}"] = c[f"used/{name}"] / c[f"capacity/{name}"]
    out["fill"] = out.get("fill/tokens", 0.0)
    for k in ("batches", "samples_in", "samples_out", "skipped", "buffered"):
      out[k] = float(c.get(k, 0))
    for k, v in c.items():
      if k.startswith(("skipped/", "kind/", "source/")):
        out[k] = float(v)
    out["wait_s"] = self._wait
    return out

  def stats_line(self) -> str:
    s = self.stats
    skipped = ", ".join(f"{k.split('/', 1)[1]} {int(v)}" for k, v in sorted(s.items()) if k.startswith("skipped/"))
    return (f"data: {s.get('samples_per_s', 0):.1f} samples/s {s.get('tokens_per_s', 0):,.0f} tokens/s "
            f"fill {s['fill']:.3f} | in {int(s['samples_in'])} = out {int(s['samples_out'])} + skipped "
            f"{int(s['skipped'])}{' (' + skipped + ')' if skipped else ''} + buffered {int(s['buffered'])}")


# ----------------------------------------------------------------------------------------------------------
# Entry points.
# ----------------------------------------------------------------------------------------------------------

def _ensure_absl_flags():
  """Grain's worker processes read absl flags; outside an absl app they are unparsed (accept the defaults)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _fingerprint(dc: DataConfig, spec: BatchSpec, layout: LayoutConfig, seed: int, pidx: int, pcount: int) -> str:
  d = dict(data=dataclasses.asdict(dc), spec=dataclasses.asdict(spec), layout=dataclasses.asdict(layout),
           seed=seed, process=[pidx, pcount])
  for k in ("validate", "prefetch", "worker_buffer", "max_tries", "max_skip_fraction", "skip_check_after"):
    # do not change which batches come out
    d["data"].pop(k)
  return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_dataset(dc: DataConfig, spec: BatchSpec, layout: LayoutConfig, seed: int, process_index: int = 0,
                  process_count: int = 1, tokenizer=None) -> grain.IterDataset:
  """The Grain dataset of (batch, stats delta) pairs for one host; see the module docstring."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} outside [0, process_count={process_count})")
  tok = tokenizer or tok_lib.load_tokenizer(dc.tokenizer)
  if tok.special != layout.special:
    raise ValueError(f"tokenizer special ids {tok.special} != the model's {layout.special} (config.data.tokenizer="
                     f"{dc.tokenizer or 'synthetic word vocabulary'!r})")
  scfg = sample_config(dc, spec, layout)
  parts, weights = sources.streams(dc.replace(seed=seed), process_index, process_count)
  ds: grain.IterDataset = PackBatches(parts, weights, Prepare(tok, scfg, layout, seed), spec, layout,
                                      dc.max_buffer, HealthLimits.from_data_config(dc))
  if dc.num_workers > 0:
    _ensure_absl_flags()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=dc.num_workers,
                                                     per_worker_buffer_size=dc.worker_buffer))
  elif dc.prefetch > 0:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=dc.prefetch)
  return ds


def make_pipeline(data_config: DataConfig, batch_spec: BatchSpec, layout: LayoutConfig, seed: Optional[int] = None,
                  process_index: int = 0, process_count: int = 1, *, tokenizer=None) -> DataIterator:
  """The host-local training input: an iterator of `PackedBatch`es of `batch_spec` (this host's rows).

  Args:
    data_config: sources and weights, image sizes, CFG dropout, tokenizer, workers (`DataConfig`; build one
      from an ml_collections ConfigDict with `DataConfig.from_config`, or use `synthetic_mixture()`).
    batch_spec: the *local* BatchSpec (batch_size = rows on this host). Pixel mode (`vae_image_capacity` > 0)
      carries VAE images as pixels; latent mode needs records with precomputed `latents`.
    layout: special-token ids and position-grid sides of the model (`LayoutConfig.from_model_config`).
    seed: overrides `data_config.seed` (shuffling, mixture, CFG dropout, timestep logits).
    process_index, process_count: this host's shard of the mixed sample stream (`jax.process_index()`,
      `jax.process_count()`); each host packs its own rows.
    tokenizer: overrides `data_config.tokenizer`.

  Returns:
    `DataIterator`: `next()` -> PackedBatch (validated when `data_config.validate`), `get_state()` -> bytes,
    `set_state(bytes)` (restores exactly the batches that would have come next, same config and worker count),
    `stats` (samples/s, tokens/s, fill, skipped/<reason>, ...), `stats_line()`, `close()`.
  """
  seed = data_config.seed if seed is None else int(seed)
  ds = build_dataset(data_config, batch_spec, layout, seed, process_index, process_count, tokenizer)
  return DataIterator(ds, batch_spec, validate=data_config.validate,
                      fingerprint=_fingerprint(data_config, batch_spec, layout, seed, process_index, process_count))


def data_config_from(config) -> DataConfig:
  """`config.data` of an experiment config -> DataConfig (`source: synthetic` with no `sources` = the default
  synthetic mixture); `config.data.seed` (else `config.seed`) seeds it."""
  d = config.data
  dc = DataConfig.from_config(d)
  if "seed" not in d and "seed" in config:
    dc = dc.replace(seed=int(config.seed))
  return dc


def make_training_input(config, model_cfg, local_spec: BatchSpec, process_index: int, process_count: int
                        ) -> DataIterator:
  """The trainer's hook (`bagel_jax.train.inputs.make_input` for `config.data.source` 'synthetic'/'pipeline')."""
  dc = data_config_from(config)
  if not local_spec.pixel_mode and any(s.type == "synthetic" for s in dc.sources):
    raise ValueError("the synthetic data needs pixel-mode batches (the VAE runs in the step): set "
                     "config.batch.vae_image_capacity > 0 and config.batch.vae_image_size (e.g. 16 and 32)")
  tok = tok_lib.load_tokenizer(dc.tokenizer)
  if tok.vocab_size > model_cfg.llm.vocab_size:
    raise ValueError(f"config.data.tokenizer={dc.tokenizer!r} has {tok.vocab_size} tokens, more than the model's "
                     f"vocabulary of {model_cfg.llm.vocab_size} (train one with --vocab-size <= "
                     f"{model_cfg.llm.vocab_size}: python -m bagel_jax.data.train_tokenizer)")
  return make_pipeline(dc, local_spec, LayoutConfig.from_model_config(model_cfg), dc.seed, process_index,
                       process_count, tokenizer=tok)


def _capacity_spec(config, model_cfg, batch_size: int = 1) -> BatchSpec:
  """One row of `config.batch` (capacities as the trainer's BatchSpec), for the start-up scan."""
  b = config.batch
  pixel = int(b.get("vae_image_capacity", 0)) > 0
  seq = max(int(b.seq_len), 1)
  return BatchSpec(batch_size=batch_size, seq_len=seq, vit_capacity=int(b.get("vit_capacity", 0)),
                   latent_capacity=int(b.get("latent_capacity", 0)), image_capacity=int(b.get("image_capacity", 0)),
                   vit_patch_dim=model_cfg.vit.patch_dim, latent_dim=model_cfg.latent_channels,
                   und_capacity=int(b.get("und_capacity", 0)) or None, ce_capacity=int(b.get("ce_capacity", 0)) or None,
                   vae_image_capacity=int(b.get("vae_image_capacity", 0)) if pixel else 0,
                   vae_image_size=int(b.get("vae_image_size", 0)) if pixel else 0,
                   latent_downsample=model_cfg.latent_downsample)


@dataclasses.dataclass
class SourceScan:
  """The first-pass check of one source: its size, and what became of its first `scanned` records."""
  name: str
  what: str
  records: int
  scanned: int = 0
  ok: int = 0
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  examples: Dict[str, str] = dataclasses.field(default_factory=dict)
  largest: Optional[np.ndarray] = None      # max need over the samples that fit a row

  def line(self) -> str:
    skips = ", ".join(f"{r} {n}" for r, n in self.skipped.most_common())
    return (f"  {self.name:<12} {self.what:<48} {self.records:>9,} records; first {self.scanned}: {self.ok} ok"
            + (f", skipped: {skips}" if skips else ""))


@dataclasses.dataclass
class StartupScan:
  sources: List[SourceScan]
  need: Dict[str, int]                      # per-row requirement of the largest sample that fits
  tokenizer: str
  vocab_size: int
  texts: int = 0
  tokens_mean: float = 0.0
  tokens_max: int = 0
  unk_rate: float = 0.0

  def report(self) -> str:
    lines = ["data sources (first-pass check of each source's first records; too_long = does not fit config.batch):"]
    lines += [s.line() for s in self.sources]
    for s in self.sources:
      for reason, ex in s.examples.items():
        lines.append(f"    {s.name} {reason}: {ex}")
    lines.append(f"tokenizer: {self.tokenizer} (vocab {self.vocab_size}); {self.texts} texts scanned: tokens per "
                 f"text mean {self.tokens_mean:.1f} max {self.tokens_max}; <unk> rate {self.unk_rate:.2%}")
    return "\n".join(lines)


def tokenizer_name(tok, path: str) -> str:
  return f"{type(tok).__name__} {path}" if path else f"{type(tok).__name__} (the synthetic word vocabulary)"


def startup_scan(config, model_cfg, *, per_source: int = 128) -> StartupScan:
  """Reads each source's first `per_source` records through the real sample preparation (no CFG dropout, so
  at full size) against one row of `config.batch`: record counts, ok/skipped by reason, the largest sample
  that fits, and tokenizer statistics over the scanned texts.

  Over-long records are counted as `too_long`, not fatal. Raises ValueError, naming the records and reasons,
  when a weighted source has no usable record among those scanned (the run could only skip) or when no record
  of any source fits a row (naming the smallest one and the capacity it exceeds)."""
  dc = data_config_from(config)
  spec = _capacity_spec(config, model_cfg)
  cap = spec_capacity(spec)
  if not spec.pixel_mode:
    cap[NEEDS.index("vae_images")] = np.iinfo(np.int64).max
  layout = LayoutConfig.from_model_config(model_cfg)
  tok = tok_lib.load_tokenizer(dc.tokenizer)
  prep = Prepare(tok, sample_config(dc, spec, layout, no_dropout=True), layout, dc.seed)
  weights = dc.weights()
  scans: List[SourceScan] = []
  need = np.zeros(len(NEEDS), np.int64)
  smallest: Optional[Tuple[int, str, str]] = None  # (tokens, where, what exceeds)
  n_texts = n_tokens = n_unk = max_tokens = 0
  unk = getattr(tok, "unk", None)
  for k, s in enumerate(dc.sources):
    src = sources.SafeSource(sources.open_source(s, dc), s.name)
    scan = SourceScan(s.name, f"{s.type} {s.path or s.task}"[-48:], len(src))
    for i in range(min(per_source, len(src))):
      rec = src[i]
      scan.scanned += 1
      if isinstance(rec, dict):
        for t in rec.get("texts") or []:
          if isinstance(t, (bytes, np.bytes_)):
            try:
              t = bytes(t).decode("utf-8")
            except UnicodeDecodeError:
              continue
          if isinstance(t, str) and t:
            ids = tok.encode(t)
            n_texts += 1
            n_tokens += len(ids)
            max_tokens = max(max_tokens, len(ids))
            n_unk += sum(1 for x in ids if x == unk) if unk is not None else 0
      p = prep((k, i, rec))
      if isinstance(p, Skipped):
        scan.skipped[p.reason] += 1
        scan.examples.setdefault(p.reason, p.detail)
        continue
      if np.any(p.need > cap):
        over = ", ".join(f"{n} {v}>{c}" for n, v, c in zip(NEEDS, p.need, cap) if v > c)
        where = rec.get("_where", f"{s.name}[{i}]") if isinstance(rec, dict) else f"{s.name}[{i}]"
        scan.skipped["too_long"] += 1
        scan.examples.setdefault("too_long", f"{where}: {over}")
        if smallest is None or p.need[0] < smallest[0]:
          smallest = (int(p.need[0]), where, over)
        continue
      scan.ok += 1
      need = np.maximum(need, p.need)
    scans.append(scan)
  result = StartupScan(scans, {k: int(v) for k, v in zip(NEEDS, need)}, tokenizer_name(tok, dc.tokenizer),
                       int(tok.vocab_size), n_texts, n_tokens / max(n_texts, 1), max_tokens,
                       n_unk / max(n_tokens, 1))
  dead = [sc for sc in scans if sc.scanned and not sc.ok and weights.get(sc.name, 0) > 0
          and set(sc.skipped) != {"too_long"}]
  if dead:
    raise ValueError("data: no usable record among the first records of source(s) "
                     f"{[sc.name for sc in dead]}; the run could only skip:\n" + result.report())
  if not any(sc.ok for sc in scans) and smallest is not None:
    raise ValueError(f"data: no scanned record fits one row of config.batch; the smallest, {smallest[1]}, needs "
                     f"{smallest[2]} (raise those config.batch capacities, or shorten the records)\n"
                     + result.report())
  return result


def max_sample_requirements(config, model_cfg, *, per_source: int = 128, verbose: bool = True) -> Dict[str, int]:
  """Per-row resources of the largest sample that fits a row among the first `per_source` records of each
  source (`startup_scan`), keys tokens, vit_tokens, latent_tokens, und_tokens, ce, images, vae_images; prints
  the start-up data report when `verbose`. Records that do not fit are counted, not fatal; the packer skips
  them as `too_long` at run time too."""
  scan = startup_scan(config, model_cfg, per_source=per_source)
  if verbose:
    print(scan.report(), flush=True)
  return scan.need


def make_global_batch(local_batch: Mapping[str, np.ndarray], mesh, sharding=None) -> Dict[str, Any]:
  """Host-local rows -> global `jax.Array`s (one call on every process, multi-host safe) with
  `jax.make_array_from_process_local_data`. `sharding`: one NamedSharding for every field, a dict per field,
  or None for rows over the mesh's batch axes (`parallel.rules.batch_sharding`, what the train step expects)."""
  import jax  # pylint: disable=import-outside-toplevel
  from bagel_jax.parallel import rules as rules_lib  # pylint: disable=import-outside-toplevel
  out = {}
  for k, v in local_batch.items():
    v = np.asarray(v)
    if isinstance(sharding, Mapping):
      sh = sharding[k]
    elif sharding is not None:
      sh = sharding
    else:
      sh = rules_lib.batch_sharding(mesh, v.ndim)
    out[k] = jax.make_array_from_process_local_data(sh, v)
  return out

