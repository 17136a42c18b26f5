"""Learning curve at paper size on Penn Treebank, for a GPU session of a few minutes:

    python benchmarks/gpu_learning_curve.py [--minutes-per-model 3.8] [--max-epochs 1000]
        [--archs egru,lstm] [--epochs-for-schedule N] [--out PATH.json] [--plot PATH.png]
        [--tiny] [--corpus ptb|synthetic] [--data-dir DIR]
    python benchmarks/gpu_learning_curve.py --from-json RECORDED.json --plot PATH.png  # plot only

Trains, one after the other, EvNN's 3-layer EGRU (configs/recipes/evnn_ptb.yaml: embedding
750, layers 1350/1350/750 tied, AdamW, variable BPTT 70, AWD dropouts, frozen Beta thresholds)
and a same-size LSTM under the same recipe (model.arch=lstm with torch.nn's initialisation,
model.weight_init=uniform and model.bias_init=uniform, as sweeps/ptb_paper.yaml's LSTM
trials), each through duosparse's own train() with a Reporter that records every epoch's
val/ppl, train/loss, sparsity/activity, perf/epoch_s and the wall time since the model's
train() was called. A model stops at the end of the first epoch whose wall time reaches
--minutes-per-model (0: after exactly one epoch), or after --max-epochs epochs: the reporter
raises a private exception after the epoch's figures are recorded (train() writes its
checkpoint before it reports, so nothing is left half-written) and it is caught outside
train(). A model that reaches train.epochs finishes normally (best-validation weights on the
test split; the figures under "final").

The learning-rate schedule: by default the recipe's train.epochs (1000) and decay_start_epoch
(701) are kept, so the cosine decay has not started in the epochs a short run reaches and the
rate is EvNN's for its first epochs: the constant 0.0012 (times AWD's seq_len/bptt factor).
--epochs-for-schedule N sets train.epochs to N and scales decay_start_epoch with it
(1 + round(700 * N / 1000)), i.e. the whole schedule compressed into N epochs.

No MLflow: nothing here needs a tracking store. On CUDA nothing special is set: train()
picks the device (train.device auto, TF32 for cuDNN and cuBLAS alike) and the EGRU layers
the Triton kernels with CUDA graphs. The JSON (--out; default
benchmarks/recorded/ptb-learning-curve-<device>.json) is rewritten after every epoch, so a
run killed by a timeout still leaves every finished epoch: device, torch version, the flat
configs (RunConfig.flat()), per arch the epochs and their figures, and a summary: val ppl at
epochs 10/20/30 where reached, the EGRU/LSTM val-ppl ratio at equal epochs, and the targets,
each true, false or null (not reached):
  - egru_val_ppl_below_150_by_epoch_30: some EGRU epoch <= 30 has val ppl < 150 (false once
    epoch 30 is reached without one, null before);
  - egru_within_10pct_of_lstm: EGRU val ppl <= 1.1 x the LSTM's at the last epoch both
    reached (that epoch is recorded beside it; null without a common epoch).
They are reported, not tuned for. --tiny is a CPU smoke mode (embedding 32, 3 layers of 48,
5 steps an epoch, 3 evaluation batches, 3 epochs unless --max-epochs says otherwise, one
CPU thread).

--plot draws val ppl against epoch (log y) for each arch with plotly and kaleido, as
dashboards/export.py writes PNGs; without a browser for kaleido it falls back to matplotlib
where installed, else says so and skips the figure.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "platform"))  # run without installing
sys.path.insert(0, str(ROOT))  # dashboards.export, for the PNG

import torch  # noqa: E402
import yaml  # noqa: E402
from duosparse import schema  # noqa: E402
from duosparse.config import RunConfig, build_config, set_dotted  # noqa: E402
from duosparse.train import train  # noqa: E402

RECIPE = ROOT / "configs" / "recipes" / "evnn_ptb.yaml"
# What sweeps/ptb_paper.yaml sets for its LSTM and GRU trials on top of the recipe
# (tests/test_gpu_learning_curve.py checks these against the spec).
ARCH_OVERRIDES: dict[str, dict[str, Any]] = {
    "egru": {"model.arch": "egru"},
    "lstm": {"model.arch": "lstm", "model.weight_init": "uniform", "model.bias_init": "uniform"},
    "gru": {"model.arch": "gru", "model.weight_init": "uniform", "model.bias_init": "uniform"},
}
TINY: dict[str, Any] = {
    "model.embedding_size": 32,
    "model.hidden_size": 48,
    "train.batch_size": 8,
    "train.eval_batch_size": 8,
    "train.test_batch_size": 8,
    "train.bptt": 10,
    "train.max_steps_per_epoch": 5,
    "train.max_eval_batches": 3,
}
TINY_MAX_EPOCHS = 3
SUMMARY_EPOCHS = (10, 20, 30)
TARGET_PPL, TARGET_EPOCH, TARGET_RATIO = 150.0, 30, 1.10


class _BudgetSpent(Exception):
    """Raised from the reporter once an epoch's figures are recorded: the model stops here."""


