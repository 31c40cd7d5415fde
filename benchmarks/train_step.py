"""Training-step throughput on this CPU.

1. `official_small`: the model and packed row of the side-by-side with the official PyTorch code (CPU-speed
   issue): 51,916,608 trainable parameters (MoT), one 2,048-token row of 4 t2i + 4 VQA + 1 text samples,
   fp32, precomputed latents, forward + loss + backward (and the full step with AdamW beside it). Prints
   tok/s, compile time, forward vs backward, the attention and MLP shares, and the roofline of this machine
   (model FLOPs / a fp32 matmul rate measured in the same run).
2. `small`: the `small` preset (L=2,048), dense vs MoT, and the MFU the same step would reach on a TPU
   topology according to the AOT roofline (bagel_jax/aot/).

  python benchmarks/train_step.py [--only official_small|small] [--steps 10] [--layouts unrolled,scan]
                                  [--topology v5p:2x2x1] [--no_aot]

Writes benchmarks/results/train_step.json (sections not run are kept from the existing file). Ratios are
measured in one run; absolute CPU times depend on the machine and its load (recorded with the results).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)


# The official PyTorch code on this model and row, measured on this machine class in windows adjacent to ours
# (a harness outside the repository, never committed: it imports the official checkout with our CPU shims
# for flash-attn; how, and what differs, is recorded in the file).
OFFICIAL_RESULTS = os.path.join(HERE, "results", "official_small_torch.json")


def official_reference() -> dict:
  """The official code's fp32 forward+loss+backward and full-step rows (median of run medians)."""
  with open(OFFICIAL_RESULTS) as f:
    d = json.load(f)
  rows = d["rows"]["fp32"]["summary"]
  return dict(tokens_per_s=rows["forward_loss_backward"]["tokens_per_s_at_median"],
              train_step_tokens_per_s=rows["train_step_adamw"]["tokens_per_s_at_median"],
              bf16_autocast_tokens_per_s=d["rows"]["bf16_autocast"]["summary"]["forward_loss_backward"][
                  "tokens_per_s_at_median"],
              source=(f"measured: official BAGEL {d['official_commit'][:7]} (torch {d['torch']}, {d['threads']} "
                      f"threads, fp32) on {d['machine']['lscpu_model_name']} on {d['date']} in quiet windows "
                      f"adjacent to ours; {OFFICIAL_RESULTS}"))


def official_small_row(c, seed: int = 0):
  """The comparison row: 4 x [text 42 + noised 16x16 latent image 258] + 4 x [8x8 ViT image 66 + prompt 32 +
  answer 82 with CE] + [text 128 with CE] = 2,048 tokens, 451 CE and 1,024 MSE tokens; every capacity exact."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from bagel_jax.data import examples  # pylint: disable=import-outside-toplevel
  from bagel_jax.data.sequence import Text, VaeImage, VitImage, assemble_batch, layout_sample  # pylint: disable=import-outside-toplevel
  from bagel_jax.layout import LayoutConfig  # pylint: disable=import-outside-toplevel
  r = np.random.default_rng(seed)
  ids = lambda n: r.integers(5, c.llm.vocab_size, n).tolist()
  samples = [[Text(ids(40)), VaeImage((16, 16), latents=r.normal(size=(256, c.latent_channels)).astype(np.float32),
                                      noisy=True, t_logit=float(r.normal()))] for _ in range(4)]
  samples += [[VitImage(r.uniform(-1, 1, (64, c.vit.patch_dim)).astype(np.float32), (8, 8)), Text(ids(30)),
               Text(ids(80), loss=True)] for _ in range(4)]
  samples.append([Text(ids(126), loss=True)])
  layout = LayoutConfig.from_model_config(c)
  spec = examples.batch_spec_for(c, batch_size=1, seq_len=2048, vit_capacity=256, latent_capacity=1024,
                                 image_capacity=8, und_capacity=1024, ce_capacity=451)
  return assemble_batch([[layout_sample(x, layout) for x in samples]], spec, layout), spec


def _median_time(fn, args, steps):
  import jax  # pylint: disable=import-outside-toplevel
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return sorted(times)[len(times) // 2]


def _compile_and_time(fn, args, steps, warmup=2):
  import jax  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  for _ in range(warmup):
    jax.block_until_ready(compiled(*args))
  return compiled, compile_s, _median_time(compiled, args, steps)


def matmul_rate(steps: int = 10) -> float:
  """fp32 GFLOP/s of this machine's XLA on the step's largest matmul shape ([1024, 512] x [512, 1408])."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  a, b = jnp.ones((1024, 512), jnp.float32), jnp.ones((512, 1408), jnp.float32)
  _, _, t = _compile_and_time(lambda a, b: a @ b, (a, b), steps * 5)
  return 2 * 1024 * 512 * 1408 / t / 1e9


