"""The Pallas block-sparse attention (interpret mode on CPU) against the reference attention and the dense mask.

Packed rows come from a seeded generator that draws interleaved samples of every kind and lays them out with
the project's own rules (`bagel_jax.data.sequence`), mixing short samples (many documents per block) with
long ones (documents and image splits spanning several blocks, so full tiles occur), plus trailing padding.

Size (over 400 lines: the kernel's whole contract in one place: forward, gradients, the cached variant, bad
input, the registry and the mesh wrapper share the packed-row generator and tolerances above).
"""
import functools
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from bagel_jax import batch as batch_lib
from bagel_jax.data import examples
from bagel_jax.data.sequence import VideoGroup, assemble_batch, fits, layout_sample
from bagel_jax.layout import LayoutConfig
from bagel_jax.kernels import attention as attention_lib
from bagel_jax.kernels import block_tables as bt
from bagel_jax.kernels import mask as mask_lib
from bagel_jax.kernels import ops
from bagel_jax.kernels.reference import reference_attention
from bagel_jax.models import bagel as bagel_lib
from bagel_jax.models import config as config_lib

CFG = config_lib.tiny()
LAYOUT = LayoutConfig.from_model_config(CFG)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 2e-5


# ----------------------------------------------------------------------------------------------------------
# Seeded packed-row generator (layout by bagel_jax.data.sequence).
# ----------------------------------------------------------------------------------------------------------

def _long_sample(g, rng, kind):
  """Like `examples.random_sample` but with the preset's full image sizes and long texts."""
  side = lambda hi: int(rng.integers(1, hi + 1))
  text = lambda lo, hi, loss: g.text(int(rng.integers(lo, hi)), loss=loss)
  vit, lat = CFG.vit.max_patches_per_side, CFG.max_latent_size
  if kind == "text":
    return [text(20, 300, True)]
  if kind == "t2i":
    return [text(2, 40, False), g.vae(side(lat), side(lat), noisy=True)]
  if kind == "vqa":
    return [g.vit(side(vit), side(vit)), text(2, 40, False), text(1, 60, True)]
  if kind == "edit":
    h, w = side(lat), side(lat)
    return [g.vae(h, w, noisy=False), g.vit(min(h, vit), min(w, vit)), text(2, 30, False),
            g.vae(h, w, noisy=True)]
  h, w = side(10), side(10)
  frames = [g.vae(h, w, noisy=False) for _ in range(int(rng.integers(2, 4)))]
  return [text(3, 10, False), g.vae(h, w, noisy=False),
          VideoGroup(frames, [1] * len(frames), noisy=True, t_logit=float(rng.normal()))]


def packed_meta(seed: int, seq_len: int, batch_size: int = 2, empty_rows=()) -> mask_lib.TokenMeta:
  """Rows of random samples of every kind (half short, half long), some with trailing padding."""
  rng = np.random.default_rng(seed)
  g = examples._Gen(CFG, rng)  # pylint: disable=protected-access
  spec = examples.batch_spec_for(CFG, batch_size=batch_size, seq_len=seq_len, vit_capacity=seq_len,
                                 latent_capacity=seq_len, image_capacity=seq_len)
  rows = []
  for r in range(batch_size):
    row = []
    for _ in range(0 if r in empty_rows else 60):
      kind = examples.KINDS[int(rng.integers(len(examples.KINDS)))]
      items = _long_sample(g, rng, kind) if rng.random() < 0.5 else examples.random_sample(g, kind)
      s = layout_sample(items, LAYOUT)
      if fits(row + [s], spec):
        row.append(s)
      elif rng.random() < 0.25:
        break
    rows.append(row)
  b = assemble_batch(rows, spec, LAYOUT)
  batch_lib.validate(b, spec)
  return mask_lib.TokenMeta.from_row(b["document"], b["split"], b["split_mode"])


def _qkv(seed, batch, lq, lk, hq, hkv, d, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (batch, lq, hq, d), dtype)
  k = jax.random.normal(ks[1], (batch, lk, hkv, d), dtype)
  v = jax.random.normal(ks[2], (batch, lk, hkv, d), dtype)
  ct = jax.random.normal(ks[3], (batch, lq, hq, d), dtype)
  return q, k, v, ct