# --- configs ---------------------------------------------------------------------------------


def build_run_config(
    arch: str,
    tiny: bool = False,
    epochs_for_schedule: int | None = None,
    corpus: str | None = None,
    data_dir: str | None = None,
) -> RunConfig:
    """The recipe with the arch's overrides (and the tiny sizes, the schedule length)."""
    tree = yaml.safe_load(RECIPE.read_text())
    overrides = dict(ARCH_OVERRIDES[arch])
    if tiny:
        overrides.update(TINY)
    if epochs_for_schedule:
        epochs, start = tree["train"]["epochs"], tree["train"].get("decay_start_epoch", 1)
        overrides["train.epochs"] = epochs_for_schedule
        overrides["train.decay_start_epoch"] = 1 + round((start - 1) * epochs_for_schedule / epochs)
    if corpus:
        overrides["data.corpus"] = corpus
    if data_dir:
        overrides["data.dir"] = data_dir
    for key, value in overrides.items():
        set_dotted(tree, key, value)
    return build_config(tree, f"{RECIPE.name} for {arch}")


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# --- recording -------------------------------------------------------------------------------


class CurveReporter:
    """duosparse.train's Reporter: one row per epoch; stops the run past the budget."""

    def __init__(
        self,
        budget_s: float,
        max_epochs: int,
        schedule_epochs: int,
        epochs: list[dict[str, float]] | None = None,
        on_epoch=None,
    ):
        self.budget_s, self.max_epochs, self.schedule_epochs = budget_s, max_epochs, schedule_epochs
        self.on_epoch = on_epoch or (lambda: None)
        self.start = time.perf_counter()
        self.epochs: list[dict[str, float]] = [] if epochs is None else epochs  # rows appended here
        self.final: dict[str, float] | None = None
        self.stopped: str | None = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if schema.TEST_PPL in metrics:  # train()'s last report: the test split
            self.final = {k: float(v) for k, v in metrics.items()}
            return
        elapsed = time.perf_counter() - self.start
        row = {
            "epoch": int(step),
            "val_ppl": float(metrics[schema.VAL_PPL]),
            "val_loss": float(metrics[schema.VAL_LOSS]),
            "train_loss": float(metrics[schema.TRAIN_LOSS]),
            "activity_sparsity": float(metrics.get(schema.SPARSITY_ACTIVITY, float("nan"))),
            "epoch_s": float(metrics[schema.PERF_EPOCH_S]),
            "tokens_per_s": float(metrics[schema.PERF_TOKENS_PER_S]),
            "elapsed_s": elapsed,
        }
        self.epochs.append(row)
        print(
            f"    epoch {row['epoch']:4d}: val ppl {row['val_ppl']:9.2f}, train loss "
            f"{row['train_loss']:.3f}, activity sparsity {row['activity_sparsity']:.3f}, "
            f"{row['epoch_s']:.1f} s training, {elapsed:.0f} s in all",
            flush=True,
        )
        if step >= self.schedule_epochs:
            self.stopped = "schedule_end"  # train() goes on to the test split
        elif step >= self.max_epochs:
            self.stopped = "max_epochs"
        elif elapsed >= self.budget_s:
            self.stopped = "budget"
        self.on_epoch()
        if self.stopped in ("max_epochs", "budget"):
            raise _BudgetSpent

    def log_artifact(self, path: Path) -> None:
        pass


