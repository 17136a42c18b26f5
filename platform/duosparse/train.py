"""Train one language model from a RunConfig; read top to bottom.

The loop knows nothing of MLflow or Ray: it reports through a `Reporter` (metrics by epoch,
artifacts as files), and a checkpoint written after every epoch lets a retried or resumed
run continue where it stopped.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import Progress

from . import data, schema, terminal
from .accounting import Accountant
from .config import WARM_START_KEYS, RunConfig
from .model import LanguageModel, Trace, detach_state
from .pruning import Pruner, restore_masks

log = logging.getLogger(__name__)  # one line per epoch; the CLI decides where lines go


class Reporter(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_missing(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: Path) -> None: ...


class NullReporter:
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_missing(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: Path) -> None:
        pass


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message says where and what to change."""


@dataclass
class Evaluation:
    loss: float
    accounting: dict[str, float]
    unit_event_rates: list[list[float]]

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 50.0))


CHECKPOINT_VERSION = 2  # 2: data position and lr-schedule state


# --- helpers ---------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class DeviceUnavailable(ValueError):
    """train.device (or a command's --device) names a device this machine does not have."""


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str, field: str = "train.device") -> torch.device:
    """The torch device for `name` (auto: a GPU when there is one); `field` names the setting
    in messages."""
    if name not in DEVICES:
        raise DeviceUnavailable(f"{field} '{name}' is not one of {', '.join(DEVICES)}.")
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif name == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(
            f"{field} is 'cuda' but no CUDA device is visible here; set "
            f"{field} to 'auto' or 'cpu', or run on a machine with a GPU."
        )
    else:
        device = torch.device(name)
    if device.type == "cuda":
        # One precision for every architecture: LSTM and GRU run in cuDNN, which may use TF32
        # (torch.backends.cudnn.allow_tf32, on by default); the EGRU's products run in cuBLAS,
        # which PyTorch keeps at full float32 by default. Give cuBLAS the cuDNN setting, so
        # the three are compared at the same arithmetic (docs/performance.md, GPU).
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
    return device


def build_model(config: RunConfig, vocab_size: int) -> LanguageModel:
    return LanguageModel(config.model, vocab_size)


def full_pass_steps(config: RunConfig, train_stream_len: int) -> int:
    """Chunks of train.bptt in one whole pass over the (batchified) training stream."""
    return max((train_stream_len - 1) // config.train.bptt, 1)


def steps_per_epoch(config: RunConfig, train_stream_len: int) -> int:
    steps = full_pass_steps(config, train_stream_len)
    cap = config.train.max_steps_per_epoch
    return min(steps, cap) if cap else steps


@torch.no_grad()
def evaluate(
    model: LanguageModel,
    stream: torch.Tensor,
    bptt: int,
    max_batches: int | None = None,
    include_embedding: bool = False,
) -> Evaluation:
    """Loss, activity and MAC counts over a batchified split, in one pass, state carried over."""
    model.eval()
    accountant = Accountant(model, include_embedding)
    state = model.initial_state(stream.size(1))
    total_loss, total_tokens = 0.0, 0
    for inputs, targets in data.bptt_batches(stream, bptt, max_batches=max_batches):
        logits, state, trace = model(inputs, state)
        total_loss += F.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), reduction="sum"
        ).item()
        total_tokens += targets.numel()
        accountant.update(trace)
    return Evaluation(
        total_loss / max(total_tokens, 1), accountant.metrics(), accountant.unit_event_rates()
    )


@dataclass
class LrState:
    """What the schedule carries between epochs (checkpointed: a resumed run continues it)."""

    scale: float = 1.0  # step decays and plateau divisions applied so far
    best_val: float = math.inf  # plateau: best validation loss so far
    bad_epochs: int = 0  # plateau: epochs in a row without a new best
    val_losses: list[float] = dataclasses.field(default_factory=list)  # ntasgd: every epoch's

    def switch_to_averaging(self, config: RunConfig, val_loss: float) -> bool:
        """AWD-LSTM's trigger, checked before this epoch's loss joins the history: the loss is
        worse than the best of all epochs except the last `nonmono`."""
        n = config.train.nonmono
        return len(self.val_losses) > n and val_loss > min(self.val_losses[:-n])

    def end_of_epoch(self, config: RunConfig, epoch: int, val_loss: float) -> None:
        t = config.train
        if t.lr_schedule == "step" and epoch in t.step_epochs:
            self.scale *= t.lr_decay_factor
        elif t.lr_schedule == "plateau":
            if val_loss < self.best_val:
                self.best_val, self.bad_epochs = val_loss, 0
            else:
                self.bad_epochs += 1
                if self.bad_epochs > t.plateau_patience:
                    self.scale *= t.lr_decay_factor
                    self.bad_epochs = 0


