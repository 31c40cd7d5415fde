"""Block-sparse Pallas attention vs dense masked attention vs splash, on packed rows of BAGEL's data mixes.

  python benchmarks/attention_kernel.py                 # L = 2,048, 8,192, 36,864; CPU part + TPU AOT part
  python benchmarks/attention_kernel.py --no_tpu        # CPU part only (no libtpu)
  python benchmarks/attention_kernel.py --lengths 2048  # a quick look

Rows (7B layout: SigLIP 14-px patches, 16-px latent tokens), packed greedily with the project's own layout
rules (`bagel_jax.data.sequence`) until the next sample does not fit:
  t2i   - text-to-image mix: a prompt (causal) + a noisy 256 or 512 px latent image (noise split);
  vqa   - understanding mix: a ViT image of 224..490 px (full split) + question (causal) + answer (causal);
  docs4 - exactly four VQA-shaped documents of L/4 tokens each (the issue's "4-document row").
Head configuration of BAGEL-7B: 28 query heads, 4 KV heads, head_dim 128, blocks 512 x 512.

Measured, per row:
- tiles: total (nq * nk), non-empty / full / partial from the dense mask tiled the slow way (the oracle),
  listed by the block tables, and *visited* as counted by the kernel itself (`ops.flash_attention_visits`,
  interpret mode on CPU; per (batch, KV head, q-block) the kernel's own counter of executed tiles);
- compiled TPU cost analysis (AOT for one v5p chip through libtpu, forward + backward, bf16): the kernel with
  the row's metadata known at trace time (its `cost_estimate`s then count exactly the listed tiles), dense
  masked attention (`reference_attention`: XLA einsums over the full [L, L] with the mask), and the splash
  baseline (`kernels/splash_baseline.py`: stock splash with a per-row dynamic dense mask);
- the CPU interpret-time ratio kernel / reference at the smallest length (a sanity ratio of two CPU programs:
  the interpreter is not a performance model; absolute CPU times are not quoted).

Writes benchmarks/results/attention_kernel.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

HQ, HKV, HEAD_DIM, BLOCK = 28, 4, 128, 512
# Per (q, k) element of a visited tile, per head, per head_dim: forward QK^T + PV (4), dQ kernel recomputes
# QK^T and computes dP, dQ (6), dK/dV kernel recomputes QK^T and computes dV, dP, dK (8).
KERNEL_FLOPS_PER_TILE_ELEM = 4 + 6 + 8
# Dense masked attention through XLA autodiff: forward 2 matmuls, backward 4 (no recompute).
DENSE_FLOPS_PER_ELEM = 4 + 8
LIBTPU_LOCK = os.path.join(tempfile.gettempdir(), "bagel_jax_libtpu.lock")


# ----------------------------------------------------------------------------------------------------------
# Rows.
# ----------------------------------------------------------------------------------------------------------

def _model_config():
  from bagel_jax.models import config as config_lib  # pylint: disable=import-outside-toplevel
  return config_lib.bagel_7b()


def make_row(mix: str, seq_len: int, seed: int = 0):
  """One packed row of `mix` -> (TokenMeta as numpy [1, L] arrays, description dict)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from bagel_jax.data import examples  # pylint: disable=import-outside-toplevel
  from bagel_jax.data.sequence import LayoutConfig, assemble_batch, fits, layout_sample  # pylint: disable=import-outside-toplevel
  from bagel_jax.kernels import mask as mask_lib  # pylint: disable=import-outside-toplevel
  cfg = _model_config()
  layout = LayoutConfig.from_model_config(cfg)
  rng = np.random.default_rng(seed)
  g = examples._Gen(cfg, rng)  # pylint: disable=protected-access
  spec = examples.batch_spec_for(cfg, batch_size=1, seq_len=seq_len, vit_capacity=seq_len,
                                 latent_capacity=seq_len, image_capacity=seq_len)

  def vqa(side, question, answer):
    return [g.vit(side, side), g.text(question, loss=False), g.text(answer, loss=True)]

  row = []
  if mix == "docs4":
    quarter = seq_len // 4
    side = max(1, int((quarter / 2) ** 0.5))
    for _ in range(4):
      probe = len(layout_sample(vqa(side, 32, 1), layout))
      row.append(layout_sample(vqa(side, 32, 1 + quarter - probe), layout))
  else:
    misses = 0
    while misses < 50:  # keep drawing until 50 samples in a row do not fit: rows end nearly full
      if mix == "t2i":
        items = [g.text(int(rng.integers(20, 78)), loss=False),
                 g.vae(*(2 * (int(rng.choice([16, 32])),)), noisy=True)]
      elif mix == "vqa":
        items = vqa(int(rng.integers(16, 36)), int(rng.integers(8, 41)), int(rng.integers(1, 121)))
      else:
        raise ValueError(f"unknown mix {mix!r}")
      s = layout_sample(items, layout)
      if fits(row + [s], spec):
        row.append(s)
        misses = 0
      else:
        misses += 1
  b = assemble_batch([row], spec, layout)
  meta = mask_lib.TokenMeta.from_row(b["document"], b["split"], b["split_mode"])
  meta = mask_lib.TokenMeta(*(np.asarray(a, np.int32) for a in meta))
  return meta, dict(mix=mix, seq_len=seq_len, documents=len(row), fill=float((b["document"] > 0).mean()))


