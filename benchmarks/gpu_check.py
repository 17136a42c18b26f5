"""GPU check of the fast EGRU, for a user with an NVIDIA GPU (a few minutes):

    python benchmarks/gpu_check.py [--out bench-gpu.json] [--seconds 1.5] [--rounds 3]
                                   [--no-loop] [--ptb-epochs N]

1. Correctness: the compiled Triton kernels (duosparse.egru_triton), with and without CUDA
   graphs, against autograd through the step-by-step reference cell (model.egru_cell) in
   float64 on the same GPU: outputs, events and every gradient; sequences of varying length
   through the graphs against the kernels run directly; then a few training steps of a small
   language model through the kernels and through egru_kernel's PyTorch loop.
2. Training throughput at the paper's size (embedding 750, 3 layers of 1350, vocabulary
   10,000, batch 64, BPTT 70, float32, untied): duosparse's EGRU language model against the
   same shell around torch.nn.GRU (cuDNN), the same training step as benchmarks/training.py
   (forward, cross-entropy, backward, clipping, Adam). Three precision settings: TF32 allowed
   in cuDNN and cuBLAS alike (what duosparse's training sets on CUDA), float32 for both, and
   PyTorch's defaults (cuDNN may use TF32 while cuBLAS, which runs the EGRU's products, stays
   float32: unequal arithmetic, shown for information). The EGRU runs as the layers select it
   on CUDA (Triton kernels, CUDA graphs), and for comparison without graphs, as egru_kernel's
   PyTorch loop, and as the reference cell stepped with autograd (a plain per-step loop).
3. With --ptb-epochs N: duosparse's own train() on Penn Treebank ($DUOSPARSE_DATA_DIR) for N
   epochs with the paper-size EGRU and regularisation (variable BPTT: a graph per length).

Wall time with torch.cuda.synchronize(), interleaved rounds, median of per-round ratios.
Writes the rows (the format of `make bench`'s bench.json) to --out; `make bench` on a machine
without a GPU shows the rows recorded in benchmarks/recorded/ (see docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # run without installing

import torch  # noqa: E402
from common import Row, interleaved, median_ratio  # noqa: E402
from training import VOCAB, TorchLM, Trainer, _duosparse  # noqa: E402

PAPER = {"embedding": 750, "hidden": 1350, "layers": 3, "batch": 64, "bptt": 70}
PRECISIONS = {  # name: (cuDNN may use TF32, cuBLAS may use TF32)
    "tf32": (True, True),  # what duosparse's training sets on CUDA (train.resolve_device)
    "fp32": (False, False),
    "pytorch-defaults": (
        True,
        False,
    ),  # mismatched: cuDNN's GRU in TF32, the EGRU's products in float32
}


class CheckFailed(Exception):
    """A correctness check of the GPU path failed (reported; the throughput part still runs)."""


def _precision(name: str) -> None:
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = PRECISIONS[name]


def _kernels(triton: bool, graphs: bool) -> None:
    from duosparse import egru_triton

    egru_triton.ENABLED, egru_triton.CUDA_GRAPHS = triton, graphs


def check_correctness(device: torch.device) -> dict:
    """Max deviations of the Triton path from the float64 reference; raises if out of tolerance."""
    from duosparse.config import load_config
    from duosparse.model import RecurrentLayer

    _precision("fp32")
    torch.manual_seed(0)
    steps, batch, inputs, hidden = 30, 16, 64, 300
    layer = RecurrentLayer("egru", inputs, hidden, load_config(None, ["model.arch=egru"]).model).to(
        device
    )
    with torch.no_grad():
        layer.threshold.uniform_(0.0, 0.3)
    x = torch.randn(steps, batch, inputs, device=device)
    y0 = torch.randn(batch, hidden, device=device).clamp(min=0)
    c0 = torch.randn(batch, hidden, device=device) * 0.5
    weights = torch.rand(steps, batch, hidden, device=device)

    def run(dtype, fast: bool) -> tuple:
        layer.to(dtype)
        layer.fast = fast
        leaves = [t.to(dtype).requires_grad_() for t in (x, y0, c0)]
        out, (y, c), events = layer(leaves[0], (leaves[1], leaves[2]))
        loss = (
            (out * weights.to(dtype)).sum()
            + (0.3 * c).sum()
            + (0.2 * y).sum()
            + (0.7 * events).sum()
        )
        params = [
            *leaves,
            layer.weight_ih,
            layer.weight_hh,
            layer.bias_ih,
            layer.bias_hh,
            layer.threshold,
        ]
        grads = torch.autograd.grad(loss, params)
        return [t.detach().double() for t in (out, c, events, *grads)]

    reference = run(torch.float64, fast=False)
    names = [
        "outputs",
        "c_T",
        "events",
        "d_x",
        "d_y0",
        "d_c0",
        "d_weight_ih",
        "d_weight_hh",
        "d_bias_ih",
        "d_bias_hh",
        "d_threshold",
    ]
    result = {}
    for graphs in (False, True):
        _kernels(True, graphs)
        got = run(torch.float32, fast=True)
        mismatched_events = float((got[2] != reference[2]).double().mean())
        errors = {}
        for name, a, b in zip(names, got, reference):
            scale = float(b.abs().max())
            errors[name] = float((a - b).abs().max()) / max(scale, 1e-12)  # relative to the largest
        result["graphs" if graphs else "no_graphs"] = {
            "max_relative_error": errors,
            "mismatched_events": mismatched_events,
        }
        worst = max(errors.values())
        print(
            f"  triton kernels ({'with' if graphs else 'without'} CUDA graphs) vs float64 reference: "
            f"worst relative error {worst:.2e}, events differing {mismatched_events:.1e}",
            flush=True,
        )
        if worst > 1e-4 or mismatched_events > 1e-3:
            raise CheckFailed(f"the Triton kernels disagree with the reference: {errors}")
    # a variable BPTT: lengths in any order through the graphs (buffers shared per family)
    # equal the same lengths without graphs
    worst = 0.0
    for steps_now in (30, 20, 41, 20, 30):
        runs = []
        for graphs in (False, True):
            _kernels(True, graphs)
            layer.fast = True
            leaves = [
                t.requires_grad_()
                for t in (
                    torch.randn(
                        steps_now,
                        batch,
                        inputs,
                        device=device,
                        generator=torch.Generator(device).manual_seed(steps_now),
                    ),
                    y0.clone(),
                    c0.clone(),
                )
            ]
            out, (y, c), events = layer(leaves[0], (leaves[1], leaves[2]))
            grads = torch.autograd.grad(
                (out * out).sum() + c.sum(), [leaves[0], layer.weight_hh, layer.threshold]
            )
            runs.append([out.detach(), c.detach(), *grads])
        worst = max(worst, *(float((a - b).abs().max()) for a, b in zip(*runs)))
    result["variable_length_graphs_vs_none_max_abs_difference"] = worst
    print(
        f"  lengths 30, 20, 41, 20, 30 through CUDA graphs vs without: largest difference {worst:.1e}",
        flush=True,
    )
    if worst > 1e-5:
        raise CheckFailed(
            f"graphs of different lengths disagree with the kernels run directly: {worst}"
        )
    return result


def check_training_agrees(device: torch.device) -> dict:
    """Five training steps of a small EGRU language model through the Triton kernels (with CUDA
    graphs) and through egru_kernel's PyTorch loop, from the same weights: the losses agree."""
    _precision("fp32")
    losses, weights = {}, {}
    for name, triton, graphs in (("pytorch_loop", False, False), ("triton_graphs", True, True)):
        _kernels(triton, graphs)
        torch.manual_seed(1)
        trainer = Trainer(_duosparse("egru", 64, 200, 2), True, device, batch=8, bptt=20)
        seen = []
        for _ in range(5):
            trainer.step()
            seen.append(float(trainer.last_loss))
        losses[name] = seen
        weights[name] = [p.detach().clone() for p in trainer.model.parameters()]
    worst = max(
        abs(a - b) / abs(b) for a, b in zip(losses["triton_graphs"], losses["pytorch_loop"])
    )
    moved = max(float((a - b).abs().max()) for a, b in zip(*weights.values()))
    print(
        f"  5 training steps, Triton+graphs vs PyTorch loop: losses {losses['triton_graphs']} vs "
        f"{losses['pytorch_loop']} (worst relative difference {worst:.1e}); largest weight "
        f"difference after the steps {moved:.1e}",
        flush=True,
    )
    if worst > 1e-4 or moved > 1e-4:
        raise CheckFailed("training through the Triton kernels drifts from the PyTorch loop")
    return {
        "losses": losses,
        "worst_relative_difference": worst,
        "largest_weight_difference": moved,
    }


