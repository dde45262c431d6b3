"""``bench/fuzz.py``: the REST API fuzz of ``tests/test_fuzz.py``, with many more requests than CI makes.

    .venv/bin/python bench/fuzz.py [--examples 1000] [--seed N] [pytest options...]

Starts a real ``imagegw serve`` (with a registry and munged, as the test does) and sends every
operation ``--examples`` generated requests as an admin and as much again without a valid
credential. Exits with pytest's status; a failure shows the smallest request that caused it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FUZZ_TEST = "tests/test_fuzz.py"


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="bench/fuzz.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=1000,
                        help="generated requests per operation and credential (default: 1000; CI makes 25)")
    parser.add_argument("--seed", type=int, help="hypothesis's seed, to repeat a run (default: random)")
    args, pytest_options = parser.parse_known_args(argv)
    if args.examples < 1:
        parser.error("--examples must be at least 1")
    return args, pytest_options


def main(argv: list[str] | None = None) -> int:
    args, pytest_options = parse_args(argv)
    command = [sys.executable, "-m", "pytest", FUZZ_TEST, "-p", "no:cacheprovider", "--durations=0",
               *pytest_options]
    if args.seed is not None:
        command.append(f"--hypothesis-seed={args.seed}")
    env = {**os.environ, "IMAGEGW_FUZZ_EXAMPLES": str(args.examples)}
    return subprocess.run(command, cwd=ROOT, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
