"""Writes `assets/synthetic_vocab.json`, the word vocabulary of the synthetic data.

  python -m bagel_jax.data.build_vocab [--records 400]

Collects every word of the synthetic templates (by generating records of every task from both splits), the
text-rendering words, the think-mode system prompts, and single characters with `##`-continuations for
spelling unknown words. The file is committed; `tests/test_data_tokenizer.py` checks it still covers the
templates and fits the tiny model's 512-token vocabulary.
"""
from __future__ import annotations

import argparse
import json
import os

from bagel_jax.data import synthetic, tokenizer
from bagel_jax.data.samples import GEN_THINK_SYSTEM_PROMPT, VLM_THINK_SYSTEM_PROMPT

MAX_VOCAB = 512


def collect_words(records_per_task: int = 400) -> set:
  words = set()
  for split in synthetic.SPLITS:
    for task in synthetic.TASKS:
      src = synthetic.SyntheticSource(task, split, records_per_task)
      for i in range(records_per_task):
        for text in src[i]["texts"]:
          words.update(tokenizer.pre_tokenize(text))
  for w in synthetic.WORDS + tuple(synthetic.COLORS) + synthetic.SHAPES + tuple(synthetic.PLURALS.values()) + \
      synthetic.NUMBERS + tuple(synthetic.DIRECTIONS):
    words.update(tokenizer.pre_tokenize(w))
  for text in (GEN_THINK_SYSTEM_PROMPT, VLM_THINK_SYSTEM_PROMPT, " ".join(synthetic.RELATIONS)):
    words.update(tokenizer.pre_tokenize(text))
  return words - set(tokenizer.THINK)


def build(records_per_task: int = 400) -> list:
  words = sorted(collect_words(records_per_task))
  chars = [c for c in tokenizer.CHARS if c not in words]
  cont = ["##" + c for c in tokenizer.CHARS]
  tokens = list(tokenizer.RESERVED) + list(tokenizer.THINK) + words + chars + cont
  if len(tokens) > MAX_VOCAB:
    raise ValueError(f"synthetic vocabulary has {len(tokens)} tokens > {MAX_VOCAB} (the tiny model's vocab)")
  return tokens


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--records", type=int, default=400, help="records per task and split to scan")
  ap.add_argument("--out", default=tokenizer.SYNTHETIC_VOCAB)
  args = ap.parse_args()
  tokens = build(args.records)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"description": "word vocabulary of bagel_jax.data.synthetic (python -m bagel_jax.data.build_vocab)",
               "special": {"pad": 0, "bos": 1, "eos": 2, "vision_start": 3, "vision_end": 4, "unk": 5},
               "tokens": tokens}, f, indent=0)
    f.write("\n")
  print(f"wrote {len(tokens)} tokens to {args.out}")


if __name__ == "__main__":
  main()
