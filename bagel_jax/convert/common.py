"""Helpers shared by the converters: layouts, read-tracking sources, conversion plans.

Layout conventions (maxdiffusion's): Linear weight [out, in] -> kernel [in, out]; Conv2d [O, I, kh, kw] ->
[kh, kw, I, O]; norm weight -> scale.

A conversion is planned before any tensor data is read: a `Plan` maps each of our parameter paths to a `Leaf`,
the list of source tensors (name, expected PyTorch shape, layout transform) that fill it. `claim_plan` checks
every name and shape against a `TensorSource`'s metadata, so missing, misshapen and (via `finish`) unexpected
tensors are reported before a 27 GB file is touched, and a `ShapeOnlySource` (names and shapes, no data)
converts to an abstract tree. `materialize` then builds one leaf at a time, optionally straight into a
sharded `jax.Array`, so host memory holds the output plus one leaf; `export_tensors` runs a plan backwards.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import shutil
from typing import Any, Callable, Dict, Iterable, Iterator, Mapping, Optional, Tuple

import ml_dtypes
import numpy as np
from flax import traverse_util


def linear_to_kernel(w: np.ndarray) -> np.ndarray:
  """torch Linear weight [out, in] -> flax kernel [in, out]."""
  return np.ascontiguousarray(np.asarray(w).T)


def kernel_to_linear(k: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(k).T)


def conv_to_kernel(w: np.ndarray) -> np.ndarray:
  """torch Conv2d weight [O, I, kh, kw] -> flax [kh, kw, I, O]."""
  return np.ascontiguousarray(np.transpose(np.asarray(w), (2, 3, 1, 0)))


def kernel_to_conv(k: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.transpose(np.asarray(k), (3, 2, 0, 1)))


def flatten(tree: Mapping) -> Dict[str, Any]:
  """Nested dict -> {'a/b/c': leaf} (our parameter paths)."""
  return traverse_util.flatten_dict(tree, sep="/")


def unflatten(flat: Mapping[str, Any]) -> Dict:
  """{'a/b/c': leaf} -> nested dict."""
  return traverse_util.unflatten_dict(dict(flat), sep="/")


# ----------------------------------------------------------------------------------------------------------
# Errors and dtypes.
# ----------------------------------------------------------------------------------------------------------

class ConversionError(ValueError):
  """A source that cannot be converted as given; the message names the file or tensor."""


class MissingTensorError(ConversionError, KeyError):
  """Also a KeyError, so callers that look names up can catch it as one."""

  def __str__(self):
    return str(self.args[0]) if self.args else ""


BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": BFLOAT16}


def target_dtype(name) -> np.dtype:
  """'float32' / 'bfloat16' (or a numpy dtype) -> numpy dtype; anything else is an error."""
  dt = np.dtype(name) if not isinstance(name, str) else DTYPES.get(name)
  if dt is None or dt not in DTYPES.values():
    raise ConversionError(f"unsupported target dtype {name!r}; choose float32 or bfloat16")
  return dt


def dtype_name(dt) -> str:
  return "bfloat16" if np.dtype(dt) == BFLOAT16 else np.dtype(dt).name


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
  """bf16 stored as uint16 -> float32, exactly (bf16 is the high half of a float32); needs neither torch nor
  a safetensors build that knows bfloat16."""
  return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


def cast(a: np.ndarray, dt: np.dtype) -> np.ndarray:
  a = np.asarray(a)
  if a.dtype == dt:
    return a
  if a.dtype == BFLOAT16 and dt == np.float32:
    return bf16_bits_to_float32(a.view(np.uint16))
  return a.astype(dt)


# ----------------------------------------------------------------------------------------------------------
# Sources.
# ----------------------------------------------------------------------------------------------------------

TensorMeta = collections.namedtuple("TensorMeta", "shape dtype")


class TensorSource:
  """A read-tracking view over named source tensors.

  `claim(name, shape)` checks presence and shape from metadata and marks the tensor consumed, `load(name)`
  reads it; `take` does both. `finish()` raises if anything was neither consumed nor declared ignorable, so
  silent partial loads cannot happen. `tensors` maps names to arrays or to anything with `.shape` (metadata)
  when a `loader` reads the data. `metadata` is the file's string metadata (safetensors `__metadata__`).
  """

  def __init__(self, tensors: Mapping[str, Any], *, what: str = "checkpoint",
               loader: Optional[Callable[[str], np.ndarray]] = None, metadata: Optional[Mapping[str, str]] = None):
    self._tensors = tensors
    self._loader = loader
    self.what = what
    self.metadata = dict(metadata or {})
    self.consumed = set()
    self.ignored = set()

  def keys(self) -> Iterable[str]:
    return self._tensors.keys()

  def __contains__(self, name: str) -> bool:
    return name in self._tensors

  def shape(self, name: str) -> Tuple[int, ...]:
    return tuple(int(d) for d in getattr(self._tensors[name], "shape", ()))

  def dtype(self, name: str) -> np.dtype:
    return np.dtype(getattr(self._tensors[name], "dtype", np.float32))

  def nbytes(self, name: str) -> int:
    return int(np.prod(self.shape(name))) * self.dtype(name).itemsize

  def claim(self, name: str, shape: Optional[tuple] = None) -> None:
    if name not in self._tensors:
      raise MissingTensorError(f"{self.what}: missing tensor {name!r}")
    if shape is not None and self.shape(name) != tuple(shape):
      raise ConversionError(f"{self.what}: tensor {name!r} has shape {self.shape(name)}, expected "
                            f"{tuple(shape)}")
    self.consumed.add(name)

  def load(self, name: str) -> np.ndarray:
    value = self._loader(name) if self._loader else np.asarray(self._tensors[name])
    if tuple(value.shape) != self.shape(name):  # metadata and data disagree: a corrupt file
      raise ConversionError(f"{self.what}: tensor {name!r} read with shape {tuple(value.shape)}, its header "
                            f"says {self.shape(name)}")
    return value

  def take(self, name: str, shape: Optional[tuple] = None) -> np.ndarray:
    self.claim(name, shape)
    return self.load(name)

  def ignore(self, *names: str) -> None:
    for n in names:
      if n in self._tensors:
        self.ignored.add(n)

  def unused(self):
    return sorted(set(self._tensors) - self.consumed - self.ignored)

  def finish(self) -> None:
    left = self.unused()
    if left:
      more = f" (+{len(left) - 10} more)" if len(left) > 10 else ""
      shown = ", ".join(f"{n} {self.shape(n)}" for n in left[:10])
      raise ConversionError(f"{self.what}: unexpected tensors not consumed by the converter: {shown}{more}")


class ShapeOnlySource(TensorSource):
  """Names and shapes without data (e.g. the 7B release's key table): plans convert against it to an
  abstract tree, and any attempt to read data is an error rather than an allocation."""

  def __init__(self, shapes: Mapping[str, tuple], *, what: str = "shape-only checkpoint", dtype="bfloat16"):
    super().__init__({k: TensorMeta(tuple(v), target_dtype(dtype)) for k, v in shapes.items()}, what=what)

  def load(self, name: str) -> np.ndarray:
    raise RuntimeError(f"{self.what} has no data (tried to read {name!r})")


# ----------------------------------------------------------------------------------------------------------
# Plans.
# ----------------------------------------------------------------------------------------------------------

def _identity(a):
  return np.asarray(a)


@dataclasses.dataclass(frozen=True)
class Piece:
  """One source tensor placed at `index` (the leading stacking axes: layer, expert) of a leaf.

  `to_ours` maps the PyTorch-layout tensor to the piece's layout, `to_src` back (None: not exported, e.g. a
  gen expert copied from its und twin). `name=None` is a constant piece filled with `fill` (QK-norm ones).
  """
  index: Tuple[int, ...]
  name: Optional[str]
  src_shape: Tuple[int, ...]
  to_ours: Callable[[np.ndarray], np.ndarray] = _identity
  to_src: Optional[Callable[[np.ndarray], np.ndarray]] = _identity
  fill: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class Leaf:
  shape: Tuple[int, ...]
  pieces: Tuple[Piece, ...]


Plan = Dict[str, Leaf]


def single(name: str, src_shape, shape, to_ours=_identity, to_src=_identity) -> Leaf:
  return Leaf(tuple(shape), (Piece((), name, tuple(src_shape), to_ours, to_src),))


def linear_leaves(plan: Plan, path: str, name: str, d_in: int, d_out: int, bias: bool = True) -> None:
  """A PyTorch Linear `name` (weight [out, in], bias [out]) -> `path`/kernel [in, out] and `path`/bias."""
  plan[f"{path}/kernel"] = single(f"{name}.weight", (d_out, d_in), (d_in, d_out), linear_to_kernel,
                                  kernel_to_linear)
  if bias:
    plan[f"{path}/bias"] = single(f"{name}.bias", (d_out,), (d_out,))


def prefixed(plan: Plan, prefix: str) -> Plan:
  return {f"{prefix}/{k}": v for k, v in plan.items()}


def claim_plan(plan: Plan, src: TensorSource) -> None:
  """Checks every source name and shape of `plan` against `src` (metadata only) and marks them consumed."""
  for leaf in plan.values():
    for p in leaf.pieces:
      if p.name is not None:
        src.claim(p.name, p.src_shape)


def plan_abstract(plan: Plan, dtype) -> Dict:
  """The nested tree of `jax.ShapeDtypeStruct`s the plan produces (nothing is read)."""
  import jax  # pylint: disable=import-outside-toplevel
  dt = target_dtype(dtype)
  return unflatten({k: jax.ShapeDtypeStruct(leaf.shape, dt) for k, leaf in plan.items()})


def source_bytes(plan: Plan, src: TensorSource) -> int:
  return sum(src.nbytes(p.name) for leaf in plan.values() for p in leaf.pieces if p.name is not None)


def build_leaf(leaf: Leaf, src: TensorSource, dt: np.dtype, on_read: Callable[[int], None] = lambda n: None,
               cache: Optional[Dict[str, np.ndarray]] = None) -> np.ndarray:
  """Reads the leaf's source tensors one at a time into a preallocated array of dtype `dt`."""
  def piece_value(p: Piece) -> np.ndarray:
    if p.name is None:
      return np.full(p.src_shape, p.fill, dt)
    if cache is not None and p.name in cache:
      raw = cache[p.name]
    else:
      raw = src.load(p.name)
      on_read(src.nbytes(p.name))
    return cast(p.to_ours(cast(raw, dt)), dt)

  if len(leaf.pieces) == 1 and leaf.pieces[0].index == ():
    out = np.ascontiguousarray(piece_value(leaf.pieces[0]))
  else:
    out = np.empty(leaf.shape, dt)
    for p in leaf.pieces:
      out[p.index] = piece_value(p)
  if out.shape != leaf.shape:
    raise AssertionError(f"plan bug: leaf built with shape {out.shape}, planned {leaf.shape}")
  return out


