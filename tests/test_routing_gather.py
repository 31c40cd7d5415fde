"""Row gathers whose gradient is a gather (routing.gather_rows / read_slots): values and gradients equal
plain `take_rows` autodiff (a scatter-add), and no scatter is left in the differentiated program."""
import jax
import jax.numpy as jnp
import numpy as np

from bagel_jax.models import routing as routing_lib


def _case(seed, b=2, length=11, cap=6):
  rng = np.random.default_rng(seed)
  idx = np.full((b, cap), -1, np.int32)
  for r in range(b):
    n = rng.integers(1, cap + 1)
    idx[r, :n] = rng.choice(length, n, replace=False)  # any order, unused slots at the end
    rng.shuffle(idx[r])  # unused slots anywhere
  x = rng.normal(size=(b, length, 3, 4)).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(idx)


def test_inverse_index_inverts():
  _, idx = _case(0)
  inv = np.asarray(routing_lib.inverse_index(idx, 11))
  for r in range(idx.shape[0]):
    for c, l in enumerate(np.asarray(idx[r])):
      if l >= 0:
        assert inv[r, l] == c
    assert (inv[r] >= 0).sum() == (np.asarray(idx[r]) >= 0).sum()


def test_gather_rows_matches_take_rows_values_and_grads():
  for seed in range(5):
    x, idx = _case(seed)
    inv = routing_lib.inverse_index(idx, x.shape[1])
    w = jax.random.normal(jax.random.key(seed), (x.shape[0], idx.shape[1]) + x.shape[2:])
    ref = lambda x: jnp.sum(jnp.sin(routing_lib.take_rows(x, idx)) * w)
    new = lambda x: jnp.sum(jnp.sin(routing_lib.gather_rows(x, idx, inv)) * w)
    np.testing.assert_array_equal(np.asarray(routing_lib.gather_rows(x, idx, inv)),
                                  np.asarray(routing_lib.take_rows(x, idx)))
    np.testing.assert_allclose(np.asarray(jax.grad(new)(x)), np.asarray(jax.grad(ref)(x)), rtol=1e-6, atol=1e-6)


def test_read_slots_matches_masked_take_rows_grads():
  for seed in range(5):
    x, idx = _case(seed)  # rows of length 11, 6 slots
    buf = x[:, :6] * 3.0 + 1.0  # the slots' contents
    inv = routing_lib.inverse_index(idx, 11)
    w = jax.random.normal(jax.random.key(seed), (buf.shape[0], 11) + buf.shape[2:])
    member = (inv >= 0)[..., None, None]
    ref = lambda b: jnp.sum(jnp.where(member, routing_lib.take_rows(b, inv), 0.0) * w)
    new = lambda b: jnp.sum(routing_lib.read_slots(b, idx, inv) * w)
    np.testing.assert_allclose(np.asarray(jax.grad(new)(buf)), np.asarray(jax.grad(ref)(buf)), rtol=1e-6,
                               atol=1e-6)


def test_routing_backward_has_no_scatter():
  """The MoT dispatch/combine round trip differentiates without a scatter (the TPU compile-time cost); the
  routing (an int scatter, no gradient) is built outside the differentiated function."""
  b, length = 2, 16
  mod = jnp.asarray(np.tile(np.array([0] * 6 + [2] * 8 + [3] * 2, np.int32), (b, 1)))  # text, VAE, pad
  batch = dict(modality=mod,
               und_index=jnp.asarray(np.tile(np.r_[np.arange(6), [-1, -1]].astype(np.int32), (b, 1))),
               latent_dest=jnp.asarray(np.tile(np.arange(6, 14, dtype=np.int32), (b, 1))))
  from bagel_jax import batch as batch_lib  # pylint: disable=import-outside-toplevel
  assert batch_lib.TEXT == 0 and batch_lib.VAE == 2 and batch_lib.PAD == 3, "the test row's modality codes"
  r = routing_lib.Routing.from_batch(batch)
  f = lambda x: jnp.sum(jnp.square(r.combine([2.0 * y for y in r.dispatch(x, 2)])))
  x = jnp.ones((b, length, 4))
  text = jax.jit(jax.grad(f)).lower(x).as_text()
  assert "scatter" not in text, "a scatter in the routing backward"
  np.testing.assert_allclose(np.asarray(jax.grad(f)(x))[:, :14], 8.0)  # d/dx (2x)^2
  np.testing.assert_allclose(np.asarray(jax.grad(f)(x))[:, 14:], 0.0)  # padding holds nothing
