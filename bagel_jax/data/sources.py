"""Random-access data sources (Grain `RandomAccessDataSource`s) and their deterministic mixture.

Every source returns records `{"kind", "texts", "images", "meta"}` (see `samples.py`); file-based sources read
image files into bytes here, so a missing file is a record-level problem, not a crash:

- `TfdsSource`: `tfds.data_source(name, split, data_dir)` over ArrayRecord (no TensorFlow at run time).
- `JsonlSource`: one JSON record per line; `images` are paths relative to the manifest's directory.
- `ParquetSource`: columns kind, texts (list<string>), images (list<string> paths or list<binary>), meta.
- `TarSource`: WebDataset-style shards: `<key>.json` holds the record with `images` naming sibling members by
  their suffix (e.g. ["0.png"] for `<key>.0.png`); members are indexed once, then read by offset.
- `synthetic.SyntheticSource`: procedural records.

`SafeSource` wraps any of them so that `__getitem__` never raises for bad data: it returns `Skipped(reason)`
(missing_file, bad_json, bad_utf8, bad_field, bad_record, ...), which the pipeline counts. Invalid UTF-8 is
`bad_utf8`, JSON nested too deeply to parse is `bad_json`, any other error a source raises on one record is
`bad_record`; every file-based record carries `_where` (`file:line`, `file:row` or `shard:key`) so skip
examples point at the offending line. `mix()` shuffles each source with its own
seed, repeats it and interleaves the sources by weight with `grain.MapDataset.mix` (a fixed, seed-independent
pattern, so the mixture ratio is exact over every window, not just in expectation).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import tarfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

import grain
import numpy as np

from bagel_jax.data import synthetic
from bagel_jax.data.config import DataConfig, SourceConfig
from bagel_jax.data.transforms import SkipSample


@dataclasses.dataclass
class Skipped:
  """A record the pipeline drops, with why and where."""
  reason: str
  detail: str = ""
  source: str = ""


def _read_file(path: str) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read()
  except FileNotFoundError as e:
    raise SkipSample("missing_file", path) from e
  except OSError as e:
    raise SkipSample("missing_file", f"{path}: {e}") from e


def _resolve_images(images: Any, base_dir: str, where: str) -> List[bytes]:
  if not isinstance(images, (list, tuple)):
    raise SkipSample("bad_field", f"{where}: 'images' must be a list, got {type(images).__name__}")
  out = []
  for i, im in enumerate(images):
    if isinstance(im, (bytes, bytearray)):
      out.append(bytes(im))
    elif isinstance(im, str):
      try:
        out.append(_read_file(im if os.path.isabs(im) else os.path.join(base_dir, im)))
      except SkipSample as e:
        raise SkipSample(e.reason, f"{where}: {e.detail}") from e
    else:
      raise SkipSample("bad_field", f"{where}: images[{i}] must be a path or bytes, got {type(im).__name__}")
  return out


def _names(images) -> list:
  """File names of path entries (for error messages); '' for inline bytes."""
  return [im if isinstance(im, str) else "" for im in images] if isinstance(images, (list, tuple)) else []


def parse_json_record(data: bytes, where: str) -> Dict[str, Any]:
  """bytes -> a JSON object, or SkipSample: bad_utf8 (not UTF-8), bad_json (syntax, or nested too deeply for
  the parser), bad_field (valid JSON that is not an object)."""
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise SkipSample("bad_utf8", f"{where}: {e}") from e
  try:
    rec = json.loads(text)
  except json.JSONDecodeError as e:
    raise SkipSample("bad_json", f"{where}: {e}") from e
  except RecursionError as e:
    raise SkipSample("bad_json", f"{where}: nested too deeply to parse") from e
  if not isinstance(rec, dict):
    raise SkipSample("bad_field", f"{where}: a record must be a JSON object, got {type(rec).__name__}")
  return rec


class JsonlSource:
  """JSON-lines manifest; line offsets are indexed once so access is random and the file is not held in memory.
  Blank lines are not records; `lines[i]` is record i's 1-based line number (for `file:line` in skip reports)."""

  def __init__(self, path: str):
    self.path = os.path.abspath(path)
    self.base = os.path.dirname(self.path)
    self.offsets: List[int] = []
    self.lines: List[int] = []
    with open(self.path, "rb") as f:
      pos = 0
      for n, line in enumerate(f, 1):
        if line.strip():
          self.offsets.append(pos)
          self.lines.append(n)
        pos += len(line)

  def __len__(self):
    return len(self.offsets)

  def __getitem__(self, index: int) -> Dict[str, Any]:
    with open(self.path, "rb") as f:
      f.seek(self.offsets[index])
      line = f.readline()
    where = f"{self.path}:{self.lines[index]}"
    rec = dict(parse_json_record(line, where))
    rec["_where"] = where
    rec["_image_names"] = _names(rec.get("images"))
    rec["images"] = _resolve_images(rec.get("images", []), self.base, where)
    return rec

  def __repr__(self):
    return f"JsonlSource({self.path}, n={len(self)})"