@functools.lru_cache(maxsize=None)
def _fwd_bwd(impl, block_q=128, block_kv=128):
  fn = (reference_attention if impl == "reference" else
        functools.partial(ops.flash_attention, block_q=block_q, block_kv=block_kv, interpret=True))

  @jax.jit
  def run(q, k, v, ct, q_meta, kv_meta):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, q_meta, kv_meta), q, k, v)
    return out, vjp(ct)

  return run


def _assert_parity(q, k, v, ct, q_meta, kv_meta, block_q=128, block_kv=128, tol=TOL):
  out, grads = _fwd_bwd("pallas", block_q, block_kv)(q, k, v, ct, q_meta, kv_meta)
  ref, ref_grads = _fwd_bwd("reference")(q, k, v, ct, q_meta, kv_meta)
  for name, a, b in [("out", out, ref)] + list(zip(("dq", "dk", "dv"), grads, ref_grads)):
    assert np.all(np.isfinite(np.asarray(a))), name
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol, rtol=0, err_msg=name)


def _as_jnp(meta):
  return mask_lib.TokenMeta(*(jnp.asarray(a) for a in meta))


# ----------------------------------------------------------------------------------------------------------
# Block tables.
# ----------------------------------------------------------------------------------------------------------

_tile_classes = jax.jit(bt.tile_classes, static_argnums=(2, 3))
_build_tables = jax.jit(bt.build_tables, static_argnums=(2, 3))


def test_generator_covers_every_case():
  """The rows exercise every mode, padding, block-straddling documents/splits and all three tile kinds."""
  metas = [packed_meta(seed, 512) for seed in range(5)]
  doc = np.concatenate([np.asarray(m.document) for m in metas])
  split = np.concatenate([np.asarray(m.split) for m in metas])
  mode = np.concatenate([np.asarray(m.mode) for m in metas])
  assert {mask_lib.CAUSAL, mask_lib.FULL, mask_lib.NOISE} <= set(np.unique(mode[doc > 0]).tolist())
  assert (doc == 0).any()
  b = 128
  straddle = lambda ids: ((ids[:, b - 1::b][:, :-1] == ids[:, b::b]) & (ids[:, b::b] > 0)).any()
  assert straddle(doc) and straddle(split)
  classes = np.concatenate([bt.dense_tile_classes(m, m, 128, 128) for m in metas])
  assert {bt.EMPTY, bt.PARTIAL, bt.FULL_TILE} <= set(np.unique(classes).tolist())


def _check_tables(meta_q, meta_k, bq, bk):
  want = bt.dense_tile_classes(meta_q, meta_k, bq, bk)
  got = np.asarray(_tile_classes(meta_q, meta_k, bq, bk))
  np.testing.assert_array_equal(got, want)
  tables = jax.tree.map(np.asarray, _build_tables(meta_q, meta_k, bq, bk))
  host = bt.build_tables(jax.tree.map(np.asarray, meta_q), jax.tree.map(np.asarray, meta_k), bq, bk, xp=np)
  for a, b in zip(tables, host):  # the NumPy path used for metadata known at trace time
    np.testing.assert_array_equal(a, b)
  for lists, counts, classes in ((tables.fwd, tables.fwd_count, want),
                                 (tables.bwd, tables.bwd_count, want.transpose(0, 2, 1))):
    for b, o in np.ndindex(counts.shape):
      cols = np.flatnonzero(classes[b, o])
      assert counts[b, o] == len(cols)
      np.testing.assert_array_equal(lists[b, o, :len(cols)], 2 * cols + (classes[b, o, cols] == bt.FULL_TILE))


@pytest.mark.parametrize("seed", range(3))
def test_block_tables_exact_on_packed_rows(seed):
  meta = packed_meta(100 + seed, 512, batch_size=3, empty_rows=(2,))
  for bq, bk in ((128, 128), (128, 256), (32, 64)):
    _check_tables(meta, meta, bq, bk)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(50))
def test_block_tables_exact_sweep(seed):
  rng = np.random.default_rng(seed)
  length = int(rng.choice([256, 512, 1024]))
  meta = packed_meta(1000 + seed, length, batch_size=2)
  for bq, bk in ((128, 128), (128, 256), (256, 128), (32, 64), (16, 16)):
    _check_tables(meta, meta, bq, bk)


