"""Tests for duosparse.data against the real PTB / WikiText-2 files and known figures.

The real-data tests read $DUOSPARSE_DATA_DIR (CI sets it to ../shared/data) and fail,
rather than skip, when it is missing.
"""

from __future__ import annotations

import functools
import http.server
import math
import os
import shutil
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from duosparse import data
from duosparse.data import (
    CORPORA,
    SPLITS,
    DataIntegrityError,
    DataNotFoundError,
    Dictionary,
    batchify,
    bptt_batches,
    candidate_roots,
    data_report,
    download_corpus,
    find_corpus_dir,
    load_corpus,
    synthetic_corpus,
    synthetic_transition_matrix,
    unigram_perplexity,
    verify_corpus_dir,
)

# Published figures (shared/data/README.md): tokens include one <eos> per line.
EXPECTED = {
    "ptb": {
        "types": 10_000,
        "train": 929_589,
        "valid": 73_760,
        "test": 82_430,
        "bytes": {"train": 5_101_618, "valid": 399_782, "test": 449_945},
    },
    "wikitext-2": {
        "types": 33_278,
        "train": 2_088_628,
        "valid": 217_646,
        "test": 245_569,
        "bytes": {"train": 10_797_148, "valid": 1_121_681, "test": 1_256_449},
    },
}


def real_data_dir() -> Path:
    """$DUOSPARSE_DATA_DIR, or a test failure saying how to set it (never a skip)."""
    value = os.environ.get("DUOSPARSE_DATA_DIR")
    if not value:
        pytest.fail(
            "DUOSPARSE_DATA_DIR is not set: these tests need the real PTB and WikiText-2 "
            "files. Set DUOSPARSE_DATA_DIR to the folder holding ptb/ and wikitext-2/ "
            "(in this repository's layout, ../shared/data); CI always sets it.",
            pytrace=False,
        )
    path = Path(value)
    for corpus in CORPORA:
        for split in SPLITS:
            if not (path / corpus / f"{split}.txt").is_file():
                pytest.fail(f"DUOSPARSE_DATA_DIR={value} lacks {corpus}/{split}.txt", pytrace=False)
    return path


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the user cache at a temp folder so no test writes to the real home."""
    cache = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.delenv("DUOSPARSE_DATA_MIRROR", raising=False)
    # Requests to the local test server must not be sent through a proxy.
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return cache


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@contextmanager
def serve(directory: Path) -> Iterator[str]:
    """Serve ``directory`` over HTTP on 127.0.0.1 (random port) from a thread."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def copy_corpus(corpus: str, root: Path) -> Path:
    """Copy the real files of ``corpus`` to ``root/<corpus>/`` and return that folder."""
    dest = root / corpus
    dest.mkdir(parents=True)
    for split in SPLITS:
        shutil.copyfile(real_data_dir() / corpus / f"{split}.txt", dest / f"{split}.txt")
        (dest / f"{split}.txt").chmod(0o644)  # the shared copies are read-only
    return dest


def change_one_byte(path: Path) -> None:
    """Replace one letter (so line and word structure stay the same) with another."""
    raw = bytearray(path.read_bytes())
    i = raw.index(b"e", 100)
    raw[i] = ord("o")
    path.write_bytes(bytes(raw))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------
# Real corpora: counts
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("corpus", ["ptb", "wikitext-2"])
def test_real_corpus_has_published_counts(corpus: str) -> None:
    root = real_data_dir()
    c = load_corpus(corpus, data_dir=root)
    want = EXPECTED[corpus]
    assert c.name == corpus
    assert c.vocab_size == want["types"]
    assert len(c.dictionary.idx2word) == len(c.dictionary.word2idx) == want["types"]
    for split in SPLITS:
        stream = c.split(split)
        assert stream.dtype == torch.long and stream.dim() == 1
        assert stream.numel() == want[split], split
    assert "<eos>" in c.dictionary and "<unk>" in c.dictionary
    assert int(max(c.train.max(), c.valid.max(), c.test.max())) == want["types"] - 1
    # The first line of train decodes back to the file's words plus <eos>.
    with open(root / corpus / "train.txt", encoding="utf8") as f:
        first = f.readline().split() + ["<eos>"]
    decoded = [c.dictionary.idx2word[i] for i in c.train[: len(first)].tolist()]
    assert decoded == first


