"""Data pipeline throughput and packing density on this CPU, against the tiny model's training speed.

  python benchmarks/data_pipeline.py [--batches 60] [--train_steps 5]

Measures, on the synthetic T2I:VQA:edit mix (weights 2:1:1, 32 px images):
- packing fill ratio (real tokens / row tokens) at L = 1,024 and L = 8,192 (goal >= 0.95), with the row's
  other capacities (ViT, latent, images, VAE images) sized so tokens are the budget that binds;
- pipeline tokens/s in-process (0 workers) and with 2 Grain worker processes (after worker start-up);
- the tiny model's training tokens/s (bagel_jax.models.bagel.loss_fn + jax.grad + optax AdamW, jitted) on batches
  from the same pipeline, and the ratio pipeline / training (goal >= 5x: the input never starves the step).
Also reports the full built-in synthetic mixture (all tasks, gen:und 4:1) at 0 workers.

Writes benchmarks/results/data_pipeline.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

MIX = dict(tasks=["t2i", "vqa", "edit"], gen_und=0.0, weights=dict(t2i=2.0, vqa=1.0, edit=1.0))


def spec_for(seq_len: int, batch_size: int):
  """Capacities from the mix's per-token composition (latent ~42%, ViT ~21%, one VAE image per ~38 tokens)
  with ~25% slack, so the token budget binds first."""
  from bagel_jax.data.examples import batch_spec_for  # pylint: disable=import-outside-toplevel
  from bagel_jax.models.config import tiny  # pylint: disable=import-outside-toplevel
  l = seq_len
  return batch_spec_for(tiny(), batch_size=batch_size, seq_len=l, vit_capacity=3 * l // 8, latent_capacity=9 * l // 16,
                        image_capacity=l // 14, pixel_images=l // 21, pixel_size=32)


def measure(dc, spec, batches: int, warmup: int = 2):
  from bagel_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  from bagel_jax.layout import LayoutConfig  # pylint: disable=import-outside-toplevel
  from bagel_jax.models.config import tiny  # pylint: disable=import-outside-toplevel
  t_start = time.perf_counter()
  it = pipeline.make_pipeline(dc, spec, LayoutConfig.from_model_config(tiny()), seed=0)
  for _ in range(warmup):
    next(it)
  startup = time.perf_counter() - t_start
  tok0, s0 = it.counters["used/tokens"], it.counters["samples_out"]
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  dt = time.perf_counter() - t0
  s = it.stats
  it.close()
  return dict(seq_len=spec.seq_len, batch_size=spec.batch_size, workers=dc.num_workers, batches=batches,
              tokens_per_s=(it.counters["used/tokens"] - tok0) / dt,
              samples_per_s=(it.counters["samples_out"] - s0) / dt,
              fill=s["fill"], fill_by_capacity={k[5:]: round(v, 4) for k, v in s.items() if k.startswith("fill/")},
              skipped=s["skipped"], startup_s=startup, line=it.stats_line())


def train_tokens_per_s(spec, steps: int):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from bagel_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  from bagel_jax.data.config import synthetic_mixture  # pylint: disable=import-outside-toplevel
  from bagel_jax.layout import LayoutConfig  # pylint: disable=import-outside-toplevel
  from bagel_jax.models import bagel  # pylint: disable=import-outside-toplevel
  from bagel_jax.models.config import tiny  # pylint: disable=import-outside-toplevel
  cfg = tiny()
  it = pipeline.make_pipeline(synthetic_mixture(**MIX, prefetch=0), spec, LayoutConfig.from_model_config(cfg), seed=1)
  batches = [{k: jnp.asarray(v) for k, v in next(it).items()} for _ in range(steps + 1)]
  it.close()
  params = bagel.init_params(cfg, jax.random.key(0))
  tx = optax.adamw(1e-3, b1=0.9, b2=0.95, eps=1e-15)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, batch, rng):
    (loss, _), grads = jax.value_and_grad(lambda p: bagel.loss_fn(p, batch, rng, cfg), has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  t0 = time.perf_counter()
  params, opt, loss = step(params, opt, batches[0], jax.random.key(0))
  jax.block_until_ready(loss)
  compile_s = time.perf_counter() - t0
  times, tokens = [], []
  for i, b in enumerate(batches[1:]):
    t0 = time.perf_counter()
    params, opt, loss = step(params, opt, b, jax.random.key(i + 1))
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - t0)
    tokens.append(int((np.asarray(b["modality"]) != 3).sum()))
  med = float(np.median(times))
  return dict(seq_len=spec.seq_len, batch_size=spec.batch_size, median_step_s=med,
              tokens_per_step=float(np.mean(tokens)), tokens_per_s=float(np.mean(tokens)) / med,
              first_step_incl_compile_s=compile_s, loss=float(loss))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batches", type=int, default=60, help="timed batches per throughput measurement")
  ap.add_argument("--train_steps", type=int, default=5)
  args = ap.parse_args()
  import jax  # pylint: disable=import-outside-toplevel
  from bagel_jax.data.config import synthetic_mixture  # pylint: disable=import-outside-toplevel

  fill = [measure(synthetic_mixture(**MIX, prefetch=0), spec_for(1024, 4), 40),
          measure(synthetic_mixture(**MIX, prefetch=0), spec_for(8192, 1), 10)]
  spec = spec_for(1024, 4)
  tput = [measure(synthetic_mixture(**MIX, num_workers=w, prefetch=2), spec, args.batches, warmup=4)
          for w in (0, 2)]
  full_mix = measure(synthetic_mixture(prefetch=2), spec, args.batches)
  train = train_tokens_per_s(spec, args.train_steps)
  best = max(t["tokens_per_s"] for t in tput)
  result = dict(
      host=dict(machine=platform.machine(), cpus=os.cpu_count(), python=platform.python_version(),
                jax=jax.__version__),
      mix="synthetic T2I:VQA:edit = 2:1:1, 32 px (tiny model: 16 latent / 16 ViT tokens per image)",
      fill=fill, throughput=tput, full_synthetic_mix_0_workers=full_mix, tiny_train_step=train,
      pipeline_over_train={str(t["workers"]): t["tokens_per_s"] / train["tokens_per_s"] for t in tput},
      goals=dict(fill_min=0.95, pipeline_over_train_min=5.0),
      goals_met=dict(fill=all(f["fill"] >= 0.95 for f in fill),
                     pipeline_over_train=best / train["tokens_per_s"] >= 5.0))
  print(f"{'measurement':34s} {'L':>6s} {'B':>3s} {'workers':>7s} {'fill':>7s} {'tokens/s':>10s} {'samples/s':>10s}")
  for f in fill:
    print(f"{'packing fill (T2I:VQA:edit)':34s} {f['seq_len']:6d} {f['batch_size']:3d} {f['workers']:7d} "
          f"{f['fill']:7.4f} {f['tokens_per_s']:10,.0f} {f['samples_per_s']:10,.0f}")
  for t in tput:
    print(f"{'pipeline throughput':34s} {t['seq_len']:6d} {t['batch_size']:3d} {t['workers']:7d} "
          f"{t['fill']:7.4f} {t['tokens_per_s']:10,.0f} {t['samples_per_s']:10,.0f}")
  print(f"{'pipeline, full synthetic mix':34s} {full_mix['seq_len']:6d} {full_mix['batch_size']:3d} "
        f"{full_mix['workers']:7d} {full_mix['fill']:7.4f} {full_mix['tokens_per_s']:10,.0f} "
        f"{full_mix['samples_per_s']:10,.0f}")
  print(f"{'tiny model train step':34s} {train['seq_len']:6d} {train['batch_size']:3d} {'':7s} {'':7s} "
        f"{train['tokens_per_s']:10,.0f}")
  for w, r in result["pipeline_over_train"].items():
    print(f"pipeline / training tokens/s with {w} workers: {r:.1f}x (goal >= 5x)")
  print("goals met:", result["goals_met"])
  os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
  with open(os.path.join(HERE, "results", "data_pipeline.json"), "w") as f:
    json.dump(result, f, indent=1, default=float)


if __name__ == "__main__":
  main()