# ----------------------------------------------------------------------------------------------------------
# CPU part: tiles, visits, interpret-time ratio.
# ----------------------------------------------------------------------------------------------------------

def tile_stats(meta):
  import numpy as np  # pylint: disable=import-outside-toplevel
  from bagel_jax.kernels import block_tables as bt  # pylint: disable=import-outside-toplevel
  from bagel_jax.train import flops as flops_lib  # pylint: disable=import-outside-toplevel
  dense = bt.dense_tile_classes(meta, meta, BLOCK, BLOCK)
  tables = bt.build_tables(meta, meta, BLOCK, BLOCK, xp=np)
  listed = bt.tile_classes(meta, meta, BLOCK, BLOCK, xp=np)
  pairs = int(flops_lib.allowed_pairs_per_row(meta.document, meta.split, meta.mode).sum())
  length = meta.document.shape[1]
  return dict(tiles_total=int(dense.size), tiles_nonempty=int((dense != bt.EMPTY).sum()),
              tiles_full=int((dense == bt.FULL_TILE).sum()), tiles_partial=int((dense == bt.PARTIAL).sum()),
              tiles_listed=int(tables.fwd_count.sum()), tiles_listed_full=int((listed == bt.FULL_TILE).sum()),
              tables_match_oracle=bool((listed == dense).all()),
              allowed_pairs=pairs, mask_density=pairs / float(length) ** 2)


def visited_tiles(meta):
  """The kernel's own count of executed tiles (interpret mode; 1 query/KV head suffices: the count is per
  (batch, KV head, q-block) and identical across heads)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from bagel_jax.kernels import ops  # pylint: disable=import-outside-toplevel
  length = meta.document.shape[1]
  q = jnp.zeros((1, length, 1, HEAD_DIM), jnp.float32)
  _, visits, _ = ops.flash_attention_visits(q, q, q, meta, meta, block_q=BLOCK, block_kv=BLOCK)
  return int(np.asarray(jax.device_get(visits)).sum())


def interpret_time_ratio(meta, repeats: int = 2):
  """CPU wall time of the kernel in interpret mode / the jnp reference, forward + backward, 7B heads, fp32."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from bagel_jax.kernels import ops  # pylint: disable=import-outside-toplevel
  from bagel_jax.kernels.reference import reference_attention  # pylint: disable=import-outside-toplevel
  length = meta.document.shape[1]
  ks = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(ks[0], (1, length, HQ, HEAD_DIM), jnp.float32)
  k = jax.random.normal(ks[1], (1, length, HKV, HEAD_DIM), jnp.float32)
  v = jax.random.normal(ks[2], (1, length, HKV, HEAD_DIM), jnp.float32)
  jmeta = type(meta)(*(jnp.asarray(a) for a in meta))

  def timed(fn):
    step = jax.jit(jax.grad(lambda q, k, v: fn(q, k, v, jmeta, jmeta).sum(), argnums=(0, 1, 2)))
    jax.block_until_ready(step(q, k, v))
    best = float("inf")
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(step(q, k, v))
      best = min(best, time.perf_counter() - t0)
    return best

  kernel = timed(lambda *a: ops.flash_attention(*a, block_q=BLOCK, block_kv=BLOCK, interpret=True))
  ref = timed(reference_attention)
  return dict(seq_len=length, kernel_over_reference=kernel / ref)


# ----------------------------------------------------------------------------------------------------------
# TPU part (a libtpu subprocess): compiled cost analysis of kernel / dense / splash.
# ----------------------------------------------------------------------------------------------------------

