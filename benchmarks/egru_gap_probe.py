"""Where the EGRU loses to the GRU: in what its decoder reads, its recurrence, or the next layer.

The EGRU's output y_t = o_t * c_t (o_t = 1 where the state c_t crosses the threshold) is
read by the decoder (or, in a stack, by the layer above) and as y_{t-1} by the layer's own
recurrent matrix. This trains the same model several ways, each reading either y or the
state c itself at those places, everything else equal:

    egru               decoder reads y, recurrences read y, layers above read y   (duosparse's EGRU)
    dense_readout      decoder reads c; the rest read y
    dense_recurrence   recurrences read c; the rest read y
    dense_feedforward  decoder and layers above read c, recurrences read y (= dense_readout
                       for one layer)
    dense_both         all read c: a GRU (stack), but for the reset by subtraction, which is
                       tiny here

The model and budget are those of docs/results/reproductions.md, section 2b (the
EvNN-initialised EGRU: xavier-normal weights, zero biases, frozen Beta thresholds of mean
0.01, pseudo-derivative 3.6 / 3.6; 1 layer, embedding 128, hidden 256, untied; Adam 3e-3,
clip 0.25, batch 20, BPTT 35, 600 steps from the start of PTB's training split, state
carried; `--steps 3981 --cosine` gives reproduction 2's three passes and lr schedule;
`--depth` gives reproduction 1's 3-layer stack, section 1b: 3 x 256, decoder bias at the
unigram, validation batch 20, 1,500 steps). The model is built and optimised by duosparse's
own `build_model`, `make_optimizer` and `clip_gradients`, and each step is
`model.egru_cell`. For every variant the script prints the perplexity on the whole
validation split and the activity sparsity there (per layer, of the events o).
docs/results/reproductions.md (sections 2k and 2l) quotes the output of

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

VARIANTS = {  # name: where the state c is read instead of the events y
    #                   (decoder, recurrences, layers above)
    "egru": (False, False, False),
    "dense_readout": (True, False, False),
    "dense_recurrence": (False, True, False),
    "dense_feedforward": (True, False, True),
    "dense_both": (True, True, True),
}
ONE_LAYER_VARIANTS = ["egru", "dense_readout", "dense_recurrence", "dense_both"]

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


DEPTH = [  # sweeps/repro_depth_adam_seeds.yaml's EGRU: reproduction 1 (section 1b)
    "model.num_layers=3",
    "model.unigram_decoder_bias=true",
    "train.eval_batch_size=20",
]
DEPTH_STEPS = 1500  # two capped epochs of 750


def forward(
    model: LanguageModel,
    tokens: Tensor,
    state: list[tuple[Tensor, Tensor]],
    variant: tuple[bool, bool, bool],
) -> tuple[Tensor, list[tuple[Tensor, Tensor]], Tensor]:
    """tokens (T, B) -> logits, each layer's state (what its recurrence reads next, c'), and
    the events (L, T, B, H).

    Every layer of `model` stepped through `egru_cell`, with y swapped for c where asked.
    """
    decoder_reads_state, recurrence_reads_state, above_reads_state = variant
    x = model.encoder(tokens)
    new_state, events = [], []
    for i, (layer, (read, c_after)) in enumerate(zip(model.layers, state)):
        x_proj = F.linear(x, layer.weight_ih, layer.bias_ih)
        ys, cs, os = [], [], []
        for x_t in x_proj:
            y, c_after, o = egru_cell(
                x_t, read, c_after, layer.weight_hh, layer.bias_hh, layer.threshold,
                layer.height, layer.width,
            )  # fmt: skip
            c = c_after + o * layer.threshold  # the state before its reset (y where o = 1)
            read = c if recurrence_reads_state else y
            ys.append(y)
            cs.append(c)
            os.append(o)
        top = i == len(model.layers) - 1
        x = torch.stack(cs if (decoder_reads_state if top else above_reads_state) else ys)
        new_state.append((read, c_after))
        events.append(torch.stack(os))
    logits = F.linear(x, model.decoder.weight, model.decoder.bias)
    return logits, new_state, torch.stack(events)


@torch.no_grad()
def validate(
    model: LanguageModel, stream: Tensor, bptt: int, variant: tuple[bool, bool, bool]
) -> tuple[float, list[float]]:
    """Perplexity on the whole stream, and each layer's activity sparsity there."""
    model.eval()
    state = model.initial_state(stream.size(1))
    loss, tokens, events = 0.0, 0, torch.zeros(len(model.layers), dtype=torch.float64)
    for inputs, targets in data.bptt_batches(stream, bptt):
        logits, state, o = forward(model, inputs, state, variant)
        loss += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        tokens += targets.numel()
        events += o.sum(dim=(1, 2, 3), dtype=torch.float64)
    model.train()
    sizes = torch.tensor([layer.hidden_size for layer in model.layers], dtype=torch.float64)
    return math.exp(loss / tokens), (1.0 - events / (tokens * sizes)).tolist()


