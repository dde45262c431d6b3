"""How the gateway's processes treat each other: a pull's work yields the CPU to the API."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from imagegw.processes import BATCH_NICENESS


def test_a_pull_runs_as_batch_work_below_the_api() -> None:
    """The pull flow lowers its CPU priority, and the programs it starts (tar2sqfs) inherit it."""
    script = ("import os, subprocess; from imagegw.processes import run_as_batch_work; run_as_batch_work(); "
              "print(os.getpriority(os.PRIO_PROCESS, 0), subprocess.run(['nice'], capture_output=True, text=True)"
              ".stdout.strip())")
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).parent.parent).stdout.split()
    assert output == [str(BATCH_NICENESS), str(BATCH_NICENESS)]
