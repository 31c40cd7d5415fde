"""Tokenizers: any `tokenizers` `tokenizer.json` (Qwen2.5's, a converted release's, or one trained on one's own
captions with `python -m bagel_jax.data.train_tokenizer`), or the shipped word-level vocabulary of the
synthetic data.

Both expose `encode(text) -> list[int]` (no special tokens added: the layout adds `<|im_start|>`/`<|im_end|>`
around every text item), `decode(ids)`, `vocab_size` and `special` (a `sequence.SpecialTokens` with the ids of
`<|im_start|>`, `<|im_end|>`, `<|vision_start|>`, `<|vision_end|>`). The pipeline checks `special` against the
model config, so a tokenizer/model mismatch fails at start-up, not as silent garbage.

Word-level vocabulary (`assets/synthetic_vocab.json`, written by `python -m bagel_jax.data.build_vocab`): ids
0..4 are padding and the four special roles (`models.config.TINY_SPECIAL_IDS`), 5 is `<unk>`, then `<think>`,
`</think>`, the template words, and single characters plus `##`-continuations so a word outside the vocabulary
is spelled rather than lost. Text is lower-cased and split into words, digit runs and single punctuation marks.
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Optional, Sequence

from bagel_jax.layout import SpecialTokens

ASSET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
SYNTHETIC_VOCAB = os.path.join(ASSET_DIR, "synthetic_vocab.json")
RESERVED = ("<pad>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<unk>")
THINK = ("<think>", "</think>")
QWEN_SPECIALS = dict(bos="<|im_start|>", eos="<|im_end|>", vision_start="<|vision_start|>",
                     vision_end="<|vision_end|>")
_WORD_RE = re.compile(r"</?think>|[a-z]+|[0-9]+|[^\sa-z0-9]")
CHARS = tuple("abcdefghijklmnopqrstuvwxyz0123456789")


def pre_tokenize(text: str) -> List[str]:
  return _WORD_RE.findall(text.lower())


class WordTokenizer:
  """Word-level tokenizer over a fixed vocabulary, with character fallback for unknown words."""

  def __init__(self, tokens: Sequence[str]):
    tokens = list(tokens)
    if tuple(tokens[:len(RESERVED)]) != RESERVED:
      raise ValueError(f"WordTokenizer: the vocabulary must start with {RESERVED}, got {tokens[:len(RESERVED)]}")
    if len(set(tokens)) != len(tokens):
      raise ValueError("WordTokenizer: duplicate tokens in the vocabulary")
    self.tokens = tokens
    self.ids: Dict[str, int] = {t: i for i, t in enumerate(tokens)}
    self.unk = self.ids["<unk>"]
    self.special = SpecialTokens(bos=1, eos=2, vision_start=3, vision_end=4)
    self.pad = 0

  @classmethod
  def load(cls, path: str = SYNTHETIC_VOCAB) -> "WordTokenizer":
    with open(path) as f:
      d = json.load(f)
    if "tokens" not in d:
      raise ValueError(f"{path}: not a word vocabulary (no 'tokens' list)")
    return cls(d["tokens"])

  @property
  def vocab_size(self) -> int:
    return len(self.tokens)

  def encode(self, text: str) -> List[int]:
    out: List[int] = []
    for w in pre_tokenize(text):
      i = self.ids.get(w)
      if i is not None:
        out.append(i)
        continue
      for k, ch in enumerate(w):  # spell it: first char, then ##-continuations
        out.append(self.ids.get(ch if k == 0 else "##" + ch, self.unk))
    return out

  def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
    words: List[str] = []
    for i in ids:
      i = int(i)
      if not 0 <= i < len(self.tokens):
        raise ValueError(f"WordTokenizer.decode: id {i} outside the vocabulary of {len(self.tokens)}")
      t = self.tokens[i]
      if skip_special and i < len(RESERVED) - 1:
        continue
      if t.startswith("##") and words:
        words[-1] += t[2:]
      else:
        words.append(t)
    return " ".join(words)

  def __getstate__(self):
    return {"tokens": self.tokens}

  def __setstate__(self, state):
    self.__init__(state["tokens"])


class HFTokenizer:
  """A Hugging Face `tokenizers` file (Qwen2.5's `tokenizer.json`); the four special ids are read from it."""

  def __init__(self, path: str):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"HFTokenizer: no tokenizer file at {path}")
    from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
    self.path = path
    self.tok = Tokenizer.from_file(path)
    ids = {}
    for role, token in QWEN_SPECIALS.items():
      i = self.tok.token_to_id(token)
      if i is None:
        raise ValueError(f"HFTokenizer: {path} has no {token} token (needed as {role})")
      ids[role] = int(i)
    self.special = SpecialTokens(**ids)
    unk = self.tok.token_to_id("<unk>")
    self.unk = None if unk is None else int(unk)  # byte-level BPE never emits it; the start-up report counts it

  @property
  def vocab_size(self) -> int:
    return self.tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> List[int]:
    return list(self.tok.encode(text, add_special_tokens=False).ids)

  def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

  def __getstate__(self):
    return {"path": self.path}

  def __setstate__(self, state):
    self.__init__(state["path"])


def load_tokenizer(path: Optional[str] = None):
  """`path` to a tokenizer.json -> HFTokenizer; None/'' -> the shipped synthetic word vocabulary."""
  if not path:
    return WordTokenizer.load()
  if path.endswith(".json") and os.path.isfile(path):
    with open(path) as f:
      head = f.read(4096)
    if '"tokens"' in head and '"model"' not in head:
      return WordTokenizer.load(path)
  return HFTokenizer(path)
