"""Append-only CSV logs (one row per iteration or validation), safe to resume."""

import csv
import os
from typing import Sequence


class CsvLog:
    """`enabled=False` (processes other than rank 0 under torchrun) writes nothing. `keep_until`
    (a resumed run): rows after that iteration are dropped first, since the run writes them again."""

    def __init__(self, path: str, columns: Sequence[str], enabled: bool = True, keep_until=None):
        self.path = path
        self.columns = list(columns)
        self.enabled = enabled
        if enabled and keep_until is not None and os.path.isfile(path):
            self._cut(int(keep_until))
        if enabled and (not os.path.isfile(path) or os.path.getsize(path) == 0):
            with open(path, "w", newline="") as handle:
                csv.writer(handle).writerow(self.columns)

    def write(self, **row) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as handle:
            csv.writer(handle).writerow([_format(row.get(c, "")) for c in self.columns])

    def _cut(self, iteration: int) -> None:
        """Keep the header and the rows up to `iteration`, rewritten through a temporary file."""
        with open(self.path, newline="") as handle:
            rows = list(csv.reader(handle))
        column = rows[0].index("iteration") if rows and "iteration" in rows[0] else 0
        kept = rows[:1] + [r for r in rows[1:] if len(r) > column and _iteration(r[column]) <= iteration]
        if kept == rows:
            return
        with open(self.path + ".tmp", "w", newline="") as handle:
            csv.writer(handle).writerows(kept)
        os.replace(self.path + ".tmp", self.path)


def _iteration(text: str) -> float:
    try:
        return float(text)
    except ValueError:  # a row cut short by a kill
        return float("inf")


def _format(value):
    return f"{value:.6g}" if isinstance(value, float) else value
