"""Pruning sensitivity: how much does each prunable tensor tolerate being pruned on its own?

For every prunable tensor (the recurrent input and recurrent matrices of every layer, and the
embedding/decoder when the run pruned it) and every level s, the tensor alone is pruned by
magnitude to sparsity s, on top of the masks it already has (a level at or below its current
sparsity changes nothing), the validation perplexity is measured with `train.evaluate`, and
the tensor is put back exactly as it was. Nothing is retrained: the table shows where a
pruning budget is cheap and where it hurts, to choose `prune.scope` or per-layer targets.

The command, `duosparse prune sensitivity CHECKPOINT_OR_RUN --levels 0.5,0.7,0.9,0.95`, is
duosparse.cli.prune: a checkpoint (`model.pt`, or a run folder holding one) is analysed and
the table printed; an MLflow run id has its `model.pt` artifact downloaded (analysis.models)
and gets the table logged back into it (artifact `sensitivity.json`, metrics
`sensitivity/<tensor>/<level>` and `sensitivity/baseline`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from duosparse import schema
from duosparse.model import LanguageModel, current_weight
from duosparse.pruning import tensor_name
from duosparse.train import evaluate
from torch import Tensor, nn

DEFAULT_LEVELS = "0.5,0.7,0.9,0.95"


class SensitivityError(ValueError):
    """Bad input to the analysis; the message names the option and the fix."""


# --- the analysis -----------------------------------------------------------------------------


def parse_levels(text: str) -> list[float]:
    """'0.5,0.9' -> [0.5, 0.9] (sorted, without repeats); each level in [0, 1)."""
    levels = []
    for part in text.split(","):
        part = part.strip()
        try:
            level = float(part)
        except ValueError:
            raise SensitivityError(
                f"--levels: '{part}' is not a number; give sparsity levels in [0, 1) separated "
                "by commas, e.g. --levels 0.5,0.7,0.9,0.95."
            ) from None
        if not (0.0 <= level < 1.0) or not math.isfinite(level):
            raise SensitivityError(
                f"--levels: {part} is not a sparsity level in [0, 1) (the fraction of a "
                "tensor's weights set to zero); e.g. --levels 0.5,0.7,0.9,0.95."
            )
        levels.append(level)
    if not levels:
        raise SensitivityError("--levels is empty; e.g. --levels 0.5,0.7,0.9,0.95.")
    return sorted(set(levels))


def magnitude_mask(weight: Tensor, mask: Tensor | None, level: float) -> Tensor:
    """A mask pruning `weight` to round(level * numel) zeros by magnitude, on top of `mask`.

    Entries `mask` already removes stay removed; the extra ones are the smallest |weight|
    among the rest. A level at or below the current sparsity returns `mask` unchanged.
    """
    keep = (torch.ones_like(weight, dtype=torch.bool) if mask is None else mask != 0).flatten()
    extra = round(level * weight.numel()) - int((~keep).sum())
    if extra > 0:
        scores = weight.detach().abs().flatten().masked_fill(~keep, math.inf)
        keep = keep.clone()
        keep[torch.topk(scores, extra, largest=False).indices] = False
    return keep.view_as(weight).to(weight.dtype)


@contextmanager
def pruned_alone(module: nn.Module, name: str, level: float) -> Iterator[float]:
    """Prune one tensor to `level` for the duration of the block, then restore it bit for bit.

    Yields the tensor's sparsity inside the block. A pruned tensor gets its mask buffer
    narrowed; an unpruned one has its parameter zeroed in place (a tied embedding/decoder is
    one parameter, so both uses see it).
    """
    with torch.no_grad():
        mask = getattr(module, name + "_mask", None)
        new = magnitude_mask(current_weight(module, name), mask, level)
        target = mask if mask is not None else getattr(module, name)
        saved = target.detach().clone()
        if mask is not None:
            mask.copy_(new)
        else:
            target.mul_(new)
    try:
        yield float((new == 0).double().mean())
    finally:
        with torch.no_grad():
            target.copy_(saved)


def sensitivity_table(
    model: LanguageModel,
    stream: Tensor,
    bptt: int,
    levels: list[float],
    max_batches: int | None = None,
    include_embedding: bool = False,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The sensitivity table of `model` on a batchified validation `stream`.

    Returns {"baseline": {...}, "levels": [...], "rows": [one per tensor x level]}, each row
    with the tensor's name, shape, sparsity before and during the test, loss and perplexity.
    """
    base = evaluate(model, stream, bptt, max_batches, include_embedding)
    rows: list[dict[str, Any]] = []
    for module, name in model.prunable(include_embedding):
        weight = current_weight(module, name)
        before = float((weight == 0).double().mean())
        for level in levels:
            with pruned_alone(module, name, level) as sparsity:
                ev = evaluate(model, stream, bptt, max_batches, include_embedding)
            row = {
                "tensor": tensor_name(model, module, name),
                "shape": list(weight.shape),
                "level": level,
                "sparsity_before": before,
                "sparsity": sparsity,
                "loss": ev.loss,
                "ppl": ev.ppl,
                "delta_ppl": ev.ppl - base.ppl,
            }
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return {
        "split": "valid",
        "bptt": bptt,
        "max_batches": max_batches,
        "include_embedding": include_embedding,
        "levels": levels,
        "baseline": {
            "loss": base.loss,
            "ppl": base.ppl,
            "weight_sparsity": base.accounting[schema.SPARSITY_WEIGHT],
        },
        "rows": rows,
    }


def metrics_of(table: dict[str, Any]) -> dict[str, float]:
    """The MLflow metrics of a table: sensitivity/<tensor>/<level> = val ppl, and the baseline."""
    out = {schema.SENSITIVITY_BASELINE: table["baseline"]["ppl"]}
    for row in table["rows"]:
        out[schema.sensitivity_metric(row["tensor"], row["level"])] = row["ppl"]
    return {k: v for k, v in out.items() if math.isfinite(v)}
