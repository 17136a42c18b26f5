"""A sweep's overall time to completion, from the work its trials still have to do.

Work is counted in token passes: a training step costs 3 passes over its tokens (forward and
backward), an evaluation 1 pass over the tokens it reads; every epoch validates, the last
epoch also tests. The rate is the work done per second of the whole sweep so far (idle cores
at stage ends included), so the estimate calibrates itself on this machine and this study:

    remaining seconds = remaining work / (work done / seconds elapsed)

Each trial also costs a fixed start-up and wrap-up (a Ray worker, imports, reading the corpus,
fetching a warm start, writing artifacts): TRIAL_OVERHEAD units, credited when the trial ends.
Without it the ETA of the quick study (24 trials, short fine-tunes after long dense runs) came
out 20% short once the dense stage had ended; the value is what that study measured here.
Work is weighted by tokens only, not by model size: in a study that mixes sizes the early
estimate is rougher until trials of each size have run. Epochs a resumed trial had finished
before this launch leave the total instead of counting as done, so they do not inflate the rate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from .config import RunConfig

TRAIN_PASSES = 3  # forward + backward
TRIAL_OVERHEAD = 400_000.0  # units: ~55 s of one core on the 2-core machine under load (docs above)


def _tokens(length: int, batch: int, bptt: int, max_batches: int | None) -> int:
    """Tokens read when a stream of `length` tokens is batchified and cut into chunks."""
    per_column = length // batch
    chunks = math.ceil(max(per_column - 1, 0) / bptt)
    if max_batches is not None:
        chunks = min(chunks, max_batches)
    return min(chunks * bptt, max(per_column - 1, 0)) * batch


def epoch_work(config: RunConfig, sizes: tuple[int, int, int] | None) -> list[float]:
    """The work of each epoch of one trial; `sizes` are the corpus's (train, valid, test)
    token counts, or None when the driver cannot read the corpus (then every epoch counts its
    capped steps, or one nominal pass)."""
    t = config.train
    if sizes is None:
        steps = t.max_steps_per_epoch or 1000
        train_tokens, val_tokens, test_tokens = steps * t.batch_size * t.bptt, 0, 0
    else:
        train_len, valid_len, test_len = sizes
        full = _tokens(train_len, t.batch_size, t.bptt, None)
        train_tokens = min(full, (t.max_steps_per_epoch or math.inf) * t.batch_size * t.bptt)
        val_tokens = _tokens(valid_len, t.eval_batch_size, t.bptt, t.max_eval_batches)
        test_tokens = _tokens(
            test_len, t.test_batch_size or t.eval_batch_size, t.bptt, t.max_eval_batches
        )
    work = [float(TRAIN_PASSES * train_tokens + val_tokens)] * t.epochs
    work[-1] += test_tokens
    return work


class SweepEta:
    """Tracks the work of a launch's trials (by run_key) as their epochs are reported."""

    def __init__(
        self,
        trials: list[RunConfig],
        sizes: Callable[[RunConfig], tuple[int, int, int] | None],
        clock: Callable[[], float] = time.monotonic,
    ):
        self.work = {c.run_key: epoch_work(c, sizes(c)) for c in trials}
        self.total = sum(sum(w) + TRIAL_OVERHEAD for w in self.work.values())
        self.done = 0.0
        self.credited: dict[str, int] = {}  # run_key -> epochs counted (done or removed)
        self.trials_total, self.trials_done = len(trials), 0
        self.clock = clock
        self.start = clock()

    def epoch(self, run_key: str, epoch: int) -> None:
        """Epoch `epoch` of the trial has ended (earlier unreported ones ran before this launch)."""
        work = self.work.get(run_key)
        if work is None:
            return
        seen = self.credited.get(run_key, 0)
        if seen >= len(work):
            return
        if seen == 0 and epoch > 1:
            self.total -= sum(work[: epoch - 1])  # done before this launch: not this launch's work
            seen = epoch - 1
        for e in range(seen, min(epoch, len(work))):
            self.done += work[e]
        self.credited[run_key] = max(seen, min(epoch, len(work)))

    def trial_ended(self, run_key: str, started: bool = True) -> None:
        """Finished, failed, stopped early (`started`) or skipped: nothing of it is left to do."""
        work = self.work.get(run_key)
        if work is None or self.credited.get(run_key, 0) > len(work):
            return
        seen = self.credited.get(run_key, 0)
        self.total -= sum(work[seen:])  # an early stop's unrun epochs were never work
        if started:
            self.done += TRIAL_OVERHEAD
        else:
            self.total -= TRIAL_OVERHEAD
        self.credited[run_key] = len(work) + 1  # ended
        self.trials_done += 1

    def elapsed(self) -> float:
        return self.clock() - self.start

    def remaining(self) -> float | None:
        """Seconds left, or None before any work is done."""
        if self.done <= 0:
            return None
        rate = self.done / max(self.elapsed(), 1e-9)
        return max(self.total - self.done, 0.0) / rate

    def summary(self) -> str:
        left = self.remaining()
        eta = (
            "ETA unknown until the first epoch ends"
            if left is None
            else f"about {clock_text(left)} left"
        )
        return (
            f"{self.trials_done}/{self.trials_total} trials done, {100 * self.done / max(self.total, 1):.0f}% "
            f"of the work, {clock_text(self.elapsed())} elapsed, {eta}"
        )


def clock_text(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
