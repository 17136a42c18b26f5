"""Run test files again and again while other processes keep every core busy: the check for
tests that pass only on a quiet machine (`make test-under-load`, by default the cluster and
deployment tests ten times). Stops at the first failing round; exit status 1 if any failed."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import time


def burn() -> None:
    while True:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "files", nargs="*", default=["tests/test_cluster.py", "tests/test_deployment.py"]
    )
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument(
        "--burners",
        type=int,
        default=os.cpu_count() or 2,
        help="busy processes (default: one per core)",
    )
    args = parser.parse_args()
    burners = [multiprocessing.Process(target=burn, daemon=True) for _ in range(args.burners)]
    for b in burners:
        b.start()
    passed = 0
    try:
        for round_ in range(1, args.rounds + 1):
            started = time.monotonic()
            result = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args.files]
            )
            took = time.monotonic() - started
            print(
                f"round {round_}/{args.rounds}: {'passed' if result.returncode == 0 else 'FAILED'} "
                f"in {took:.0f} s with {args.burners} busy processes",
                flush=True,
            )
            if result.returncode != 0:
                break
            passed += 1
    finally:
        for b in burners:
            b.terminate()
    print(f"{passed} of {args.rounds} rounds passed under load")
    return 0 if passed == args.rounds else 1


if __name__ == "__main__":
    sys.exit(main())