@pytest.mark.parametrize("seed", range(3))
def test_block_tables_conservative_on_arbitrary_metadata(seed):
  """Any metadata where a split has one mode: no non-empty tile is dropped and no partial one marked full,
  so the kernel stays exact even where the summaries cannot be (unsorted ids, cross attention)."""
  rng = np.random.default_rng(seed)
  bsz = 4
  split_mode = rng.integers(0, 3, (bsz, 8))

  def meta(length):
    split = rng.integers(0, 8, (bsz, length))
    idx = rng.integers(0, 100, (bsz, length))
    idx[::2] = np.sort(idx[::2], axis=1)
    return mask_lib.TokenMeta(*(jnp.asarray(a, jnp.int32) for a in (
        rng.integers(0, 3, (bsz, length)), split, np.take_along_axis(split_mode, split, 1), idx)))

  for _ in range(20):
    mq, mk = meta(64), meta(96)
    for bq, bk in ((8, 8), (16, 32), (32, 16)):
      want = bt.dense_tile_classes(mq, mk, bq, bk)
      got = np.asarray(_tile_classes(mq, mk, bq, bk))
      assert not np.any((want != bt.EMPTY) & (got == bt.EMPTY))
      assert not np.any((got == bt.FULL_TILE) & (want != bt.FULL_TILE))


# ----------------------------------------------------------------------------------------------------------
# Parity with the reference attention (outputs and gradients).
# ----------------------------------------------------------------------------------------------------------

def _parity_case(seed, ratio, seq_len=384, block_q=128, block_kv=256):
  """seq_len 384 is not a multiple of block_kv: the wrapper pads; row 1 is all padding every third seed."""
  meta = _as_jnp(packed_meta(seed, seq_len, batch_size=2, empty_rows=(1,) if seed % 3 == 0 else ()))
  hkv = 1 if ratio == 7 else 2
  q, k, v, ct = _qkv(seed, 2, seq_len, seq_len, hkv * ratio, hkv, CFG.llm.head_dim)
  _assert_parity(q, k, v, ct, meta, meta, block_q, block_kv)


@pytest.mark.parametrize("seed", range(5))
def test_parity_packed_rows(seed):
  _parity_case(seed, ratio=(1, 7)[seed % 2])


@pytest.mark.slow
@pytest.mark.parametrize("ratio", [1, 7])
@pytest.mark.parametrize("seed", range(5, 55))
def test_parity_packed_rows_sweep(seed, ratio):
  _parity_case(seed, ratio)


@pytest.mark.slow
def test_parity_square_blocks_and_lane_head_dim():
  """head_dim already a lane multiple (no padding) and square blocks dividing the row."""
  meta = _as_jnp(packed_meta(7, 512))
  q, k, v, ct = _qkv(7, 2, 512, 512, 2, 2, 128)
  _assert_parity(q, k, v, ct, meta, meta, 128, 128)


def test_all_padding_rows_give_zeros():
  meta = _as_jnp(packed_meta(3, 384, batch_size=2, empty_rows=(0, 1)))
  q, k, v, ct = _qkv(3, 2, 384, 384, 2, 2, CFG.llm.head_dim)
  out, grads = _fwd_bwd("pallas", 128, 256)(q, k, v, ct, meta, meta)
  for a in (out,) + tuple(grads):
    np.testing.assert_array_equal(np.asarray(a), 0.0)


def test_cross_attention_lengths_not_dividing_blocks():
  """Lq != Lk, neither a multiple of the blocks: queries are the tail of a row, keys the whole row."""
  meta = _as_jnp(packed_meta(11, 300))
  tail = 170
  q_meta = mask_lib.TokenMeta(*(a[:, -tail:] for a in meta))
  q, k, v, ct = _qkv(11, 2, tail, 300, 4, 2, 16)
  _assert_parity(q, k, v, ct, q_meta, meta, 128, 128)


def test_bfloat16_inputs():
  meta = _as_jnp(packed_meta(5, 384))
  q, k, v, ct = _qkv(5, 2, 384, 384, 7, 1, 128, jnp.bfloat16)  # head_dim a lane multiple: no padding
  out, grads = _fwd_bwd("pallas")(q, k, v, ct, meta, meta)
  assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
  f32 = lambda x: x.astype(jnp.float32)
  ref, ref_grads = _fwd_bwd("reference")(f32(q), f32(k), f32(v), f32(ct), meta, meta)
  for name, a, b in [("out", out, ref)] + list(zip(("dq", "dk", "dv"), grads, ref_grads)):
    a, b = np.asarray(f32(a)), np.asarray(b)
    assert np.abs(a - b).max() <= 0.02 * max(1.0, np.abs(b).max()), name