def lr_at(config: RunConfig, global_step: int, per_epoch: int, lr_state: LrState) -> float:
    """The learning rate of step `global_step` (0-based), before AWD's seq_len/bptt factor."""
    t = config.train
    lr = t.lr * lr_state.scale
    warmup = t.warmup_epochs * per_epoch
    if global_step < warmup:
        lr *= min(1.0, (global_step + 1) / warmup)  # a fractional warmup never overshoots
    if t.lr_schedule == "cosine":
        start, total = (t.decay_start_epoch - 1) * per_epoch, t.epochs * per_epoch
        progress = min(max(global_step - start, 0) / max(total - start, 1), 1.0)
        lr *= 0.5 * (1 + math.cos(math.pi * progress))
    return lr


def make_optimizer(config: RunConfig, model: LanguageModel) -> torch.optim.Optimizer:
    """Thresholds in a group of their own: their lr is scaled by train.threshold_lr_factor
    and they are not decayed (as EvNN)."""
    t = config.train
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    weights = [p for n, p in named if not n.endswith("threshold")]
    thresholds = [p for n, p in named if n.endswith("threshold")]
    groups = [{"params": weights, "lr_factor": 1.0}]
    if thresholds:
        groups.append(
            {"params": thresholds, "lr_factor": t.threshold_lr_factor, "weight_decay": 0.0}
        )
    if t.optimizer in ("sgd", "ntasgd"):
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    adam = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    return adam(groups, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)


def averaging_optimizer(config: RunConfig, optimizer: torch.optim.Optimizer) -> torch.optim.ASGD:
    """NT-ASGD's second phase over the same parameter groups (AWD-LSTM: t0 = 0, lambd = 0)."""
    groups = [
        {k: v for k, v in g.items() if k in ("params", "lr_factor", "weight_decay")}
        for g in optimizer.param_groups
    ]
    return torch.optim.ASGD(
        groups, lr=config.train.lr, t0=0, lambd=0.0, weight_decay=config.train.weight_decay
    )