def throughput(
    device: torch.device, seconds: float, rounds: int, loop_too: bool, failures: list[str]
) -> list[Row]:
    p = PAPER
    gpu = torch.cuda.get_device_name(device)
    torch.manual_seed(0)
    trainers = {
        "cudnn_gru": Trainer(
            TorchLM("gru", p["embedding"], p["hidden"], p["layers"]),
            False,
            device,
            batch=p["batch"],
            bptt=p["bptt"],
        ),
        "egru": Trainer(
            _duosparse("egru", p["embedding"], p["hidden"], p["layers"]),
            True,
            device,
            batch=p["batch"],
            bptt=p["bptt"],
        ),
    }
    # name: (trainer, (Triton kernels, CUDA graphs, whole-sequence path) or None for cuDNN)
    variants = {
        "cudnn_gru": ("cudnn_gru", None),
        "egru_triton_graphs": ("egru", (True, True, True)),
        "egru_triton": ("egru", (True, False, True)),
    }
    if loop_too:
        variants["egru_pytorch_loop"] = ("egru", (False, False, True))  # egru_kernel on CUDA
        variants["egru_reference_cell"] = ("egru", (False, False, False))  # egru_cell with autograd
    rows = []
    for precision in PRECISIONS:
        _precision(precision)
        calls, sizes = {}, {}
        for name, (trainer_name, kernels) in variants.items():
            trainer = trainers[trainer_name]

            def select(trainer=trainer, kernels=kernels):
                if kernels:
                    _kernels(*kernels[:2])
                    for layer in trainer.model.layers:
                        layer.fast = kernels[2]

            def call(trainer=trainer, name=name, sizes=sizes, select=select):
                select()
                return trainer.train(sizes[name])

            select()
            try:
                trainer.train(2)  # warm up: Triton compiles, graphs are captured, cuDNN picks plans
            except Exception as error:  # one broken variant must not cost the others' figures
                print(f"  {name} failed, left out: {error!r}", flush=True)
                failures.append(f"{name} ({precision}): {error!r}")
                continue
            start = time.perf_counter()
            trainer.train(2)
            one = (time.perf_counter() - start) / 2
            sizes[name] = max(2, math.ceil(seconds / one))
            calls[name] = call
        samples = interleaved(calls, rounds)
        rates = {n: s.units_per_second("wall") for n, s in samples.items()}
        where = (
            f"{gpu}; emb {p['embedding']}, {p['layers']} x {p['hidden']}, untied, vocab {VOCAB}, "
            f"batch {p['batch']}, bptt {p['bptt']}, Adam; precision '{precision}' (cuDNN TF32 "
            f"{PRECISIONS[precision][0]}, cuBLAS TF32 {PRECISIONS[precision][1]}); wall time, "
            f"median of {rounds} interleaved rounds"
        )
        for name in calls:
            if name == "cudnn_gru":
                continue
            default = name == "egru_triton_graphs"  # what the layers select on CUDA
            rows.append(
                Row(
                    "gpu",
                    f"train paper size, {precision}: EGRU ({name.removeprefix('egru_')}) / cuDNN GRU",
                    statistics.median(rates[name]),
                    statistics.median(rates["cudnn_gru"]),
                    "tokens/s",
                    median_ratio(rates[name], rates["cudnn_gru"]),
                    0.8 if default and precision != "pytorch-defaults" else None,
                    note=where,
                    details={"gpu": gpu, "rounds": {n: rates[n] for n in (name, "cudnn_gru")}},
                )
            )
            print(
                f"  {rows[-1].figure}: {rows[-1].measured:,.0f} vs {rows[-1].baseline:,.0f} tokens/s, "
                f"ratio {rows[-1].ratio:.2f}",
                flush=True,
            )
    _kernels(True, True)
    for layer in trainers["egru"].model.layers:
        layer.fast = True
    return rows