def train_variant(
    config: RunConfig,
    corpus: data.Corpus,
    variant: tuple[bool, bool, bool],
    steps: int,
    cosine: bool = False,
) -> dict:
    """Train from the seed's initialisation; validate once, at the end."""
    t = config.train
    seed_everything(t.seed)
    model = build_model(config, corpus.vocab_size)
    if config.model.unigram_decoder_bias:
        model.start_at_unigram(data.unigram_log_probs(corpus.train, corpus.vocab_size))
    optimizer = make_optimizer(config, model)
    train_data = data.batchify(corpus.train, t.batch_size)
    state, loss_sum, started = model.initial_state(t.batch_size), 0.0, time.perf_counter()
    batches = data.epoch_batches(train_data, t.bptt, steps)
    for step, (inputs, targets, next_start) in enumerate(batches):
        # constant, or a cosine decay to 0 over the steps (lr_schedule: cosine), scaled by the
        # chunk's length as train.py does (a pass's last chunk is short); thresholds frozen
        lr = t.lr * (0.5 * (1 + math.cos(math.pi * step / steps)) if cosine else 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr * inputs.size(0) / t.bptt * group["lr_factor"]
        state = [tuple(s.detach() for s in layer_state) for layer_state in state]
        logits, state, _ = forward(model, inputs, state, variant)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        clip_gradients(config, model)
        optimizer.step()
        loss_sum += loss.item()
        if next_start == 0:  # a pass ended: the stream starts again, and so does the state
            state = model.initial_state(t.batch_size)
    val_ppl, activity_sparsity = validate(
        model, data.batchify(corpus.valid, t.eval_batch_size), t.bptt, variant
    )
    return {
        "val_ppl": val_ppl,
        "train_ppl": math.exp(loss_sum / steps),
        "activity_sparsity": sum(activity_sparsity) / len(activity_sparsity),
        "activity_sparsity_per_layer": activity_sparsity,
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help="1,327 steps are a pass over PTB (default 600)")
    parser.add_argument("--cosine", action="store_true", help="decay the lr to 0 over the steps")
    parser.add_argument("--depth", action="store_true", help="reproduction 1's 3-layer stack")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS))
    parser.add_argument("--set", action="append", default=[], help="extra config overrides")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    preset = [*EGRU_2B, *(DEPTH if args.depth else [])]
    config = load_config(None, [*preset, f"train.seed={args.seed}", *args.set])
    steps = args.steps or (DEPTH_STEPS if args.depth else 600)
    variants = args.variants or (list(VARIANTS) if args.depth else ONE_LAYER_VARIANTS)
    corpus = data.load_corpus("ptb", None, seed=args.seed)
    results = {}
    for name in variants:
        results[name] = train_variant(config, corpus, VARIANTS[name], steps, args.cosine)
        r = results[name]
        per_layer = ", ".join(f"{a:.3f}" for a in r["activity_sparsity_per_layer"])
        print(
            f"{name:17} val ppl {r['val_ppl']:7.1f}  train ppl {r['train_ppl']:7.1f}  "
            f"activity sparsity {per_layer}  ({r['seconds']:.0f} s)",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "steps": steps, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
