"""Streaming safetensors reading and writing.

Reading goes through `safetensors.safe_open(framework="np")`, one tensor at a time, except bfloat16: older
safetensors builds have no numpy bf16 and TPU hosts have no torch, so bf16 tensors are read as raw uint16 at
their header offsets (exact; `common.cast` widens them to fp32 with a bit shift). The header is parsed and
checked against the file size first, so a truncated download fails with a message saying so instead of a
deserialisation error half-way through a conversion. Writing streams tensors produced one at a time, so
exporting a 14.6B-parameter model never holds a second copy of it.
"""
from __future__ import annotations

import glob
import json
import os
import struct
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from bagel_jax.convert.common import BFLOAT16, ConversionError, TensorMeta, TensorSource

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": BFLOAT16, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def read_header(path: str) -> Tuple[int, Dict[str, dict], Dict[str, str]]:
  """-> (offset of the data section, {name: {dtype, shape, data_offsets}}, __metadata__), validated."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise ConversionError(f"{path}: not a safetensors file (only {size} bytes)")
    (n,) = struct.unpack("<Q", head)
    if n > _MAX_HEADER or 8 + n > size:
      raise ConversionError(f"{path}: truncated or not a safetensors file (header of {n} bytes declared, file "
                            f"has {size} bytes)")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ConversionError(f"{path}: corrupt safetensors header ({e})") from e
  meta = header.pop("__metadata__", None) or {}
  data_start, data_size = 8 + n, size - 8 - n
  end_max = 0
  for name, info in header.items():
    try:
      dtype = np.dtype(_DTYPES[info["dtype"]])
      begin, end = (int(x) for x in info["data_offsets"])
      shape = tuple(int(d) for d in info["shape"])
    except (KeyError, TypeError, ValueError) as e:
      raise ConversionError(f"{path}: corrupt header entry for tensor {name!r}: {info!r}") from e
    if end - begin != int(np.prod(shape)) * dtype.itemsize:
      raise ConversionError(f"{path}: tensor {name!r} {info['dtype']}{list(shape)} spans {end - begin} bytes")
    end_max = max(end_max, end)
  if end_max > data_size:
    raise ConversionError(f"{path}: truncated safetensors file: the header describes {end_max} bytes of tensor "
                          f"data but only {data_size} follow it (incomplete download or copy?)")
  return data_start, header, meta


class SafetensorsFiles:
  """Several safetensors files (a sharded checkpoint) as one name -> tensor store."""

  def __init__(self, paths: Sequence[str], index: Optional[Mapping[str, str]] = None):
    self.paths = list(paths)
    self._where: Dict[str, Tuple[str, int, dict]] = {}
    self.meta: Dict[str, TensorMeta] = {}
    self.metadata: Dict[str, str] = {}  # the files' __metadata__, merged
    for path in self.paths:
      start, header, file_meta = read_header(path)
      self.metadata.update(file_meta)
      for name, info in header.items():
        if name in self._where:
          raise ConversionError(f"tensor {name!r} appears in both {self._where[name][0]} and {path}")
        self._where[name] = (path, start, info)
        self.meta[name] = TensorMeta(tuple(info["shape"]), np.dtype(_DTYPES[info["dtype"]]))
    if index is not None:
      base = {os.path.basename(p) for p in self.paths}
      wrong = sorted(n for n, f in index.items() if n not in self._where or f not in base
                     or os.path.basename(self._where[n][0]) != f)
      unindexed = sorted(set(self._where) - set(index))
      if wrong or unindexed:
        raise ConversionError(f"safetensors index disagrees with the shard files: indexed but not found where "
                              f"listed {wrong[:5]}, present but not indexed {unindexed[:5]}")
    self._handles: Dict[str, object] = {}

  def _handle(self, path: str):
    if path not in self._handles:
      from safetensors import safe_open  # pylint: disable=import-outside-toplevel
      self._handles[path] = safe_open(path, framework="np")
    return self._handles[path]

  def load(self, name: str) -> np.ndarray:
    path, start, info = self._where[name]
    if info["dtype"] == "BF16":
      begin, end = info["data_offsets"]
      with open(path, "rb") as f:
        f.seek(start + begin)
        raw = f.read(end - begin)
      if len(raw) != end - begin:
        raise ConversionError(f"{path}: tensor {name!r} is truncated")
      return np.frombuffer(raw, "<u2").view(BFLOAT16).reshape(info["shape"])
    return self._handle(path).get_tensor(name)

  def source(self, what: Optional[str] = None) -> TensorSource:
    return TensorSource(self.meta, what=what or ", ".join(os.path.basename(p) for p in self.paths),
                        loader=self.load, metadata=self.metadata)


def open_file(path: str, what: Optional[str] = None) -> TensorSource:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such safetensors file")
  return SafetensorsFiles([path]).source(what or os.path.basename(path))


def open_dir(directory: str, stem: str = "model", what: Optional[str] = None) -> TensorSource:
  """An HF-style directory: `<stem>.safetensors`, or shards listed by `<stem>.safetensors.index.json`, or
  (no index) every `*.safetensors` file in it."""
  index_path = os.path.join(directory, f"{stem}.safetensors.index.json")
  single = os.path.join(directory, f"{stem}.safetensors")
  index = None
  if os.path.isfile(index_path):
    with open(index_path) as f:
      index = json.load(f)["weight_map"]
    paths = [os.path.join(directory, p) for p in sorted(set(index.values()))]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
      raise FileNotFoundError(f"{index_path} lists shard files that do not exist: {missing}")
  elif os.path.isfile(single):
    paths = [single]
  else:
    paths = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not paths:
      other = sorted(os.path.basename(p) for p in glob.glob(os.path.join(directory, "*.bin")))
      hint = f" (found {other}: re-save with safe_serialization=True)" if other else ""
      raise FileNotFoundError(f"{directory}: no *.safetensors weights{hint}")
  return SafetensorsFiles(paths, index).source(what or directory)


def dtype_code(dt) -> str:
  dt = np.dtype(dt)
  if dt not in _NAMES:
    raise ConversionError(f"dtype {dt} cannot be stored in safetensors")
  return _NAMES[dt]


def write_streaming(path: str, entries: Iterable[Tuple[str, Tuple[int, ...], np.dtype, Callable[[], np.ndarray]]],
                    metadata: Optional[Mapping[str, str]] = None, progress: bool = False) -> List[str]:
  """Writes (name, shape, dtype, producer) entries in name order, calling each producer once just before
  its bytes are written. Returns the names written."""
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  entries = sorted(entries, key=lambda e: e[0])
  names = [e[0] for e in entries]
  if len(set(names)) != len(names):
    raise ConversionError(f"{path}: duplicate tensor names")
  header, offset = {}, 0
  for name, shape, dt, _ in entries:
    n = int(np.prod(shape)) * np.dtype(dt).itemsize
    header[name] = {"dtype": dtype_code(dt), "shape": [int(d) for d in shape], "data_offsets": [offset, offset + n]}
    offset += n
  if metadata:
    header = {"__metadata__": dict(metadata), **header}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f, tqdm(total=offset, unit="B", unit_scale=True, desc=os.path.basename(path),
                                   disable=not progress, leave=False) as bar:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name, shape, dt, produce in entries:
      value = np.ascontiguousarray(produce())
      if value.shape != tuple(shape) or value.dtype != np.dtype(dt):
        raise AssertionError(f"{name}: produced {value.dtype}{value.shape}, declared {np.dtype(dt)}{tuple(shape)}")
      f.write(value.reshape(-1).view(np.uint8))  # little-endian hosts only, as numpy and safetensors assume
      bar.update(value.nbytes)
  return names