ShardingFn = Callable[[Any, Tuple[int, ...]], Any]


def materialize(plan: Plan, src: TensorSource, dtype, *, logical_axes: Optional[Mapping[str, Any]] = None,
                sharding_fn: Optional[ShardingFn] = None, progress: bool = False, desc: str = "",
                dtypes: Optional[Mapping[str, Any]] = None) -> Dict:
  """Builds every leaf of `plan` from `src` (call `claim_plan` + `src.finish()` first), in `dtype` or, per
  path, `dtypes` (the model keeps norm scales and the frozen VAE in fp32 whatever `param_dtype` says).

  Without `sharding_fn` the leaves are host numpy arrays. With it, `sharding_fn(logical_spec, shape)` (the
  leaf's logical PartitionSpec from `logical_axes`, flat path -> spec) gives each leaf's sharding and the
  leaf becomes a `jax.Array` assembled by `jax.make_array_from_callback`, so each host keeps only its shards
  and at most one full leaf at a time."""
  import jax  # pylint: disable=import-outside-toplevel
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  dt = target_dtype(dtype)
  out = {}
  bar = tqdm(total=source_bytes(plan, src), unit="B", unit_scale=True, desc=desc or src.what,
             disable=not progress, leave=False)
  try:
    for path, leaf in plan.items():
      value = build_leaf(leaf, src, target_dtype(dtypes[path]) if dtypes and path in dtypes else dt, bar.update)
      if sharding_fn is not None:
        if logical_axes is None or path not in logical_axes:
          raise AssertionError(f"no logical axes for {path!r}")
        sharding = sharding_fn(logical_axes[path], leaf.shape)
        value = jax.make_array_from_callback(leaf.shape, sharding, lambda idx, v=value: v[idx])
      out[path] = value
  finally:
    bar.close()
  return unflatten(out)


