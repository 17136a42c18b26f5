"""What the sweep's driver shows and records while Ray Tune runs the trials."""

from __future__ import annotations

from ray.tune import Callback

from . import schema, terminal, tracking
from .eta import SweepEta

# The launch's estimate, shared by the callbacks of its stages (driver only; sweep_runner.run_sweep
# sets it for the launch and clears it after).
LAUNCH_ETA: SweepEta | None = None


class SweepProgress(Callback):
    """A Ray Tune callback: progress with the sweep's overall ETA on the driver (a rich bar
    on a terminal, else a line per finished trial), and MLflow bookkeeping for trials that
    end without their trainable's help (ASHA stops, dead workers). Picklable, since Tune
    saves it with the experiment for `Tuner.restore`."""

    def __init__(self, uri: str, show: bool, stage: str | None):
        self.uri, self.show, self.stage = uri, show, stage
        self._bar = self._client = None

    def __getstate__(self):
        return {
            "uri": self.uri,
            "show": self.show,
            "stage": self.stage,
            "_bar": None,
            "_client": None,
        }

    def setup(self, **info):
        from rich.console import Console

        self._client = tracking.mlflow_client(self.uri)
        self._console = Console(stderr=True)
        self._live = self.show and self._console.is_terminal
        eta = LAUNCH_ETA
        self._bar = terminal.progress_bar(
            self._console,
            "{task.fields[note]}",
            eta=False,  # the sweep's own ETA is in the note
            transient=False,
            enabled=self._live,
        )
        self._task = self._bar.add_task(
            f"sweep {self.stage}" if self.stage else "sweep",
            total=eta.trials_total if eta else None,
            completed=eta.trials_done if eta else 0,
            note="",
        )
        self._bar.start()

    def _key(self, trial) -> str | None:
        return ((trial.config or {}).get("trial") or {}).get("run_key")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if LAUNCH_ETA and result.get("epoch") and not result.get("duosparse_done"):
            LAUNCH_ETA.epoch(self._key(trial) or "", int(result["epoch"]))
        if self._bar and result.get("epoch") and LAUNCH_ETA:
            self._bar.update(
                self._task, note=f"epoch {result['epoch']} of a trial; {LAUNCH_ETA.summary()}"
            )

    def _ended(self, trial, trials) -> None:
        if LAUNCH_ETA:
            LAUNCH_ETA.trial_ended(self._key(trial) or "")
            running = sum(t is not trial and t.status == "RUNNING" for t in trials)
            failed = sum(
                t.status == "ERROR" or bool((t.last_result or {}).get("failed")) for t in trials
            )
            note = f"{LAUNCH_ETA.summary()} ({running} running, {failed} failed)"
            if self._live:
                self._bar.update(self._task, completed=LAUNCH_ETA.trials_done, note=note)
            elif self.show:
                self._console.print(
                    f"sweep{' ' + self.stage if self.stage else ''}: {note}",
                    highlight=False,
                    soft_wrap=True,
                )

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        run_id = last.get("mlflow_run_id")
        if run_id and not last.get("duosparse_done"):  # stopped by the scheduler
            self._client.set_tag(run_id, schema.TAG_EARLY_STOPPED, "true")
            tracking.finish_run(self._client, run_id, "FINISHED")
        self._ended(trial, trials)

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = (trial.last_result or {}).get("mlflow_run_id")
        if run_id and self._client.get_run(run_id).info.status == "RUNNING":
            tracking.finish_run(self._client, run_id, "FAILED", "the trial's worker died")
        self._ended(trial, trials)

    def on_experiment_end(self, trials, **info):
        if self._bar:
            self._bar.stop()
