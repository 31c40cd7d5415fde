"""Pure helpers for PyTorch-named tensors <-> Flax parameter trees.

Layout conventions (maxdiffusion's): Linear weight [out, in] -> kernel [in, out]; Conv2d [O, I, kh, kw] ->
[kh, kw, I, O]; norm weight -> scale. Converters consume a flat `{torch_name: np.ndarray}` mapping through a
`TensorSource`, which records what was read so that every source tensor is either consumed or explicitly
ignored, and write into a nested dict with `set_path`.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Mapping, Optional

import numpy as np


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


def set_path(tree: Dict, path: str, value) -> None:
  """Sets tree['a']['b']['c'] = value for path 'a/b/c', creating dicts on the way."""
  keys = path.split("/")
  node = tree
  for k in keys[:-1]:
    node = node.setdefault(k, {})
  if keys[-1] in node:
    raise ValueError(f"parameter path {path!r} written twice")
  node[keys[-1]] = value


def get_path(tree: Mapping, path: str):
  node = tree
  for k in path.split("/"):
    node = node[k]
  return node


def flatten(tree: Mapping, prefix: str = "") -> Dict[str, np.ndarray]:
  """Nested dict -> {'a/b/c': leaf}."""
  out = {}
  for k, v in tree.items():
    p = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, Mapping):
      out.update(flatten(v, p))
    else:
      out[p] = v
  return out


class TensorSource:
  """A read-tracking view over named source tensors.

  `take(name)` returns the tensor and marks it consumed; `finish()` raises if anything was neither consumed
  nor declared ignorable, so silent partial loads cannot happen.
  """

  def __init__(self, tensors: Mapping[str, np.ndarray], *, what: str = "checkpoint",
               loader: Optional[Callable[[str], np.ndarray]] = None):
    self._tensors = tensors
    self._loader = loader
    self._what = what
    self.consumed = set()
    self.ignored = set()

  def keys(self) -> Iterable[str]:
    return self._tensors.keys()

  def __contains__(self, name: str) -> bool:
    return name in self._tensors

  def shape(self, name: str):
    t = self._tensors[name]
    return tuple(getattr(t, "shape", ()))

  def take(self, name: str, shape: Optional[tuple] = None) -> np.ndarray:
    if name not in self._tensors:
      raise KeyError(f"{self._what}: missing tensor {name!r}")
    value = self._loader(name) if self._loader else np.asarray(self._tensors[name])
    if shape is not None and tuple(value.shape) != tuple(shape):
      raise ValueError(f"{self._what}: tensor {name!r} has shape {tuple(value.shape)}, expected {tuple(shape)}")
    self.consumed.add(name)
    return value

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
      raise ValueError(f"{self._what}: unexpected tensors not consumed by the converter: {left[:10]}{more}")