def _scratch_dir() -> str | None:
    """A folder in memory where there is room (train() rewrites a checkpoint every epoch:
    weights, optimizer state and the best weights, ~0.5 GB at paper size)."""
    shm = Path("/dev/shm")
    try:
        if shm.is_dir() and shutil.disk_usage(shm).free > 4e9:
            return str(shm)
    except OSError:
        pass
    return None


def run_arch(
    config: RunConfig, budget_s: float, max_epochs: int, record: dict[str, Any], on_epoch=None
) -> None:
    """train() until the budget, max_epochs or the schedule's end; fills `record` (its
    "epochs" list grows by one row an epoch, before on_epoch is called)."""
    reporter = CurveReporter(budget_s, max_epochs, config.train.epochs, record["epochs"], on_epoch)
    with tempfile.TemporaryDirectory(prefix="curve-", dir=_scratch_dir()) as workdir:
        try:
            train(config, reporter=reporter, workdir=workdir, progress=False)
        except _BudgetSpent:
            pass
        except Exception as error:  # one failed arch must not cost the others' curves
            reporter.stopped = f"error: {error!r}"
            print(f"    FAILED: {error!r}", flush=True)
    record["stopped"] = reporter.stopped or "schedule_end"
    record["final"] = reporter.final
    record["wall_s"] = time.perf_counter() - reporter.start


# --- summary ---------------------------------------------------------------------------------


def _ppl_at(epochs: list[dict], epoch: int) -> float | None:
    for row in epochs:
        if row["epoch"] == epoch:
            return row["val_ppl"]
    return None


def summarize(curves: dict[str, dict]) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "epochs_reached": {
            a: (c["epochs"][-1]["epoch"] if c["epochs"] else 0) for a, c in curves.items()
        },
        "val_ppl_at": {
            a: {str(e): _ppl_at(c["epochs"], e) for e in SUMMARY_EPOCHS} for a, c in curves.items()
        },
        "best_val_ppl": {
            a: min((r["val_ppl"] for r in c["epochs"]), default=None) for a, c in curves.items()
        },
    }
    egru, lstm = curves.get("egru", {}).get("epochs", []), curves.get("lstm", {}).get("epochs", [])
    ratios = {}
    for e in SUMMARY_EPOCHS:
        a, b = _ppl_at(egru, e), _ppl_at(lstm, e)
        ratios[str(e)] = a / b if a is not None and b is not None else None
    common = sorted({r["epoch"] for r in egru} & {r["epoch"] for r in lstm})
    last = common[-1] if common else None
    last_ratio = _ppl_at(egru, last) / _ppl_at(lstm, last) if last else None
    summary["egru_over_lstm_val_ppl"] = {
        **ratios,
        "last_common_epoch": last,
        "at_last_common_epoch": last_ratio,
    }

    below = None
    if "egru" in curves:
        early = [r for r in egru if r["epoch"] <= TARGET_EPOCH]
        if any(r["val_ppl"] < TARGET_PPL for r in early):
            below = True
        elif any(r["epoch"] >= TARGET_EPOCH for r in egru):
            below = False
    summary["targets"] = {
        f"egru_val_ppl_below_{TARGET_PPL:g}_by_epoch_{TARGET_EPOCH}": below,
        "egru_within_10pct_of_lstm": None if last_ratio is None else last_ratio <= TARGET_RATIO,
        "egru_within_10pct_of_lstm_epoch": last,
    }
    return summary