def train_ptb(device: torch.device, epochs: int) -> dict:
    """duosparse's own `train()` on Penn Treebank ($DUOSPARSE_DATA_DIR) for a few epochs with the
    paper-size EGRU of sweeps/ptb_paper.yaml, i.e. its recipe configs/recipes/evnn_ptb.yaml
    (EvNN: embedding 750, layers 1350/1350/750 tied, variable BPTT around 70, batch 64, AWD
    dropouts, AdamW, cosine schedule, frozen Beta thresholds) with the spec's base on top,
    less its pruning; threshold 0.05 (the mean of the Beta draws, one of the spec's values):
    the whole training path on the GPU, with the kernels as the layers select them. A few
    epochs of the recipe's 1000, its schedule compressed into them (the cosine starts at the
    same fraction of training, decay_start_epoch 1 + round(700 N / 1000)): the perplexity
    shows the path trains, not the paper's figure (benchmarks/gpu_learning_curve.py records
    a learning curve)."""
    import copy
    import tempfile

    from duosparse import egru_triton, schema
    from duosparse.config import build_config
    from duosparse.sweep import load_spec
    from duosparse.train import train

    _kernels(True, True)
    torch.backends.cudnn.allow_tf32 = True  # train() gives cuBLAS the cuDNN setting
    spec_path = Path(__file__).resolve().parents[1] / "sweeps" / "ptb_paper.yaml"
    base = copy.deepcopy(load_spec(spec_path).base)  # the recipe with the spec's base merged on top
    base.pop("prune", None)
    base["model"].update(arch="egru", threshold=0.05)
    recipe_epochs, decay_start = base["train"]["epochs"], base["train"].get("decay_start_epoch", 1)
    base["train"].update(
        epochs=epochs,
        device="cuda",
        decay_start_epoch=1 + round((decay_start - 1) * epochs / recipe_epochs),
    )
    config = build_config(base, f"{spec_path.name} (base and recipe) for train_ptb")
    with tempfile.TemporaryDirectory() as tmp:
        torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        metrics = train(config, workdir=Path(tmp) / "run", progress=False)
        seconds = time.perf_counter() - start
    families = list(egru_triton._graphs.values())
    result = {
        "epochs": epochs,
        "wall_s": seconds,
        "val_ppl": metrics.get(schema.VAL_PPL),
        "test_ppl": metrics.get(schema.TEST_PPL),
        "activity_sparsity": metrics.get(schema.SPARSITY_ACTIVITY),
        "train_tokens_per_s": metrics.get(schema.PERF_TOKENS_PER_S),
        "graph_families": len(families),
        "graphs": sum(len(f.graphs) for f in families),
        "peak_gpu_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9,
    }
    print(
        f"  PTB, paper-size EGRU, {epochs} epochs in {seconds:.0f} s: test ppl {result['test_ppl']:.1f}, "
        f"val ppl {result['val_ppl']:.1f}, activity sparsity {result['activity_sparsity']:.3f}, "
        f"{result['train_tokens_per_s']:,.0f} training tokens/s; {result['graphs']} graphs in "
        f"{result['graph_families']} families, peak GPU memory {result['peak_gpu_memory_gb']:.1f} GB",
        flush=True,
    )
    return result


