"""The test tiers: `make test-fast` leaves out what needs a service or takes long, and a missing
prerequisite skips locally but fails under CI (DUOSPARSE_REQUIRE_ALL_PREREQUISITES=1)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import conftest
import pytest

ROOT = Path(__file__).resolve().parents[1]
FAST = "not slow and not system"  # the Makefile's test-fast selection


def test_a_missing_prerequisite_skips_locally_and_fails_under_ci(monkeypatch):
    conftest.require(True, "present")  # nothing happens
    monkeypatch.setattr(conftest, "REQUIRE_ALL", False)
    with pytest.raises(pytest.skip.Exception, match="needs PostgreSQL"):
        conftest.require(False, "needs PostgreSQL")
    monkeypatch.setattr(conftest, "REQUIRE_ALL", True)
    with pytest.raises(
        pytest.fail.Exception, match="needs PostgreSQL .CI requires every prerequisite"
    ):
        conftest.require(False, "needs PostgreSQL")


def collected(marker_expression: str) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", marker_expression],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return {line for line in result.stdout.splitlines() if "::" in line}


def test_the_fast_tier_leaves_out_services_browsers_ray_and_real_training():
    fast = collected(FAST)
    assert f'-m "{FAST}"' in (ROOT / "Makefile").read_text(), (
        "the Makefile's test-fast selection changed"
    )
    assert len(fast) > 200, "the fast tier lost its unit tests"
    # services (PostgreSQL, network namespaces), Chromium, Ray sweeps, subprocess CLIs
    for module in (
        "test_cluster",
        "test_dashboard",
        "test_sweep_ray",
        "test_store_concurrency",
        "test_robustness_signals",
        "test_cli",
    ):
        assert not any(f"tests/{module}.py::" in t for t in fast), module
    for name in (
        "test_nothing_listens_beyond_loopback",
        "test_mlflow_and_ray_refuse_unauthenticated_requests",
        "test_export_pareto_writes_valid_png_svg_pdf_and_html",
        "test_a_few_hundred_steps_on_ptb_beat_the_unigram_model_by_far",
    ):
        assert not any(name in t for t in fast), name
    # and the unit tests stay in it
    for name in ("test_model.py::", "test_accounting.py::", "test_tiers.py::"):
        assert any(name in t for t in fast), name