def print_table(payload: dict) -> None:
    curves = payload["curves"]
    archs = list(curves)
    shown = set()
    for c in curves.values():
        epochs = [r["epoch"] for r in c["epochs"]]
        shown |= {e for e in epochs if e == 1 or e % 5 == 0}
        if epochs:
            shown.add(epochs[-1])
    header = f"{'epoch':>5} " + " ".join(
        f"{a + ' val ppl':>14} {a + ' act.sp':>11} {a + ' wall s':>11}" for a in archs
    )
    if "egru" in archs and "lstm" in archs:
        header += f" {'egru/lstm':>9}"
    print(header)
    for e in sorted(shown):
        cells = []
        for a in archs:
            row = next((r for r in curves[a]["epochs"] if r["epoch"] == e), None)
            cells.append(
                f"{row['val_ppl']:14.2f} {row['activity_sparsity']:11.3f} {row['elapsed_s']:11.0f}"
                if row
                else f"{'-':>14} {'-':>11} {'-':>11}"
            )
        line = f"{e:5d} " + " ".join(cells)
        if "egru" in archs and "lstm" in archs:
            a, b = _ppl_at(curves["egru"]["epochs"], e), _ppl_at(curves["lstm"]["epochs"], e)
            line += f" {a / b:9.3f}" if a is not None and b is not None else f" {'-':>9}"
        print(line)
    for a in archs:
        c = curves[a]
        print(
            f"{a}: {len(c['epochs'])} epochs in {c.get('wall_s', float('nan')):.0f} s, stopped: {c['stopped']}"
        )
    for name, value in payload["summary"]["targets"].items():
        print(f"target {name}: {value}")


# --- plot ------------------------------------------------------------------------------------


def plot(payload: dict, png: str | Path) -> Path | None:
    """Val ppl against epoch, log y, one line per arch; None (with a message) if no renderer."""
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    curves = {a: c["epochs"] for a, c in payload["curves"].items() if c["epochs"]}
    title = f"PTB, EvNN recipe at paper size, {payload.get('device', '?')}: validation perplexity"
    try:
        import plotly.graph_objects as go

        from dashboards.export import ExportError, export_figures

        fig = go.Figure()
        for arch, rows in curves.items():
            fig.add_trace(
                go.Scatter(
                    x=[r["epoch"] for r in rows],
                    y=[r["val_ppl"] for r in rows],
                    mode="lines+markers",
                    name=arch.upper(),
                )
            )
        fig.add_hline(
            y=TARGET_PPL,
            line_dash="dot",
            line_color="gray",
            annotation_text=f"target {TARGET_PPL:g} by epoch {TARGET_EPOCH}",
        )
        fig.update_layout(
            title=title,
            xaxis_title="epoch",
            yaxis_title="validation perplexity",
            yaxis_type="log",
            template="plotly_white",
        )
        try:
            export_figures({png.stem: fig}, png.parent, ["png"])
            print(f"plot written to {png}")
            return png
        except ExportError as error:
            reason = str(error)
    except ImportError as error:
        reason = f"plotly is not installed ({error})"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"no plot: {reason}; matplotlib is not installed either", flush=True)
        return None
    figure, axes = plt.subplots(figsize=(9, 5.6))
    for arch, rows in curves.items():
        axes.plot(
            [r["epoch"] for r in rows], [r["val_ppl"] for r in rows], marker="o", label=arch.upper()
        )
    axes.axhline(TARGET_PPL, linestyle=":", color="gray")
    axes.set(yscale="log", xlabel="epoch", ylabel="validation perplexity", title=title)
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.legend()
    figure.savefig(png, dpi=150, bbox_inches="tight")
    print(f"plot written to {png} (matplotlib; kaleido could not render: {reason})")
    return png


# --- main ------------------------------------------------------------------------------------