def export_tensors(plan: Plan, flat_params: Mapping[str, Any], dtype=None) -> Iterator[Tuple[str, Callable]]:
  """Runs `plan` backwards: yields (source name, shape, producer) with producer() -> the PyTorch-layout tensor
  (cast to `dtype` if given). Producers read their leaf lazily, so a streaming writer holds one tensor."""
  dt = None if dtype is None else target_dtype(dtype)
  for path, leaf in plan.items():
    if path not in flat_params:
      raise ConversionError(f"parameter {path!r} missing from the checkpoint")
    have = tuple(np.shape(flat_params[path]))
    if have != leaf.shape:
      raise ConversionError(f"parameter {path!r} has shape {have}, expected {leaf.shape}")
    for p in leaf.pieces:
      if p.name is None or p.to_src is None:
        continue

      def produce(p=p, path=path):
        value = np.asarray(flat_params[path][p.index] if p.index else flat_params[path])
        value = np.ascontiguousarray(p.to_src(value))
        if value.shape != p.src_shape:
          raise AssertionError(f"plan bug: {p.name} exported with shape {value.shape}, planned {p.src_shape}")
        return value if dt is None else cast(value, dt)
      yield p.name, p.src_shape, produce


def check_tree_shapes(got: Mapping[str, Any], want: Mapping[str, Any], what: str) -> None:
  """Flat {path: array-like} vs flat {path: ShapeDtypeStruct}: same paths and shapes, else a plan bug or an
  incompatible base checkpoint, named path by path."""
  missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  bad = [f"{k}: {tuple(np.shape(got[k]))} != {tuple(want[k].shape)}" for k in sorted(set(got) & set(want))
         if tuple(np.shape(got[k])) != tuple(want[k].shape)]
  if missing or extra or bad:
    raise ConversionError(f"{what} does not match the model's parameter tree: missing {missing[:8]}, "
                          f"unexpected {extra[:8]}, shape mismatches {bad[:8]}")


