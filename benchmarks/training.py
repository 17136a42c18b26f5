"""Training throughput: duosparse's EGRU (egru_kernel), GRU and LSTM against torch.nn.GRU /
torch.nn.LSTM in the same language-model shell (embedding -> recurrent layer(s) -> decoder,
untied, as in sweeps/ptb_quick.yaml), the same sizes and the same training step: forward,
cross-entropy, backward, gradient clipping, Adam step (and, for duosparse, the threshold
clamp train.train does). Tokens are random (the cost of a training step does not depend on
them); the figure is tokens per second, ratio = duosparse / torch.nn.

On CPU (the default, what `make bench` records) single-threaded and in process CPU time;
`--device cuda` runs the same comparison on a GPU (wall time, synchronised): not measured
in docs/performance.md, where no GPU was available."""

from __future__ import annotations

import math
import statistics

import torch
import torch.nn.functional as F
from common import Row, clock, interleaved, median_ratio, timed
from duosparse.config import load_config
from duosparse.model import LanguageModel, detach_state

VOCAB, BATCH, BPTT, CLIP = 10_000, 20, 35, 0.25

# (label, embedding, hidden, layers): the quick study's two sizes and a 400-unit 2-layer model
SIZES = [("h128 1L", 128, 128, 1), ("h256 1L", 128, 256, 1), ("h400 2L", 400, 400, 2)]


class TorchLM(torch.nn.Module):
    """The baseline shell: embedding, torch.nn.GRU or torch.nn.LSTM, decoder (untied)."""

    def __init__(self, kind: str, embedding: int, hidden: int, layers: int):
        super().__init__()
        self.encoder = torch.nn.Embedding(VOCAB, embedding)
        rnn = torch.nn.GRU if kind == "gru" else torch.nn.LSTM
        self.rnn = rnn(embedding, hidden, num_layers=layers)
        self.decoder = torch.nn.Linear(hidden, VOCAB)
        self.kind, self.layers, self.hidden = kind, layers, hidden

    def initial_state(self, batch: int):
        h = self.decoder.weight.new_zeros(self.layers, batch, self.hidden)
        return h if self.kind == "gru" else (h, h.clone())

    def forward(self, tokens, state):
        out, state = self.rnn(self.encoder(tokens), state)
        state = state.detach() if self.kind == "gru" else tuple(s.detach() for s in state)
        return self.decoder(out), state


class Trainer:
    """One model with its optimiser and carried state; `run(n)` does n training steps."""

    def __init__(
        self,
        model: torch.nn.Module,
        duosparse: bool,
        device: torch.device,
        seed: int = 0,
        batch: int = BATCH,
        bptt: int = BPTT,
    ):
        self.model, self.duosparse, self.device = model.to(device), duosparse, device
        self.batch, self.bptt = batch, bptt
        self.optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        self.state = model.initial_state(batch)
        gen = torch.Generator().manual_seed(seed)
        self.batches = [
            torch.randint(0, VOCAB, (bptt + 1, batch), generator=gen).to(device) for _ in range(8)
        ]
        self.i = 0
        model.train()

    def step(self) -> None:
        seq = self.batches[self.i % len(self.batches)]
        self.i += 1
        inputs, targets = seq[:-1], seq[1:]
        if self.duosparse:
            logits, self.state, _ = self.model(inputs, detach_state(self.state))
        else:
            logits, self.state = self.model(inputs, self.state)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        self.last_loss = loss.detach()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
        self.optimizer.step()
        if self.duosparse:
            self.model.clamp_thresholds()

    def train(self, steps: int) -> int:
        """`steps` training steps; returns the tokens trained on."""
        for _ in range(steps):
            self.step()
        _synchronize(self.device)
        return steps * self.bptt * self.batch


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _duosparse(arch: str, embedding: int, hidden: int, layers: int) -> LanguageModel:
    cfg = load_config(
        None,
        [
            f"model.arch={arch}",
            f"model.embedding_size={embedding}",
            f"model.hidden_size={hidden}",
            f"model.num_layers={layers}",
            "model.tie_weights=false",
            "model.threshold=0.05",
        ],
    ).model
    return LanguageModel(cfg, VOCAB)


