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
shard's mixture exact, and a sample's content independent of the number of hosts and workers. Packing itself
is `bagel_jax.data.packing`; the start-up check of the sources, `bagel_jax.data.scan`.

Statistics: every batch carries the counts of what its worker consumed since the previous batch; the
`DataIterator` sums them, so `samples_in == samples_out + skipped + buffered` holds at every step and the
counters survive checkpoints. `DataIterator.stats` gives samples/s, tokens/s, fill ratio and `skipped/<reason>`.

Entry points: `make_pipeline` (library) and `make_training_input` (the trainer's: opens the sources once,
checks them against the batch, then builds the pipeline over the same opened sources). Both take typed
objects only (`DataConfig`, `BatchSpec`, `LayoutConfig`).
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import time
from typing import Dict, Iterator, Optional, Sequence, Union

import grain

from bagel_jax import batch as batch_lib
from bagel_jax import console
from bagel_jax.batch import BatchSpec, PackedBatch
from bagel_jax.data import samples, scan as scan_lib, sources, tokenizer as tok_lib, transforms as tf
from bagel_jax.data.config import DataConfig
from bagel_jax.data.packing import NEEDS, HealthLimits, PackBatches, Prepare
from bagel_jax.layout import LayoutConfig

log = console.logger(__name__)

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
          log.warning("data: first record skipped as %s: %s", reason, ex)
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
                  process_count: int = 1, tokenizer=None,
                  opened: Optional[Sequence[sources.SafeSource]] = None) -> grain.IterDataset:
  """The Grain dataset of (batch, stats delta) pairs for one host; see the module docstring. `opened`: the
  sources of `dc` already opened (`sources.open_sources`, with this `seed`)."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} outside [0, process_count={process_count})")
  tok = tokenizer or tok_lib.load_tokenizer(dc.tokenizer)
  if tok.special != layout.special:
    raise ValueError(f"tokenizer special ids {tok.special} != the model's {layout.special} (config.data.tokenizer="
                     f"{dc.tokenizer or 'synthetic word vocabulary'!r})")
  scfg = sample_config(dc, spec, layout)
  parts, weights = sources.streams(dc.replace(seed=seed), process_index, process_count, opened)
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
                  process_index: int = 0, process_count: int = 1, *, tokenizer=None,
                  opened: Optional[Sequence[sources.SafeSource]] = None) -> DataIterator:
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
    opened: the sources already opened (`sources.open_sources(data_config)` at this seed), so they are not
      opened twice.

  Returns:
    `DataIterator`: `next()` -> PackedBatch (validated when `data_config.validate`), `get_state()` -> bytes,
    `set_state(bytes)` (restores exactly the batches that would have come next, same config and worker count),
    `stats` (samples/s, tokens/s, fill, skipped/<reason>, ...), `stats_line()`, `close()`.
  """
  seed = data_config.seed if seed is None else int(seed)
  ds = build_dataset(data_config, batch_spec, layout, seed, process_index, process_count, tokenizer, opened)
  return DataIterator(ds, batch_spec, validate=data_config.validate,
                      fingerprint=_fingerprint(data_config, batch_spec, layout, seed, process_index, process_count))


def scan_sources(dc: DataConfig, spec: BatchSpec, layout: LayoutConfig, tokenizer=None,
                 opened: Optional[Sequence[sources.SafeSource]] = None, *, per_source: int = 128
                 ) -> scan_lib.StartupScan:
  """`scan.startup_scan` of `dc`'s sources (opened here unless given) against one row of `spec`, through the
  pipeline's own sample preparation without CFG dropout."""
  tok = tokenizer or tok_lib.load_tokenizer(dc.tokenizer)
  prepare = Prepare(tok, sample_config(dc, spec, layout, no_dropout=True), layout, dc.seed)
  return scan_lib.startup_scan(dc, dataclasses.replace(spec, batch_size=1), tok,
                               sources.open_sources(dc) if opened is None else opened, prepare,
                               per_source=per_source)


def make_training_input(dc: DataConfig, spec: BatchSpec, layout: LayoutConfig, *, vocab_size: int,
                        process_index: int = 0, process_count: int = 1, per_source: int = 128,
                        verbose: bool = True) -> DataIterator:
  """The trainer's input: `spec` is this host's BatchSpec, `vocab_size` the model's embedding rows.

  Opens every source once, scans the first `per_source` records of each through the real sample preparation
  against one row of `spec` (`scan.startup_scan`; the report is printed when `verbose`), refuses a batch too
  small for the largest sample that fits (naming the `config.batch` key), then builds the pipeline over the
  same opened sources."""
  if not spec.pixel_mode and any(s.type == "synthetic" for s in dc.sources):
    raise ValueError("the synthetic data needs pixel-mode batches (the VAE runs in the step): set "
                     "config.batch.vae_image_capacity > 0 and config.batch.vae_image_size (e.g. 16 and 32)")
  tok = tok_lib.load_tokenizer(dc.tokenizer)
  if tok.vocab_size > vocab_size:
    raise ValueError(f"config.data.tokenizer={dc.tokenizer!r} has {tok.vocab_size} tokens, more than the model's "
                     f"vocabulary of {vocab_size} (train one with --vocab-size <= {vocab_size}: python -m "
                     "bagel_jax.data.train_tokenizer)")
  opened = sources.open_sources(dc)
  found = scan_sources(dc, spec, layout, tok, opened, per_source=per_source)
  if verbose:
    log.info(found.report())
  scan_lib.check_capacities(found.need, spec)
  return make_pipeline(dc, spec, layout, dc.seed, process_index, process_count, tokenizer=tok, opened=opened)
