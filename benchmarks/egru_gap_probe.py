"""Where the one-layer EGRU loses to the GRU: in what its decoder reads, or its recurrence.

The EGRU's output y_t = o_t * c_t (o_t = 1 where the state c_t crosses the threshold) is
read twice: by the decoder, and as y_{t-1} by the layer's own recurrent matrix. This trains
the same model four ways, each reading either y or the state c itself at those two places,
everything else equal:

    egru              decoder reads y, recurrence reads y   (duosparse's EGRU)
    dense_readout     decoder reads c, recurrence reads y
    dense_recurrence  decoder reads y, recurrence reads c
    dense_both        decoder reads c, recurrence reads c   (a GRU, but for the reset by
                                                            subtraction, which is tiny here)

The model and budget are those of docs/results/reproductions.md, section 2b (the
EvNN-initialised EGRU: xavier-normal weights, zero biases, frozen Beta thresholds of mean
0.01, pseudo-derivative 3.6 / 3.6; 1 layer, embedding 128, hidden 256, untied; Adam 3e-3,
clip 0.25, batch 20, BPTT 35, 600 steps from the start of PTB's training split, state
carried; `--steps 3981 --cosine` gives reproduction 2's three passes and lr schedule). The
model is built and optimised by duosparse's own `build_model`, `make_optimizer` and
`clip_gradients`, and each step is `model.egru_cell`. For every variant the script prints
the perplexity on the whole validation split (batch 10) and the activity sparsity there.
docs/results/reproductions.md (section 2k) quotes the output of

    DUOSPARSE_DATA_DIR=../shared/data python benchmarks/egru_gap_probe.py
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from duosparse import data
from duosparse.config import RunConfig, load_config
from duosparse.model import LanguageModel, egru_cell
from duosparse.train import build_model, clip_gradients, make_optimizer, seed_everything
from torch import Tensor

VARIANTS = {  # name: (decoder reads the state, recurrence reads the state)
    "egru": (False, False),
    "dense_readout": (True, False),
    "dense_recurrence": (False, True),
    "dense_both": (True, True),
}

EGRU_2B = [  # sweeps/repro_egru_ablation.yaml's EvNN-initialised EGRU
    "model.arch=egru",
    "model.embedding_size=128",
    "model.hidden_size=256",
    "model.num_layers=1",
    "model.tie_weights=false",
    "model.weight_init=xavier_normal",
    "model.bias_init=zeros",
    "model.threshold_init=beta",
    "model.threshold=0.01",
    "train.threshold_lr_factor=0.0",
    "train.optimizer=adam",
    "train.lr=0.003",
    "train.clip=0.25",
    "train.batch_size=20",
    "train.eval_batch_size=10",
    "train.bptt=35",
]


def forward(
    model: LanguageModel,
    tokens: Tensor,
    state: tuple[Tensor, Tensor],
    readout_state: bool,
    recurrence_state: bool,
) -> tuple[Tensor, tuple[Tensor, Tensor], Tensor]:
    """tokens (T, B) -> logits, the state (what the recurrence reads next, c'), events.

    The first layer of `model` stepped through `egru_cell`, with y swapped for c where asked.
    """
    layer = model.layers[0]
    x_proj = F.linear(model.encoder(tokens), layer.weight_ih, layer.bias_ih)
    read, c_after = state
    outputs, events = [], []
    for x_t in x_proj:
        y, c_after, o = egru_cell(
            x_t, read, c_after, layer.weight_hh, layer.bias_hh, layer.threshold,
            layer.height, layer.width,
        )  # fmt: skip
        c = c_after + o * layer.threshold  # the state before its reset (y where o = 1)
        read = c if recurrence_state else y
        outputs.append(c if readout_state else y)
        events.append(o)
    logits = F.linear(torch.stack(outputs), model.decoder.weight, model.decoder.bias)
    return logits, (read, c_after), torch.stack(events)


@torch.no_grad()
def validate(model: LanguageModel, stream: Tensor, bptt: int, variant: tuple[bool, bool]):
    model.eval()
    state = model.layers[0].initial_state(stream.size(1))
    loss, tokens, events = 0.0, 0, 0.0
    for inputs, targets in data.bptt_batches(stream, bptt):
        logits, state, o = forward(model, inputs, state, *variant)
        loss += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        tokens += targets.numel()
        events += o.sum().item()
    model.train()
    return math.exp(loss / tokens), 1.0 - events / (tokens * model.layers[0].hidden_size)


def train_variant(
    config: RunConfig,
    corpus: data.Corpus,
    variant: tuple[bool, bool],
    steps: int,
    cosine: bool = False,
) -> dict[str, float]:
    """Train from the seed's initialisation; validate once, at the end."""
    t = config.train
    seed_everything(t.seed)
    model = build_model(config, corpus.vocab_size)
    optimizer = make_optimizer(config, model)
    train_data = data.batchify(corpus.train, t.batch_size)
    first_layer = model.layers[0]
    state, loss_sum, started = first_layer.initial_state(t.batch_size), 0.0, time.perf_counter()
    batches = data.epoch_batches(train_data, t.bptt, steps)
    for step, (inputs, targets, next_start) in enumerate(batches):
        # constant, or a cosine decay to 0 over the steps (lr_schedule: cosine), scaled by the
        # chunk's length as train.py does (a pass's last chunk is short); thresholds frozen
        lr = t.lr * (0.5 * (1 + math.cos(math.pi * step / steps)) if cosine else 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr * inputs.size(0) / t.bptt * group["lr_factor"]
        state = tuple(s.detach() for s in state)
        logits, state, _ = forward(model, inputs, state, *variant)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        clip_gradients(config, model)
        optimizer.step()
        loss_sum += loss.item()
        if next_start == 0:  # a pass ended: the stream starts again, and so does the state
            state = first_layer.initial_state(t.batch_size)
    val_ppl, activity_sparsity = validate(
        model, data.batchify(corpus.valid, t.eval_batch_size), t.bptt, variant
    )
    return {
        "val_ppl": val_ppl,
        "train_ppl": math.exp(loss_sum / steps),
        "activity_sparsity": activity_sparsity,
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="1,327 steps are a pass over PTB")
    parser.add_argument("--cosine", action="store_true", help="decay the lr to 0 over the steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--set", action="append", default=[], help="extra config overrides")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = load_config(None, [*EGRU_2B, f"train.seed={args.seed}", *args.set])
    corpus = data.load_corpus("ptb", None, seed=args.seed)
    results = {}
    for name in args.variants:
        results[name] = train_variant(config, corpus, VARIANTS[name], args.steps, args.cosine)
        r = results[name]
        print(
            f"{name:17} val ppl {r['val_ppl']:7.1f}  train ppl {r['train_ppl']:7.1f}  "
            f"activity sparsity {r['activity_sparsity']:.3f}  ({r['seconds']:.0f} s)",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
