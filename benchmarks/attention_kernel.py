"""Block-sparse Pallas attention vs dense masked attention, on rows the real packer makes from the stage mixes.

  python benchmarks/attention_kernel.py                 # PT/CT/SFT rows at L = 2,048, 8,192, 36,864 + TPU part
  python benchmarks/attention_kernel.py --no_tpu        # CPU part only (no libtpu)
  python benchmarks/attention_kernel.py --lengths 2048 --rows 4   # a quick look

Rows (BAGEL-7B layout: SigLIP 14-px patches, 16-px latent tokens) come from `bagel_jax.aot.rows`: samples of
each Table-3 stage mix (pretrain, continued, sft) with random sizes, packed by `data.pipeline.PackBatches`
(best fit) into rows whose only capacity is the row length, so document boundaries fall anywhere. Two
extreme rows per length as well: `docs4_aligned` (four documents on the 512-token tile grid: the old
favourable row) and `t2i_fill` (one prompt + one noisy image filling ~90% of the row). Heads of BAGEL-7B: 28
query heads, 4 KV heads, head_dim 128.

Per row, counted (no timing): allowed (q, k) pairs of the mask; the non-empty tiles of the dense mask tiled
the slow way (`block_tables.dense_tile_classes`, the oracle) at 128-, 256- and 512-token blocks; the kernel's
forward + backward FLOPs, (4 + 6 + 8) x block^2 x heads x head_dim per non-empty tile (QK^T and PV forward,
the dQ kernel's recompute + dP + dQ, the dK/dV kernel's recompute + dV + dP + dK); dense masked attention's
12 x heads x head_dim x L^2 (XLA autodiff, no recompute). Reported with their spread over the rows.

Checks that are not true by construction: the kernel's own count of visited tiles (interpret mode on CPU,
`ops.flash_attention_visits`) equals the oracle's non-empty tiles; the compiled TPU cost analysis of dense
attention (AOT for one v5p chip through libtpu) equals the analytic dense count; the kernel compiles through
Mosaic at the block size `ops.block_size` picks for each length.

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

os.environ.setdefault("JAX_PLATFORMS", "cpu")
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from bagel_jax.aot import libtpu, rows as rows_lib  # pylint: disable=wrong-import-position
from bagel_jax.batch import BatchSpec  # pylint: disable=wrong-import-position
from bagel_jax.data.sequence import LayoutConfig, Text, VaeImage, VitImage, assemble_batch, layout_sample  # pylint: disable=wrong-import-position
from bagel_jax.kernels import block_tables as bt, mask as mask_lib, ops  # pylint: disable=wrong-import-position
from bagel_jax.models import config as config_lib  # pylint: disable=wrong-import-position
from bagel_jax.train import flops as flops_lib  # pylint: disable=wrong-import-position
from experiments.bagel_7b import continued, pretrain, sft  # pylint: disable=wrong-import-position

HQ, HKV, HEAD_DIM = 28, 4, 128
BLOCKS = (128, 256, 512)
KERNEL_FLOPS_PER_TILE_ELEM = 4 + 6 + 8
DENSE_FLOPS_PER_ELEM = 4 + 8
STAGES = dict(pretrain=pretrain, continued=continued, sft=sft)


# ----------------------------------------------------------------------------------------------------------
# Rows.
# ----------------------------------------------------------------------------------------------------------

def _spec(cfg, seq_len: int, rows: int = 1) -> BatchSpec:
  """Rows bounded by their length only (the benchmark is about the mask, not the recipe's capacities)."""
  return BatchSpec(batch_size=rows, seq_len=seq_len, vit_capacity=seq_len, latent_capacity=seq_len,
                   image_capacity=seq_len, vit_patch_dim=cfg.vit.patch_dim, latent_dim=cfg.latent_channels,
                   latent_downsample=cfg.latent_downsample)


def _meta(batch):
  meta = mask_lib.TokenMeta.from_row(batch["document"], batch["split"], batch["split_mode"])
  return mask_lib.TokenMeta(*(np.asarray(a, np.int32) for a in meta))


def stage_rows(cfg, stage: str, seq_len: int, n: int, seed: int = 0):
  """`n` rows of the stage's mix from the real packer (steady state: the second packed batch)."""
  mix = rows_lib.StageMix.from_config(STAGES[stage].get_config("variant=mot,topology=v5p-256"))
  batch = rows_lib.packed_rows(cfg, mix, _spec(cfg, seq_len), rows=n, seed=seed, skip_batches=1)
  return _meta(batch), batch


def extreme_rows(cfg, seq_len: int):
  """docs4_aligned: four VQA-shaped documents of L/4 tokens (boundaries on the tile grid); t2i_fill: a prompt
  and one noisy image of ~90% of the row."""
  layout = LayoutConfig.from_model_config(cfg)
  spec = _spec(cfg, seq_len)
  vit = lambda side: VitImage(np.zeros((side * side, cfg.vit.patch_dim), np.float32), (side, side))
  quarter, side = seq_len // 4, max(1, int((seq_len // 8) ** 0.5))
  docs = []
  for _ in range(4):
    probe = len(layout_sample([vit(side), Text([5] * 32), Text([5], loss=True)], layout))
    docs.append(layout_sample([vit(side), Text([5] * 32), Text([5] * (1 + quarter - probe), loss=True)], layout))
  lat = min(cfg.max_latent_size, int((0.9 * seq_len) ** 0.5))
  fill = layout_sample([Text([5] * 64), VaeImage((lat, lat), latents=np.zeros((lat * lat, cfg.latent_channels),
                                                                               np.float32), noisy=True)], layout)
  return {"docs4_aligned": _meta(assemble_batch([docs], spec, layout)),
          "t2i_fill": _meta(assemble_batch([[fill]], spec, layout))}


# ----------------------------------------------------------------------------------------------------------
# Counts.
# ----------------------------------------------------------------------------------------------------------

def row_counts(meta) -> dict:
  """Per row of [1, L] metadata: pairs, non-empty oracle tiles per block size, kernel and dense FLOPs."""
  length = meta.document.shape[1]
  pairs = int(flops_lib.allowed_pairs_per_row(meta.document, meta.split, meta.mode).sum())
  out = dict(allowed_pairs=pairs, mask_density=pairs / float(length) ** 2, fill=float((meta.document > 0).mean()),
             documents=int(len(set(meta.document[0].tolist()) - {0})),
             dense_flops=float(DENSE_FLOPS_PER_ELEM * HQ * HEAD_DIM * length ** 2), blocks={})
  for blk in BLOCKS:
    if length % blk:
      continue
    tiles = bt.dense_tile_classes(meta, meta, blk, blk)
    nonempty = int((tiles != bt.EMPTY).sum())
    kflops = float(KERNEL_FLOPS_PER_TILE_ELEM * blk * blk * HQ * HEAD_DIM * nonempty)
    out["blocks"][blk] = dict(tiles=int(tiles.size), nonempty=nonempty, full=int((tiles == bt.FULL_TILE).sum()),
                              kernel_flops=kflops, dense_over_kernel=out["dense_flops"] / kflops,
                              kernel_over_pairs=kflops / (KERNEL_FLOPS_PER_TILE_ELEM * HQ * HEAD_DIM * pairs))
  return out


def visited_tiles(meta, block: int) -> int:
  """The kernel's own count of executed tiles (interpret mode; one head suffices: the count is per (batch,
  KV head, q-block) and the same for every head)."""
  length = meta.document.shape[1]
  q = jnp.zeros((1, length, 1, HEAD_DIM), jnp.float32)
  _, visits, _ = ops.flash_attention_visits(q, q, q, meta, meta, block_q=block, block_kv=block)
  return int(np.asarray(jax.device_get(visits)).sum())


# ----------------------------------------------------------------------------------------------------------
# TPU part (a libtpu subprocess): the kernel compiles at the chosen block; dense costs against the analytic count.
# ----------------------------------------------------------------------------------------------------------

_TPU_SCRIPT = r"""
import json, sys, time
import numpy as np, jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from bagel_jax.aot import libtpu
from bagel_jax.kernels import mask as mask_lib, ops
from bagel_jax.kernels.reference import reference_attention

job = json.loads(sys.argv[1])
mesh = Mesh(np.array(libtpu.topology_devices("v5p:2x2x1")[:1]), ("x",))  # one chip; tells Pallas the generation
rep = NamedSharding(mesh, P())
out = {}
for name, (path, block) in job["rows"].items():
  data = np.load(path)
  meta = mask_lib.TokenMeta(*(data[f] for f in mask_lib.TokenMeta._fields))
  L = meta.document.shape[1]
  def compile_(fn, hq, hkv, *extra):
    args = [jax.ShapeDtypeStruct((1, L, hq, 128), jnp.bfloat16, sharding=rep),
            jax.ShapeDtypeStruct((1, L, hkv, 128), jnp.bfloat16, sharding=rep),
            jax.ShapeDtypeStruct((1, L, hkv, 128), jnp.bfloat16, sharding=rep)] + list(extra)
    def step(q, k, v, *m):
      return jax.value_and_grad(lambda q, k, v: fn(q, k, v, *m).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)
    t0 = time.time()
    with jax.set_mesh(mesh):
      c = jax.jit(step).lower(*args).compile()
    cost = c.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return dict(flops=float(cost.get("flops", 0.0)), bytes=float(cost.get("bytes accessed", 0.0)),
                temp_bytes=int(c.memory_analysis().temp_size_in_bytes), compile_s=round(time.time() - t0, 1),
                kernels=sorted({k for k in ("bagel_flash_fwd", "bagel_flash_dq", "bagel_flash_dkv") if k in c.as_text()}))
  res = dict(block=block)
  res["kernel"] = compile_(lambda q, k, v: ops.flash_attention(q, k, v, meta, meta, block_q=block, block_kv=block),
                           28, 4)
  if L <= job["dense_max_len"]:
    metas = [jax.ShapeDtypeStruct((1, L), jnp.int32, sharding=rep)] * 4
    res["dense"] = compile_(lambda q, k, v, *m: reference_attention(q, k, v, mask_lib.TokenMeta(*m),
                                                                    mask_lib.TokenMeta(*m)), 28, 4, *metas)
  out[name] = res
  print("ROW_DONE", name, json.dumps(res), flush=True)
print("TPU_RESULT " + json.dumps(out))
"""


def tpu_costs(rows, dense_max_len: int):
  """rows: {name: (TokenMeta numpy, block)}. One libtpu subprocess under the repository's libtpu lock."""
  tmp = tempfile.mkdtemp(prefix="attn_bench_")
  job = dict(rows={}, dense_max_len=dense_max_len)
  for name, (meta, block) in rows.items():
    path = os.path.join(tmp, f"{name}.npz")
    np.savez(path, **meta._asdict())
    job["rows"][name] = (path, block)
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  with libtpu.libtpu_lock():
    r = subprocess.run([sys.executable, "-c", _TPU_SCRIPT, json.dumps(job)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=7200, check=False)
  lines = [l for l in r.stdout.splitlines() if l.startswith("TPU_RESULT ")]
  if not lines:
    raise RuntimeError(f"TPU subprocess failed (rc {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
  return json.loads(lines[-1][len("TPU_RESULT "):])


# ----------------------------------------------------------------------------------------------------------
# Main.
# ----------------------------------------------------------------------------------------------------------

def summarise(counts, length: int) -> dict:
  """Spread over a group's rows, per block size, and the block `ops.block_size` uses at this length."""
  out = dict(rows=len(counts), fill=rows_lib.spread([c["fill"] for c in counts]),
             documents=rows_lib.spread([c["documents"] for c in counts]),
             mask_density=rows_lib.spread([c["mask_density"] for c in counts]), blocks={})
  for blk in BLOCKS:
    if length % blk:
      continue
    b = [c["blocks"][blk] for c in counts]
    out["blocks"][blk] = dict(dense_over_kernel=rows_lib.spread([x["dense_over_kernel"] for x in b]),
                              kernel_over_pairs=rows_lib.spread([x["kernel_over_pairs"] for x in b]),
                              nonempty_fraction=rows_lib.spread([x["nonempty"] / x["tiles"] for x in b]))
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--lengths", default="2048,8192,36864")
  ap.add_argument("--stages", default="pretrain,continued,sft")
  ap.add_argument("--rows", type=int, default=16, help="packed rows per (stage, length) up to 8,192 tokens")
  ap.add_argument("--rows_long", type=int, default=8, help="packed rows per (stage, length) above 8,192 tokens")
  ap.add_argument("--no_tpu", action="store_true", help="skip the libtpu AOT compiles")
  ap.add_argument("--dense_max_len", type=int, default=8192, help="longest row compiled for dense attention")
  ap.add_argument("--out", default=os.path.join(HERE, "results", "attention_kernel.json"))
  args = ap.parse_args(argv)
  cfg = config_lib.bagel_7b()
  lengths = [int(x) for x in args.lengths.split(",")]
  groups, checks, tpu_rows = {}, [], {}
  t0 = time.time()
  for length in lengths:
    block = ops.block_size(length)
    n = args.rows if length <= 8192 else args.rows_long
    for stage in args.stages.split(","):
      metas, _ = stage_rows(cfg, stage, length, n)
      counts = [row_counts(mask_lib.TokenMeta(*(a[i:i + 1] for a in metas))) for i in range(n)]
      name = f"{stage}_{length}"
      groups[name] = dict(stage=stage, seq_len=length, block_used=block, **summarise(counts, length))
      # the median row (by dense/kernel at the used block) is checked: visits and a TPU compile
      ratios = [c["blocks"][block]["dense_over_kernel"] for c in counts]
      med = int(np.argsort(ratios)[len(ratios) // 2])
      one = mask_lib.TokenMeta(*(a[med:med + 1] for a in metas))
      tpu_rows[name] = (one, block)
      if length <= 8192:
        checks.append(dict(row=f"{name}[{med}]", block=block, visited=visited_tiles(one, block),
                           nonempty=counts[med]["blocks"][block]["nonempty"]))
      jax.clear_caches()  # interpret-mode and mask programs of every row length otherwise stay resident
      g = groups[name]["blocks"][block]["dense_over_kernel"]
      print(f"{name:18s} fill {groups[name]['fill']['median']:.1%} docs {groups[name]['documents']['median']:.0f} "
            f"dense/kernel median {g['median']:.2f} (p10 {g['p10']:.2f}, p90 {g['p90']:.2f}) at block {block}",
            flush=True)
    for name, meta in extreme_rows(cfg, length).items():
      c = row_counts(meta)
      groups[f"{name}_{length}"] = dict(stage=name, seq_len=length, block_used=block, rows=1,
                                        fill=c["fill"], documents=c["documents"], mask_density=c["mask_density"],
                                        blocks={b: dict(dense_over_kernel=v["dense_over_kernel"],
                                                        kernel_over_pairs=v["kernel_over_pairs"],
                                                        nonempty_fraction=v["nonempty"] / v["tiles"])
                                                for b, v in c["blocks"].items()})
  tpu = {} if args.no_tpu else tpu_costs(tpu_rows, args.dense_max_len)
  for name, t in tpu.items():
    length = groups[name]["seq_len"]
    if "dense" in t:
      t["dense_over_analytic"] = t["dense"]["flops"] / (DENSE_FLOPS_PER_ELEM * HQ * HEAD_DIM * length ** 2)
    groups[name]["tpu_median_row"] = t
  result = dict(
      description=__doc__.split("\n\n")[0], host=dict(machine=platform.machine(), cpus=os.cpu_count()),
      heads=dict(q=HQ, kv=HKV, head_dim=HEAD_DIM), blocks=list(BLOCKS),
      block_rule={length: ops.block_size(length) for length in lengths},
      rows_per_group=dict(up_to_8192=args.rows, longer=args.rows_long),
      row_model=rows_lib.__doc__, groups=groups, visit_checks=checks,
      goals=dict(visited_equals_nonempty=all(c["visited"] == c["nonempty"] for c in checks),
                 dense_compiled_equals_analytic={n: t.get("dense_over_analytic") for n, t in tpu.items()
                                                 if "dense_over_analytic" in t},
                 kernel_compiles_at_chosen_block={n: t["kernel"]["kernels"] for n, t in tpu.items()}),
      seconds=round(time.time() - t0, 1))
  print(f"\n{'group':22s} {'fill':>6s} {'docs':>5s} {'density':>8s} " +
        " ".join(f"{'d/k @' + str(b):>22s}" for b in BLOCKS) + f" {'used':>5s}")
  for name, g in groups.items():
    cells = []
    for b in BLOCKS:
      v = g["blocks"].get(b, {}).get("dense_over_kernel")
      cells.append("-" if v is None else (f"{v['median']:.2f} ({v['p10']:.2f}-{v['p90']:.2f})"
                                          if isinstance(v, dict) else f"{v:.2f}"))
    med = lambda x: x["median"] if isinstance(x, dict) else x
    print(f"{name:22s} {med(g['fill']):6.1%} {med(g['documents']):5.0f} {med(g['mask_density']):8.3f} " +
          " ".join(f"{c:>22s}" for c in cells) + f" {g['block_used']:5d}")
  print(f"goals: {json.dumps(result['goals'])}")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1, default=float)
  return result


if __name__ == "__main__":
  main()
