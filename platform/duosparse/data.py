"""Word-level language-model data: tokenizing, caching, the synthetic corpus, batching.

Tokenization follows github.com/pytorch/examples (word_language_model/data.py) exactly:
each line is split on whitespace, one ``<eos>`` is appended per line (an empty line gives
a lone ``<eos>``), and one vocabulary is built over train, then valid, then test. With the
canonical files this gives the published figures (PTB: 10,000 types; WikiText-2: 33,278).

Finding, verifying (sha256) and downloading the real corpora is :mod:`duosparse.corpora`;
its public names are exported from here too, so ``duosparse.data`` stays the one entry point.

Besides the real corpora there is a ``synthetic`` corpus (a sparse Markov chain), so
that training code can be tested in seconds without any files.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import logging
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .corpora import (
    CORPORA,
    DATA_DIR_ENV,
    MIRROR_ENV,
    SPLITS,
    SYNTHETIC,
    CorpusSpec,
    DataIntegrityError,
    DataNotFoundError,
    candidate_roots,
    data_report,
    download_corpus,
    file_sha256,
    find_corpus_dir,
    integrity_error,
    user_cache_dir,
    verify_corpus_dir,
)

__all__ = [
    "CORPORA",
    "DATA_DIR_ENV",
    "MIRROR_ENV",
    "SPLITS",
    "SYNTHETIC",
    "Corpus",
    "CorpusSpec",
    "DataIntegrityError",
    "DataNotFoundError",
    "Dictionary",
    "batchify",
    "bptt_batches",
    "epoch_batches",
    "candidate_roots",
    "clear_memory_cache",
    "data_report",
    "download_corpus",
    "find_corpus_dir",
    "load_corpus",
    "synthetic_corpus",
    "synthetic_transition_matrix",
    "unigram_log_probs",
    "unigram_perplexity",
    "user_cache_dir",
    "verify_corpus_dir",
]

log = logging.getLogger(__name__)

EOS = "<eos>"

# Bump when the tokenized-cache layout or the tokenization itself changes, so stale
# cache files are rebuilt instead of trusted.
_TOKENIZED_FORMAT = 1


# --------------------------------------------------------------------------------------
# Vocabulary and corpus
# --------------------------------------------------------------------------------------


class Dictionary:
    """Word <-> id mapping; ids are given in order of first appearance."""

    def __init__(self) -> None:
        self.word2idx: dict[str, int] = {}
        self.idx2word: list[str] = []

    def add_word(self, word: str) -> int:
        if word not in self.word2idx:
            self.idx2word.append(word)
            self.word2idx[word] = len(self.idx2word) - 1
        return self.word2idx[word]

    @classmethod
    def from_words(cls, words: list[str]) -> Dictionary:
        d = cls()
        for w in words:
            d.add_word(w)
        if len(d) != len(words):
            raise ValueError("vocabulary list contains duplicate words")
        return d

    def __len__(self) -> int:
        return len(self.idx2word)

    def __contains__(self, word: object) -> bool:
        return word in self.word2idx


@dataclass(eq=False, repr=False)
class Corpus:
    """A tokenized corpus: three 1-D LongTensor token streams sharing one vocabulary.

    Corpora returned by :func:`load_corpus` are shared between callers in one process:
    treat the tensors as read-only.
    """

    name: str
    dictionary: Dictionary
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor

    @property
    def vocab_size(self) -> int:
        return len(self.dictionary)

    def split(self, name: str) -> torch.Tensor:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; valid choices are {', '.join(SPLITS)}")
        return getattr(self, name)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={self.split(s).numel():,}" for s in SPLITS)
        return f"Corpus(name={self.name!r}, vocab_size={self.vocab_size:,}, {sizes})"


def _tokenize(path: Path, dictionary: Dictionary) -> torch.Tensor:
    """One file -> 1-D LongTensor of ids, adding new words to ``dictionary`` on the way."""
    ids: list[int] = []
    add = dictionary.add_word
    # Text-mode iteration (universal newlines) is what pytorch/examples does; keeping it
    # keeps the token counts identical to the published ones.
    with open(path, encoding="utf8") as f:
        for line in f:
            for word in line.split():
                ids.append(add(word))
            ids.append(add(EOS))
    return torch.tensor(ids, dtype=torch.long)


def _tokenized_cache_path(digests: Mapping[str, str]) -> Path:
    key = hashlib.sha256("\n".join(digests[s] for s in SPLITS).encode()).hexdigest()
    return user_cache_dir() / "tokenized" / f"{key}.pt"


def _read_tokenized(path: Path, corpus: str, digests: Mapping[str, str]) -> Corpus | None:
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("format") != _TOKENIZED_FORMAT or blob.get("digests") != {
            s: digests[s] for s in SPLITS
        }:
            return None
        dictionary = Dictionary.from_words(list(blob["vocab"]))
        streams = {s: blob[s] for s in SPLITS}
        for t in streams.values():
            if not (isinstance(t, torch.Tensor) and t.dtype == torch.long and t.dim() == 1):
                return None
            if t.numel() and int(t.max()) >= len(dictionary):
                return None
    except Exception as exc:  # a damaged cache is rebuilt, never fatal
        log.warning("ignoring unreadable tokenized cache %s (%s)", path, exc)
        return None
    return Corpus(corpus, dictionary, **streams)


def _write_tokenized(path: Path, corpus: Corpus, digests: Mapping[str, str]) -> None:
    blob = {
        "format": _TOKENIZED_FORMAT,
        "corpus": corpus.name,
        "digests": {s: digests[s] for s in SPLITS},
        "vocab": list(corpus.dictionary.idx2word),
        **{s: corpus.split(s) for s in SPLITS},
    }
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".part", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save(blob, f)
        os.replace(tmp, path)  # atomic: concurrent trials never read a half-written file
        tmp = None
    except (OSError, RuntimeError) as exc:  # read-only home, full disk: just skip the cache
        log.info("not caching tokenized corpus at %s (%s)", path, exc)
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


@functools.lru_cache(maxsize=4)
def _load_real(corpus: str, corpus_dir: str, stamp: tuple, verify: bool) -> Corpus:
    # `stamp` (sizes and mtimes) is only part of the cache key, so an edited file is reread.
    spec = CORPORA[corpus]
    directory = Path(corpus_dir)
    files = {s: directory / spec.filename(s) for s in SPLITS}
    digests = {s: file_sha256(files[s]) for s in SPLITS}
    if verify:
        for s in SPLITS:
            if digests[s] != spec.sha256[s]:
                raise integrity_error(corpus, files[s], spec.sha256[s], digests[s])
    cache_path = _tokenized_cache_path(digests)
    cached = _read_tokenized(cache_path, corpus, digests)
    if cached is not None:
        return cached
    dictionary = Dictionary()
    # Order matters: the vocabulary is built over train, then valid, then test.
    streams = {s: _tokenize(files[s], dictionary) for s in SPLITS}
    result = Corpus(corpus, dictionary, **streams)
    _write_tokenized(cache_path, result, digests)
    return result


def clear_memory_cache() -> None:
    """Forget corpora tokenized in this process (the on-disk cache is kept)."""
    _load_real.cache_clear()


def load_corpus(
    corpus: str,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    seed: int = 0,
    *,
    verify: bool = True,
) -> Corpus:
    """Load a corpus by name: ``ptb``, ``wikitext-2`` or ``synthetic``.

    Real corpora are located with :func:`find_corpus_dir`, checked against their sha256
    (``verify=False`` accepts modified files, e.g. a custom preprocessing), tokenized once
    per process and cached on disk under the user cache. ``seed`` only affects
    ``synthetic``.
    """
    if corpus == SYNTHETIC:
        return synthetic_corpus(seed)
    corpus_dir = find_corpus_dir(corpus, data_dir, download=download).resolve()
    stamp = tuple(
        (st.st_size, st.st_mtime_ns)
        for st in ((corpus_dir / CorpusSpec.filename(s)).stat() for s in SPLITS)
    )
    return _load_real(corpus, str(corpus_dir), stamp, verify)


# --------------------------------------------------------------------------------------
# Synthetic corpus
# --------------------------------------------------------------------------------------


def synthetic_transition_matrix(seed: int = 0, vocab_size: int = 64) -> torch.Tensor:
    """The (V, V) float64 transition matrix of the synthetic corpus's Markov chain.

    Each word has 3 likely successors holding 90% of its outgoing mass; the remaining
    10% is spread over all words so every transition is possible (the chain is ergodic
    and its entropy rate finite). Id ``V - 1`` is ``<eos>``.
    """
    if vocab_size < 4:
        raise ValueError(f"vocab_size must be at least 4, got {vocab_size}")
    g = torch.Generator().manual_seed(seed)
    v = vocab_size
    probs = torch.full((v, v), 0.1 / v, dtype=torch.float64)
    for word in range(v):
        successors = torch.randperm(v, generator=g)[:3]
        weights = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
        probs[word, successors] += 0.9 * weights / weights.sum()
    return probs


def synthetic_corpus(
    seed: int = 0,
    vocab_size: int = 64,
    train_tokens: int = 40_000,
    valid_tokens: int = 4_000,
    test_tokens: int = 4_000,
) -> Corpus:
    """A deterministic, learnable corpus drawn from :func:`synthetic_transition_matrix`.

    Words are ``w0`` ... ``w{V-2}`` (``wK`` has id K) and ``<eos>`` (id ``V - 1``). One
    chain is run for all splits and cut into train, valid, test, so a small RNN quickly
    gets far below the unigram perplexity (down to about exp(entropy rate)).
    """
    probs = synthetic_transition_matrix(seed, vocab_size)
    dictionary = Dictionary.from_words([f"w{i}" for i in range(vocab_size - 1)] + [EOS])
    total = train_tokens + valid_tokens + test_tokens
    g = torch.Generator().manual_seed(seed + 1_000_003)  # independent of the matrix draw
    uniforms = torch.rand(total, generator=g, dtype=torch.float64).tolist()
    # Inverse-CDF sampling in a plain loop: one torch.multinomial call per token would be
    # ~50x slower for a 48k-token stream.
    cdf = probs.cumsum(dim=1).tolist()
    last = vocab_size - 1
    state = last  # start like a fresh sentence, after an <eos>
    ids = []
    for u in uniforms:
        state = min(bisect.bisect_right(cdf[state], u), last)
        ids.append(state)
    stream = torch.tensor(ids, dtype=torch.long)
    train, valid, test = stream.split([train_tokens, valid_tokens, test_tokens])
    return Corpus(SYNTHETIC, dictionary, train.clone(), valid.clone(), test.clone())


# --------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------


def batchify(data: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Cut a 1-D stream into ``batch_size`` contiguous columns: shape (T, B).

    Column j holds tokens ``[j*T, (j+1)*T)``; the remainder that does not fill a whole
    row is dropped, as in pytorch/examples. Columns are independent streams, so the
    hidden state can be carried down each one across BPTT chunks.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if data.dim() != 1:
        raise ValueError(f"expected a 1-D token stream, got shape {tuple(data.shape)}")
    nbatch = data.size(0) // batch_size
    if nbatch == 0:
        raise ValueError(
            f"a stream of {data.size(0)} tokens is too short for batch_size {batch_size}"
        )
    data = data.narrow(0, 0, nbatch * batch_size)
    return data.view(batch_size, -1).t().contiguous()


def _variable_length(bptt: int, generator: torch.Generator | None) -> int:
    # AWD-LSTM (Merity et al. 2018): mostly bptt, sometimes bptt/2, jittered by N(0, 5^2),
    # so chunk boundaries move between epochs and every token gets trained at every depth.
    base = bptt if torch.rand(1, generator=generator).item() < 0.95 else bptt / 2
    jitter = torch.randn(1, generator=generator, dtype=torch.float64).item()
    return max(5, int(base + 5.0 * jitter))


def bptt_batches(
    source: torch.Tensor,
    bptt: int,
    variable: bool = False,
    generator: torch.Generator | None = None,
    max_batches: int | None = None,
    start: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(inputs, targets)``, each (seq_len, B), walking ``source`` in order from row
    ``start``.

    ``targets`` are ``inputs`` shifted one step ahead, so the chunks cover the stream
    without gaps or overlap. With ``variable=True`` the lengths follow AWD-LSTM and are
    drawn from ``generator`` (the global torch RNG when None); they never exceed
    ``bptt + 20`` or the data that is left. AWD-LSTM also scales the learning rate by
    ``seq_len / bptt`` per chunk; that is up to the training loop
    (``inputs.size(0)`` is the length).
    """
    if bptt < 1:
        raise ValueError(f"bptt must be >= 1, got {bptt}")
    last = source.size(0) - 1  # the final token is only ever a target
    i = start
    count = 0
    while i < last:
        if max_batches is not None and count >= max_batches:
            return
        seq_len = min(_variable_length(bptt, generator), bptt + 20) if variable else bptt
        seq_len = min(seq_len, last - i)
        yield source[i : i + seq_len], source[i + 1 : i + 1 + seq_len]
        i += seq_len
        count += 1