_TPU_SCRIPT = r"""
import json, sys, time, traceback
import numpy as np, jax, jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from bagel_jax.kernels import mask as mask_lib, ops, splash_baseline
from bagel_jax.kernels.reference import reference_attention

job = json.loads(sys.argv[1])
topo = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1", chip_config_name="megacore")
mesh = Mesh(np.array(topo.devices[:1]), ("x",))  # one chip; a mesh context tells Pallas the TPU generation
rep = NamedSharding(mesh, P())
out = {}
for name, path in job["rows"].items():
  data = np.load(path)
  meta = mask_lib.TokenMeta(*(data[f] for f in mask_lib.TokenMeta._fields))
  L = meta.document.shape[1]
  res = {}
  def compile_(fn, hq, hkv, *extra):
    dt = jnp.bfloat16
    args = [jax.ShapeDtypeStruct((1, L, hq, 128), dt, sharding=rep),
            jax.ShapeDtypeStruct((1, L, hkv, 128), dt, sharding=rep),
            jax.ShapeDtypeStruct((1, L, hkv, 128), dt, sharding=rep)] + list(extra)
    def step(q, k, v, *m):
      loss = lambda q, k, v: fn(q, k, v, *m).astype(jnp.float32).sum()
      return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)
    t0 = time.time()
    with jax.set_mesh(mesh):
      c = jax.jit(step).lower(*args).compile()
    cost = c.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = c.memory_analysis()
    return dict(flops=float(cost.get("flops", 0.0)), bytes=float(cost.get("bytes accessed", 0.0)),
                temp_bytes=int(mem.temp_size_in_bytes), compile_s=round(time.time() - t0, 1),
                custom_calls=c.as_text().count("tpu_custom_call"))
  meta_args = [jax.ShapeDtypeStruct((1, L), jnp.int32, sharding=rep)] * 4
  unpack = lambda m: (mask_lib.TokenMeta(*m), mask_lib.TokenMeta(*m))
  # the kernel with concrete metadata: host-side tables, exact cost estimates
  res["kernel"] = compile_(lambda q, k, v: ops.flash_attention(q, k, v, meta, meta, block_q=512, block_kv=512),
                           28, 4)
  # dense masked attention with traced metadata; beyond dense_max_len the 28-head program exceeds HBM, so one
  # head is compiled and scaled by 28 (every term is linear in heads), checked against 28 heads at 8,192
  dense = lambda q, k, v, *m: reference_attention(q, k, v, *unpack(m))
  for heads, scale, key in ((28, 1, "dense"), (1, 28, "dense_1head_x28")):
    if key == "dense" and L > job["dense_max_len"]:
      continue
    if key == "dense_1head_x28" and L < job["dense_scaled_min_len"]:
      continue
    try:
      r = compile_(dense, heads, 1 if heads == 1 else 4, *meta_args)
      out_r = dict(r, flops=r["flops"] * scale, bytes=r["bytes"] * scale, temp_bytes=r["temp_bytes"] * scale,
                   heads_compiled=heads, scaled_by=scale)
    except Exception as e:
      out_r = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
    res[key] = out_r
  try:
    res["splash"] = compile_(lambda q, k, v, *m: splash_baseline.splash_attention(q, k, v, *unpack(m)), 28, 4,
                             *meta_args)
  except Exception as e:
    res["splash"] = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
  out[name] = res
  print("ROW_DONE", name, json.dumps(res), flush=True)
print("TPU_RESULT " + json.dumps(out))
"""


