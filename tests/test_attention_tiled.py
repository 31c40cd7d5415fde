"""The plain-JAX block-sparse attention (`attention_impl="tiled"`, what `auto` runs off TPU): parity with the
reference (outputs and gradients) on the kernel tests' packed rows, exactly the non-empty tiles visited, the
registry, a mesh, and the tiny model end to end."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bagel_jax.kernels import attention as attention_lib
from bagel_jax.kernels import block_tables as bt
from bagel_jax.kernels import mask as mask_lib
from bagel_jax.kernels import tiled
from bagel_jax.kernels.reference import reference_attention
from tests.test_attention_kernel import CFG, _as_jnp, _qkv, assert_tiny_model_matches_reference, packed_meta

TOL = 2e-5


@functools.lru_cache(maxsize=None)
def _fwd_bwd(impl, block=128):
  fn = reference_attention if impl == "reference" else functools.partial(tiled.tiled_attention, block_q=block,
                                                                          block_kv=block)

  @jax.jit
  def run(q, k, v, ct, q_meta, kv_meta):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, q_meta, kv_meta), q, k, v)
    return out, vjp(ct)

  return run


def _assert_parity(q, k, v, ct, q_meta, kv_meta, block=128, tol=TOL):
  out, grads = _fwd_bwd("tiled", block)(q, k, v, ct, q_meta, kv_meta)
  ref, ref_grads = _fwd_bwd("reference")(q, k, v, ct, q_meta, kv_meta)
  for name, a, b in [("out", out, ref)] + list(zip(("dq", "dk", "dv"), grads, ref_grads)):
    assert np.all(np.isfinite(np.asarray(a))), name
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol, rtol=0, err_msg=name)


def _case(seed, ratio, block, seq_len=384):
  """384 tokens: not a multiple of 256 (padded); row 1 all padding every third seed."""
  meta = _as_jnp(packed_meta(seed, seq_len, batch_size=2, empty_rows=(1,) if seed % 3 == 0 else ()))
  hkv = 1 if ratio == 7 else 2
  q, k, v, ct = _qkv(seed, 2, seq_len, seq_len, hkv * ratio, hkv, CFG.llm.head_dim)
  _assert_parity(q, k, v, ct, meta, meta, block)


@pytest.mark.parametrize("seed", range(4))
def test_parity_packed_rows(seed):
  _case(seed, ratio=(1, 7)[seed % 2], block=(64, 128, 256, 32)[seed])


@pytest.mark.slow
@pytest.mark.parametrize("ratio", [1, 7])
@pytest.mark.parametrize("seed", range(5, 55))
def test_parity_packed_rows_sweep(seed, ratio):
  _case(seed, ratio, block=(64, 128, 256)[seed % 3])


def test_cross_attention_lengths_not_dividing_blocks():
  """Lq != Lk, neither a multiple of the block: queries are the tail of a row, keys the whole row."""
  meta = _as_jnp(packed_meta(11, 300))
  q_meta = mask_lib.TokenMeta(*(a[:, -170:] for a in meta))
  q, k, v, ct = _qkv(11, 2, 170, 300, 4, 2, 16)
  _assert_parity(q, k, v, ct, q_meta, meta, block=64)


def test_all_padding_rows_give_zeros():
  meta = _as_jnp(packed_meta(3, 384, batch_size=2, empty_rows=(0, 1)))
  q, k, v, ct = _qkv(3, 2, 384, 384, 2, 2, 16)
  out, grads = _fwd_bwd("tiled", 128)(q, k, v, ct, meta, meta)
  for a in (out,) + tuple(grads):
    np.testing.assert_array_equal(np.asarray(a), 0.0)


def test_bfloat16_inputs():
  meta = _as_jnp(packed_meta(5, 256))
  q, k, v, ct = _qkv(5, 2, 256, 256, 4, 2, 32, jnp.bfloat16)
  out, grads = _fwd_bwd("tiled", 64)(q, k, v, ct, meta, meta)
  assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
  f32 = lambda x: x.astype(jnp.float32)
  ref, ref_grads = _fwd_bwd("reference")(f32(q), f32(k), f32(v), f32(ct), meta, meta)
  for name, a, b in [("out", out, ref)] + list(zip(("dq", "dk", "dv"), grads, ref_grads)):
    a, b = np.asarray(f32(a)), np.asarray(b)
    assert np.abs(a - b).max() <= 0.02 * max(1.0, np.abs(b).max()), name


@pytest.mark.parametrize("block,batch", [(64, 32), (128, 8)])
def test_walks_exactly_the_nonempty_tiles(block, batch):
  """The tile list is the non-empty tiles of the dense mask (far below all tiles), padded to whole batches;
  the loop's trip count is the number of batches they fill."""
  meta = packed_meta(13, 1024)
  ids, count = jax.jit(tiled._tile_list, static_argnums=(2, 3, 4))(_as_jnp(meta), _as_jnp(meta), block, block, batch)  # pylint: disable=protected-access
  dense = bt.dense_tile_classes(meta, meta, block, block)
  nonempty = np.flatnonzero(dense.reshape(-1) != bt.EMPTY)
  assert int(count) == len(nonempty) < dense.size / 2
  ids = np.asarray(ids)
  np.testing.assert_array_equal(ids[:int(count)], nonempty)
  assert len(ids) % batch == 0 and np.all(ids[int(count):] == dense.size)  # empty slots: the fill value
  cfg = tiled._Cfg(block, block, batch, 1.0)  # pylint: disable=protected-access
  trips, _ = tiled._walk(cfg, 1024 // block, 1024 // block, _as_jnp(meta), _as_jnp(meta))  # pylint: disable=protected-access
  assert int(trips) == -(-len(nonempty) // batch)


def test_empty_slots_never_overwrite_block_zero():
  """A batch whose live tiles include q-block 0 and which ends in empty slots (those point at block 0 too):
  the forward must not let the empty run's merge overwrite block 0's (regression: outputs of the first
  q-block were lost when the tile count was not a multiple of the batch)."""
  meta = _as_jnp(packed_meta(0, 384, batch_size=2, empty_rows=(1,)))
  q, k, v, ct = _qkv(0, 2, 384, 384, 2, 2, 16)
  for batch in (5, 7, 32):
    out = tiled.tiled_attention(q, k, v, meta, meta, block_q=64, block_kv=64, batch=batch)
    np.testing.assert_allclose(np.asarray(out), np.asarray(reference_attention(q, k, v, meta, meta)), atol=TOL)


def test_registry_and_auto_on_cpu():
  meta = _as_jnp(packed_meta(2, 256))
  q, k, v, _ = _qkv(2, 2, 256, 256, 4, 2, 16)
  ref = np.asarray(reference_attention(q, k, v, meta, meta, scale=0.3))
  out = attention_lib.attention(q, k, v, meta, meta, impl="tiled", scale=0.3)
  np.testing.assert_allclose(np.asarray(out), ref, atol=TOL)
  # "auto" lowers the tiled path on CPU (the kernel for TPU: test_attention_aot): same bits as "tiled".
  auto = jax.jit(lambda q, k, v: attention_lib.attention(q, k, v, meta, meta, impl="auto", scale=0.3))(q, k, v)
  np.testing.assert_array_equal(np.asarray(auto), np.asarray(out))


def test_bad_arguments():
  meta = _as_jnp(packed_meta(2, 128))
  q, k, v, _ = _qkv(2, 2, 128, 128, 3, 2, 16)
  with pytest.raises(ValueError, match="multiple of kv heads"):
    tiled.tiled_attention(q, k, v, meta, meta)
  q, k, v, _ = _qkv(2, 2, 128, 128, 4, 2, 16)
  with pytest.raises(ValueError, match="block_q"):
    tiled.tiled_attention(q, k, v, meta, meta, block_q=0)


def test_tiny_model_forward_backward_tiled_equals_reference():
  assert_tiny_model_matches_reference("tiled")
