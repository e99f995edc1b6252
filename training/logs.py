"""Append-only CSV logs (one row per iteration or validation), safe to resume."""

import csv
import os
from typing import Sequence


class CsvLog:
    """`enabled=False` (processes other than rank 0 under torchrun) writes nothing."""

    def __init__(self, path: str, columns: Sequence[str], enabled: bool = True):
        self.path = path
        self.columns = list(columns)
        self.enabled = enabled
        if enabled and not os.path.isfile(path):
            with open(path, "w", newline="") as handle:
                csv.writer(handle).writerow(self.columns)

    def write(self, **row) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as handle:
            csv.writer(handle).writerow([_format(row.get(c, "")) for c in self.columns])


def _format(value):
    return f"{value:.6g}" if isinstance(value, float) else value
