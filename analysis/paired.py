"""What pruning costs, with an interval: each pruned model against its dense baseline on the
same test tokens (a paired comparison).

For every dense model of a run table (`lineages`: the runs pruned from its weights in a staged
study, or the runs that differ from it only in their pruning), the run at the highest prune
level and the unpruned one are both evaluated again, chunk by
chunk, on the whole test split, with the batch size and BPTT length they were tested with.
The interval of the perplexity difference comes from a moving-block bootstrap over the
chunks (consecutive chunks share a carried state, so they are resampled in blocks of about
sqrt(n)); both models are resampled with the same blocks. One seed is enough for this
interval: it is the test set's sampling noise, not the training noise across seeds.
"""

from __future__ import annotations

import math
import tempfile
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from duosparse import data, schema
from duosparse.train import load_model

from .runs import BEST_VAL_PPL, RUN_ID, RUN_KEY, SEED, WARM_START, config_columns, usable_rows


def chunk_losses(model: Any, stream: torch.Tensor, bptt: int) -> tuple[np.ndarray, np.ndarray]:
    """Summed cross-entropy and token count of each BPTT chunk of a batchified split, state
    carried across chunks as in training's evaluation."""
    model.eval()
    losses, tokens = [], []
    with torch.no_grad():
        state = model.initial_state(stream.size(1))
        for inputs, targets in data.bptt_batches(stream, bptt):
            logits, state, _ = model(inputs, state)
            losses.append(
                F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
            )
            tokens.append(targets.numel())
    return np.asarray(losses), np.asarray(tokens, dtype=float)


def paired_difference(
    loss_a: np.ndarray,
    loss_b: np.ndarray,
    tokens: np.ndarray,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """ppl_b - ppl_a with a moving-block bootstrap interval over the chunks."""
    n = len(tokens)
    block = max(1, round(math.sqrt(n)))
    starts = np.arange(n - block + 1)
    rng = np.random.default_rng(seed)
    draws = rng.choice(starts, size=(n_boot, math.ceil(n / block)))
    index = (draws[:, :, None] + np.arange(block)).reshape(n_boot, -1)[:, :n]

    def ppl(loss: np.ndarray) -> np.ndarray:
        return np.exp(loss[index].sum(1) / tokens[index].sum(1))

    diffs = ppl(loss_b) - ppl(loss_a)
    low, high = np.quantile(diffs, [(1 - confidence) / 2, (1 + confidence) / 2])
    ppl_a = math.exp(loss_a.sum() / tokens.sum())
    ppl_b = math.exp(loss_b.sum() / tokens.sum())
    return {
        "ppl_dense": ppl_a,
        "ppl_pruned": ppl_b,
        "difference": ppl_b - ppl_a,
        "ci_low": float(low),
        "ci_high": float(high),
        "block_chunks": block,
        "chunks": n,
    }


def lineages(table: pd.DataFrame) -> list[tuple[pd.Series, pd.Series]]:
    """(dense, most pruned) pairs of usable runs, one per dense model: in a staged study the
    pruned runs that warm-start from an unpruned run (init.from_run_key); otherwise the runs
    whose configs differ only in their pruning (and the lineage key)."""
    ok = usable_rows(table)
    level = "prune.target_sparsity"
    dense, pruned = ok[ok[level] <= 0], ok[ok[level] > 0]
    groups: list[tuple[pd.DataFrame, pd.DataFrame]] = []
    linked = (
        pruned[WARM_START].isin(set(dense[RUN_KEY]))
        if WARM_START in ok
        else pd.Series(False, pruned.index)
    )
    for key, children in pruned[linked].groupby(WARM_START, sort=True):
        groups.append((dense[dense[RUN_KEY] == key], children))
    rest = pd.concat(
        [dense[~dense[RUN_KEY].isin(set(pruned[linked][WARM_START]))], pruned[~linked]]
    )
    keys = [c for c in config_columns(rest) if not c.startswith("prune.") and c != WARM_START]
    for _, group in rest.groupby(keys, dropna=False, sort=True) if keys and len(rest) else []:
        groups.append((group[group[level] <= 0], group[group[level] > 0]))
    pairs = []
    for base, children in groups:
        if len(base) and len(children):
            top = children[children[level] == children[level].max()]
            pairs.append(
                (base.sort_values(BEST_VAL_PPL).iloc[0], top.sort_values(BEST_VAL_PPL).iloc[0])
            )
    return pairs


def pruning_cost(
    table: pd.DataFrame, client: Any, n_boot: int = 2000, confidence: float = 0.95
) -> list[dict[str, Any]]:
    """For each lineage: the test perplexity rise from the dense run to the most pruned one,
    with its paired interval; entries that cannot be computed say why."""
    out = []
    corpora: dict[tuple, Any] = {}
    for dense, pruned in lineages(table):
        entry: dict[str, Any] = {
            "model.arch": dense["model.arch"],
            "model.threshold": dense.get("model.threshold"),
            SEED: dense.get(SEED),
            "target_sparsity": float(pruned["prune.target_sparsity"]),
            "dense_run_id": dense[RUN_ID],
            "pruned_run_id": pruned[RUN_ID],
        }
        try:
            with tempfile.TemporaryDirectory() as tmp:
                models = []
                for run_id in (dense[RUN_ID], pruned[RUN_ID]):
                    path = client.download_artifacts(
                        run_id, schema.ARTIFACT_CHECKPOINT, tmp + "/" + run_id
                    )
                    models.append(load_model(path))
            (model_a, config), (model_b, _) = models
            t = config.train
            key = (config.data.corpus, config.data.dir, t.seed)
            if key not in corpora:
                corpora[key] = data.load_corpus(config.data.corpus, config.data.dir, seed=t.seed)
            stream = data.batchify(corpora[key].test, t.test_batch_size or t.eval_batch_size)
            loss_a, tokens = chunk_losses(model_a, stream, t.bptt)
            loss_b, _ = chunk_losses(model_b, stream, t.bptt)
            entry.update(paired_difference(loss_a, loss_b, tokens, n_boot, confidence))
            entry["significant"] = entry["ci_low"] > 0
        except Exception as e:  # a missing artifact or corpus: say so, keep the rest
            entry["skipped"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        out.append(entry)
    return out
