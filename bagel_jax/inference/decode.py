"""Text decoding with the KV cache (the official `gen_text` / `generate_text`).

Decoding starts by feeding `<|im_start|>` at the context's RoPE position (it opens a new causal split), then
feeds each sampled token, one per step, into the same split; a row stops when it samples `<|im_end|>`. The step
(embed one token, decoder against the cache, cache write, lm_head, greedy or temperature/top-p sampling) is one
compiled function for every step and every sampling setting: temperature, top-p and greedy are traced values.
"""
from __future__ import annotations

import functools
from typing import Callable, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from bagel_jax import batch as batch_lib
from bagel_jax.inference import forward
from bagel_jax.inference import kv_cache as kv_lib
from bagel_jax.inference.contexts import TRACE_COUNTS, Context
from bagel_jax.kernels.mask import CAUSAL
from bagel_jax.models.config import BagelConfig


def sample_logits(logits, rng, temperature, top_p, greedy):
  """logits [B, V] -> token ids [B]: argmax when `greedy`, else a draw from softmax(logits / temperature)
  restricted to the smallest set of tokens whose probability mass reaches `top_p` (nucleus sampling)."""
  logits = logits.astype(jnp.float32)
  best = jnp.argmax(logits, axis=-1)
  scaled = logits / jnp.maximum(temperature, 1e-6)
  order = jnp.sort(scaled, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(order, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
  keep = before < top_p
  keep = keep.at[:, 0].set(True)
  threshold = jnp.min(jnp.where(keep, order, jnp.inf), axis=-1, keepdims=True)
  drawn = jax.random.categorical(rng, jnp.where(scaled >= threshold, scaled, -jnp.inf), axis=-1)
  return jnp.where(greedy, best, drawn).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config",), donate_argnums=(1,))
def decode_step(params, cache: kv_lib.KVCache, tokens, valid, new_split, rng, temperature, top_p, greedy,
                vocab_limit, *, config: BagelConfig):
  """Feeds tokens [B] (rows where `valid`) -> (next tokens [B], logits [B, V], updated cache). Sampling sees
  only ids < `vocab_limit` (the tokenizer's size: embedding rows past it are padding, never real tokens).
  The cache is donated: each step updates it in place instead of copying the whole cache per token."""
  TRACE_COUNTS["decode_step"] += 1
  b = tokens.shape[0]
  block = dict(text_ids=tokens[:, None].astype(jnp.int32), modality=jnp.full((b, 1), batch_lib.TEXT, jnp.int32),
               und_index=jnp.zeros((b, 1), jnp.int32), gen_index=jnp.zeros((b, 0), jnp.int32))
  x = forward.embed_block(params, config, block)
  valid2 = valid[:, None]
  h, k, v, q_meta = forward.run_decoder(params, config, cache, x, forward.block_routing(block, config),
                                        jnp.zeros((b, 1), jnp.int32), valid2, CAUSAL, new_split)
  cache = kv_lib.write(cache, k, v, q_meta, valid2, valid.astype(jnp.int32), new_split)
  logits = forward.lm_logits(params, config, h)[:, 0]
  allowed = jnp.arange(logits.shape[-1]) < vocab_limit
  nxt = sample_logits(jnp.where(allowed, logits, -jnp.inf), rng, temperature, top_p, greedy)
  return nxt, logits, cache


_copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


def generate_text(params, config: BagelConfig, ctx: Context, *, max_new_tokens: int, do_sample: bool = False,
                  temperature: float = 1.0, top_p: float = 1.0, rng=None, return_logits: bool = False,
                  forced: Optional[np.ndarray] = None, vocab_limit: Optional[int] = None,
                  on_token: Optional[Callable[[List[List[int]]], None]] = None
                  ) -> Tuple[List[List[int]], Context, Optional[list]]:
  """Greedy or sampled decoding for every row of `ctx` until `<|im_end|>` or `max_new_tokens`.

  Returns (generated ids per row without `<|im_start|>`/`<|im_end|>`, the context after decoding, and the
  logits of every step if asked). `forced` [B, T] feeds given tokens instead of sampled ones (teacher forcing:
  the cache-parity test). Like the official `gen_text`, callers that only want the text keep their own `ctx`:
  the returned context also holds the generated tokens. `on_token`, if given, is called after every decoding
  step with the ids generated so far per row (streaming to a user interface)."""
  if max_new_tokens <= 0:
    raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
  if do_sample and not (temperature > 0 and 0 < top_p <= 1):
    raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
  lc = config.llm
  b = ctx.batch_size
  ctx.check_room(np.full(b, 1 + max_new_tokens if forced is None else forced.shape[1] + 1), "text decoding")
  rng = jax.random.key(0) if rng is None else rng
  tokens = np.full(b, lc.bos_token_id, np.int32)
  done = np.zeros(b, bool)
  out: List[List[int]] = [[] for _ in range(b)]
  all_logits = []
  cache = _copy(ctx.cache)  # decoding donates its cache; the caller's context stays valid
  fed = np.zeros(b, np.int64)
  steps = max_new_tokens if forced is None else forced.shape[1] + 1
  temp, tp, greedy = jnp.float32(temperature), jnp.float32(top_p), jnp.asarray(not do_sample)
  limit = jnp.int32(vocab_limit or lc.vocab_size)
  for step in range(steps):
    valid = ~done
    nxt, logits, cache = decode_step(params, cache, jnp.asarray(tokens), jnp.asarray(valid),
                                     jnp.full(b, step == 0), jax.random.fold_in(rng, step), temp, tp, greedy,
                                     limit, config=config)
    fed += valid
    if return_logits:
      all_logits.append(np.asarray(logits))
    if forced is not None:
      if step == forced.shape[1]:
        break
      tokens = forced[:, step].astype(np.int32)
      continue
    nxt = np.asarray(nxt)
    for r in np.nonzero(valid)[0]:
      if nxt[r] == lc.eos_token_id:
        done[r] = True
      else:
        out[r].append(int(nxt[r]))
    if on_token is not None:
      on_token(out)
    if done.all():
      break
    tokens = np.where(done, 0, nxt).astype(np.int32)
  new_ctx = ctx.advanced(cache, fed, fed)
  return out, new_ctx, (all_logits if return_logits else None)