LAYOUTS = {  # how the 8 decoder layers are laid out in the program (BagelConfig knobs)
    "unrolled": dict(scan_layers=False),            # one module per layer: fastest on CPU
    "scan_unrolled": dict(scan_layers=True, scan_unroll=8),  # stacked parameters (the TPU layout), no loop
    "scan": dict(scan_layers=True, scan_unroll=1),  # the TPU default: one loop over stacked layers
}


def official_small(steps: int, impl: str = "auto", layout: str = "unrolled", components: bool = True):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from bagel_jax.kernels import attention as attention_lib  # pylint: disable=import-outside-toplevel
  from bagel_jax.kernels import mask as mask_lib  # pylint: disable=import-outside-toplevel
  from bagel_jax.models import bagel as bagel_lib, config as config_lib  # pylint: disable=import-outside-toplevel
  from bagel_jax.train import flops as flops_lib  # pylint: disable=import-outside-toplevel

  c = config_lib.official_small("mot", attention_impl=impl, **LAYOUTS[layout])
  batch_np, _ = official_small_row(c)
  batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
  params = bagel_lib.init_params(c, jax.random.key(0))
  trainable = {k: v for k, v in params.items() if k != "vae"}
  frozen_vae = params["vae"]
  rng = jax.random.key(1)
  tokens = int((batch_np["modality"] != 3).sum())

  def loss(p, b, r):
    return bagel_lib.loss_fn(dict(p, vae=frozen_vae), b, r, c)[0]

  tx = optax.adamw(1e-4)
  opt_state = tx.init(trainable)

  def full_step(p, o, b, r):
    g = jax.grad(loss)(p, b, r)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o

  _, fwd_compile, fwd_s = _compile_and_time(loss, (trainable, batch, rng), steps)
  _, grad_compile, grad_s = _compile_and_time(jax.value_and_grad(loss), (trainable, batch, rng), steps)
  _, step_compile, step_s = _compile_and_time(full_step, (trainable, opt_state, batch, rng), steps)

  attn, mlp_s = ({}, None)
  if components:
    # Components at the step's shapes, timed alone: the 8 layers' attention (fwd+bwd) with this impl and with
    # the dense reference, and the 8 layers' MLP (und and gen buffers of 1,024 tokens each).
    lc = c.llm
    meta = mask_lib.TokenMeta.from_row(batch["document"], batch["split"], batch["split_mode"])
    kq = jax.random.split(jax.random.key(2), 4)
    q = jax.random.normal(kq[0], (1, 2048, lc.num_heads, lc.head_dim))
    k = jax.random.normal(kq[1], (1, 2048, lc.num_kv_heads, lc.head_dim))
    v = jax.random.normal(kq[2], (1, 2048, lc.num_kv_heads, lc.head_dim))

    def attn_loss(which):
      return lambda q, k, v: jnp.sum(attention_lib.attention(q, k, v, meta, meta, impl=which) ** 2)

    attn = {w: lc.num_layers * _compile_and_time(jax.grad(attn_loss(w), (0, 1, 2)), (q, k, v),
                                                  steps if w != "reference" else 3)[2]
            for w in (impl, "reference")}
    x = jax.random.normal(kq[3], (1024, lc.hidden_size))
    w_gu = jax.random.normal(kq[0], (2, lc.hidden_size, lc.intermediate_size)) * 0.02
    w_d = jax.random.normal(kq[1], (lc.intermediate_size, lc.hidden_size)) * 0.02

    def mlp_loss(w_gu, w_d, x):
      return jnp.sum((jax.nn.silu(x @ w_gu[0]) * (x @ w_gu[1])) @ w_d)

    mlp_s = 2 * lc.num_layers * _compile_and_time(jax.grad(mlp_loss, (0, 1, 2)), (w_gu, w_d, x), steps)[2]

  off = official_reference()
  fl = flops_lib.step_flops(batch_np, c)
  rate = matmul_rate()
  roofline_s = fl["total"] / (rate * 1e9)
  return dict(
      model="official_small (MoT)", attention_impl=impl, dtype="float32",
      trainable_params=bagel_lib.count_params(trainable), tokens_per_step=tokens,
      ce_tokens=int((batch_np["ce_weight"] > 0).sum()), mse_tokens=int((batch_np["mse_weight"] > 0).sum()),
      compile_s=dict(forward=fwd_compile, forward_backward=grad_compile, train_step=step_compile),
      forward_s=fwd_s, forward_backward_s=grad_s, train_step_s=step_s,
      backward_over_forward=(grad_s - fwd_s) / fwd_s,
      tokens_per_s=tokens / grad_s, train_step_tokens_per_s=tokens / step_s,
      attention_fwd_bwd_s=attn or None, mlp_fwd_bwd_s=mlp_s,
      share_of_forward_backward=dict(attention=attn[impl] / grad_s, mlp=mlp_s / grad_s) if attn else None,
      model_flops=fl, fp32_matmul_gflops=rate, roofline_step_s=roofline_s,
      roofline_tokens_per_s=tokens / roofline_s, achieved_fraction_of_roofline=roofline_s / grad_s,
      layout=layout, scan_layers=c.scan_layers, scan_unroll=c.scan_unroll,
      official=off, speedup_over_official=tokens / grad_s / off["tokens_per_s"],
      train_step_speedup_over_official=tokens / step_s / off["train_step_tokens_per_s"],
      load_average_during_run=os.getloadavg())