# ----------------------------------------------------------------------------------------------------------
# Output directories.
# ----------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_output_dir(dst: str, overwrite: bool = False):
  """Yields a temporary sibling of `dst` to write into; renamed to `dst` only if the block succeeds, removed
  otherwise, so `dst` never holds a half-written result. The temp name is deterministic so that every host of
  a multi-host conversion writes into the same directory of a shared file system."""
  import jax  # pylint: disable=import-outside-toplevel
  dst = os.path.abspath(dst)
  lead = jax.process_index() == 0
  if os.path.exists(dst) and not overwrite:
    raise FileExistsError(f"destination {dst} already exists (pass --overwrite to replace it)")
  parent, base = os.path.split(dst)
  tmp = os.path.join(parent, f".{base}.partial")
  if lead:
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(tmp):  # left over from a killed run
      shutil.rmtree(tmp)
    os.makedirs(tmp)
  _barrier("convert-tmp")
  try:
    yield tmp
    _barrier("convert-written")
  except BaseException:
    if lead:
      shutil.rmtree(tmp, ignore_errors=True)
    raise
  if lead:
    if os.path.exists(dst):
      old = os.path.join(parent, f".{base}.replaced")
      shutil.rmtree(old, ignore_errors=True)
      os.rename(dst, old)
      os.rename(tmp, dst)
      shutil.rmtree(old)
    else:
      os.rename(tmp, dst)
  _barrier("convert-renamed")


def _barrier(name: str) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)
