"""benchmarks/gpu_learning_curve.py on the CPU: its tiny mode end to end (PTB, a few steps an
epoch), the budget stop, the summary and targets, the paper-size configs it builds (without
training them), and benchmarks/gpu_check.py's PTB config from the spec's recipe."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def curve():
    return _load("gpu_learning_curve")


def test_tiny_run_records_both_curves_and_a_summary(curve, data_dir, tmp_path, capsys):
    out = tmp_path / "curve.json"
    assert (
        curve.main(["--tiny", "--max-epochs", "2", "--out", str(out), "--data-dir", str(data_dir)])
        == 0
    )
    payload = json.loads(out.read_text())
    assert payload["device"] == curve.device_name() and payload["torch"]
    assert set(payload["curves"]) == {"egru", "lstm"} and set(payload["configs"]) == {
        "egru",
        "lstm",
    }
    for arch in ("egru", "lstm"):
        record = payload["curves"][arch]
        assert record["stopped"] == "max_epochs"
        assert [r["epoch"] for r in record["epochs"]] == [1, 2]
        for row in record["epochs"]:
            assert math.isfinite(row["val_ppl"]) and row["val_ppl"] > 1
            assert math.isfinite(row["train_loss"]) and row["epoch_s"] > 0 and row["elapsed_s"] > 0
            assert 0 <= row["activity_sparsity"] <= 1
        assert payload["configs"][arch]["model.arch"] == arch
        assert payload["configs"][arch]["train.max_steps_per_epoch"] == 5
    assert payload["curves"]["lstm"]["epochs"][0]["activity_sparsity"] == 0  # dense units
    summary = payload["summary"]
    assert set(summary) >= {
        "epochs_reached",
        "val_ppl_at",
        "best_val_ppl",
        "egru_over_lstm_val_ppl",
        "targets",
    }
    assert summary["epochs_reached"] == {"egru": 2, "lstm": 2}
    assert summary["val_ppl_at"]["egru"] == {"10": None, "20": None, "30": None}
    assert summary["egru_over_lstm_val_ppl"]["last_common_epoch"] == 2
    targets = summary["targets"]
    assert targets["egru_val_ppl_below_150_by_epoch_30"] is None  # epoch 30 not reached
    assert isinstance(targets["egru_within_10pct_of_lstm"], bool)
    assert "egru val ppl" in capsys.readouterr().out  # the table


def test_a_spent_budget_stops_after_exactly_one_epoch(curve, data_dir, tmp_path):
    out = tmp_path / "curve.json"
    argv = ["--tiny", "--minutes-per-model", "0", "--out", str(out), "--data-dir", str(data_dir)]
    assert curve.main(argv) == 0
    payload = json.loads(out.read_text())
    for arch in ("egru", "lstm"):
        assert payload["curves"][arch]["stopped"] == "budget"
        assert [r["epoch"] for r in payload["curves"][arch]["epochs"]] == [1]
        assert payload["curves"][arch]["final"] is None  # stopped before the test split


def test_the_configs_are_the_recipe_at_paper_size_and_the_sweeps_lstm(curve):
    egru, lstm = curve.build_run_config("egru"), curve.build_run_config("lstm")
    for config in (egru, lstm):
        m, t = config.model, config.train
        assert (m.embedding_size, m.hidden_size, m.num_layers, m.tie_weights) == (
            750,
            1350,
            3,
            True,
        )
        assert (t.epochs, t.decay_start_epoch, t.lr, t.batch_size, t.bptt) == (
            1000,
            701,
            0.0012,
            64,
            70,
        )
        assert config.data.corpus == "ptb" and config.prune.schedule == "none"
    assert (egru.model.weight_init, egru.model.bias_init) == ("xavier_normal", "zeros")
    # the LSTM differs from the recipe exactly as sweeps/ptb_paper.yaml's LSTM trials do
    spec = yaml.safe_load((ROOT / "sweeps" / "ptb_paper.yaml").read_text())
    lstm_grid = next(c["grid"] for c in spec["conditional"] if c["when"] == {"model.arch": "lstm"})
    assert {k: v[0] for k, v in lstm_grid.items()} == {
        k: v for k, v in curve.ARCH_OVERRIDES["lstm"].items() if k != "model.arch"
    }
    flat_egru, flat_lstm = egru.flat(), lstm.flat()
    assert {k for k in flat_egru if flat_egru[k] != flat_lstm[k]} == {
        "model.arch",
        "model.weight_init",
        "model.bias_init",
    }
    short = curve.build_run_config("egru", epochs_for_schedule=30)
    assert (short.train.epochs, short.train.decay_start_epoch) == (30, 22)


def test_targets_are_true_false_or_null(curve):
    def rows(ppls):
        return {"epochs": [{"epoch": i + 1, "val_ppl": p} for i, p in enumerate(ppls)]}

    s = curve.summarize({"egru": rows([400] * 29 + [140]), "lstm": rows([400] * 29 + [130])})
    assert s["targets"]["egru_val_ppl_below_150_by_epoch_30"] is True
    assert (
        s["targets"]["egru_within_10pct_of_lstm"] is True
        and s["targets"]["egru_within_10pct_of_lstm_epoch"] == 30
    )
    assert s["egru_over_lstm_val_ppl"]["30"] == pytest.approx(140 / 130)
    s = curve.summarize({"egru": rows([400] * 31), "lstm": rows([300] * 20)})
    assert s["targets"]["egru_val_ppl_below_150_by_epoch_30"] is False
    assert (
        s["targets"]["egru_within_10pct_of_lstm"] is False and s["val_ppl_at"]["lstm"]["30"] is None
    )
    s = curve.summarize({"egru": rows([160] * 12)})
    assert s["targets"] == {
        "egru_val_ppl_below_150_by_epoch_30": None,
        "egru_within_10pct_of_lstm": None,
        "egru_within_10pct_of_lstm_epoch": None,
    }


@pytest.mark.slow
def test_plot_from_a_recorded_json_writes_a_png_or_says_why_not(curve, tmp_path, capsys):
    recorded = tmp_path / "rec.json"
    payload = {
        "device": "test",
        "curves": {
            a: {
                "epochs": [
                    {"epoch": e, "val_ppl": 900 / e, "activity_sparsity": 0.5, "elapsed_s": 5.0 * e}
                    for e in (1, 2, 3)
                ],
                "stopped": "budget",
                "wall_s": 15.0,
            }
            for a in ("egru", "lstm")
        },
    }
    payload["summary"] = curve.summarize(payload["curves"])
    recorded.write_text(json.dumps(payload))
    png = tmp_path / "curve.png"
    assert curve.main(["--from-json", str(recorded), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    assert png.is_file() and png.stat().st_size > 0 or "no plot" in printed


def test_gpu_check_trains_the_recipes_paper_size_egru(monkeypatch):
    """gpu_check.train_ptb builds its config from sweeps/ptb_paper.yaml with its recipe."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    gpu_check = _load("gpu_check")
    import duosparse.train

    class Built(Exception):
        pass

    def fake_train(config, **_):
        raise Built(config)

    monkeypatch.setattr(duosparse.train, "train", fake_train)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: None)
    with pytest.raises(Built) as built:
        gpu_check.train_ptb(torch.device("cpu"), 6)
    config = built.value.args[0]
    m, t = config.model, config.train
    assert (m.arch, m.embedding_size, m.hidden_size, m.num_layers, m.tie_weights) == (
        "egru",
        750,
        1350,
        3,
        True,
    )
    assert (m.threshold, m.threshold_init) == (0.05, "beta")
    assert (t.epochs, t.device, t.lr_schedule) == (6, "cuda", "cosine") and t.decay_start_epoch <= 6
    assert config.prune.schedule == "none"
