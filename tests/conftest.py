"""Shared fixtures. Real data comes from $DUOSPARSE_DATA_DIR (CI sets it to ../shared/data)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# CI (.ci/run) sets this: there a missing prerequisite (PostgreSQL, Chromium, a network
# namespace) fails the test; in a local run it skips the test with the reason.
REQUIRE_ALL = os.environ.get("DUOSPARSE_REQUIRE_ALL_PREREQUISITES") == "1"


def require(available: bool, reason: str) -> None:
    """Skip (local run) or fail (CI) the calling test when a system prerequisite is missing."""
    if available:
        return
    if REQUIRE_ALL:
        pytest.fail(f"{reason} (CI requires every prerequisite)", pytrace=False)
    pytest.skip(reason)


def postgres_uri() -> str:
    """The PostgreSQL role the store tests may create databases with (`make test` starts one)."""
    uri = os.environ.get("DUOSPARSE_TEST_POSTGRES_URI", "")
    require(
        bool(uri),
        "DUOSPARSE_TEST_POSTGRES_URI is not set: run the tests through `make test` "
        "(it starts PostgreSQL with .ci/postgres.sh) or set it to a role that may CREATEDB",
    )
    return uri


# The Triton kernels of duosparse.egru_triton run on CPU under Triton's interpreter in the tests
# (tests/test_egru_triton.py); Triton reads this when it is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def data_dir() -> Path:
    value = os.environ.get("DUOSPARSE_DATA_DIR")
    if not value or not (Path(value) / "ptb" / "train.txt").is_file():
        pytest.fail(
            "DUOSPARSE_DATA_DIR must point at a folder holding ptb/ and wikitext-2/ "
            "(CI uses ../shared/data); `make test` sets it."
        )
    return Path(value)


@pytest.fixture
def in_tmp_cwd(tmp_path, monkeypatch) -> Path:
    """Run in an empty folder, so the embedded MLflow store (./mlruns.db) is the test's own."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path