class averaged_weights:
    """Within the block the parameters hold ASGD's running averages (what NT-ASGD evaluates
    and keeps); outside, the iterates that training continues from. No-op for others."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer, self.saved = optimizer, []

    def __enter__(self) -> None:
        if isinstance(self.optimizer, torch.optim.ASGD):
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    if "ax" in self.optimizer.state[p]:
                        self.saved.append((p, p.detach().clone()))
                        p.data.copy_(self.optimizer.state[p]["ax"])

    def __exit__(self, *exc: object) -> None:
        for p, value in self.saved:
            p.data.copy_(value)
        self.saved = []


def clip_gradients(config: RunConfig, model: LanguageModel) -> None:
    """EvNN clips each EGRU layer's parameter gradients inside the layer's backward, then the
    whole model's; the first is the same as clipping each layer's gradients after backward."""
    t = config.train
    if t.layer_clip > 0:
        for layer in model.layers:
            if layer.arch == "egru":
                torch.nn.utils.clip_grad_norm_(layer.parameters(), t.layer_clip)
    if t.clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip)


def _activity_penalty(config: RunConfig, events: list[torch.Tensor]) -> torch.Tensor | None:
    reg = config.model.activity_regularizer
    if reg.weight == 0 or not events:
        return None
    rate = torch.cat([e.flatten() for e in events]).mean()  # unit-weighted event rate
    if reg.kind == "linear":
        return reg.weight * rate
    return reg.weight * (rate - reg.target) ** 2


def _activation_penalty(config: RunConfig, trace: Trace) -> torch.Tensor | None:
    """AWD-LSTM's AR (on the dropped output) and TAR (on the raw output's steps), last layer."""
    reg = config.model.activation_regularizer
    penalty = None
    if reg.ar > 0:
        penalty = reg.ar * trace.decoder_input.pow(2).mean()
    if reg.tar > 0:
        raw = trace.outputs[-1]
        tar = reg.tar * (raw[1:] - raw[:-1]).pow(2).mean()
        penalty = tar if penalty is None else penalty + tar
    return penalty


# --- a finite blow-up ----------------------------------------------------------------------

LOSS_CAP = 50.0  # nats: perplexities are reported as exp(min(loss, LOSS_CAP))
DIVERGENCE_MARGIN = 1.0  # nats above the uniform guess log(vocab) that count as diverged


def check_divergence(config: RunConfig, val_loss: float, vocab_size: int, epoch: int) -> None:
    """Raise TrainingDiverged when an epoch's validation loss is finite but blown up.

    The rule: val/loss >= LOSS_CAP (the perplexity is at its cap), or val/loss > log(vocab) +
    DIVERGENCE_MARGIN. A model that has learned nothing predicts the uniform distribution,
    loss log(vocab), and the unigram model its first steps learn is below that (its entropy on
    the training split is at most log(vocab)). A loss more than one nat above log(vocab) is
    e times more perplexed than knowing nothing: the weights have been thrown away from any
    solution, which is what a too-high learning rate does (clipping or not). It is checked
    against the uniform guess, not the unigram loss, so a short or slow first epoch that has
    not yet learned the unigram statistics is not mistaken for divergence.
    """
    uniform = math.log(vocab_size)
    if val_loss >= LOSS_CAP:
        why = f"at the perplexity cap (val/ppl = exp({LOSS_CAP:g}))"
    elif val_loss > uniform + DIVERGENCE_MARGIN:
        why = (
            f"more than {DIVERGENCE_MARGIN:g} nat above a uniform guess over the "
            f"{vocab_size} words (log {vocab_size} = {uniform:.3f})"
        )
    else:
        return
    t = config.train
    raise TrainingDiverged(
        f"val/loss is {val_loss:.4g} after epoch {epoch}, {why}: training diverged although the "
        f"loss stayed finite; lower train.lr (now {t.lr:g}) or set train.clip (now {t.clip:g})."
    )


# --- a dead start ------------------------------------------------------------------------


class SilentStart(RuntimeError):
    """An EGRU layer emits no event at initialisation (train.on_silent_start: error)."""


@torch.no_grad()
def silent_start(model: LanguageModel, tokens: torch.Tensor) -> str | None:
    """None, or why the EGRU is silent at init: the layers that emit no event on `tokens`
    (T, B), with the scale of their internal state |c| (measured at threshold 0), so a long
    run never starts with a layer through which no signal (and little gradient) passes."""
    if model.cfg.arch != "egru":
        return None
    was_training = model.training
    model.eval()
    _, _, trace = model(tokens, model.initial_state(tokens.size(1)))
    silent = [i for i, events in enumerate(trace.events) if not events.any()]
    if not silent:
        model.train(was_training)
        return None
    open_model = copy.deepcopy(model)
    for layer in open_model.layers:
        layer.threshold.zero_()  # at threshold 0, y = max(c, 0): the scale of c
    _, _, open_trace = open_model(tokens, open_model.initial_state(tokens.size(1)))
    model.train(was_training)
    parts = []
    for i in silent:
        theta = model.layers[i].threshold
        scale = open_trace.outputs[i].abs().flatten()[: 1 << 20].quantile(0.99).item()
        parts.append(
            f"layer {i + 1} is silent at init: its thresholds ({theta.min().item():.3g} to "
            f"{theta.max().item():.3g}) are above |c| ~ {scale:.2g} (99th percentile)"
        )
    return (
        "; ".join(parts)
        + ". No event passes a silent layer, so the logits do not depend on the input "
        "and training starts dead; lower model.threshold, or use model.threshold_init: beta with a "
        "small mean (EvNN: 0.01), or model.weight_init: xavier_normal."
    )


# --- checkpoints --------------------------------------------------------------------------


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # atomic: a killed run never leaves half a checkpoint


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_model(path: str | Path) -> tuple[LanguageModel, RunConfig]:
    """A trained model from a final checkpoint (model.pt), masks and thresholds included."""
    payload = load_checkpoint(path)
    config = RunConfig.model_validate(payload["config"])
    model = build_model(config, payload["vocab_size"])
    restore_masks(model, payload["model"])
    model.load_state_dict(payload["model"])
    return model, config


def warm_start(
    model: LanguageModel, config: RunConfig, checkpoint: str | Path | None, vocab_size: int
) -> None:
    """Load the final weights of the run config.init.from_run_key names (masks, thresholds
    and all) into `model`; the new run's own pruning schedule then starts from them."""
    key = config.init.from_run_key
    if checkpoint is None or not Path(checkpoint).is_file():
        raise ValueError(
            f"init.from_run_key is {key[:12]}... but no checkpoint of that run was given to train()"
        )
    payload = load_checkpoint(checkpoint)
    # The checkpoint's own config, re-validated by this code version, may hash to another
    # run_key (keys added since): compare what fixes the weights' shapes instead.
    source, this = RunConfig.model_validate(payload["config"]).flat(), config.flat()
    differ = [k for k in WARM_START_KEYS if source[k] != this[k]]
    if differ:
        raise ValueError(
            f"init.from_run_key {key[:12]}: the checkpoint's {', '.join(differ)} differ from this run's"
        )
    if payload["vocab_size"] != vocab_size:
        raise ValueError(
            f"init.from_run_key {key[:12]}: that run's vocabulary has {payload['vocab_size']} words, "
            f"this run's corpus {vocab_size}; warm-start from a run on the same corpus"
        )
    restore_masks(model, payload["model"])
    model.load_state_dict(payload["model"])


