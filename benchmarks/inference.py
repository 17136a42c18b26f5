"""Event-driven batch-1 inference (duosparse.inference) against the dense batch-1 path.

The model has the paper's size (embedding 750, hidden 1350, 3 layers, tied: a dense mat-vec
is big enough to time). At each operating point (weight sparsity s_w, activity sparsity
s_a) the recurrent matrices and the (tied) embedding are magnitude-pruned to s_w per tensor
(`prune.include_embedding`: with a dense embedding, the first layer's input would be dense
whatever the activity, and the effective MACs would be ~34x, not ~1 / ((1 - s_w)(1 - s_a))
= 50x, below dense at 90 % / 80 %; that case is timed too, in its own row) and each layer's
EGRU threshold is set by bisection so that the layer's outputs are zero on a fraction s_a of
random tokens (layer by layer, on a batch of random tokens; below the ~50 % that a zero
threshold gives an untrained network the threshold goes negative). Then one random sequence
of batch 1 is run token by token through `EventDrivenEGRU.run` (event-driven) and
`run(dense=True)` (the same gate code with full `torch.addmv` mat-vecs), in interleaved
rounds, both single-threaded (batch-1 streaming inference; on a shared machine one thread is
also the steadier measurement). Timed: the recurrent layers (logits off), which is what the
effective-MAC reduction counts; one extra row times the whole model with logits.
The effective-MAC reduction (dense / effective, recurrent layers) and the activity come from
`accounting.Accountant` on the same sequence through `LanguageModel.forward`.
"""

from __future__ import annotations

import statistics

import torch
from common import Row, clock, interleaved, median_ratio
from duosparse import schema
from duosparse.accounting import Accountant
from duosparse.config import load_config
from duosparse.inference import EventDrivenEGRU
from duosparse.model import LanguageModel
from duosparse.pruning import prune_to
from scipy.stats import spearmanr

VOCAB, EMBEDDING, HIDDEN, LAYERS = 10_000, 750, 1350, 3
POINTS = [(0.0, 0.0), (0.5, 0.5), (0.8, 0.6), (0.9, 0.8), (0.95, 0.9)]  # (s_w, s_a)
HEADLINE = (0.9, 0.8)
TARGET_SPEEDUP = 10.0


def build(weight_sparsity: float, include_embedding: bool = True, seed: int = 0) -> LanguageModel:
    torch.manual_seed(seed)
    cfg = load_config(
        None,
        [
            "model.arch=egru",
            f"model.embedding_size={EMBEDDING}",
            f"model.hidden_size={HIDDEN}",
            f"model.num_layers={LAYERS}",
        ],
    ).model
    model = LanguageModel(cfg, VOCAB).eval()
    if weight_sparsity > 0:
        prune_to(model.prunable(include_embedding), weight_sparsity, "layer")
    return model


@torch.no_grad()
def calibrate(
    model: LanguageModel, activity_sparsity: float, tokens: torch.Tensor, iterations: int
) -> list[float]:
    """Per layer, the threshold at which that layer's outputs are zero on a fraction
    `activity_sparsity` of `tokens` (T, B), by bisection; returns the thresholds."""
    x = model.embedding_weight()[tokens]
    thresholds = []
    for layer in model.layers:
        lo, hi = -1.0, 1.0  # c stays within (-1, 1) + |theta|: all fire at -1, none at 1

        def outputs(theta: float, layer=layer, x=x) -> torch.Tensor:
            layer.threshold.fill_(theta)
            return layer(x, layer.initial_state(x.size(1)))[0]

        for _ in range(iterations):
            mid = (lo + hi) / 2
            if float((outputs(mid) == 0).double().mean()) < activity_sparsity:
                lo = mid
            else:
                hi = mid
        theta = (lo + hi) / 2
        thresholds.append(theta)
        x = outputs(theta)
    return thresholds


@torch.no_grad()
def account(model: LanguageModel, sequence: torch.Tensor) -> dict[str, float]:
    _, _, trace = model(sequence[:, None], model.initial_state(1))
    accountant = Accountant(model)
    accountant.update(trace)
    return accountant.metrics()


def _tokens(engine: EventDrivenEGRU, sequence: torch.Tensor, **kw) -> int:
    engine.run(sequence, **kw)
    return sequence.numel()


def run(quick: bool = False) -> tuple[list[Row], list[dict]]:
    steps, rounds, iterations = (15, 3, 10) if quick else (40, 5, 14)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(steps, rounds, iterations)
    finally:
        torch.set_num_threads(threads)


