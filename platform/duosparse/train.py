"""Train one language model from a RunConfig; read top to bottom.

The loop knows nothing of MLflow or Ray: it reports through a `Reporter` (metrics by epoch,
artifacts as files), and a checkpoint written after every epoch lets a retried or resumed
run continue where it stopped.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from . import data, schema
from .accounting import Accountant
from .config import RunConfig
from .model import LanguageModel, detach_state
from .pruning import Pruner, restore_masks


class Reporter(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: Path) -> None: ...


class NullReporter:
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
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


CHECKPOINT_VERSION = 1


# --- helpers ---------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'.")
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


def steps_per_epoch(config: RunConfig, train_stream_len: int) -> int:
    steps = max((train_stream_len - 1) // config.train.bptt, 1)
    cap = config.train.max_steps_per_epoch
    return min(steps, cap) if cap else steps


@torch.no_grad()
def evaluate(
    model: LanguageModel, stream: torch.Tensor, bptt: int, max_batches: int | None = None,
    include_embedding: bool = False,
) -> Evaluation:
    """Loss, activity and MAC counts over a batchified split, in one pass, state carried over."""
    model.eval()
    accountant = Accountant(model, include_embedding)
    state = model.initial_state(stream.size(1))
    total_loss, total_tokens = 0.0, 0
    for inputs, targets in data.bptt_batches(stream, bptt, max_batches=max_batches):
        logits, state, trace = model(inputs, state)
        total_loss += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        total_tokens += targets.numel()
        accountant.update(trace)
    return Evaluation(total_loss / max(total_tokens, 1), accountant.metrics(), accountant.unit_event_rates())


def _lr_at(config: RunConfig, global_step: int, total_steps: int) -> float:
    t = config.train
    if t.lr_schedule == "cosine":
        return 0.5 * t.lr * (1 + math.cos(math.pi * min(global_step / max(total_steps, 1), 1.0)))
    return t.lr


def make_optimizer(config: RunConfig, model: LanguageModel) -> torch.optim.Optimizer:
    t = config.train
    params = [p for p in model.parameters() if p.requires_grad]
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)


def _activity_penalty(config: RunConfig, events: list[torch.Tensor]) -> torch.Tensor | None:
    reg = config.model.activity_regularizer
    if reg.weight == 0 or not events:
        return None
    rate = torch.cat([e.flatten() for e in events]).mean()  # unit-weighted event rate
    return reg.weight * (rate - reg.target) ** 2


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


# --- the run ------------------------------------------------------------------------------


def train(
    config: RunConfig,
    reporter: Reporter | None = None,
    workdir: str | Path = "runs/latest",
    corpus: data.Corpus | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Train, validate every epoch, test the best-validation weights; returns final metrics.

    `workdir` holds `last.pt` (resume state, rewritten every epoch) and the final artifacts.
    If `last.pt` exists there for the same config, training continues from it.
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
    test_data = data.batchify(corpus.test, t.eval_batch_size).to(device)

    model = build_model(config, corpus.vocab_size).to(device)
    optimizer = make_optimizer(config, model)
    per_epoch = steps_per_epoch(config, train_data.size(0))
    pruner = Pruner(config.prune, model, per_epoch)
    total_steps = per_epoch * t.epochs
    include_embedding = config.prune.include_embedding

    start_epoch, global_step, best_val, best_state = 1, 0, math.inf, None
    resume = workdir / "last.pt"
    if resume.exists():
        ckpt = load_checkpoint(resume)
        if ckpt.get("run_key") == config.run_key:
            restore_masks(model, ckpt["model"])
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            start_epoch, global_step = ckpt["epoch"] + 1, ckpt["global_step"]
            best_val, best_state = ckpt["best_val"], ckpt["best_model"]
            torch.set_rng_state(ckpt["rng"])

    generator = torch.Generator().manual_seed(t.seed)
    metrics: dict[str, float] = {}
    for epoch in range(start_epoch, t.epochs + 1):
        model.train()
        generator.manual_seed(t.seed * 1000 + epoch)  # batch lengths repeatable after resume
        state = model.initial_state(t.batch_size)
        loss_sum, token_count, epoch_start = 0.0, 0, time.perf_counter()
        batches = data.bptt_batches(train_data, t.bptt, t.variable_bptt, generator, per_epoch)
        with _progress(progress, f"epoch {epoch}/{t.epochs}", per_epoch) as bar:
            for step, (inputs, targets) in enumerate(batches):
                pruner.step((epoch - 1) * per_epoch + step)  # schedule in nominal steps
                lr = _lr_at(config, global_step, total_steps) * inputs.size(0) / t.bptt
                for group in optimizer.param_groups:
                    group["lr"] = lr
                state = detach_state(state)
                logits, state, trace = model(inputs, state)
                loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"train/loss became {loss.item()} at epoch {epoch}, step {step + 1}; "
                        f"lower train.lr (now {t.lr}) or set train.clip (now {t.clip})."
                    )
                penalty = _activity_penalty(config, trace.events)
                optimizer.zero_grad(set_to_none=True)
                (loss if penalty is None else loss + penalty).backward()
                if t.clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip)
                optimizer.step()
                model.clamp_thresholds()
                global_step += 1
                loss_sum += loss.item() * targets.numel()
                token_count += targets.numel()
                bar.advance(loss.item())
        epoch_s = time.perf_counter() - epoch_start
        if epoch >= pruner.final_epoch:
            pruner.finish()  # the schedule's last update lands exactly on the target

        val = evaluate(model, val_data, t.bptt, t.max_eval_batches, include_embedding)
        if not math.isfinite(val.loss):
            raise TrainingDiverged(f"val/loss became {val.loss} after epoch {epoch}; lower train.lr.")
        metrics = {
            schema.TRAIN_LOSS: loss_sum / max(token_count, 1),
            schema.VAL_LOSS: val.loss,
            schema.VAL_PPL: val.ppl,
            schema.PERF_TOKENS_PER_S: token_count / epoch_s,
            schema.PERF_EPOCH_S: epoch_s,
            **val.accounting,
        }
        # The best model is picked among those at the final sparsity: weights from before
        # pruning finished are not the pruned model the config asks for.
        if epoch >= pruner.final_epoch and val.loss < best_val:
            best_val, best_state = val.loss, copy.deepcopy(model.state_dict())
        save_checkpoint(resume, {
            "version": CHECKPOINT_VERSION, "run_key": config.run_key,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "epoch": epoch, "global_step": global_step, "best_val": best_val,
            "best_model": best_state, "rng": torch.get_rng_state(),
        })
        reporter.log_metrics(metrics, step=epoch)  # after the checkpoint: a resumed run has it

    # Final figures: the best-validation weights on the test split.
    restore_masks(model, best_state)
    model.load_state_dict(best_state)
    test = evaluate(model, test_data, t.bptt, t.max_eval_batches, include_embedding)
    final = {schema.TEST_LOSS: test.loss, schema.TEST_PPL: test.ppl, **test.accounting}
    reporter.log_metrics(final, step=t.epochs)
    _write_artifacts(workdir, config, model, corpus, final, test, reporter)
    best = {schema.VAL_LOSS: best_val, schema.VAL_PPL: math.exp(min(best_val, 50.0))}
    return {**metrics, **best, **final}  # last epoch's train/perf figures, best val, final test


def _write_artifacts(
    workdir: Path, config: RunConfig, model: LanguageModel, corpus: data.Corpus,
    final: dict[str, float], test: Evaluation, reporter: Reporter,
) -> None:
    (workdir / schema.ARTIFACT_CONFIG).write_text(config.to_yaml())
    save_checkpoint(workdir / schema.ARTIFACT_CHECKPOINT, {
        "version": CHECKPOINT_VERSION, "config": config.model_dump(mode="json"),
        "vocab_size": corpus.vocab_size, "model": model.state_dict(), "metrics": final,
    })
    layers = len(test.unit_event_rates)
    (workdir / schema.ARTIFACT_ACTIVITY).write_text(json.dumps({
        "split": "test",
        "layer_activity_sparsity": [final[schema.layer_activity(i)] for i in range(layers)],
        "unit_event_rates": test.unit_event_rates,
    }))
    for name in (schema.ARTIFACT_CONFIG, schema.ARTIFACT_CHECKPOINT, schema.ARTIFACT_ACTIVITY):
        reporter.log_artifact(workdir / name)


class _progress:
    """A rich progress bar over one epoch's steps (silent when disabled)."""

    def __init__(self, enabled: bool, label: str, total: int):
        self.enabled, self.label, self.total = enabled, label, total
        self.bar: Progress | None = None

    def __enter__(self) -> _progress:
        if self.enabled:
            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn(), transient=True,
            )
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=self.total, loss=float("nan"))
        return self

    def advance(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, loss=loss)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
