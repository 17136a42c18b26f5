"""Overheads of the platform around the model.

accounting  `train.evaluate` (forward passes + `accounting.Accountant`) against the same
            evaluation loop without the Accountant (`evaluate_plain` below, a copy of
            train.evaluate minus the accounting), on the validation split, interleaved rounds.
sweep       `train.train(config)` called directly against the same config as a one-trial
            sweep through `sweep_runner.run_sweep` (local Ray, SQLite MLflow store and Tune storage
            in a temporary folder). Measured: the trial's own wall time, from its MLflow
            child run's start to its end (the run is created in the trainable before
            training and terminated after the final artifacts: per-epoch MLflow logging and
            Tune checkpoints included; Ray worker start-up excluded), and, for information, the
            whole `run_sweep` call with Ray already started (`ray.init` timed apart). The
            trial gets as many CPUs as the direct call has threads. The direct call runs
            before and after the sweep; its time is their mean.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from common import Row, clock, interleaved, median_ratio, timed
from duosparse import data, train
from duosparse.config import RunConfig, load_config
from duosparse.model import LanguageModel

# --- accounting ------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_plain(
    model: LanguageModel, stream: torch.Tensor, bptt: int, max_batches: int | None = None
) -> float:
    """train.evaluate without the Accountant: the baseline of the accounting overhead."""
    model.eval()
    state = model.initial_state(stream.size(1))
    total_loss, total_tokens = 0.0, 0
    for inputs, targets in data.bptt_batches(stream, bptt, max_batches=max_batches):
        logits, state, trace = model(inputs, state)
        total_loss += F.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), reduction="sum"
        ).item()
        total_tokens += targets.numel()
    return total_loss / max(total_tokens, 1)


def _corpus() -> tuple[data.Corpus, str]:
    try:
        return data.load_corpus("ptb"), "ptb"
    except Exception:  # noqa: BLE001 - no data here: the synthetic corpus still times the loop
        return data.load_corpus("synthetic"), "synthetic"


def accounting_rows(quick: bool) -> list[Row]:
    corpus, name = _corpus()
    rounds, batches = (3, 10) if quick else (7, 30)
    stream = data.batchify(corpus.valid, 20)
    rows = []
    for label, overrides in (
        (
            "EGRU h256 1L",
            ["model.embedding_size=128", "model.hidden_size=256", "model.num_layers=1"],
        ),
        (
            "EGRU h400 2L",
            ["model.embedding_size=400", "model.hidden_size=400", "model.num_layers=2"],
        ),
    ):
        cfg = load_config(
            None, ["model.arch=egru", "model.tie_weights=false", "model.threshold=0.05", *overrides]
        ).model
        torch.manual_seed(0)
        model = LanguageModel(cfg, corpus.vocab_size)
        evaluate_plain(model, stream, 35, 2)  # warm up
        samples = interleaved(
            {
                "plain": lambda m=model: (evaluate_plain(m, stream, 35, batches), 1)[1],
                "accounted": lambda m=model: (train.evaluate(m, stream, 35, batches), 1)[1],
            },
            rounds,
        )
        times = {n: s.seconds_per_unit(clock()) for n, s in samples.items()}
        wall = {n: s.seconds_per_unit("wall") for n, s in samples.items()}
        rows.append(
            Row(
                "overheads",
                f"evaluation with MAC/activity accounting / without, {label}",
                statistics.median(times["accounted"]),
                statistics.median(times["plain"]),
                "s",
                median_ratio(times["accounted"], times["plain"]),
                1.10,
                higher_is_better=False,
                note=f"train.evaluate vs the same loop without the Accountant; {name} valid, "
                f"batch 20, bptt 35, {batches} chunks, {torch.get_num_threads()} thread(s), "
                f"{clock()} time; median of {rounds} interleaved rounds",
                details={"wall_ratio": median_ratio(wall["accounted"], wall["plain"])},
            )
        )
    return rows


# --- sweep machinery -------------------------------------------------------------------------


def trial_config(corpus_name: str, quick: bool) -> RunConfig:
    """A quick-study EGRU trial; about 60 s single-threaded on an idle 2-core EPYC (quick: 15 s)."""
    steps, evals = (30, 10) if quick else (150, 20)
    return load_config(
        None,
        [
            "model.arch=egru",
            "model.embedding_size=128",
            "model.hidden_size=256",
            "model.num_layers=1",
            "model.tie_weights=false",
            "model.threshold=0.05",
            f"data.corpus={corpus_name}",
            "train.epochs=2",
            "train.batch_size=20",
            "train.eval_batch_size=20",
            f"train.max_steps_per_epoch={steps}",
            f"train.max_eval_batches={evals}",
            "train.lr=0.003",
        ],
    )


def sweep_rows(quick: bool) -> list[Row]:
    import ray
    from duosparse import sweep_runner, tracking
    from duosparse.sweep import parse_spec

    _, corpus_name = _corpus()
    config = trial_config(corpus_name, quick)
    cpus = torch.get_num_threads()
    previous_cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="duosparse-bench-") as tmp:
        tmp_path = Path(tmp)
        direct = [timed(lambda: train.train(config, workdir=tmp_path / "direct0", progress=False))]
        uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
        spec = parse_spec(
            {
                "name": "bench_sweep_overhead",
                "base": config.model_dump(mode="json"),
                "seeds": [config.train.seed],
                "resources": {"cpu": cpus},
                "max_concurrent": 1,
                "retries": 0,
                "tracking": {"uri": uri},
                "storage_path": str(tmp_path / "tune"),
            }
        )
        os.chdir(tmp)  # the embedded store puts artifacts beside the working directory
        started_here = not ray.is_initialized()
        try:
            env = {k: os.environ[k] for k in ("DUOSPARSE_DATA_DIR",) if k in os.environ}
            ray_init_s = (
                timed(
                    lambda: ray.init(
                        address="local",
                        num_cpus=os.cpu_count(),
                        include_dashboard=False,
                        log_to_driver=False,
                        configure_logging=False,
                        runtime_env={"env_vars": env} if env else None,
                    )
                )
                if started_here
                else 0.0
            )
            sweep_s = timed(
                lambda: sweep_runner.run_sweep(spec, tracking_uri=uri, show_progress=False)
            )
        finally:
            if started_here:
                ray.shutdown()  # only the Ray this process started
            os.chdir(previous_cwd)
        client = tracking.open_store(uri)
        experiment = client.get_experiment_by_name(spec.experiment)
        runs = sweep_runner.runs_by_key(client, experiment.experiment_id)
        run = runs.get(config.run_key)
        if run is None or run.info.status != "FINISHED":
            raise RuntimeError(
                f"the benchmark sweep's trial did not finish: {run and run.info.status}"
            )
        trial_s = (run.info.end_time - run.info.start_time) / 1000
        direct.append(
            timed(lambda: train.train(config, workdir=tmp_path / "direct1", progress=False))
        )
    direct_s = statistics.mean(direct)
    what = (
        f"EGRU h256 1L untied, {corpus_name}, 2 epochs x {config.train.max_steps_per_epoch} steps, "
        f"batch 20, {cpus} CPU(s); direct runs {direct[0]:.1f} s and {direct[1]:.1f} s"
    )
    return [
        Row(
            "overheads",
            "sweep trial wall time (MLflow run start->end) / direct train()",
            trial_s,
            direct_s,
            "s",
            trial_s / direct_s,
            1.10,
            higher_is_better=False,
            note=what,
            details={"direct_s": direct, "ray_init_s": ray_init_s},
        ),
        Row(
            "overheads",
            "whole one-trial run_sweep (Ray already up) / direct train()",
            sweep_s,
            direct_s,
            "s",
            sweep_s / direct_s,
            None,
            higher_is_better=False,
            note=f"Tune set-up, worker start-up and imports included; ray.init took "
            f"{ray_init_s:.1f} s apart; {what}",
            details={"direct_s": direct, "ray_init_s": ray_init_s},
        ),
    ]


def run(quick: bool = False, sweep: bool = True) -> list[Row]:
    rows = accounting_rows(quick)
    if sweep:
        rows += sweep_rows(quick)
    return rows