def test_cached_attention_matches_full_row():
  """Queries against a KV cache (with unused slots) plus themselves = the same rows of full attention."""
  meta = _as_jnp(packed_meta(13, 256))
  q, k, v, _ = _qkv(13, 2, 256, 256, 4, 2, 16)
  full = ops.flash_attention(q, k, v, meta, meta, block_q=128, block_kv=128, interpret=True)
  for cut in (255, 130):  # one decoded token; a chunk (e.g. a denoised image) of 126 tokens
    unused = 37
    pad = lambda x: jnp.concatenate([x[:, :cut], jnp.zeros((2, unused) + x.shape[2:], x.dtype)], axis=1)
    cache_meta = mask_lib.TokenMeta(*(pad(a) for a in meta))
    q_meta = mask_lib.TokenMeta(*(a[:, cut:] for a in meta))
    out = ops.cached_attention(q[:, cut:], k[:, cut:], v[:, cut:], q_meta, pad(k), pad(v), cache_meta,
                               block_q=128, block_kv=128, interpret=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(full[:, cut:]), atol=TOL, rtol=0)


@pytest.mark.slow  # ~2-4 min in the interpreter; the tables' exactness stays in the default run (block tables tests)
def test_kernel_visits_exactly_the_nonempty_tiles():
  meta = _as_jnp(packed_meta(17, 512))
  q, k, v, _ = _qkv(17, 2, 512, 512, 4, 2, 16)
  out, visits, _ = ops.flash_attention_visits(q, k, v, meta, meta, block_q=128, block_kv=128)
  want = bt.dense_tile_classes(meta, meta, 128, 128)
  np.testing.assert_array_equal(np.asarray(visits), np.broadcast_to((want != bt.EMPTY).sum(-1)[:, None],
                                                                    visits.shape))
  np.testing.assert_allclose(np.asarray(out), np.asarray(reference_attention(q, k, v, meta, meta)), atol=TOL)


def test_cost_estimate_counts_nonempty_tiles():
  """Concrete metadata: the tile count behind the kernels' cost estimates is the non-empty count (compiled TPU
  FLOPs are checked in test_attention_aot); traced metadata: no count (the estimate assumes every tile)."""
  meta = packed_meta(19, 512)
  q, k, v, _ = _qkv(19, 2, 512, 512, 4, 2, 128)
  prepare = functools.partial(ops._prepare, scale=None, block_q=128, block_kv=128,  # pylint: disable=protected-access
                              interpret=True)
  assert prepare(q, k, v, meta, meta)[0].tiles == int((bt.dense_tile_classes(meta, meta, 128, 128)
                                                       != bt.EMPTY).sum())
  seen = []
  jax.eval_shape(lambda m: seen.append(prepare(q, k, v, m, m)[0].tiles), _as_jnp(meta))
  assert seen == [None]


# ----------------------------------------------------------------------------------------------------------
# Bad input: clear errors at trace time naming the argument.
# ----------------------------------------------------------------------------------------------------------

def _trace(fn, *args):
  return jax.eval_shape(fn, *args)


def test_bad_input_errors():
  meta = _as_jnp(packed_meta(1, 256))
  q, k, v, _ = _qkv(1, 2, 256, 256, 4, 2, 16)
  call = lambda **kw: (lambda q, k, v: ops.flash_attention(q, k, v, kw.pop("qm", meta), kw.pop("km", meta),
                                                           interpret=True, **kw))
  short = mask_lib.TokenMeta(*(a[:, :200] for a in meta))
  with pytest.raises(ValueError, match=r"q_meta\.document must have shape \(2, 256\)"):
    _trace(call(qm=short), q, k, v)
  floaty = meta._replace(split=meta.split.astype(jnp.float32))
  with pytest.raises(ValueError, match=r"kv_meta\.split must be an integer array"):
    _trace(call(km=floaty), q, k, v)
  with pytest.raises(TypeError, match="q_meta must be a TokenMeta"):
    _trace(call(qm=meta[:3]), q, k, v)
  with pytest.raises(ValueError, match="block_q=100"):
    _trace(call(block_q=100), q, k, v)
  with pytest.raises(ValueError, match="block_kv=64"):
    _trace(call(block_kv=64), q, k, v)
  big = jax.ShapeDtypeStruct((1, 4096, 8, 256), jnp.float32)
  big_meta = mask_lib.TokenMeta(*([jax.ShapeDtypeStruct((1, 4096), jnp.int32)] * 4))
  with pytest.raises(ValueError, match=r"block_q=2048, block_kv=2048 with head_dim=256.*VMEM"):
    jax.eval_shape(lambda q, m: ops.flash_attention(q, q, q, m, m, block_q=2048, block_kv=2048), big, big_meta)
  with pytest.raises(ValueError, match="q heads 3 must be a multiple of k/v heads 2"):
    _trace(call(), q[:, :, :3], k, v)
  with pytest.raises(ValueError, match="k and v must have the same shape"):
    _trace(call(), q, k, v[:, :, :1])
  with pytest.raises(ValueError, match="k_cache must be"):
    ops.cached_attention(q, k, v, meta, k[:, :, :1], v, meta, interpret=True)