def run(
    seconds: float = 1.5, rounds: int = 3, loop_too: bool = True, ptb_epochs: int = 0
) -> tuple[list[Row], dict]:
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    import triton

    device = torch.device("cuda")
    info = {
        "gpu": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(
        f"GPU check on {info['gpu']} (torch {info['torch']}, CUDA {info['cuda']}, "
        f"Triton {info['triton']})",
        flush=True,
    )
    failures: list[str] = []
    print("correctness:", flush=True)
    for key, check in (
        ("correctness", check_correctness),
        ("training_agrees", check_training_agrees),
    ):
        try:
            info[key] = check(device)
        except Exception as error:
            print(f"  FAILED: {error!r}", flush=True)
            failures.append(f"{key}: {error!r}")
    rows = []
    if rounds:
        print("training throughput at the paper's size:", flush=True)
        rows = throughput(device, seconds, rounds, loop_too, failures)
    if ptb_epochs:
        print("duosparse train on Penn Treebank:", flush=True)
        try:
            info["train_ptb"] = train_ptb(device, ptb_epochs)
        except Exception as error:
            print(f"  FAILED: {error!r}", flush=True)
            failures.append(f"train_ptb: {error!r}")
    info["failures"] = failures
    return rows, info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench-gpu.json")
    parser.add_argument(
        "--seconds", type=float, default=1.5, help="length of one timed measurement"
    )
    parser.add_argument("--rounds", type=int, default=3, help="0: no throughput part")
    parser.add_argument(
        "--no-loop", action="store_true", help="skip the (slow) PyTorch-loop variants"
    )
    parser.add_argument(
        "--ptb-epochs",
        type=int,
        default=0,
        help="also train the paper-size EGRU on PTB ($DUOSPARSE_DATA_DIR) this many epochs",
    )
    args = parser.parse_args(argv)
    rows, info = run(args.seconds, args.rounds, not args.no_loop, args.ptb_epochs)
    targeted = [r for r in rows if r.met is not None]
    payload = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": info,
        "all_targets_met": all(r.met for r in targeted),
        "figures": [r.to_json() for r in rows],
    }
    Path(args.out).write_text(json.dumps(payload, indent=2))
    print(
        f"{sum(bool(r.met) for r in targeted)} of {len(targeted)} targets met; written to {args.out}"
    )
    for failure in info["failures"]:
        print(f"FAILED: {failure}")
    return 1 if info["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
