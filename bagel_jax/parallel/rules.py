"""Where things live: logical axis names (used in model code) -> mesh axes. The only file that knows both.

Model code annotates every parameter and large activation with logical names; a rule set maps them to mesh
axes. Rule sets are swapped by name from the config (`config.mesh.rules`), MaxText-style. Flax resolves a rule
only if its mesh axes are not already used by an earlier dimension of the same array, so one mesh axis never
shards two dimensions of a tensor.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("dcn_data", "data", "fsdp", "tensor", "expert", "sequence")
BATCH_AXES = ("dcn_data", "data", "fsdp")

Rules = Tuple[Tuple[str, object], ...]

_COMMON: Rules = (
    # activations
    ("activation_batch", BATCH_AXES),
    ("activation_length", "sequence"),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    # never sharded
    ("modality", None),
    ("layers", None),
    ("head_dim", None),
    ("freq", None),
    ("latent", None),
    ("vit_patch", None),
    ("vit_pos", None),
    ("conv_h", None), ("conv_w", None), ("conv_in", None),
    ("exp", "expert"),
)

RULE_SETS: Dict[str, Rules] = {
    # FSDP over `fsdp` (and tensor parallelism over `tensor` when that axis is > 1).
    "default": _COMMON + (
        ("conv_out", "fsdp"),  # the frozen VAE's convs: FSDP-sharded on output channels, never a copy per chip
        ("embed", "fsdp"),
        ("vit_embed", "fsdp"),
        ("mlp", "tensor"),
        ("vit_mlp", "tensor"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("vit_heads", "tensor"),
        ("vocab", "tensor"),
    ),
    # Pure FSDP: weights sharded on their largest dims over every non-batch mesh axis, no tensor parallelism.
    "fsdp_only": _COMMON + (
        ("conv_out", "fsdp"),
        ("embed", ("fsdp", "tensor")),
        ("vit_embed", ("fsdp", "tensor")),
        ("mlp", None),
        ("vit_mlp", None),
        ("heads", None),
        ("kv_heads", None),
        ("vit_heads", None),
        ("vocab", None),
    ),
}


def get_rules(name: str) -> Rules:
  if name not in RULE_SETS:
    raise ValueError(f"config.mesh.rules={name!r} is not one of {sorted(RULE_SETS)}")
  return RULE_SETS[name]


def rules_for_mesh(rules: Rules, mesh: Mesh) -> Rules:
  """Drops mesh axes the mesh does not have, so the same rules serve 1-device CPU and multi-slice pods (for
  both parameter shardings and the activation constraints inside the model)."""
  out = []
  for name, entry in rules:
    if entry is None:
      out.append((name, None))
      continue
    names = tuple(n for n in ((entry,) if isinstance(entry, str) else entry) if n in mesh.axis_names)
    out.append((name, None if not names else names[0] if len(names) == 1 else names))
  return tuple(out)


def _restrict(spec: P, mesh: Mesh) -> P:
  """Drops mesh axes the mesh does not have (e.g. `sequence` on a 3-axis mesh)."""
  def keep(entry):
    if entry is None:
      return None
    names = (entry,) if isinstance(entry, str) else tuple(entry)
    names = tuple(n for n in names if n in mesh.axis_names)
    return None if not names else (names[0] if len(names) == 1 else names)
  return P(*(keep(e) for e in spec))


def _fit(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Shards each dimension over the longest prefix of its mesh axes that divides it (e.g. embed over
  ('fsdp', 'tensor') falls back to 'fsdp' alone); replicates it when not even the first axis divides (4 KV
  heads over tensor=8). What was given up is reported by `sharding_shortfalls`, never silently."""
  out = []
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    while names and dim % _axes_size(names, mesh):
      names = names[:-1]
    out.append(None if not names else names[0] if len(names) == 1 else names)
  return P(*out)


def _axes_size(names: Sequence[str], mesh: Mesh) -> int:
  size = 1
  for n in names:
    size *= mesh.shape[n]
  return size


def _mesh_spec(spec: P, shape: Sequence[int], mesh: Mesh, rules: Rules) -> Tuple[P, P]:
  wanted = _restrict(nn.logical_to_mesh_axes(tuple(spec), rules), mesh)
  return wanted, _fit(wanted, shape, mesh)


def _spec_ways(spec: P, mesh: Mesh) -> int:
  return _axes_size([n for e in spec if e is not None for n in ((e,) if isinstance(e, str) else e)], mesh)


def sharding_shortfalls(logical_specs, abstract_tree, mesh: Mesh, rules: Rules):
  """Arrays sharded fewer ways than their rules ask because a dimension is not divisible by its mesh axes.

  The classic case: FSDP over a 256-chip v6e slice cannot split SigLIP's 1,152-wide dimensions, so the whole
  ViT (and its Adam and EMA copies) would sit on every chip. Returns [(path, shape, wanted, got, extra bytes per
  chip)] largest first, for the AOT report and the trainer's log; `experiments.common.fsdp_ici` sizes the FSDP
  group so the 7B and 1.5B models have none."""
  out = []
  flat = jax.tree_util.tree_flatten_with_path(logical_specs, is_leaf=lambda x: isinstance(x, P))[0]
  for (path, spec), leaf in zip(flat, jax.tree.leaves(abstract_tree)):
    wanted, got = _mesh_spec(spec, leaf.shape, mesh, rules)
    w, g = _spec_ways(wanted, mesh), _spec_ways(got, mesh)
    if g < w:
      size = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
      out.append((jax.tree_util.keystr(path), tuple(leaf.shape), wanted, got, size // g - size // w))
  return sorted(out, key=lambda r: -r[-1])


def logical_to_sharding(logical_specs, abstract_tree, mesh: Mesh, rules: Rules):
  """Tree of logical PartitionSpecs (+ shapes) -> tree of NamedShardings on `mesh`."""
  def one(spec, leaf):
    return NamedSharding(mesh, _mesh_spec(spec, leaf.shape, mesh, rules)[1])
  return jax.tree.map(one, logical_specs, abstract_tree, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Rows over every batch axis the mesh has; everything else replicated."""
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1) or None
  return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))


def batch_shardings(mesh: Mesh, abstract_batch):
  return jax.tree.map(lambda x: batch_sharding(mesh, len(x.shape)) if len(x.shape) else
                      NamedSharding(mesh, P()), abstract_batch)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