class ParquetSource:
  """Parquet manifest (pyarrow); rows are read by row group on access."""

  def __init__(self, path: str):
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    self.path = os.path.abspath(path)
    self.base = os.path.dirname(self.path)
    self._pf = None
    meta = pq.ParquetFile(self.path).metadata
    self.group_starts = np.cumsum([0] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
    self._cache: Tuple[int, Optional[list]] = (-1, None)

  def _file(self):
    if self._pf is None:
      import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
      self._pf = pq.ParquetFile(self.path)
    return self._pf

  def __len__(self):
    return int(self.group_starts[-1])

  def __getitem__(self, index: int) -> Dict[str, Any]:
    index = int(index)
    g = int(np.searchsorted(self.group_starts, index, side="right") - 1)
    if self._cache[0] != g:
      self._cache = (g, self._file().read_row_group(g).to_pylist())
    rec = dict(self._cache[1][index - int(self.group_starts[g])])
    where = f"{self.path}:row {index}"
    rec["_where"] = where
    rec["_image_names"] = _names(rec.get("images"))
    rec["images"] = _resolve_images(rec.get("images") or [], self.base, where)
    return rec

  def __getstate__(self):
    return {"path": self.path}

  def __setstate__(self, state):
    self.__init__(state["path"])


class TarSource:
  """WebDataset-style tar shards (see module docstring)."""

  def __init__(self, paths: Sequence[str]):
    self.paths = [os.path.abspath(p) for p in paths]
    if not self.paths:
      raise ValueError("TarSource: no shard paths")
    self.entries: List[Tuple[int, str, Dict[str, Tuple[int, int]]]] = []  # (shard, key, {suffix: (off, size)})
    for si, p in enumerate(self.paths):
      groups: Dict[str, Dict[str, Tuple[int, int]]] = {}
      with tarfile.open(p, "r:") as tar:
        for m in tar:
          if not m.isfile():
            continue
          name = os.path.basename(m.name)
          key, _, suffix = name.partition(".")
          groups.setdefault(os.path.join(os.path.dirname(m.name), key), {})[suffix] = (m.offset_data, m.size)
      for key in sorted(groups):
        if "json" in groups[key]:
          self.entries.append((si, key, groups[key]))

  @classmethod
  def from_pattern(cls, pattern: str) -> "TarSource":
    paths = []
    for part in pattern.split(","):
      hits = sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part]
      paths.extend(hits)
    return cls(paths)

  def __len__(self):
    return len(self.entries)

  def _read(self, shard: int, off_size: Tuple[int, int]) -> bytes:
    with open(self.paths[shard], "rb") as f:
      f.seek(off_size[0])
      return f.read(off_size[1])

  def __getitem__(self, index: int) -> Dict[str, Any]:
    shard, key, members = self.entries[int(index)]
    where = f"{self.paths[shard]}:{key}"
    rec = parse_json_record(self._read(shard, members["json"]), where)
    images = rec.get("images", [])
    if not isinstance(images, list):
      raise SkipSample("bad_field", f"{where}: 'images' must be a list of member suffixes")
    out = []
    for s in images:
      if s not in members:
        raise SkipSample("missing_file", f"{where}.{s}")
      out.append(self._read(shard, members[s]))
    return dict(rec, images=out, _image_names=[f"{where}.{m}" for m in images], _where=where)