def print_official(r):
  print(f"official_small MoT, {r['trainable_params']:,d} trainable params, {r['tokens_per_step']} tokens "
        f"({r['ce_tokens']} CE, {r['mse_tokens']} MSE), attention_impl={r['attention_impl']}, layers {r['layout']}")
  print(f"{'':28s} {'seconds':>9s} {'tok/s':>8s} {'compile s':>10s}")
  for name, key, ckey in (("forward + loss", "forward_s", "forward"),
                          ("forward + loss + backward", "forward_backward_s", "forward_backward"),
                          ("train step (with AdamW)", "train_step_s", "train_step")):
    print(f"{name:28s} {r[key]:9.3f} {r['tokens_per_step'] / r[key]:8.0f} {r['compile_s'][ckey]:10.1f}")
  a = r["attention_fwd_bwd_s"]
  print(f"backward / forward: {r['backward_over_forward']:.2f}")
  if a:
    print(f"attention fwd+bwd (8 layers): {a[r['attention_impl']]:.3f} s "
          f"({r['share_of_forward_backward']['attention']:.0%}), dense reference {a['reference']:.3f} s; MLP "
          f"fwd+bwd (8 layers, 2 experts): {r['mlp_fwd_bwd_s']:.3f} s ({r['share_of_forward_backward']['mlp']:.0%})")
  print(f"model FLOPs {r['model_flops']['total'] / 1e9:.0f} G/step; fp32 matmul {r['fp32_matmul_gflops']:.0f} GFLOP/s "
        f"-> roofline {r['roofline_tokens_per_s']:.0f} tok/s; achieved {r['achieved_fraction_of_roofline']:.0%}")
  o = r["official"]
  print(f"official PyTorch code (measured, fp32): {o['tokens_per_s']:.0f} tok/s fwd+bwd, "
        f"{o['train_step_tokens_per_s']:.0f} with AdamW -> {r['speedup_over_official']:.2f}x / "
        f"{r['train_step_speedup_over_official']:.2f}x")