def _layer_rows(
    label: str,
    embedding: int,
    hidden: int,
    layers: int,
    rounds: int,
    seconds: float,
    device: torch.device,
) -> Row:
    """The recurrent layer(s) alone, forward + backward: EGRU (egru_kernel) / torch.nn.GRU."""
    torch.manual_seed(0)
    ds = _duosparse("egru", embedding, hidden, layers).to(device)
    gru = torch.nn.GRU(embedding, hidden, num_layers=layers).to(device)
    x = torch.randn(BPTT, BATCH, embedding, device=device, requires_grad=True)

    def egru_pass() -> None:
        out, state = x, None
        for layer in ds.layers:
            out, state, _ = layer(out, layer.initial_state(BATCH))
        (out.sum() + state[1].sum()).backward()
        _synchronize(device)

    def gru_pass() -> None:
        out, _ = gru(x)
        out.sum().backward()
        _synchronize(device)

    passes = {}
    for name, fn in (("egru", egru_pass), ("gru", gru_pass)):
        fn()
        passes[name] = (fn, max(2, math.ceil(seconds / max(timed(fn), 1e-3))))
    samples = interleaved(
        {
            n: (lambda f=f, k=k: [f() for _ in range(k)] and k * BPTT * BATCH)
            for n, (f, k) in passes.items()
        },
        rounds,
    )
    rates = {n: s.units_per_second(_clock(device)) for n, s in samples.items()}
    return Row(
        "training",
        f"layer only {label}: EGRU fwd+bwd / torch.nn.GRU",
        statistics.median(rates["egru"]),
        statistics.median(rates["gru"]),
        "tokens/s",
        median_ratio(rates["egru"], rates["gru"]),
        None,
        note="the recurrent layer(s) alone (no embedding, decoder, optimiser): where the EGRU's extra "
        "element-wise work shows",
    )


def _clock(device: torch.device) -> str:
    return clock() if device.type == "cpu" else "wall"


def run(quick: bool = False, device: str = "cpu") -> list[Row]:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible here")
    rounds, seconds = (3, 0.3) if quick else (5, 0.8)
    rows = []
    for label, embedding, hidden, layers in SIZES:
        torch.manual_seed(0)
        trainers = {
            "torch.nn.GRU": Trainer(TorchLM("gru", embedding, hidden, layers), False, device),
            "egru": Trainer(_duosparse("egru", embedding, hidden, layers), True, device),
            "gru": Trainer(_duosparse("gru", embedding, hidden, layers), True, device),
            "torch.nn.LSTM": Trainer(TorchLM("lstm", embedding, hidden, layers), False, device),
            "lstm": Trainer(_duosparse("lstm", embedding, hidden, layers), True, device),
        }
        steps = {}
        for name, trainer in trainers.items():  # warm up, then size each measurement
            trainer.step()
            one = timed(trainer.step)
            steps[name] = max(2, math.ceil(seconds / max(one, 1e-3)))
        samples = interleaved(
            {n: (lambda t=t, k=steps[n]: t.train(k)) for n, t in trainers.items()}, rounds
        )
        rates = {n: s.units_per_second(_clock(device)) for n, s in samples.items()}
        wall = {n: s.units_per_second("wall") for n, s in samples.items()}
        where = (
            f"emb {embedding}, hidden {hidden}, {layers} layer(s), untied, vocab {VOCAB}, "
            f"batch {BATCH}, bptt {BPTT}, Adam, {device.type}, "
            f"{torch.get_num_threads()} thread(s), {_clock(device)} time; "
            f"median of {rounds} interleaved rounds"
        )
        for name, base, target in (
            ("egru", "torch.nn.GRU", 1.0),
            ("gru", "torch.nn.GRU", None),
            ("lstm", "torch.nn.LSTM", None),
        ):
            rows.append(
                Row(
                    "training",
                    f"train {label}: duosparse {name.upper()} / {base}",
                    statistics.median(rates[name]),
                    statistics.median(rates[base]),
                    "tokens/s",
                    median_ratio(rates[name], rates[base]),
                    target,
                    note=where,
                    details={
                        "wall_ratio": median_ratio(wall[name], wall[base]),
                        "rounds": {n: rates[n] for n in (name, base)},
                    },
                )
            )
        rows.append(_layer_rows(label, embedding, hidden, layers, rounds, seconds / 2, device))
    return rows