# --- the run ------------------------------------------------------------------------------


@dataclass
class RunProgress:
    """Where a run stands after its last finished epoch; `last.pt` holds it for a resume."""

    epoch: int = 0  # the last finished epoch (0: none yet)
    global_step: int = 0
    best_val: float = math.inf  # best validation loss at the final sparsity
    best_state: dict | None = None  # the weights that reached it
    position: int = 0  # where a capped epoch continues in the training stream
    lr_state: LrState = dataclasses.field(default_factory=LrState)
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # the last epoch's


def train(
    config: RunConfig,
    reporter: Reporter | None = None,
    workdir: str | Path = "runs/latest",
    corpus: data.Corpus | None = None,
    progress: bool = True,
    init_checkpoint: str | Path | None = None,
) -> dict[str, float]:
    """Train, validate every epoch, test the best-validation weights; returns final metrics.

    `workdir` holds `last.pt` (resume state, rewritten every epoch) and the final artifacts.
    If `last.pt` exists there for the same config, training continues from it. A config with
    `init.from_run_key` starts from `init_checkpoint`, that run's final model.pt
    (warmstart.fetch_checkpoint finds it in MLflow).
    """
    reporter = reporter or NullReporter()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t = config.train
    seed_everything(t.seed)
    device = resolve_device(t.device)

    corpus = corpus or data.load_corpus(config.data.corpus, config.data.dir, seed=t.seed)
    train_data = data.batchify(corpus.train, t.batch_size).to(device)
    val_data = data.batchify(corpus.valid, t.eval_batch_size).to(device)

    model = build_model(config, corpus.vocab_size).to(device)
    optimizer = make_optimizer(config, model)
    per_epoch = steps_per_epoch(config, train_data.size(0))
    pruner = Pruner(config.prune, model, per_epoch)

    resume = workdir / "last.pt"
    done, optimizer = _resume(resume, config, model, optimizer)
    if done.metrics:  # a kill may have landed between the checkpoint and the epoch's log
        reporter.log_missing(done.metrics, step=done.epoch)
    if done.epoch == 0 and config.init.from_run_key:
        warm_start(model, config, init_checkpoint, corpus.vocab_size)
    elif done.epoch == 0:
        if config.model.unigram_decoder_bias:
            model.start_at_unigram(data.unigram_log_probs(corpus.train, corpus.vocab_size))
        _check_silent_start(config, model, train_data)

    metrics: dict[str, float] = {}
    run_start, first_epoch = time.perf_counter(), done.epoch + 1
    for epoch in range(first_epoch, t.epochs + 1):
        epoch_start = time.perf_counter()
        loss_sum, token_count = _train_epoch(
            config, model, optimizer, pruner, train_data, epoch, per_epoch, done, progress
        )
        epoch_s = time.perf_counter() - epoch_start
        if epoch >= pruner.final_epoch:
            pruner.finish()  # the schedule's last update lands exactly on the target

        val = _validate(config, model, optimizer, val_data, epoch, pruner, done, corpus.vocab_size)
        metrics = {
            schema.TRAIN_LOSS: loss_sum / max(token_count, 1),
            schema.VAL_LOSS: val.loss,
            schema.VAL_PPL: val.ppl,
            schema.PERF_TOKENS_PER_S: token_count / epoch_s,
            schema.PERF_EPOCH_S: epoch_s,
            **val.accounting,
        }
        optimizer = _end_of_epoch_schedule(config, optimizer, done.lr_state, epoch, val.loss)
        done.epoch, done.metrics = epoch, metrics
        _save_resume(resume, config, model, optimizer, done)
        reporter.log_metrics(metrics, step=epoch)  # after the checkpoint, which holds it too
        _log_epoch(
            epoch, t.epochs, metrics, time.perf_counter() - run_start, epoch - first_epoch + 1
        )

    final, test = _final_test(config, model, corpus, done, device)
    reporter.log_metrics(final, step=t.epochs)
    _write_artifacts(workdir, config, model, corpus, final, test, reporter)
    best = {schema.VAL_LOSS: done.best_val, schema.VAL_PPL: math.exp(min(done.best_val, 50.0))}
    return {**metrics, **best, **final}  # last epoch's train/perf figures, best val, final test


