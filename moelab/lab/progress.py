"""A progress bar with ETA for long commands: rich's when it is installed, else one plain line per step.

ETA (plain) = mean seconds per finished step x steps left.
"""

from __future__ import annotations

import sys
import time
from typing import Any


class ProgressBar:
    def __init__(self, total: int, description: str = "", plain: bool = False) -> None:
        self.total = total
        self.description = description
        self.done = 0
        self._t0 = time.perf_counter()
        self._rich: Any = None
        self._task: Any = None
        if not plain:
            try:
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeElapsedColumn,
                    TimeRemainingColumn,
                )
            except ImportError:
                pass
            else:
                self._rich = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())

    def __enter__(self) -> ProgressBar:
        if self._rich is not None:
            self._rich.start()
            self._task = self._rich.add_task(self.description, total=self.total)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.stop()

    def log(self, message: str) -> None:
        if self._rich is not None:
            self._rich.console.print(message)
        else:
            print(message, file=sys.stderr, flush=True)

    def advance(self, label: str = "") -> None:
        self.done += 1
        if self._rich is not None:
            self._rich.update(self._task, advance=1, description=f"{self.description} {label}".strip())
            return
        elapsed = time.perf_counter() - self._t0
        eta = elapsed / self.done * (self.total - self.done)
        print(f"[{self.done}/{self.total}] {label} (elapsed {elapsed:.0f} s, eta {eta:.0f} s)", file=sys.stderr,
              flush=True)