def _write(path: Path, payload: dict) -> None:
    payload["summary"] = summarize(payload["curves"])
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--minutes-per-model",
        type=float,
        default=3.8,
        help="wall budget per model: it stops at the first epoch end past it",
    )
    parser.add_argument(
        "--max-epochs",
        type=int,
        default=None,
        help=f"stop after this many epochs (default 1000; {TINY_MAX_EPOCHS} with --tiny)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="JSON to write (default benchmarks/recorded/ptb-learning-curve-<device>.json)",
    )
    parser.add_argument("--archs", default="egru,lstm", help="comma-separated, run in this order")
    parser.add_argument(
        "--epochs-for-schedule",
        type=int,
        default=None,
        help="train.epochs for the lr schedule (default: the recipe's 1000, constant lr early)",
    )
    parser.add_argument(
        "--tiny", action="store_true", help="CPU smoke mode: tiny model, 5 steps an epoch"
    )
    parser.add_argument(
        "--corpus", choices=["ptb", "synthetic"], default=None, help="default: the recipe's (ptb)"
    )
    parser.add_argument(
        "--data-dir", default=None, help="folder holding ptb/ (default $DUOSPARSE_DATA_DIR)"
    )
    parser.add_argument(
        "--plot", default=None, metavar="PNG", help="also draw val ppl vs epoch into this PNG"
    )
    parser.add_argument(
        "--from-json",
        default=None,
        metavar="JSON",
        help="no training: plot (--plot) and print the table of a recorded JSON",
    )
    args = parser.parse_args(argv)

    if args.from_json:
        payload = json.loads(Path(args.from_json).read_text())
        print_table(payload)
        if args.plot:
            plot(payload, args.plot)
        return 0

    if args.tiny:  # one CPU thread: on a shared machine, two spinning ones cost several times more
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return _record(args, parser)
        finally:
            torch.set_num_threads(threads)
    return _record(args, parser)


def _record(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    unknown = [a for a in archs if a not in ARCH_OVERRIDES]
    if unknown or not archs:
        parser.error(f"--archs {args.archs!r}: choose from {', '.join(ARCH_OVERRIDES)}")
    max_epochs = args.max_epochs or (TINY_MAX_EPOCHS if args.tiny else 1000)
    configs = {
        a: build_run_config(a, args.tiny, args.epochs_for_schedule, args.corpus, args.data_dir)
        for a in archs
    }
    device = device_name()
    out = Path(
        args.out
        or ROOT
        / "benchmarks"
        / "recorded"
        / f"ptb-learning-curve-{slug(device)}{'-tiny' if args.tiny else ''}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    payload: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d"),
        "device": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "tiny": args.tiny,
        "budget": {
            "minutes_per_model": args.minutes_per_model,
            "max_epochs": max_epochs,
            "epochs_for_schedule": args.epochs_for_schedule,
        },
        "configs": {a: c.flat() for a, c in configs.items()},
        "curves": {},
    }
    print(
        f"PTB learning curve on {device} (torch {torch.__version__}): {', '.join(archs)}, "
        f"{args.minutes_per_model:g} min or {max_epochs} epochs each; writing {out}",
        flush=True,
    )
    failed = False
    for arch in archs:
        config = configs[arch]
        m = config.model
        print(
            f"  {arch}: embedding {m.embedding_size}, {m.num_layers} layers of {m.hidden_size}"
            f"{' (last tied)' if m.tie_weights else ''}, lr {config.train.lr} "
            f"{config.train.lr_schedule} over {config.train.epochs} epochs",
            flush=True,
        )
        record: dict[str, Any] = {"epochs": [], "stopped": "running", "final": None}
        payload["curves"][arch] = record
        run_arch(
            config,
            args.minutes_per_model * 60,
            max_epochs,
            record,
            on_epoch=lambda: _write(out, payload),
        )
        failed |= record["stopped"].startswith("error")
        if torch.cuda.is_available():
            record["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
            torch.cuda.reset_peak_memory_stats()
        _write(out, payload)
    print_table(payload)
    print(f"written to {out}")
    if args.plot:
        plot(payload, args.plot)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