def _resume(
    path: Path, config: RunConfig, model: LanguageModel, optimizer: torch.optim.Optimizer
) -> tuple[RunProgress, torch.optim.Optimizer]:
    """The progress (and the model's and optimizer's state) of `last.pt` when it belongs to
    this config; a fresh start otherwise. NT-ASGD's switch may change the optimizer's kind."""
    if not path.exists():
        return RunProgress(), optimizer
    ckpt = load_checkpoint(path)
    if ckpt.get("run_key") != config.run_key:
        return RunProgress(), optimizer
    restore_masks(model, ckpt["model"])
    model.load_state_dict(ckpt["model"])
    if ckpt["averaging"]:
        optimizer = averaging_optimizer(config, optimizer)
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"])
    done = RunProgress(
        epoch=ckpt["epoch"],
        global_step=ckpt["global_step"],
        best_val=ckpt["best_val"],
        best_state=ckpt["best_model"],
        position=ckpt["position"],
        lr_state=LrState(**ckpt["lr_state"]),
        metrics=ckpt.get("metrics", {}),
    )
    return done, optimizer


def _save_resume(
    path: Path,
    config: RunConfig,
    model: LanguageModel,
    optimizer: torch.optim.Optimizer,
    done: RunProgress,
) -> None:
    save_checkpoint(
        path,
        {
            "version": CHECKPOINT_VERSION,
            "run_key": config.run_key,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": done.epoch,
            "global_step": done.global_step,
            "best_val": done.best_val,
            "best_model": done.best_state,
            "rng": torch.get_rng_state(),
            "position": done.position,
            "lr_state": dataclasses.asdict(done.lr_state),
            "averaging": isinstance(optimizer, torch.optim.ASGD),
            "metrics": done.metrics,
        },
    )


def _train_epoch(
    config: RunConfig,
    model: LanguageModel,
    optimizer: torch.optim.Optimizer,
    pruner: Pruner,
    train_data: torch.Tensor,
    epoch: int,
    per_epoch: int,
    done: RunProgress,
    show_progress: bool,
) -> tuple[float, int]:
    """One epoch of truncated BPTT; advances done.global_step and done.position and returns
    the summed training loss and the number of target tokens."""
    t = config.train
    model.train()
    generator = torch.Generator().manual_seed(t.seed * 1000 + epoch)  # repeatable after resume
    # Capped epochs continue where the last one stopped (data.epoch_batches); whole epochs
    # are one pass each, from the first token.
    capped = per_epoch < full_pass_steps(config, train_data.size(0))
    if capped:
        batches = data.epoch_batches(
            train_data, t.bptt, per_epoch, done.position, t.variable_bptt, generator
        )
    else:
        batches = (
            (x, y, 0) for x, y in data.bptt_batches(train_data, t.bptt, t.variable_bptt, generator)
        )
    state = model.initial_state(t.batch_size)
    # The loss stays on the device: the host reads it (a sync on a GPU) once per
    # LOSS_READ_EVERY steps, to check it and to show it, not at every step.
    loss_sum = torch.zeros((), dtype=torch.float64, device=train_data.device)
    token_count, window = 0, []
    with _progress(show_progress, f"epoch {epoch}/{t.epochs}", per_epoch) as bar:
        for step, (inputs, targets, next_position) in enumerate(batches):
            pruner.step((epoch - 1) * per_epoch + step)  # schedule in nominal steps
            lr = lr_at(config, done.global_step, per_epoch, done.lr_state)
            for group in optimizer.param_groups:
                group["lr"] = lr * inputs.size(0) / t.bptt * group["lr_factor"]
            state = detach_state(state)
            logits, state, trace = model(inputs, state)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
            total = loss
            for penalty in (
                _activity_penalty(config, trace.events),
                _activation_penalty(config, trace),
            ):
                if penalty is not None:
                    total = total + penalty
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            clip_gradients(config, model)
            optimizer.step()
            model.clamp_thresholds()
            done.global_step += 1
            if next_position == 0 and capped:
                state = model.initial_state(t.batch_size)  # the stream starts again
            done.position = next_position
            loss_sum += loss.detach().double() * targets.numel()
            token_count += targets.numel()
            window.append(loss.detach())
            if len(window) == LOSS_READ_EVERY:
                bar.advance(len(window), _read_losses(window, config, epoch, step))
                window = []
        if window:
            bar.advance(len(window), _read_losses(window, config, epoch, step))
    return loss_sum.item(), token_count


