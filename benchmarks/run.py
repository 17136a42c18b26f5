"""Training throughput of the duosparse LSTM, GRU and EGRU against torch.nn.GRU, measured in
the same process, printed as ratios and written to bench.json. Run with `make bench`."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from duosparse.config import load_config
from duosparse.model import LanguageModel, detach_state

VOCAB, EMBED, HIDDEN, LAYERS, BATCH, BPTT, STEPS, WARMUP = 10_000, 128, 256, 2, 32, 35, 12, 3


class TorchGRULM(torch.nn.Module):
    """The baseline: torch.nn.GRU in the same shell (embedding, 2 layers, tied decoder)."""

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Embedding(VOCAB, EMBED)
        self.rnn1 = torch.nn.GRU(EMBED, HIDDEN)
        self.rnn2 = torch.nn.GRU(HIDDEN, EMBED)
        self.decoder = torch.nn.Linear(EMBED, VOCAB)
        self.decoder.weight = self.encoder.weight

    def forward(self, x, state):
        h1, h2 = state
        y, h1 = self.rnn1(self.encoder(x), h1)
        y, h2 = self.rnn2(y, h2)
        return self.decoder(y), (h1.detach(), h2.detach())


def tokens_per_s(model: torch.nn.Module, step) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, VOCAB, (BPTT + 1, BATCH), generator=gen) for _ in range(STEPS + WARMUP)]
    state = None
    for i, seq in enumerate(batches):
        if i == WARMUP:
            start = time.perf_counter()
        logits, state = step(model, seq[:-1], state)
        loss = F.cross_entropy(logits.flatten(0, 1), seq[1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return STEPS * BPTT * BATCH / (time.perf_counter() - start)


def duosparse_step(model, x, state):
    state = detach_state(state) if state is not None else model.initial_state(BATCH)
    logits, state, _ = model(x, state)
    return logits, state


def torch_step(model, x, state):
    if state is None:
        state = (torch.zeros(1, BATCH, HIDDEN), torch.zeros(1, BATCH, EMBED))
    return model(x, state)


def main() -> None:
    torch.manual_seed(0)
    rows = {}
    baseline = tokens_per_s(TorchGRULM(), torch_step)
    rows["torch.nn.GRU"] = baseline
    for arch in ("lstm", "gru", "egru"):
        cfg = load_config(None, [f"model.arch={arch}", f"model.embedding_size={EMBED}",
                                 f"model.hidden_size={HIDDEN}", f"model.num_layers={LAYERS}",
                                 "model.threshold=0.05"]).model
        rows[f"duosparse {arch}"] = tokens_per_s(LanguageModel(cfg, VOCAB), duosparse_step)
    print(f"training throughput, {LAYERS} layers, embedding {EMBED}, hidden {HIDDEN}, vocab {VOCAB}, "
          f"batch {BATCH}, bptt {BPTT}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"{'model':<18}{'tokens/s':>12}{'ratio to torch.nn.GRU':>24}")
    results = {}
    for name, value in rows.items():
        ratio = value / baseline
        results[name] = {"tokens_per_s": value, "ratio": ratio}
        print(f"{name:<18}{value:>12,.0f}{ratio:>24.2f}")
    Path("bench.json").write_text(json.dumps({"training_throughput": results}, indent=2))
    print("written to bench.json")


if __name__ == "__main__":
    main()