# ----------------------------------------------------------------------------------------------------------
# Integration: registry, mesh specs, shard_map, the tiny model.
# ----------------------------------------------------------------------------------------------------------

def test_registered_implementations():
  meta = _as_jnp(packed_meta(2, 256))
  q, k, v, _ = _qkv(2, 2, 256, 256, 4, 2, 16)
  out = attention_lib.attention(q, k, v, meta, meta, impl="pallas_interpret", scale=0.3)
  np.testing.assert_allclose(np.asarray(out), np.asarray(reference_attention(q, k, v, meta, meta, scale=0.3)),
                             atol=TOL)
  assert attention_lib.implementation("pallas") is ops.pallas_attention
  # "auto" resolves per lowering platform: `tiled` here on CPU (the kernel for TPU: test_attention_aot)
  auto = jax.jit(lambda q, k, v: attention_lib.attention(q, k, v, meta, meta, impl="auto", scale=0.3))(q, k, v)
  np.testing.assert_allclose(np.asarray(auto), np.asarray(reference_attention(q, k, v, meta, meta, scale=0.3)),
                             atol=1e-6)


def test_assumed_tile_fraction_sets_the_cost_estimate_of_traced_metadata():
  meta = packed_meta(19, 512)
  q, k, v, _ = _qkv(19, 2, 512, 512, 4, 2, 128)
  prepare = functools.partial(ops._prepare, scale=None, block_q=128, block_kv=128,  # pylint: disable=protected-access
                              interpret=True)
  seen = []
  with ops.assume_tile_fraction({512: 0.25}):
    jax.eval_shape(lambda m: seen.append(prepare(q, k, v, m, m)[0].tiles), _as_jnp(meta))
  with ops.assume_tile_fraction({1024: 0.25}):  # another length: no assumption
    jax.eval_shape(lambda m: seen.append(prepare(q, k, v, m, m)[0].tiles), _as_jnp(meta))
  assert seen == [2 * 16 // 4, None]
  with pytest.raises(ValueError, match="fraction"):
    with ops.assume_tile_fraction(1.5):
      jax.eval_shape(lambda m: prepare(q, k, v, m, m), _as_jnp(meta))


def test_mesh_specs():
  mesh = lambda **s: SimpleNamespace(axis_names=tuple(s), axis_sizes=tuple(s.values()))
  assert ops.mesh_specs(mesh(data=2, fsdp=2, tensor=2), 8, 28, 4) == (P(("data", "fsdp"), None, "tensor", None),
                                                                      P(("data", "fsdp"), None))
  # batch 2 not divisible by data*fsdp=4: drop fsdp; 2 kv heads not divisible by tensor=4: replicate heads
  assert ops.mesh_specs(mesh(data=2, fsdp=2, tensor=4), 2, 4, 2) == (P(("data",), None, None, None),
                                                                     P(("data",), None))
  assert ops.mesh_specs(mesh(fsdp=8), 3, 4, 2) == (P(None, None, None, None), P(None, None))
  assert ops.mesh_specs(mesh(data=1, expert=2, tensor=2), 4, 4, 2)[0] == P(("data",), None, "tensor", None)


_SHARD_MAP_SCRIPT = textwrap.dedent("""
    import numpy as np, jax, jax.numpy as jnp
    jax.config.update("jax_default_matmul_precision", "highest")
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from bagel_jax.kernels import attention as attention_lib, mask as mask_lib, pallas_attention as pk
    from tests.test_attention_kernel import packed_meta, _qkv
    # The TPU-semantics interpreter joins simulated devices with a threading.Barrier that deadlocks with
    # host-platform devices; the kernels' numerics are covered by the single-device tests, so this
    # multi-device check of the shard_map wiring uses the plain interpreter.
    pk.KernelConfig.interpret_arg = lambda self: bool(self.interpret)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 1, 2), ("data", "fsdp", "tensor"))
    meta = packed_meta(23, 256, batch_size=4)
    q, k, v, ct = _qkv(23, 4, 256, 256, 4, 2, 16)
    def loss(impl):
      return lambda q, k, v, m: jnp.sum(attention_lib.attention(q, k, v, m, m, impl=impl) * ct)
    outs = {}
    with jax.set_mesh(mesh):
      s = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
      args = [jax.device_put(x, s) for x in (q, k, v)] + [meta]
      for impl in ("reference", "pallas_interpret", "tiled"):
        f = jax.jit(jax.value_and_grad(loss(impl), argnums=(0, 1, 2)))
        if impl != "reference":
          assert "sdy.manual_computation" in f.lower(*args).as_text()
        outs[impl] = f(*args)
    for impl in ("pallas_interpret", "tiled"):
      for a, b in zip(jax.tree.leaves(outs[impl]), jax.tree.leaves(outs["reference"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-6, err_msg=impl)
    print("SHARD_MAP_OK")
""")


def test_shard_map_over_a_cpu_mesh():
  """Under jax.set_mesh the registered entries run the kernel and the tiled path in shard_map (batch over data,
  heads over tensor) and equal the reference, value and gradients (4 host CPU devices in a subprocess)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
             PYTHONPATH=REPO)
  res = subprocess.run([sys.executable, "-c", _SHARD_MAP_SCRIPT], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600, check=False)
  assert "SHARD_MAP_OK" in res.stdout, res.stdout[-3000:] + res.stderr[-5000:]


def assert_tiny_model_matches_reference(impl: str):
  """Loss, loss sums and every gradient of the tiny MoT model with attention `impl` equal the reference's."""
  ref_cfg = config_lib.tiny("mot")
  spec = examples.batch_spec_for(ref_cfg, batch_size=2, seq_len=256, vit_capacity=64, latent_capacity=96)
  batch = examples.random_batch(ref_cfg, spec, seed=3)
  batch_lib.validate(batch, spec)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  params = bagel_lib.init_params(ref_cfg, jax.random.key(0))
  results = {}
  for name in ("reference", impl):
    cfg = config_lib.tiny("mot", attention_impl=name)
    fn = jax.jit(jax.value_and_grad(lambda p, b, r, cfg=cfg: bagel_lib.loss_fn(p, b, r, cfg), has_aux=True))
    results[name] = fn(params, batch, jax.random.key(1))
  (loss, metrics), grads = results[impl]
  (ref_loss, ref_metrics), ref_grads = results["reference"]
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
  for key in ("ce_sum", "mse_sum"):
    np.testing.assert_allclose(float(metrics[key]), float(ref_metrics[key]), rtol=1e-6, err_msg=key)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(ref_grads))
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    ref = functools.reduce(lambda t, p: t[p.key], path, ref_grads)
    np.testing.assert_allclose(np.asarray(g), np.asarray(ref), rtol=1e-4, atol=1e-6 * scale,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow  # ~1-2 min; the default run keeps the kernel's parity sweep and the tiled model test
def test_tiny_model_forward_backward_pallas_interpret_equals_reference():
  assert_tiny_model_matches_reference("pallas_interpret")


@pytest.mark.slow
def test_no_races_with_two_simulated_cores():
  """The TPU-semantics interpreter with race detection and the 'parallel' grid split over two cores."""
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call  # pylint: disable=import-outside-toplevel
  meta = _as_jnp(packed_meta(29, 384))
  q, k, v, ct = _qkv(29, 2, 384, 384, 4, 2, 16)
  params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
  f = lambda q, k, v: ops.flash_attention(q, k, v, meta, meta, block_q=128, block_kv=128, interpret=params)
  out, vjp = jax.vjp(f, q, k, v)
  grads = vjp(ct)
  jax.block_until_ready(grads)
  assert not interpret_pallas_call.races.races_found
  ref, ref_vjp = jax.vjp(lambda q, k, v: reference_attention(q, k, v, meta, meta), q, k, v)
  for a, b in zip((out,) + tuple(grads), (ref,) + tuple(ref_vjp(ct))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOL)