def small_config(variant: str, seq: int = 2048):
  from experiments.tiny import random_smoke  # pylint: disable=import-outside-toplevel
  c = random_smoke.get_config(f"variant={variant},batch=1,seq={seq},steps=10")
  c.model.preset = "small"
  # NU + NL = 1.11 L as in the 7B recipe (experiments/common.seven_b_batch): MoT experts then run their
  # matmuls over 1.11x the row's tokens, not the 1.5x of an und buffer as long as the row.
  # image_capacity L/8: the random samples carry images of <= 4x4 tokens (~19 tokens a sample), so a cap of 64
  # images ended the rows at 42% of their tokens.
  c.batch.update(dict(vit_capacity=seq // 4, latent_capacity=seq // 2, image_capacity=seq // 8,
                      und_capacity=seq - seq // 2 + seq // 9))
  c.train.tensorboard = False
  return c


def cpu_throughput(variant: str, steps: int):
  import jax  # pylint: disable=import-outside-toplevel
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from bagel_jax.data import examples  # pylint: disable=import-outside-toplevel
  from bagel_jax.train import inputs, trainer  # pylint: disable=import-outside-toplevel
  c = small_config(variant)
  s = trainer.make_setup(c)
  state = trainer.create_state(s)
  # A dense row: every sample kind, images up to 4x4 tokens, until 2,048 tokens are nearly full.
  batch_np = examples.random_batch(s.model_cfg, s.spec, seed=0)
  tokens = int((batch_np["modality"] != 3).sum())
  batch = inputs.to_global(batch_np, s.mesh)
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    t0 = time.time()
    state, m = s.step_fn(state, batch)
    jax.block_until_ready(m)
    compile_s = time.time() - t0
    times = []
    for _ in range(steps):
      t0 = time.time()
      state, m = s.step_fn(state, batch)
      jax.block_until_ready(m)
      times.append(time.time() - t0)
  step = sorted(times)[len(times) // 2]
  return dict(variant=variant, tokens_per_step=tokens, fill=tokens / s.spec.seq_len, median_step_s=step,
              tokens_per_s=tokens / step, first_step_incl_compile_s=compile_s, loss=float(m["loss"]),
              params=sum(int(x.size) for x in jax.tree.leaves(state.params)))


def tpu_estimate(variant: str, topology: str):
  """Run in a subprocess: libtpu must not be loaded by the CPU benchmark process (and takes the shared
  libtpu lock, so it queues behind any other AOT job). One row per chip: per-chip work equals the CPU row's."""
  code = (f"import json,sys; sys.path.insert(0,{REPO!r}); from benchmarks.train_step import small_config; "
          f"from bagel_jax.aot import libtpu, training; from bagel_jax.parallel import topology; "
          f"c=small_config({variant!r}); c.model.dtype='bfloat16'; c.batch.batch_size=topology.chip_count({topology!r})\n"
          f"with libtpu.libtpu_lock(): r=training.analyse(c,{topology!r})\nprint(json.dumps(dict(memory=r['memory_per_chip'], "
          f"roofline=r['roofline'], compiled=dict(recompute_ratio=r['compiled']['recompute_ratio']), "
          f"model_flops=r['model_flops_per_step'], device_kind=r['device_kind'])))")
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  env["PYTHONPATH"] = REPO
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=3000)
  if r.returncode:
    return dict(error=r.stderr[-2000:])
  return json.loads(r.stdout.strip().splitlines()[-1])


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--only", choices=("official_small", "small"), default=None, help="run one section")
  ap.add_argument("--impl", default="auto", help="attention_impl of the official_small rows")
  ap.add_argument("--layouts", default="unrolled,scan_unrolled,scan",
                  help=f"layer layouts of the official_small rows, the first also timed by component: {list(LAYOUTS)}")
  ap.add_argument("--topology", default="v5p:2x2x1")
  ap.add_argument("--no_aot", action="store_true")
  ap.add_argument("--aot_only", action="store_true", help="keep the CPU rows of the existing results file")
  args = ap.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  path = os.path.join(HERE, "results", "train_step.json")
  old = {}
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
  if args.only != "small" and not args.aot_only:
    rows = {}
    for i, layout in enumerate(args.layouts.split(",")):
      rows[layout] = official_small(args.steps, args.impl, layout, components=i == 0)
      print_official(rows[layout])
    old["official_small"] = next(iter(rows.values()))
    old["official_small_layouts"] = rows
  if args.only == "official_small":
    with open(path, "w") as f:
      json.dump(old, f, indent=1, default=float)
    return
  if args.aot_only:
    result = old
    rows = result["cpu"]
  else:
    rows = [cpu_throughput(v, args.steps) for v in ("dense", "mot")]
    result = dict(old, host=dict(machine=platform.machine(), cpus=os.cpu_count()), preset="small", seq_len=2048,
                  cpu=rows, mot_over_dense_step_time=rows[1]["median_step_s"] / rows[0]["median_step_s"])
  if not args.no_aot:
    result["tpu_aot_estimate"] = {v: tpu_estimate(v, args.topology) for v in ("dense", "mot")}
    result["tpu_aot_estimate"]["topology"] = args.topology
  print(f"{'variant':8s} {'params':>12s} {'tok/step':>9s} {'step s':>8s} {'tok/s':>8s} {'TPU MFU est.':>13s}")
  for r in rows:
    est = result.get("tpu_aot_estimate", {}).get(r["variant"], {}).get("roofline", {})
    mfu = est.get("mfu_estimate_overlapped", float("nan"))
    print(f"{r['variant']:8s} {r['params']:12,d} {r['tokens_per_step']:9d} {r['median_step_s']:8.2f} "
          f"{r['tokens_per_s']:8.0f} {mfu:13.1%}")
  print(f"MoT / dense step time on this CPU: {result['mot_over_dense_step_time']:.2f}x (same active FLOPs)")
  os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=1, default=float)


if __name__ == "__main__":
  main()
