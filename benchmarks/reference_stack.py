"""duosparse's stacked LSTM against torch.nn.LSTM(num_layers=N), trained side by side on PTB.

Both models start from the same weights and see the same chunks (Adam, clip 0.25, batch 20,
BPTT 35, state carried); every 100 steps each prints its training perplexity and its
validation perplexity on the first 20 validation chunks. docs/results/reproductions.md
(section 1) quotes the output of

    DUOSPARSE_DATA_DIR=../shared/data python benchmarks/reference_stack.py --steps 400
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from duosparse import data
from duosparse.config import load_config
from duosparse.model import LanguageModel, detach_state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    corpus = data.load_corpus("ptb", None, seed=0)
    train, valid, vocab = (
        data.batchify(corpus.train, 20),
        data.batchify(corpus.valid, 20),
        corpus.vocab_size,
    )
    cfg = load_config(
        None,
        [
            "model.arch=lstm",
            "model.embedding_size=128",
            "model.hidden_size=256",
            f"model.num_layers={args.layers}",
            "model.tie_weights=false",
        ],
    ).model
    ours = LanguageModel(cfg, vocab)
    embedding, rnn = torch.nn.Embedding(vocab, 128), torch.nn.LSTM(128, 256, num_layers=args.layers)
    decoder = torch.nn.Linear(256, vocab)
    with torch.no_grad():
        embedding.weight.copy_(ours.encoder.weight)
        decoder.weight.copy_(ours.decoder.weight)
        decoder.bias.copy_(ours.decoder.bias)
        for i, layer in enumerate(ours.layers):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(rnn, f"{name}_l{i}").copy_(getattr(layer, name))
    theirs = torch.nn.ModuleList([embedding, rnn, decoder])

    def run_ours(x, state):
        logits, state, _ = ours(x, state)
        return logits, state

    def run_theirs(x, state):
        out, state = rnn(embedding(x), state)
        return decoder(out), state

    def detach(state):
        return None if state is None else tuple(t.detach() for t in state)

    models = {
        "duosparse": (ours, run_ours, lambda: ours.initial_state(20), detach_state),
        "torch.nn": (theirs, run_theirs, lambda: None, detach),
    }
    for name, (model, forward, initial, cut) in models.items():
        optimiser, state = torch.optim.Adam(model.parameters(), lr=args.lr), initial()
        for step in range(args.steps):
            i = step * 35 % (train.size(0) - 36)
            logits, state = forward(train[i : i + 35], cut(state))
            loss = F.cross_entropy(logits.flatten(0, 1), train[i + 1 : i + 36].flatten())
            optimiser.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
            optimiser.step()
            if (step + 1) % 100 == 0:
                model.eval()
                total, tokens, eval_state = 0.0, 0, initial()
                with torch.no_grad():
                    for j in range(0, 20 * 35, 35):
                        logits, eval_state = forward(valid[j : j + 35], eval_state)
                        target = valid[j + 1 : j + 36]
                        total += F.cross_entropy(
                            logits.flatten(0, 1), target.flatten(), reduction="sum"
                        ).item()
                        tokens += target.numel()
                model.train()
                print(
                    f"{name:9} step {step + 1:5d}  train ppl {math.exp(loss.item()):7.1f}  "
                    f"val ppl (20 chunks) {math.exp(total / tokens):7.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
