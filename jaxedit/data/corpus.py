"""Text corpora for the preservation covariance C0, and the token samples drawn from them.

A corpus is a local text file (WikiText .tokens/.txt files are split into articles at ` = Title = `
lines; other files into paragraphs at blank lines), or a Hugging Face dataset id "name[:config]"
(streamed; needs internet), e.g. "wikitext:wikitext-103-raw-v1" or "wikipedia:20220301.en".
The reference implementations use 100k Wikipedia articles truncated to the model's context.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Iterable, Iterator

from jaxedit.data.paths import corpus_file

_LOCAL_SUFFIXES = (".txt", ".tokens", ".raw", ".text")


def _is_wikitext_title(line: str) -> bool:
    """` = Title = ` starts an article; ` = = Section = = ` does not."""
    s = line.strip()
    return len(s) > 4 and s.startswith("= ") and s.endswith(" =") and not s.startswith("= =")


def wikitext_articles(lines: Iterable[str]) -> Iterator[str]:
    """Splits WikiText lines into articles, each starting with its ` = Title = ` line.

    Args:
      lines: the lines of a WikiText file (or the rows of a WikiText dataset), newlines optional.
    Yields:
      each article's text (title line included, blank lines dropped), in order.
    """
    article: list[str] = []
    for line in lines:
        if _is_wikitext_title(line) and any(not _is_wikitext_title(a) for a in article):
            yield "\n".join(article)
            article = []
        if line.strip():
            article.append(line.strip())
    if article:
        yield "\n".join(article)


def _paragraphs(lines: Iterable[str]) -> Iterator[str]:
    block: list[str] = []
    for line in lines:
        if line.strip():
            block.append(line.strip())
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


def read_text_corpus(path: str | os.PathLike) -> list[str]:
    """The documents of a local text file: WikiText articles if it has ` = Title = ` lines, else
    paragraphs separated by blank lines."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {str(path)!r} does not exist (pass a local text file, e.g. a "
                                f"WikiText .tokens file, or a Hugging Face dataset id such as "
                                f"'wikitext:wikitext-103-raw-v1')")
    lines = path.read_text(encoding="utf-8").splitlines()
    if any(_is_wikitext_title(line) for line in lines):
        return list(wikitext_articles(lines))
    return list(_paragraphs(lines))


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
    """Where the text comes from: a local file (`path`) or a hub dataset (`dataset`, `config`, `split`)."""

    path: str | None = None
    dataset: str | None = None
    config: str | None = None
    split: str = "train"
    text_field: str = "text"

    @classmethod
    def parse(cls, corpus: str | os.PathLike, split: str = "train", text_field: str = "text",
              data_dir: str | os.PathLike | None = None) -> "CorpusSpec":
        """A local path if it exists or looks like one (a .txt/.tokens suffix, a leading / . or ~;
        a bare file name that does not exist is looked up in <data_dir>/corpus, see
        jaxedit.data.paths), else a hub id "name[:config]" (prefix "hf:" to force)."""
        s = str(corpus)
        if s.startswith("hf:"):
            s = s[3:]
        elif (Path(s).expanduser().exists() or s.startswith(("/", ".", "~"))
              or s.lower().endswith(_LOCAL_SUFFIXES) or isinstance(corpus, os.PathLike)):
            path = Path(s).expanduser()
            if not path.exists() and path.name == s:  # a bare name: the data folder's corpus/
                path = corpus_file(s, data_dir)
            return cls(path=str(path.resolve()))
        name, _, config = s.partition(":")
        if not name:
            raise ValueError(f"corpus {corpus!r} is neither a local file nor a dataset id 'name[:config]'")
        return cls(dataset=name, config=config or None, split=split, text_field=text_field)

    def describe(self) -> str:
        if self.path:
            return self.path
        return f"hf:{self.dataset}" + (f":{self.config}" if self.config else "") + f" [{self.split}]"

    def tag(self) -> str:
        """A short readable name for file names."""
        return Path(self.path).name if self.path else f"{self.dataset}-{self.config or ''}-{self.split}"

    def identity(self) -> str:
        """A string that changes when the text does: the file's sha256, or the dataset coordinates."""
        if self.path:
            p = Path(self.path)
            if not p.is_file():
                read_text_corpus(p)  # raises the clear error
            digest = hashlib.sha256()
            with open(p, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
            return f"file:{p.name}:sha256:{digest.hexdigest()}"
        return f"hf:{self.dataset}:{self.config}:{self.split}:{self.text_field}"

    def documents(self) -> Iterator[str]:
        """The documents (articles), streamed for hub datasets."""
        if self.path:
            yield from read_text_corpus(self.path)
            return
        yield from _hub_documents(self)


def _hub_documents(spec: CorpusSpec) -> Iterator[str]:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise ImportError("reading a hub corpus needs the `datasets` package (pip install datasets)") from e
    try:
        ds = datasets.load_dataset(spec.dataset, spec.config, split=spec.split, streaming=True)
        rows = iter(ds)
        first = next(rows)
    except Exception as e:
        raise RuntimeError(
            f"could not load the Hugging Face dataset {spec.dataset!r} (config {spec.config!r}, split "
            f"{spec.split!r}): {type(e).__name__}: {e}. Without internet (or with HF_DATASETS_OFFLINE=1) "
            f"pass a local text file instead, e.g. a WikiText .tokens file") from e
    if spec.text_field not in first:
        raise KeyError(f"dataset {spec.dataset!r} rows have no field {spec.text_field!r} (fields: {sorted(first)})")

    def texts():
        yield first[spec.text_field]
        for row in rows:
            yield row[spec.text_field]

    if "wikitext" in spec.dataset.lower():  # one row per line: rebuild the articles
        yield from wikitext_articles(texts())
    else:
        yield from (t for t in texts() if t and t.strip())


def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text (BOS for Llama-3, nothing for SmolLM2)."""
    with_special = list(tokenizer("a")["input_ids"])
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    for i in range(len(with_special) - len(plain) + 1):
        if with_special[i:i + len(plain)] == plain:
            return with_special[:i]
    return []


def corpus_samples(tokenizer, documents: Iterable[str], n_samples: int, max_length: int) -> list[list[int]]:
    """Token samples of at most max_length tokens (special prefix such as BOS included).

    Each document gives its first max_length tokens, as in the reference implementations; when the
    corpus has fewer than n_samples documents, later chunks of the documents are used too (all
    second chunks, then all third chunks, ...), so a small local corpus still yields n_samples.

    Returns:
      up to n_samples lists of token ids (fewer if the corpus is exhausted).
    """
    if n_samples <= 0 or max_length <= 0:
        raise ValueError(f"n_samples ({n_samples}) and max_length ({max_length}) must be positive")
    prefix = special_prefix(tokenizer)
    body = max_length - len(prefix)
    if body <= 0:
        raise ValueError(f"max_length {max_length} leaves no room after the special prefix {prefix}")
    samples: list[list[int]] = []
    later: list[list[list[int]]] = []  # per document, its chunks after the first
    spare = 0
    for doc in documents:
        ids = list(tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"])
        chunks = [prefix + ids[i:i + body] for i in range(0, len(ids), body)]
        if not chunks:
            continue
        samples.append(chunks[0])
        if len(samples) == n_samples:
            return samples
        if spare < n_samples:
            later.append(chunks[1:])
            spare += len(chunks) - 1
    depth = 0
    while len(samples) < n_samples and any(len(c) > depth for c in later):
        for chunks in later:
            if len(chunks) > depth:
                samples.append(chunks[depth])
                if len(samples) == n_samples:
                    return samples
        depth += 1
    return samples
