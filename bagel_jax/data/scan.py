"""The start-up check of a run's data: what the first records of every source become against one batch row.

`startup_scan` runs the first records of each source through the real sample preparation (no CFG dropout, so
samples at full size): record counts, ok / skipped by reason with an example each, the largest sample that fits
a row, tokenizer statistics. It refuses, naming records and reasons, data the run could only skip.
`check_capacities` refuses a batch too small for that largest sample, naming the `config.batch` key. The
trainer runs both on the sources the pipeline then reads (`pipeline.make_training_input`), opened once.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from bagel_jax.batch import BatchSpec
from bagel_jax.data.config import DataConfig
from bagel_jax.data.packing import NEEDS, Prepare, spec_capacity
from bagel_jax.data.sources import SafeSource, Skipped

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


def startup_scan(dc: DataConfig, row: BatchSpec, tok, opened: Sequence[SafeSource], prepare: Prepare, *,
                 per_source: int = 128) -> StartupScan:
  """Reads each source's first `per_source` records (`opened`: the sources of `dc`, in order) through `prepare`
  (the real sample preparation, without CFG dropout, so at full size) against the capacities of one `row`:
  record counts, ok/skipped by reason, the largest sample that fits, and tokenizer (`tok`) statistics over the
  scanned texts.

  Over-long records are counted as `too_long`, not fatal. Raises ValueError, naming the records and reasons,
  when a weighted source has no usable record among those scanned (the run could only skip) or when no record
  of any source fits a row (naming the smallest one and the capacity it exceeds)."""
  cap = spec_capacity(row)
  if not row.pixel_mode:
    cap[NEEDS.index("vae_images")] = np.iinfo(np.int64).max
  weights = dc.weights()
  scans: List[SourceScan] = []
  need = np.zeros(len(NEEDS), np.int64)
  smallest: Optional[Tuple[int, str, str]] = None  # (tokens, where, what exceeds)
  n_texts = n_tokens = n_unk = max_tokens = 0
  unk = getattr(tok, "unk", None)
  for k, s in enumerate(dc.sources):
    src = opened[k]
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
      p = prepare((k, i, rec))
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


def check_capacities(need: Mapping[str, int], spec: BatchSpec) -> None:
  """Refuses a batch row smaller than one sample (`need`: per-row requirement, keys `NEEDS`), naming the
  `config.batch` key to raise."""
  have = dict(tokens=("seq_len", spec.seq_len), vit_tokens=("vit_capacity", spec.vit_capacity),
              latent_tokens=("latent_capacity", spec.latent_capacity), images=("image_capacity", spec.image_capacity),
              und_tokens=("und_capacity", spec.nu), ce=("ce_capacity", spec.nc),
              vae_images=("vae_image_capacity", spec.vae_image_capacity if spec.pixel_mode else 10 ** 9))
  for what, value in need.items():
    key, cap = have[what]
    if value > cap:
      raise ValueError(f"config.batch.{key}={cap} is smaller than one sample of the data mix "
                       f"(needs {value} {what.replace('_', ' ')})")
