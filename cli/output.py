"""How the commands print: records as JSON, lists as aligned columns."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any


def print_table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def print_json(record: dict[str, Any]) -> None:
    print(json.dumps(record, indent=2, sort_keys=True, default=str))


def when(epoch: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(epoch)) if isinstance(epoch, (int, float)) else "-"
