"""Device meshes from config: ICI axes inside a slice, DCN axes across slices (MaxText's split).

`config.mesh.ici` and `config.mesh.dcn` map axis names to sizes; one ICI entry may be -1 ("whatever is
left"). Multi-slice runs get a leading `dcn_data` axis built with `create_hybrid_device_mesh`.
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from bagel_jax.parallel.rules import MESH_AXES

ICI_AXES = ("data", "fsdp", "tensor", "expert", "sequence")


def resolve_axes(sizes: Mapping[str, int], total: int, what: str) -> Dict[str, int]:
  """Fills a single -1 and checks that the product equals `total` devices."""
  sizes = {k: int(v) for k, v in sizes.items()}
  unknown = sorted(set(sizes) - set(ICI_AXES))
  if unknown:
    raise ValueError(f"config.mesh.{what}: unknown mesh axes {unknown}; known: {ICI_AXES}")
  fill = [k for k, v in sizes.items() if v == -1]
  if len(fill) > 1:
    raise ValueError(f"config.mesh.{what}: only one axis may be -1, got {fill}")
  bad = [k for k, v in sizes.items() if v != -1 and v < 1]
  if bad:
    raise ValueError(f"config.mesh.{what}: axis sizes must be >= 1 or -1, got {({k: sizes[k] for k in bad})}")
  known = math.prod(v for v in sizes.values() if v != -1)
  if fill:
    if total % known:
      raise ValueError(f"config.mesh.{what}={dict(sizes)}: {total} devices are not divisible by {known}")
    sizes[fill[0]] = total // known
  if math.prod(sizes.values()) != total:
    raise ValueError(f"config.mesh.{what}={dict(sizes)}: product {math.prod(sizes.values())} != {total} devices")
  return {a: sizes.get(a, 1) for a in ICI_AXES}


def create_mesh(ici: Mapping[str, int], dcn: Optional[Mapping[str, int]] = None,
                devices: Optional[Sequence] = None) -> Mesh:
  """Mesh with axes ('dcn_data', 'data', 'fsdp', 'tensor', 'expert', 'sequence')."""
  devices = list(jax.devices() if devices is None else devices)
  n_slices = int((dcn or {}).get("data", 1))
  if (dcn or {}) and set(dcn) - {"data"}:
    raise ValueError(f"config.mesh.dcn: only a 'data' axis across slices is supported, got {dict(dcn)}")
  if len(devices) % n_slices:
    raise ValueError(f"config.mesh.dcn.data={n_slices} does not divide {len(devices)} devices")
  per_slice = resolve_axes(ici, len(devices) // n_slices, "ici")
  shape = tuple(per_slice[a] for a in ICI_AXES)
  if n_slices > 1:
    if all(hasattr(d, "slice_index") for d in devices):
      arr = mesh_utils.create_hybrid_device_mesh((1,) + shape, (n_slices,) + (1,) * len(shape), devices=devices)
    else:  # CPU / single-slice hardware emulating slices: contiguous device groups
      arr = np.asarray(devices).reshape((n_slices,) + shape)
  else:
    try:
      arr = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
      arr = np.asarray(devices).reshape(shape)  # CPU / unknown topologies
    arr = arr.reshape((1,) + shape)
  return Mesh(arr, MESH_AXES)


def batch_axis_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in ("dcn_data", "data", "fsdp")]))
