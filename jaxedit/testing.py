"""Stand-ins for tests, program smoke runs and benchmarks: tokenizers that need no files, and a tiny
random Llama. Their metrics mean nothing; they exercise the code paths in seconds.

Both tokenizers follow the Hugging Face call convention the library uses:
tokenizer(text, add_special_tokens=True) -> {"input_ids": [...]}, decode(ids), len(tokenizer), and
pad/bos/eos ids 0/1/2.
"""
from __future__ import annotations

import re
import zlib
from typing import Sequence

PAD, BOS, EOS = 0, 1, 2


class CharTokenizer:
    """One id per character (3 + ord(c) % 125), BOS first: every subject boundary is a token boundary."""

    pad_token_id, bos_token_id, eos_token_id = PAD, BOS, EOS

    def __len__(self):
        return 128

    def __call__(self, text, add_special_tokens=True, **_):
        ids = [3 + ord(c) % 125 for c in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}

    def decode(self, ids, skip_special_tokens=False, **_):
        return "".join(chr(int(i) - 3) if int(i) >= 3 else ("" if skip_special_tokens else f"<{int(i)}>")
                       for i in ids)


class WordTokenizer:
    """One id per word or punctuation mark: `known_words` get ids 3, 4, ...; other words a crc32 hash
    into the rest of the vocabulary. BOS first unless add_bos is False."""

    pad_token_id, bos_token_id, eos_token_id = PAD, BOS, EOS
    _WORD = re.compile(r"\w+|[^\w\s]")

    def __init__(self, vocab_size: int = 256, add_bos: bool = True, known_words: Sequence[str] = ()):
        if vocab_size <= 3 + len(known_words):
            raise ValueError(f"vocab_size {vocab_size} leaves no ids for hashed words")
        self.vocab_size, self.add_bos = vocab_size, add_bos
        self.ids = {w: 3 + i for i, w in enumerate(known_words)}
        self.words = {i: w for w, i in self.ids.items()}

    def __len__(self):
        return self.vocab_size

    def _id(self, word: str) -> int:
        if word in self.ids:
            return self.ids[word]
        first = 3 + len(self.ids)
        i = first + zlib.crc32(word.encode("utf-8")) % (self.vocab_size - first)
        self.words.setdefault(i, word)
        return i

    def __call__(self, text, add_special_tokens=True, **_):
        ids = [self._id(w) for w in self._WORD.findall(text)]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens and self.add_bos else []) + ids}

    def decode(self, ids, skip_special_tokens=False, **_):
        out = []
        for i in map(int, ids):
            if i < 3:
                if not skip_special_tokens:
                    out.append(f"<{i}>")
                continue
            out.append(self.words.get(i, f"w{i}"))
        return "".join(" " + w for w in out)


def tiny_model(seed: int = 0, num_hidden_layers: int = 4, vocab_size: int = 256, std: float = 0.1, **config):
    """(cfg, params, WordTokenizer) of a random Llama-3-style model (llama3_flax.config.tiny)."""
    import jax

    from llama3_flax import config as lconfig, model as lmodel

    cfg = lconfig.tiny(num_hidden_layers=num_hidden_layers, vocab_size=vocab_size, **config)
    return cfg, lmodel.init_params(cfg, jax.random.PRNGKey(seed), std=std), WordTokenizer(vocab_size)
