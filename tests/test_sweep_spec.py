"""Sweep specs: validation, expansion, conditional axes, identity. No Ray here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from duosparse.sweep import SpecError, expand, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]
DUOSPARSE = str(Path(sys.executable).with_name("duosparse"))


def spec(**overrides):
    tree = {
        "name": "t",
        "base": {"data": {"corpus": "synthetic"}, "prune": {"schedule": "oneshot"}},
        "grid": {"model.arch": ["lstm", "gru", "egru"], "prune.target_sparsity": [0.0, 0.5, 0.9]},
        "conditional": [{"when": {"model.arch": "egru"}, "grid": {"model.threshold": [0.01, 0.1]}}],
        "seeds": [0, 1],
    }
    tree.update(overrides)
    return parse_spec(tree)


def test_conditional_axes_apply_only_where_they_match():
    trials = expand(spec())
    # lstm, gru: 3 prune levels x 2 seeds; egru: 3 x 2 thresholds x 2 seeds
    assert len(trials) == 2 * 3 * 2 + 3 * 2 * 2
    assert {t.model.threshold for t in trials if t.model.arch != "egru"} == {0.0}
    assert {t.model.threshold for t in trials if t.model.arch == "egru"} == {0.01, 0.1}
    assert len({t.run_key for t in trials}) == len(trials)
    assert {t.train.seed for t in trials} == {0, 1}


def test_expansion_is_stable_and_duplicates_collapse():
    a = [t.run_key for t in expand(spec())]
    b = [t.run_key for t in expand(spec())]
    assert a == b
    dup = spec(grid={"model.arch": ["lstm", "lstm"]}, conditional=[])
    assert len(expand(dup)) == 2  # one config x two seeds


def test_adding_a_grid_value_adds_exactly_its_trials():
    before = {t.run_key for t in expand(spec())}
    grid = {"model.arch": ["lstm", "gru", "egru"], "prune.target_sparsity": [0.0, 0.5, 0.9, 0.95]}
    after = {t.run_key for t in expand(spec(grid=grid))}
    assert (
        before < after and len(after - before) == 2 + 2 + 2 * 2
    )  # lstm, gru x 2 seeds; egru x 2 thresholds x 2 seeds


@pytest.mark.parametrize(
    "tree_update, needle",
    [
        ({"grid": {"model.hiden_size": [1]}}, "model.hiden_size"),
        ({"grid": {"model.hidden_size": ["big"]}}, "model.hidden_size"),
        ({"grid": {"model.arch": []}}, "model.arch"),
        (
            {
                "conditional": [
                    {"when": {"model.arch": "transformer"}, "grid": {"model.threshold": [0.1]}}
                ]
            },
            "conditional[0]",
        ),
        ({"max_concurent": 2}, "max_concurent"),
        ({"resources": {"gpu": -1}}, "resources.gpu"),
        ({"base": {"train": {"epochz": 1}}}, "train.epochz"),
    ],
)
def test_invalid_specs_name_the_field(tree_update, needle):
    with pytest.raises(SpecError) as info:
        expand(spec(**tree_update))
    assert needle in str(info.value)


@pytest.mark.parametrize("path", sorted((ROOT / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_specs_are_valid(path):
    spec = load_spec(path)
    trials = expand(spec)
    assert trials or spec.searches  # a search's trials are drawn as it runs


def test_quick_study_is_dense_then_pruned_from_the_dense_weights():
    from duosparse.sweep import expand_stages

    (dense_name, dense), (prune_name, pruned) = expand_stages(
        load_spec(ROOT / "sweeps" / "ptb_quick.yaml")
    )
    assert (dense_name, prune_name) == ("dense", "prune")
    assert {t.model.arch for t in dense} == {"lstm", "gru", "egru"}
    assert len({t.model.threshold for t in dense if t.model.arch == "egru"}) >= 2
    levels = {t.prune.target_sparsity for t in pruned}
    assert {0.9, 0.95} <= levels and max(levels) >= 0.95 and len(levels) >= 5
    assert all(t.prune.target_sparsity == 0 for t in dense)  # the dense baselines
    parents = {t.run_key for t in dense}
    assert all(t.init.from_run_key in parents for t in pruned)
    assert len(pruned) == len(dense) * len(levels)
    # full splits: nothing caps the evaluation
    assert all(t.train.max_eval_batches is None for t in dense + pruned)


def test_paper_studies_have_paper_sizes():
    for name in ("ptb_paper.yaml", "wt2_paper.yaml"):
        trials = expand(load_spec(ROOT / "sweeps" / name))
        egru = [t for t in trials if t.model.arch == "egru"]
        assert any(
            t.model.num_layers == 3
            and t.model.hidden_size == 1350
            and t.model.embedding_size == 750
            for t in egru
        )
        assert max(t.prune.target_sparsity for t in trials) == 0.95


@pytest.mark.slow
def test_invalid_spec_on_the_command_line_fails_before_ray(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "bad", "grid": {"model.arch": []}}))
    result = subprocess.run(
        [DUOSPARSE, "sweep", "run", str(bad)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "model.arch" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()  # Ray never started: no Tune state


def test_a_seed_axis_is_refused_in_favour_of_seeds():
    with pytest.raises(SpecError, match=r"grid: 'train.seed' is set by the spec's 'seeds'"):
        spec(grid={"model.arch": ["lstm"], "train.seed": [0, 1]})
