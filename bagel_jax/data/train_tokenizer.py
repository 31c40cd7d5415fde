"""Train a subword (byte-level BPE) tokenizer on the texts of one's own manifests, with the `tokenizers` library.

  python -m bagel_jax.data.train_tokenizer --manifest data/t2i.jsonl [--manifest data/vqa.jsonl] \
      --vocab-size 512 --out data/tokenizer.json

The special tokens sit at fixed ids, the ones the tiny preset's layout expects (`models.config.TINY_SPECIAL_IDS`):
0 <pad>, 1 <|im_start|>, 2 <|im_end|>, 3 <|vision_start|>, 4 <|vision_end|>, 5 <unk>, 6 <think>, 7 </think>.
Byte-level BPE spells any text, accented or not, from its 256 byte symbols, so no word becomes <unk> and no
word is spelled letter by letter once it is frequent enough to earn merges. `--vocab-size` counts everything
(specials + 256 bytes + merges) and must not exceed the model's vocabulary (512 for the tiny preset).
Use it with `tokenizer=data/tokenizer.json` in experiments/own_data configs (or `--config.data.tokenizer=`);
any other `tokenizer.json` with the four Qwen role tokens (e.g. a converted release's) loads the same way.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Iterator, List, Sequence

from bagel_jax.data.tokenizer import HFTokenizer

SPECIAL_TOKENS = ("<pad>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<unk>", "<think>",
                  "</think>")
MIN_VOCAB = len(SPECIAL_TOKENS) + 256


def manifest_texts(paths: Sequence[str]) -> Iterator[str]:
  """Every string of `texts` in the JSONL manifests (records that do not parse are passed over: the pipeline
  counts them when it trains)."""
  for path in paths:
    with open(path, "rb") as f:
      for line in f:
        try:
          rec = json.loads(line)
        except (ValueError, RecursionError):
          continue
        texts = rec.get("texts") if isinstance(rec, dict) else None
        for t in texts if isinstance(texts, list) else []:
          if isinstance(t, str) and t.strip():
            yield t


def train(texts: Sequence[str], vocab_size: int, out: str, *, lowercase: bool = False, min_frequency: int = 2):
  """Trains byte-level BPE on `texts`, writes `out` (tokenizer.json) and returns the `HFTokenizer`."""
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # pylint: disable=import-outside-toplevel
  if vocab_size < MIN_VOCAB:
    raise ValueError(f"--vocab-size {vocab_size} < {MIN_VOCAB} (the {len(SPECIAL_TOKENS)} special tokens and 256 "
                     "byte symbols of byte-level BPE)")
  texts = list(texts)
  if not texts:
    raise ValueError("no texts to train on (the manifests have no non-empty 'texts')")
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  norm: List = [normalizers.NFC()] + ([normalizers.Lowercase()] if lowercase else [])
  tok.normalizer = normalizers.Sequence(norm)
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  for i, t in enumerate(SPECIAL_TOKENS):
    if tok.token_to_id(t) != i:
      raise AssertionError(f"special token {t} got id {tok.token_to_id(t)}, expected {i}")
  out = os.path.abspath(out)
  os.makedirs(os.path.dirname(out), exist_ok=True)
  tok.save(out)
  return HFTokenizer(out)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--manifest", action="append", required=True, help="JSONL manifest (repeatable)")
  ap.add_argument("--vocab-size", type=int, default=512, help="total vocabulary (<= the model's; tiny: 512)")
  ap.add_argument("--out", required=True, help="tokenizer.json to write")
  ap.add_argument("--lowercase", action="store_true", help="lower-case texts before tokenizing")
  ap.add_argument("--min-frequency", type=int, default=2, help="a merge must occur at least this often")
  args = ap.parse_args(argv)
  texts = list(manifest_texts(args.manifest))
  try:
    tok = train(texts, args.vocab_size, args.out, lowercase=args.lowercase, min_frequency=args.min_frequency)
  except ValueError as e:
    ap.exit(2, f"train_tokenizer: error: {e}\n")
  lens = [len(tok.encode(t)) for t in texts]
  words = sum(len(t.split()) for t in texts)
  print(f"wrote {args.out}: vocab {tok.vocab_size} (specials at ids 0-{len(SPECIAL_TOKENS) - 1}); {len(texts)} "
        f"texts: tokens per text mean {sum(lens) / len(lens):.1f} max {max(lens)}, {sum(lens) / max(words, 1):.2f} "
        f"tokens per word")


if __name__ == "__main__":
  main()