# Steps between two host reads of the training loss (each one a device sync on a GPU).
LOSS_READ_EVERY = 25


def _read_losses(window: list[torch.Tensor], config: RunConfig, epoch: int, step: int) -> float:
    """The last loss of a window of steps ending at `step` (0-based); TrainingDiverged naming
    the first step whose loss was not finite, if any was."""
    losses = torch.stack(window).cpu()
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        first = int(bad[0])
        t = config.train
        raise TrainingDiverged(
            f"train/loss became {losses[first].item()} at epoch {epoch}, "
            f"step {step - len(window) + first + 2}; "
            f"lower train.lr (now {t.lr}) or set train.clip (now {t.clip})."
        )
    return losses[-1].item()


def _validate(
    config: RunConfig,
    model: LanguageModel,
    optimizer: torch.optim.Optimizer,
    val_data: torch.Tensor,
    epoch: int,
    pruner: Pruner,
    done: RunProgress,
    vocab_size: int,
) -> Evaluation:
    """The validation split after `epoch`; keeps the best weights at the final sparsity and
    ends a diverged run (TrainingDiverged)."""
    t = config.train
    with averaged_weights(optimizer):
        val = evaluate(model, val_data, t.bptt, t.max_eval_batches, config.prune.include_embedding)
        # The best model is picked among those at the final sparsity: weights from before
        # pruning finished are not the pruned model the config asks for.
        if epoch >= pruner.final_epoch and val.loss < done.best_val:
            done.best_val, done.best_state = val.loss, copy.deepcopy(model.state_dict())
    if not math.isfinite(val.loss):
        raise TrainingDiverged(f"val/loss became {val.loss} after epoch {epoch}; lower train.lr.")
    check_divergence(config, val.loss, vocab_size, epoch)
    return val


def _end_of_epoch_schedule(
    config: RunConfig,
    optimizer: torch.optim.Optimizer,
    lr_state: LrState,
    epoch: int,
    val_loss: float,
) -> torch.optim.Optimizer:
    """NT-ASGD's switch to averaging, then the step and plateau decays; returns the optimizer
    the next epoch uses."""
    t = config.train
    if (
        t.optimizer == "ntasgd"
        and not isinstance(optimizer, torch.optim.ASGD)
        and lr_state.switch_to_averaging(config, val_loss)
    ):
        optimizer = averaging_optimizer(config, optimizer)
    lr_state.val_losses.append(val_loss)
    lr_state.end_of_epoch(config, epoch, val_loss)
    return optimizer