def test_ptb_found_through_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    root = real_data_dir()
    monkeypatch.setenv("DUOSPARSE_DATA_DIR", str(root))
    assert find_corpus_dir("ptb") == root / "ptb"
    c = load_corpus("ptb")
    assert (c.vocab_size, c.train.numel()) == (10_000, 929_589)
    # The PTB vocabulary is in first-appearance order, so the first word is fixed.
    assert c.dictionary.idx2word[0] == "aer"


def test_ptb_unigram_perplexity_is_a_sane_baseline() -> None:
    c = load_corpus("ptb", data_dir=real_data_dir())
    ppl = unigram_perplexity(c.train, c.valid, c.vocab_size)
    # Published unigram perplexities for PTB are in the high hundreds; a good LSTM is <100.
    assert 600 < ppl < 800
    # The same add-one model computed independently, in plain Python.
    counts = Counter(c.train.tolist())
    total = c.train.numel() + c.vocab_size
    nll = -sum(math.log((counts[w] + 1) / total) for w in c.valid.tolist()) / c.valid.numel()
    assert ppl == pytest.approx(math.exp(nll), rel=1e-9)


def test_tokenized_corpus_is_cached_on_disk(
    isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = real_data_dir()
    data.clear_memory_cache()
    first = load_corpus("ptb", data_dir=root)
    files = list((isolated_cache / "duosparse" / "tokenized").glob("*.pt"))
    assert len(files) == 1
    blob = torch.load(files[0], weights_only=True)
    assert blob["vocab"] == first.dictionary.idx2word

    def no_tokenizing(*args: object, **kwargs: object) -> None:
        raise AssertionError("should have been read from the on-disk cache")

    data.clear_memory_cache()
    monkeypatch.setattr(data, "_tokenize", no_tokenizing)
    second = load_corpus("ptb", data_dir=root)
    assert second.dictionary.idx2word == first.dictionary.idx2word
    for split in SPLITS:
        assert torch.equal(second.split(split), first.split(split))
    # In-process cache: the same object comes back.
    assert load_corpus("ptb", data_dir=root) is second


def test_unwritable_cache_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    data.clear_memory_cache()
    c = load_corpus("ptb", data_dir=real_data_dir())
    assert c.valid.numel() == 73_760


# ---------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("corpus", ["ptb", "wikitext-2"])
def test_shared_files_verify(corpus: str) -> None:
    report = verify_corpus_dir(corpus, real_data_dir() / corpus)
    assert set(report) == set(SPLITS)
    for split, entry in report.items():
        assert entry["ok"], entry
        assert entry["sha256"] == CORPORA[corpus].sha256[split]
        assert entry["bytes"] == EXPECTED[corpus]["bytes"][split]
        assert Path(entry["path"]) == real_data_dir() / corpus / f"{split}.txt"


def test_changed_byte_and_missing_file_are_reported(tmp_path: Path) -> None:
    corpus_dir = copy_corpus("ptb", tmp_path / "data")
    change_one_byte(corpus_dir / "valid.txt")
    report = verify_corpus_dir("ptb", corpus_dir)
    assert report["train"]["ok"] and report["test"]["ok"]
    assert not report["valid"]["ok"]
    assert report["valid"]["bytes"] == EXPECTED["ptb"]["bytes"]["valid"]  # same size
    assert report["valid"]["sha256"] != CORPORA["ptb"].sha256["valid"]

    (corpus_dir / "test.txt").unlink()
    report = verify_corpus_dir("ptb", corpus_dir)
    assert report["test"] == {**report["test"], "ok": False, "bytes": None, "sha256": None}


def test_load_refuses_a_changed_file(tmp_path: Path) -> None:
    corpus_dir = copy_corpus("ptb", tmp_path / "data")
    change_one_byte(corpus_dir / "valid.txt")
    with pytest.raises(DataIntegrityError) as info:
        load_corpus("ptb", data_dir=tmp_path / "data")
    message = str(info.value)
    assert "valid.txt" in message
    assert CORPORA["ptb"].sha256["valid"] in message
    assert info.value.actual in message and info.value.actual != info.value.expected
    assert "duosparse data download ptb" in message
    # Explicitly accepting modified files still works.
    c = load_corpus("ptb", data_dir=tmp_path / "data", verify=False)
    assert c.valid.numel() == 73_760


# ---------------------------------------------------------------------------------------
# Download
# ---------------------------------------------------------------------------------------


def test_download_from_local_mirror(tmp_path: Path) -> None:
    copy_corpus("ptb", tmp_path / "mirror")
    dest = tmp_path / "dest"
    with serve(tmp_path / "mirror") as url:
        corpus_dir = download_corpus("ptb", dest, base_url=url)
    assert corpus_dir == dest / "ptb"
    assert sorted(p.name for p in corpus_dir.iterdir()) == ["test.txt", "train.txt", "valid.txt"]
    assert all(e["ok"] for e in verify_corpus_dir("ptb", corpus_dir).values())
    for split in SPLITS:
        assert (corpus_dir / f"{split}.txt").read_bytes() == (
            real_data_dir() / "ptb" / f"{split}.txt"
        ).read_bytes()
    # Files already verified are not fetched again: this works with no server at all.
    assert download_corpus("ptb", dest, base_url=f"http://127.0.0.1:{free_port()}") == corpus_dir


def test_download_of_corrupted_file_leaves_nothing(tmp_path: Path) -> None:
    mirror_dir = copy_corpus("ptb", tmp_path / "mirror")
    change_one_byte(mirror_dir / "train.txt")
    dest = tmp_path / "dest"
    with serve(tmp_path / "mirror") as url, pytest.raises(DataIntegrityError) as info:
        download_corpus("ptb", dest, base_url=url)
    assert info.value.expected == CORPORA["ptb"].sha256["train"]
    assert info.value.expected in str(info.value) and info.value.actual in str(info.value)
    leftovers = [p for p in dest.rglob("*") if p.is_file()] if dest.exists() else []
    assert leftovers == []


@pytest.mark.parametrize("server", ["closed-port", "empty-mirror"])
def test_download_failure_explains_how_to_provide_data(tmp_path: Path, server: str) -> None:
    dest = tmp_path / "dest"
    (tmp_path / "empty").mkdir()
    if server == "closed-port":
        with pytest.raises(DataNotFoundError) as info:
            download_corpus("ptb", dest, base_url=f"http://127.0.0.1:{free_port()}")
    else:
        with serve(tmp_path / "empty") as url, pytest.raises(DataNotFoundError) as info:
            download_corpus("ptb", dest, base_url=url)
    message = str(info.value)
    assert "offline" in message and "DUOSPARSE_DATA_DIR" in message
    assert "\n" not in message
    assert not (dest / "ptb" / "train.txt").exists()


def test_find_downloads_into_user_cache_from_mirror_env(
    tmp_path: Path, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy_corpus("ptb", tmp_path / "mirror")
    monkeypatch.delenv("DUOSPARSE_DATA_DIR", raising=False)
    with serve(tmp_path / "mirror") as url:
        monkeypatch.setenv("DUOSPARSE_DATA_MIRROR", url)
        # With a data_dir the download goes there; without one, into the user cache.
        into_data_dir = find_corpus_dir("ptb", data_dir=tmp_path / "mine", download=True)
        assert into_data_dir == tmp_path / "mine" / "ptb"
        found = find_corpus_dir("ptb", download=True)
        assert found == isolated_cache / "duosparse" / "data" / "ptb"
    assert all(e["ok"] for e in verify_corpus_dir("ptb", found).values())
    # Now it is found in the cache without downloading.
    assert find_corpus_dir("ptb") == found
    c = load_corpus("ptb")
    assert c.test.numel() == 82_430


# ---------------------------------------------------------------------------------------
# Locating data
# ---------------------------------------------------------------------------------------


def test_candidate_roots_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUOSPARSE_DATA_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert candidate_roots(tmp_path / "explicit") == [
        tmp_path / "explicit",
        tmp_path / "env",
        tmp_path / "xdg" / "duosparse" / "data",
    ]
    monkeypatch.delenv("DUOSPARSE_DATA_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert candidate_roots() == [tmp_path / "home" / ".cache" / "duosparse" / "data"]


def test_explicit_data_dir_wins_over_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy_corpus("ptb", tmp_path / "explicit")
    monkeypatch.setenv("DUOSPARSE_DATA_DIR", str(real_data_dir()))
    assert find_corpus_dir("ptb", data_dir=tmp_path / "explicit") == tmp_path / "explicit" / "ptb"
    assert find_corpus_dir("ptb") == real_data_dir() / "ptb"


def test_missing_data_names_the_fix(
    tmp_path: Path, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DUOSPARSE_DATA_DIR", raising=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataNotFoundError) as info:
        find_corpus_dir("ptb", data_dir=empty)
    message = str(info.value)
    assert "\n" not in message  # one paragraph
    assert "'ptb'" in message
    assert "DUOSPARSE_DATA_DIR" in message and "--data-dir" in message
    assert "duosparse data download ptb" in message
    assert str(empty / "ptb") in message
    assert str(isolated_cache / "duosparse" / "data" / "ptb") in message
    assert info.value.searched == [empty, isolated_cache / "duosparse" / "data"]
    with pytest.raises(DataNotFoundError):
        load_corpus("wikitext-2", data_dir=empty)


def test_pointing_at_the_corpus_folder_gets_a_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    root = real_data_dir()
    monkeypatch.delenv("DUOSPARSE_DATA_DIR", raising=False)
    with pytest.raises(DataNotFoundError, match="point at its parent folder"):
        find_corpus_dir("ptb", data_dir=root / "ptb")


def test_unknown_corpus_lists_choices(tmp_path: Path) -> None:
    for call in (
        lambda: find_corpus_dir("penn"),
        lambda: load_corpus("penn"),
        lambda: verify_corpus_dir("penn", tmp_path),
        lambda: download_corpus("penn", tmp_path),
    ):
        with pytest.raises(ValueError, match="'ptb', 'wikitext-2', 'synthetic'"):
            call()


def test_data_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    report = data_report(real_data_dir())
    assert [r["corpus"] for r in report] == ["ptb", "wikitext-2"]
    for entry in report:
        assert entry["found"] and entry["ok"], entry
        assert entry["path"] == str(real_data_dir() / entry["corpus"])
        assert set(entry["files"]) == set(SPLITS)
    monkeypatch.delenv("DUOSPARSE_DATA_DIR", raising=False)
    report = data_report(tmp_path)
    assert not any(r["found"] for r in report)
    assert all("DUOSPARSE_DATA_DIR" in r["message"] for r in report)


# ---------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------


def random_stream(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(seed))


def test_batchify_columns_are_contiguous_slices() -> None:
    assert batchify(torch.arange(10), 3).tolist() == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    stream = random_stream(1003)
    batched = batchify(stream, 4)
    assert batched.shape == (250, 4) and batched.is_contiguous()
    for j in range(4):
        assert torch.equal(batched[:, j], stream[j * 250 : (j + 1) * 250])
    with pytest.raises(ValueError, match="too short"):
        batchify(torch.arange(3), 4)


def test_fixed_bptt_batches_rebuild_the_stream() -> None:
    batched = batchify(random_stream(1003), 4)  # 250 rows
    chunks = list(bptt_batches(batched, 35))
    assert [x.size(0) for x, _ in chunks] == [35] * 7 + [4]  # 249 = 7 * 35 + 4
    assert torch.equal(torch.cat([x for x, _ in chunks]), batched[:-1])
    assert torch.equal(torch.cat([y for _, y in chunks]), batched[1:])
    start = 0
    for x, y in chunks:
        assert x.shape == y.shape and x.size(1) == 4
        assert torch.equal(y, batched[start + 1 : start + 1 + x.size(0)])
        assert torch.equal(y[:-1], x[1:])  # targets are the inputs shifted by one
        start += x.size(0)
    assert len(list(bptt_batches(batched, 35, max_batches=3))) == 3


def lengths(source: torch.Tensor, seed: int, bptt: int = 35) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return [x.size(0) for x, _ in bptt_batches(source, bptt, variable=True, generator=gen)]


def test_variable_bptt_is_repeatable_and_gapless() -> None:
    batched = batchify(random_stream(40_000), 4)  # 10,000 rows
    a, b, c = lengths(batched, 1), lengths(batched, 1), lengths(batched, 2)
    assert a == b
    assert a != c
    assert sum(a) == sum(c) == batched.size(0) - 1
    assert max(a + c) <= 35 + 20
    assert min(a[:-1] + c[:-1]) >= 5
    assert len(set(a)) > 10  # really variable
    assert sum(1 for n in a if n <= 25) > 0  # some bptt/2 chunks (prob. 0.05 each)
    assert 30 < sum(a) / len(a) < 36

    gen = torch.Generator().manual_seed(1)
    chunks = list(bptt_batches(batched, 35, variable=True, generator=gen))
    assert torch.equal(torch.cat([x for x, _ in chunks]), batched[:-1])
    assert torch.equal(torch.cat([y for _, y in chunks]), batched[1:])
    # Never longer than bptt + 20, even when bptt is tiny and jitter dominates.
    assert max(lengths(batched, 3, bptt=2)) <= 22


# ---------------------------------------------------------------------------------------
# Synthetic corpus and baselines
# ---------------------------------------------------------------------------------------


def test_dictionary() -> None:
    d = Dictionary()
    assert [d.add_word(w) for w in ["a", "b", "a", "c"]] == [0, 1, 0, 2]
    assert len(d) == 3 and d.idx2word == ["a", "b", "c"] and d.word2idx["c"] == 2


def test_unigram_perplexity_known_value() -> None:
    # add-one counts [3, 2, 1] -> probs [1/2, 1/3, 1/6]; ppl on [0, 1] = sqrt(2 * 3).
    ppl = unigram_perplexity(torch.tensor([0, 0, 1]), torch.tensor([0, 1]), 3)
    assert ppl == pytest.approx(math.sqrt(6))


def test_synthetic_corpus_is_deterministic() -> None:
    a, b, other = synthetic_corpus(seed=5), synthetic_corpus(seed=5), synthetic_corpus(seed=6)
    for split in SPLITS:
        assert torch.equal(a.split(split), b.split(split))
    assert not torch.equal(a.train, other.train)
    assert (a.train.numel(), a.valid.numel(), a.test.numel()) == (40_000, 4_000, 4_000)
    assert a.vocab_size == 64
    assert a.dictionary.idx2word[:2] == ["w0", "w1"] and a.dictionary.idx2word[-1] == "<eos>"
    assert int(a.train.max()) < 64 and len(torch.unique(a.train)) == 64
    assert torch.equal(load_corpus("synthetic", seed=5).train, a.train)
    small = synthetic_corpus(
        seed=0, vocab_size=16, train_tokens=100, valid_tokens=10, test_tokens=10
    )
    assert small.vocab_size == 16 and small.train.numel() == 100


def test_synthetic_corpus_is_learnable() -> None:
    c = synthetic_corpus(seed=0)
    probs = synthetic_transition_matrix(seed=0, vocab_size=64)
    assert torch.allclose(probs.sum(dim=1), torch.ones(64, dtype=torch.float64))
    # Entropy rate of the chain: the best any model can do is exp(H) perplexity.
    stationary = torch.full((64,), 1 / 64, dtype=torch.float64)
    for _ in range(1000):
        stationary = stationary @ probs
    entropy = -(stationary[:, None] * probs * probs.log()).sum().item()
    floor = math.exp(entropy)
    unigram = unigram_perplexity(c.train, c.test, c.vocab_size)
    assert unigram > 5 * floor
    # A count-based bigram model fitted on train gets close to the floor on test, so the
    # data really is a first-order chain a small RNN can learn.
    counts = torch.ones(64, 64, dtype=torch.float64)
    counts.index_put_(
        (c.train[:-1], c.train[1:]),
        torch.ones(c.train.numel() - 1, dtype=torch.float64),
        accumulate=True,
    )
    cond = counts / counts.sum(dim=1, keepdim=True)
    bigram = math.exp(-cond[c.test[:-1], c.test[1:]].log().mean().item())
    assert floor * 0.9 < bigram < floor * 1.2