def epoch_batches(
    source: torch.Tensor,
    bptt: int,
    steps: int,
    start: int = 0,
    variable: bool = False,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """``steps`` chunks from row ``start`` on, wrapping to row 0 at the end of the stream.

    Yields ``(inputs, targets, next_start)``: a capped epoch hands ``next_start`` of its last
    chunk to the next epoch, so capped epochs walk the whole corpus before any token comes
    again (``next_start == 0`` marks a wrap: the stream restarts, and so should the state).
    """
    position, count = start, 0
    while count < steps:
        chunks = bptt_batches(source, bptt, variable, generator, steps - count, start=position)
        for inputs, targets in chunks:
            position += inputs.size(0)
            if position >= source.size(0) - 1:
                position = 0
            count += 1
            yield inputs, targets, position
        if count == 0:
            raise ValueError(f"a stream of {source.size(0)} rows has no chunk to train on")


# --------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------


def unigram_log_probs(train: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """log p(word) of the add-one smoothed unigram model fitted on ``train`` (float64)."""
    counts = torch.bincount(train.reshape(-1), minlength=vocab_size).to(torch.float64) + 1.0
    if counts.numel() > vocab_size:
        raise ValueError(f"train holds ids >= vocab_size ({vocab_size})")
    return counts.log() - math.log(counts.sum().item())


def unigram_perplexity(train: torch.Tensor, eval_stream: torch.Tensor, vocab_size: int) -> float:
    """Perplexity on ``eval_stream`` of an add-one smoothed unigram model fitted on ``train``.

    A model that has learnt nothing about context cannot beat this (much): it is the bar
    a language model must clear.
    """
    if eval_stream.numel() == 0:
        raise ValueError("eval_stream is empty")
    log_probs = unigram_log_probs(train, vocab_size)
    return math.exp(-log_probs[eval_stream.reshape(-1)].mean().item())