def _final_test(
    config: RunConfig, model: LanguageModel, corpus: data.Corpus, done: RunProgress, device
) -> tuple[dict[str, float], Evaluation]:
    """The best-validation weights on the test split, at train.test_batch_size."""
    t = config.train
    restore_masks(model, done.best_state)
    model.load_state_dict(done.best_state)
    test_data = data.batchify(corpus.test, t.test_batch_size or t.eval_batch_size).to(device)
    test = evaluate(model, test_data, t.bptt, t.max_eval_batches, config.prune.include_embedding)
    final = {schema.TEST_LOSS: test.loss, schema.TEST_PPL: test.ppl, **test.accounting}
    log.info(
        "test ppl %.2f (best-validation weights, val ppl %.2f); activity sparsity %.3f "
        "(silent units %.3f), compute reduction %.2fx",
        test.ppl,
        math.exp(min(done.best_val, 50.0)),
        final.get(schema.SPARSITY_ACTIVITY, math.nan),
        final.get(schema.SPARSITY_SILENT_UNITS, math.nan),
        final.get(schema.OPS_COMPUTE_REDUCTION, math.nan),
    )
    return final, test


def probe_silent_start(config: RunConfig, corpus: data.Corpus) -> str | None:
    """`silent_start` for the model `train(config)` would build (same seed, same first chunk),
    on the CPU: a sweep checks its trials with it before it launches any."""
    if config.model.arch != "egru":
        return None
    seed_everything(config.train.seed)
    model = build_model(config, corpus.vocab_size)
    tokens = data.batchify(corpus.train, config.train.batch_size)[: config.train.bptt]
    return silent_start(model, tokens)


def _check_silent_start(config: RunConfig, model: LanguageModel, train_data: torch.Tensor) -> None:
    """Probe the first training chunk at init; warn, or refuse under on_silent_start: error."""
    reason = silent_start(model, train_data[: config.train.bptt])
    if reason is None:
        return
    if config.train.on_silent_start == "error":
        raise SilentStart(
            reason + " (train.on_silent_start: error; set it to warn to train anyway)"
        )
    warnings.warn(reason, SilentStartWarning, stacklevel=3)


class SilentStartWarning(UserWarning):
    """An EGRU layer emits no event at initialisation."""


def _write_artifacts(
    workdir: Path,
    config: RunConfig,
    model: LanguageModel,
    corpus: data.Corpus,
    final: dict[str, float],
    test: Evaluation,
    reporter: Reporter,
) -> None:
    (workdir / schema.ARTIFACT_CONFIG).write_text(config.to_yaml())
    save_checkpoint(
        workdir / schema.ARTIFACT_CHECKPOINT,
        {
            "version": CHECKPOINT_VERSION,
            "config": config.model_dump(mode="json"),
            "vocab_size": corpus.vocab_size,
            "model": model.state_dict(),
            "metrics": final,
        },
    )
    layers = len(test.unit_event_rates)
    (workdir / schema.ARTIFACT_ACTIVITY).write_text(
        json.dumps(
            {
                "split": "test",
                "layer_activity_sparsity": [final[schema.layer_activity(i)] for i in range(layers)],
                "unit_event_rates": test.unit_event_rates,
            }
        )
    )
    for name in (schema.ARTIFACT_CONFIG, schema.ARTIFACT_CHECKPOINT, schema.ARTIFACT_ACTIVITY):
        reporter.log_artifact(workdir / name)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _log_epoch(
    epoch: int, epochs: int, metrics: dict[str, float], elapsed: float, done: int
) -> None:
    """epoch, train loss, val ppl, activity sparsity, effective MACs, tokens/s, elapsed, ETA
    (the epochs this process ran so far, projected over those left)."""
    eta = elapsed / max(done, 1) * (epochs - epoch)
    log.info(
        "epoch %d/%d  train loss %.3f  val ppl %.2f  activity sparsity %.3f  effective MACs/token %.3g  "
        "%s tok/s  elapsed %s  ETA %s",
        epoch,
        epochs,
        metrics[schema.TRAIN_LOSS],
        metrics[schema.VAL_PPL],
        metrics.get(schema.SPARSITY_ACTIVITY, math.nan),
        metrics.get(schema.OPS_EFFECTIVE, math.nan),
        f"{metrics[schema.PERF_TOKENS_PER_S]:,.0f}",
        _duration(elapsed),
        _duration(eta),
    )


class _progress:
    """A rich progress bar over one epoch's steps (silent when disabled)."""

    def __init__(self, enabled: bool, label: str, total: int):
        self.enabled, self.label, self.total = enabled, label, total
        self.bar: Progress | None = None

    def __enter__(self) -> _progress:
        if self.enabled:
            self.bar = terminal.progress_bar(Console(stderr=True), "loss {task.fields[loss]:.3f}")
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=self.total, loss=float("nan"))
        return self

    def advance(self, steps: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=steps, loss=loss)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
