"""`make bench`: the performance figures of duosparse, each a ratio against a baseline measured
in the same run, printed as one table and written to bench.json.

    python benchmarks/run.py [--quick] [--only training,inference,overheads,gpu] [--no-sweep]
                             [--threads 1] [--device cpu|cuda] [--out bench.json]

Sections (see each module's docstring for exactly what is timed):
  training   training throughput of the EGRU (and LSTM, GRU) against torch.nn.GRU/LSTM (CPU;
             --device cuda on a GPU machine)
  inference  event-driven batch-1 inference against the dense batch-1 path, per operating point
  overheads  MAC/activity accounting in evaluation; the sweep machinery around one trial
  gpu        EGRU training against cuDNN's GRU at the paper's size (gpu_check.py): measured
             when a CUDA GPU is visible, else the rows recorded by gpu_check.py on a GPU
             (benchmarks/recorded/), marked as such

Timings are medians of interleaved rounds (baseline and candidate alternate), so a machine
whose load changes shifts both alike; single-threaded (`--threads`) and in process CPU time,
so time spent descheduled on a shared machine does not count (the wall-clock ratio is kept
in bench.json too). `--quick` runs fewer, shorter rounds (a 15 s trial
instead of a 60 s one): for a smoke test, not for the record (docs/performance.md).
The exit status is 0 whether or not targets are met; bench.json says which are.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Row, machine  # noqa: E402

SECTIONS = ("training", "inference", "overheads", "gpu")
RECORDED = Path(__file__).resolve().parent / "recorded"


def _fmt(value: float) -> str:
    if value != value:  # nan
        return "nan"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def print_table(rows: list[Row]) -> None:
    headers = ("figure", "measured", "baseline", "unit", "ratio", "target", "met")
    cells = [
        (
            r.figure,
            _fmt(r.measured),
            _fmt(r.baseline),
            r.unit,
            f"{r.ratio:.2f}",
            r.target_text,
            {True: "yes", False: "NO", None: "-"}[r.met],
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    line = "  ".join(
        h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths))
    )
    print(line)
    print("-" * len(line))
    section = None
    for row, cell in zip(rows, cells):
        if row.section != section:
            section = row.section
            print(f"[{section}]")
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cell, widths))
            )
        )


def print_points(points: list[dict]) -> None:
    print("\nevent-driven inference, operating points (recurrent layers, batch 1, 1 thread):")
    print(
        f"{'weight sp.':>10} {'embedding':>9} {'activity sp.':>12} {'eff. MACs/token':>16} "
        f"{'MAC reduction':>14} {'dense us/tok':>13} {'event us/tok':>13} {'speedup':>8}"
    )
    for p in sorted(points, key=lambda p: p["effective_mac_reduction"]):
        print(
            f"{p['weight_sparsity']:>10.0%} {'pruned' if p['embedding_pruned'] else 'dense':>9} "
            f"{p['activity_sparsity']:>12.1%} "
            f"{p['effective_macs_per_token']:>16,.0f} {p['effective_mac_reduction']:>13.1f}x "
            f"{p['dense_us_per_token']:>13,.0f} {p['event_us_per_token']:>13,.0f} {p['speedup']:>7.1f}x"
        )


def recorded_gpu_rows() -> list[Row]:
    """The GPU rows that gpu_check.py wrote on a GPU machine (benchmarks/recorded/gpu-*.json),
    each figure named with its GPU and date: not measured in this run."""
    rows = []
    for path in sorted(RECORDED.glob("gpu-*.json")):
        recorded = json.loads(path.read_text())
        stamp = f"[recorded: {recorded['machine']['gpu']}, {recorded['machine']['date']}] "
        for figure in recorded["figures"]:
            fields = {k: figure[k] for k in Row.__dataclass_fields__}
            fields["figure"] = stamp + fields["figure"]
            fields["note"] = f"{fields['note']}; from {path.relative_to(RECORDED.parent.parent)}"
            rows.append(Row(**fields))
    if not rows:
        print(
            "no CUDA GPU here and nothing recorded in benchmarks/recorded/: the gpu section is empty"
        )
    return rows


# glibc hands freed memory at the top of the heap back to the OS and large blocks come from
# fresh mmaps, so every training step faults the same megabytes in again (3,000-7,000 page
# faults per step here, mostly the vocabulary-sized tensors, for baseline and candidate
# alike): noise of several per cent. Higher thresholds keep those pages in the process.
MALLOC_ENV = {"MALLOC_TRIM_THRESHOLD_": "268435456", "MALLOC_MMAP_THRESHOLD_": "67108864"}


def _with_malloc_env() -> None:
    """Re-run this script with MALLOC_ENV set (glibc reads it only at process start)."""
    if any(key in os.environ for key in MALLOC_ENV):  # set already (or chosen by the user)
        return
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        _with_malloc_env()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds (smoke test)")
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run, of {', '.join(SECTIONS)}",
    )
    parser.add_argument(
        "--no-sweep", action="store_true", help="skip the sweep-overhead figure (needs Ray)"
    )
    parser.add_argument("--out", default="bench.json", help="where to write the JSON table")
    parser.add_argument(
        "--device",
        default="cpu",
        help="device of the training section (cpu, or cuda on a GPU machine)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for training and overheads (default 1, as a sweep trial "
        "with resources.cpu 1; inference always runs 1)",
    )
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(
            f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}"
        )

    import torch

    torch.set_num_threads(args.threads)
    info = machine()
    print(
        f"duosparse benchmarks on {info['cpu']}, {info['cores']} cores, torch {info['torch']} "
        f"({info['torch_threads']} threads), load average {info['load_average_at_start']}"
        + (" [quick]" if args.quick else ""),
        flush=True,
    )
    start = time.perf_counter()
    rows: list[Row] = []
    points: list[dict] = []
    timings = {}
    for section in sections:
        t0 = time.perf_counter()
        print(f"... {section}", flush=True)
        if section == "training":
            import training

            rows += training.run(args.quick, args.device)
        elif section == "gpu":
            if torch.cuda.is_available():
                import gpu_check

                rows += gpu_check.run(0.7 if args.quick else 1.5, 2 if args.quick else 3)[0]
            else:
                rows += recorded_gpu_rows()
        elif section == "inference":
            import inference

            section_rows, points = inference.run(args.quick)
            rows += section_rows
        else:
            import overheads

            rows += overheads.run(args.quick, sweep=not args.no_sweep)
        timings[section] = time.perf_counter() - t0
    elapsed = time.perf_counter() - start

    print()
    print_table(rows)
    if points:
        print_points(points)
    targeted = [r for r in rows if r.met is not None]
    met = sum(bool(r.met) for r in targeted)
    print(
        f"\n{met} of {len(targeted)} targets met; {elapsed:.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())})"
    )
    payload = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "quick": args.quick,
        "machine": info,
        "elapsed_s": elapsed,
        "section_s": timings,
        "all_targets_met": met == len(targeted),
        "figures": [r.to_json() for r in rows],
        "operating_points": points,
    }
    Path(args.out).write_text(json.dumps(payload, indent=2))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