class TfdsSource:
  """A TFDS dataset through `tfds.data_source` (ArrayRecord, random access, no TensorFlow import)."""

  def __init__(self, name: str, split: str = "train", data_dir: Optional[str] = None):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    if name.split("/")[0] == "bagel_synthetic":
      synthetic.tfds_builder_class()  # registers the builder so its configs resolve
    self.name, self.split, self.data_dir = name, split, data_dir
    self.ds = tfds.data_source(name, split=split, data_dir=data_dir or None)

  def __len__(self):
    return len(self.ds)

  def __getitem__(self, index: int) -> Dict[str, Any]:
    return dict(self.ds[int(index)])

  def __getstate__(self):
    return {"name": self.name, "split": self.split, "data_dir": self.data_dir}

  def __setstate__(self, state):
    self.__init__(**state)


class SafeSource:
  """Never raises on bad data: a `SkipSample` from the source becomes a `Skipped` record. Each record is tagged
  with the source name (`_source`) for per-source statistics."""

  def __init__(self, source, name: str):
    self.source, self.name = source, name
    self._len = len(source)

  def __len__(self):
    return self._len

  def __getitem__(self, index: int):
    try:
      rec = self.source[index]
    except SkipSample as e:
      return Skipped(e.reason, e.detail, self.name)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError, OSError) as e:
      # a source's own parsing of one bad record (e.g. a malformed Parquet cell, a TFDS decode) must not end
      # the run: count it; the pipeline's health limits stop runs where such records dominate
      return Skipped("bad_record", f"{self.name}[{index}]: {type(e).__name__}: {e}", self.name)
    if isinstance(rec, dict):
      rec = dict(rec)
      rec["_source"] = self.name
    return rec

  def __repr__(self):
    return f"SafeSource({self.name}: {self.source!r})"


def open_source(s: SourceConfig, dc: DataConfig):
  """The raw source of one `SourceConfig`."""
  if s.type == "synthetic":
    return synthetic.SyntheticSource(s.task, s.split, s.num_records, dc.image_size, dc.seed, dc.num_frames,
                                     s.variants or synthetic.T2I_VARIANTS)
  if s.type == "tfds":
    return TfdsSource(s.path, s.split, s.data_dir)
  if s.type == "jsonl":
    return JsonlSource(s.path)
  if s.type == "parquet":
    return ParquetSource(s.path)
  if s.type == "tar":
    return TarSource.from_pattern(s.path)
  raise ValueError(f"unknown source type {s.type!r}")


class Tag:
  """record -> (source number, index in that source's shuffled+repeated stream, record): the identity a
  sample's RNG is derived from, so a sample's content does not depend on how streams are sharded."""

  def __init__(self, k: int):
    self.k = k

  def __call__(self, index: int, record):
    return self.k, int(index), record


def open_sources(dc: DataConfig) -> List[SafeSource]:
  """Every source of `dc`, opened once (in `dc.sources` order): the start-up scan and the streams share them."""
  return [SafeSource(open_source(s, dc), s.name) for s in dc.sources]


def streams(dc: DataConfig, process_index: int = 0, process_count: int = 1,
            opened: Optional[Sequence[SafeSource]] = None) -> Tuple[List[grain.MapDataset], List[float]]:
  """One stream per source (weight > 0): shuffled with its own seed (reshuffled every epoch), repeated
  (`num_epochs`, 0 = forever), tagged (`Tag`) and sliced to this process's shard [process_index::process_count].
  Sharding each source before mixing keeps the mixture exact on every host (and in every worker). `opened`:
  the sources as `open_sources(dc)` returned them (opened here otherwise)."""
  weights = dc.weights()
  parts, w = [], []
  for k, s in enumerate(dc.sources):
    if weights[s.name] <= 0:
      continue
    src = opened[k] if opened is not None else SafeSource(open_source(s, dc), s.name)
    if len(src) == 0:
      raise ValueError(f"data source {s.name!r} ({s.type} {s.path or s.task}) is empty")
    ds = grain.MapDataset.source(src)
    if dc.shuffle:
      ds = ds.shuffle(seed=int(np.random.SeedSequence([dc.seed, k]).generate_state(1)[0]))
    ds = ds.repeat(dc.num_epochs or None).map_with_index(Tag(k))
    if process_count > 1:
      ds = ds[process_index::process_count]
    parts.append(ds)
    w.append(weights[s.name])
  return parts, w


def mix(parts: Sequence[grain.MapDataset], weights: Sequence[float]) -> grain.MapDataset:
  """Interleaves the streams by weight (`grain.MapDataset.mix`: a fixed pattern, exact over every window)."""
  return parts[0] if len(parts) == 1 else grain.MapDataset.mix(list(parts), list(weights))