def tpu_costs(rows, dense_max_len: int, dense_scaled_min_len: int):
  """rows: {name: TokenMeta numpy}. Runs one libtpu subprocess under the repository's libtpu file lock."""
  import fcntl  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  tmp = tempfile.mkdtemp(prefix="attn_bench_")
  paths = {}
  for name, meta in rows.items():
    paths[name] = os.path.join(tmp, f"{name}.npz")
    np.savez(paths[name], **meta._asdict())
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  job = dict(rows=paths, dense_max_len=dense_max_len, dense_scaled_min_len=dense_scaled_min_len)
  with open(LIBTPU_LOCK, "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    r = subprocess.run([sys.executable, "-c", _TPU_SCRIPT, json.dumps(job)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=7200, check=False)
  lines = [l for l in r.stdout.splitlines() if l.startswith("TPU_RESULT ")]
  if not lines:
    raise RuntimeError(f"TPU subprocess failed (rc {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
  return json.loads(lines[-1][len("TPU_RESULT "):])


# ----------------------------------------------------------------------------------------------------------
# Main.
# ----------------------------------------------------------------------------------------------------------

def _fmt(x, spec):
  return format(x, spec) if isinstance(x, (int, float)) else str(x)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--lengths", default="2048,8192,36864")
  ap.add_argument("--mixes", default="t2i,vqa,docs4")
  ap.add_argument("--no_tpu", action="store_true", help="skip the libtpu AOT cost analysis")
  ap.add_argument("--no_visits", action="store_true", help="skip the interpret-mode visit count")
  ap.add_argument("--dense_max_len", type=int, default=8192,
                  help="longest row compiled with all 28 heads for the dense reference")
  ap.add_argument("--out", default=os.path.join(HERE, "results", "attention_kernel.json"))
  args = ap.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  lengths = [int(x) for x in args.lengths.split(",")]
  mixes = args.mixes.split(",")

  rows, metas = [], {}
  for length in lengths:
    for mix in mixes:
      meta, desc = make_row(mix, length)
      name = f"{mix}_{length}"
      metas[name] = meta
      t0 = time.time()
      desc.update(tile_stats(meta))
      if not args.no_visits:
        desc["tiles_visited"] = visited_tiles(meta)
      desc["cpu_seconds_tables_and_visits"] = round(time.time() - t0, 1)
      desc["name"] = name
      rows.append(desc)
      print(f"{name}: {desc['documents']} docs, fill {desc['fill']:.1%}, tiles {desc['tiles_nonempty']}/"
            f"{desc['tiles_total']} non-empty, visited {desc.get('tiles_visited')}", flush=True)

  small = min(lengths)
  ratio = interpret_time_ratio(metas[f"{mixes[0]}_{small}"])

  tpu = {}
  if not args.no_tpu:
    tpu = tpu_costs(metas, args.dense_max_len, dense_scaled_min_len=min(max(lengths), 8192))
  for r in rows:
    t = tpu.get(r["name"], {})
    r["tpu"] = t
    elem = BLOCK * BLOCK * HQ * HEAD_DIM
    r["nonempty_tile_flops"] = float(KERNEL_FLOPS_PER_TILE_ELEM * elem * r["tiles_nonempty"])
    r["dense_flops_analytic"] = float(DENSE_FLOPS_PER_ELEM * HQ * HEAD_DIM * r["seq_len"] ** 2)
    k = t.get("kernel", {})
    d = t.get("dense") if "flops" in t.get("dense", {}) else t.get("dense_1head_x28", {})
    if "flops" in k:
      r["kernel_over_nonempty_tile_flops"] = k["flops"] / r["nonempty_tile_flops"]
    if "flops" in k and "flops" in (d or {}):
      r["dense_over_kernel_flops"] = d["flops"] / k["flops"]
      r["dense_over_kernel_bytes"] = d["bytes"] / k["bytes"]

  goals = dict(
      visited_equals_nonempty=all(r.get("tiles_visited") == r["tiles_nonempty"] for r in rows)
      if not args.no_visits else None,
      kernel_flops_within_5pct_of_nonempty_tiles=all(r.get("kernel_over_nonempty_tile_flops", 0) <= 1.05
                                                     for r in rows) if tpu else None,
      docs4_dense_over_kernel_flops={r["name"]: r.get("dense_over_kernel_flops") for r in rows
                                     if r["mix"] == "docs4"})
  result = dict(
      description=__doc__.split("\n\n")[0], host=dict(machine=platform.machine(), cpus=os.cpu_count()),
      heads=dict(q=HQ, kv=HKV, head_dim=HEAD_DIM), block=BLOCK, dtype_tpu="bfloat16",
      tpu_target="v5p (one chip of v5p:2x2x1), forward + backward", rows=rows,
      cpu_interpret_time_ratio=ratio, goals=goals)

  head = (f"{'row':14s} {'docs':>4s} {'fill':>6s} {'tiles':>6s} {'non-empty':>10s} {'full':>5s} {'visited':>8s} "
          f"{'kernel GF':>10s} {'k/ne-tile':>9s} {'dense GF':>10s} {'dense/k':>8s} {'splash GF':>10s} "
          f"{'splash temp GiB':>15s}")
  print("\n" + head + "\n" + "-" * len(head))
  for r in rows:
    t = r["tpu"]
    d = t.get("dense") if "flops" in t.get("dense", {}) else t.get("dense_1head_x28", {})
    s = t.get("splash", {})
    print(f"{r['name']:14s} {r['documents']:4d} {r['fill']:6.1%} {r['tiles_total']:6d} "
          f"{r['tiles_nonempty']:5d} ({r['tiles_nonempty'] / r['tiles_total']:3.0%}) {r['tiles_full']:5d} "
          f"{_fmt(r.get('tiles_visited', '-'), '8d'):>8s} "
          f"{_fmt(t.get('kernel', {}).get('flops', float('nan')) / 1e9, '10.1f')} "
          f"{_fmt(r.get('kernel_over_nonempty_tile_flops', float('nan')), '9.3f')} "
          f"{_fmt((d or {}).get('flops', float('nan')) / 1e9, '10.1f')} "
          f"{_fmt(r.get('dense_over_kernel_flops', float('nan')), '8.2f')} "
          f"{(_fmt(s['flops'] / 1e9, '10.1f') if 'flops' in s else 'error'):>10s} "
          f"{(_fmt(s['temp_bytes'] / 2 ** 30, '15.2f') if 'temp_bytes' in s else '-'):>15s}")
  print(f"\nCPU interpret-mode time / reference time (fwd+bwd, L={ratio['seq_len']}): "
        f"{ratio['kernel_over_reference']:.2f}x (interpreter overhead; not a TPU speed figure)")
  print(f"goals: {json.dumps(goals)}")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1, default=float)
  return result


if __name__ == "__main__":
  main()