def _run(steps: int, rounds: int, iterations: int) -> tuple[list[Row], list[dict]]:
    gen = torch.Generator().manual_seed(1)
    calibration = torch.randint(0, VOCAB, (30, 4), generator=gen)
    sequence = torch.randint(0, VOCAB, (steps,), generator=gen)
    where = (
        f"emb {EMBEDDING}, hidden {HIDDEN}, {LAYERS} layers, tied, vocab {VOCAB}; batch 1, "
        f"{steps} tokens, 1 thread, {clock()} time; median of {rounds} interleaved rounds"
    )
    cases = [(s_w, s_a, True) for s_w, s_a in POINTS] + [(*HEADLINE, False)]
    rows, table = [], []
    for s_w, s_a, include_embedding in cases:
        model = build(s_w, include_embedding)
        thresholds = calibrate(model, s_a, calibration, iterations)
        m = account(model, sequence)
        engine = EventDrivenEGRU.from_model(model)
        event = engine.run(sequence, logits=False)
        dense = engine.run(sequence, logits=False, dense=True)
        agree = all(torch.allclose(a, b, atol=1e-4) for a, b in zip(event.outputs, dense.outputs))
        headline = (s_w, s_a) == HEADLINE and include_embedding
        timings = {
            "dense": lambda e=engine: _tokens(e, sequence, logits=False, dense=True),
            "event": lambda e=engine: _tokens(e, sequence, logits=False),
        }
        if headline:  # the whole model (with logits), and the pure-torch kernel
            timings["dense+logits"] = lambda e=engine: _tokens(e, sequence, dense=True)
            timings["event+logits"] = lambda e=engine: _tokens(e, sequence)
            torch_engine = EventDrivenEGRU.from_model(model, backend="torch")
            timings["event torch backend"] = lambda e=torch_engine: _tokens(
                e, sequence, logits=False
            )
        samples = interleaved(timings, rounds)
        times = {n: [t * 1e6 for t in s.seconds_per_unit(clock())] for n, s in samples.items()}
        wall = {n: s.seconds_per_unit("wall") for n, s in samples.items()}
        speedup = median_ratio(times["dense"], times["event"])
        reduction = m[schema.OPS_COMPUTE_REDUCTION]
        point = {
            "weight_sparsity": s_w,
            "embedding_pruned": include_embedding,
            "activity_target": s_a,
            "activity_sparsity": m[schema.SPARSITY_ACTIVITY],
            "layer_activity": [m[schema.layer_activity(i)] for i in range(LAYERS)],
            "thresholds": thresholds,
            "dense_macs_per_token": m[schema.OPS_DENSE],
            "effective_macs_per_token": m[schema.OPS_EFFECTIVE],
            "performed_macs_per_token": event.macs_per_token,
            "effective_mac_reduction": reduction,
            "dense_us_per_token": statistics.median(times["dense"]),
            "event_us_per_token": statistics.median(times["event"]),
            "speedup": speedup,
            "wall_ratio": median_ratio(wall["dense"], wall["event"]),
            "outputs_agree": agree,
        }
        table.append(point)
        label = f"s_w {s_w:.0%} / s_a {s_a:.0%}" + (
            "" if include_embedding else ", embedding dense"
        )
        rows.append(
            Row(
                "inference",
                f"infer batch-1 speedup, {label} (event vs dense)",
                point["event_us_per_token"],
                point["dense_us_per_token"],
                "us/token",
                speedup,
                TARGET_SPEEDUP if headline else None,
                note=f"effective-MAC reduction {reduction:.1f}x, activity sparsity "
                f"{point['activity_sparsity']:.1%}; {where}"
                + ("" if agree else "; OUTPUTS DIFFER"),
                details=point,
            )
        )
        if headline:
            rows.append(
                Row(
                    "inference",
                    f"infer batch-1 speedup with logits, {label}",
                    statistics.median(times["event+logits"]),
                    statistics.median(times["dense+logits"]),
                    "us/token",
                    median_ratio(times["dense+logits"], times["event+logits"]),
                    None,
                    note=f"the decoder ({VOCAB}x{EMBEDDING}, tied, pruned with the embedding) in both "
                    f"paths; {where}",
                )
            )
            rows.append(
                Row(
                    "inference",
                    f"infer batch-1 speedup, torch backend, {label}",
                    statistics.median(times["event torch backend"]),
                    statistics.median(times["dense"]),
                    "us/token",
                    median_ratio(times["dense"], times["event torch backend"]),
                    None,
                    note=f"repeat_interleave/index_add_ kernel instead of scipy's; {where}",
                )
            )
    rows.append(_monotone_row(table))
    return rows, table


def _monotone_row(table: list[dict]) -> Row:
    reductions = [p["effective_mac_reduction"] for p in table]
    speedups = [p["speedup"] for p in table]
    # scipy's rank correlation averages the ranks of ties (two equal speedups are no order)
    rho = float(spearmanr(reductions, speedups).statistic)
    pairs = ", ".join(f"{r:.1f}x->{s:.1f}x" for r, s in sorted(zip(reductions, speedups)))
    return Row(
        "inference",
        "infer speedup grows with effective-MAC reduction (Spearman rho)",
        rho,
        1.0,
        "rank corr.",
        rho,
        1.0,
        note=f"reduction->speedup over the operating points: {pairs}",
    )
