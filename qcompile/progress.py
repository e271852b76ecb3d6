"""Progress reporting. Library code calls `progress.task(description, total)` and the returned `advance()`;
the CLI passes a rich-backed reporter, the Python API reports nothing unless given one."""

from __future__ import annotations

from typing import Callable


class RichProgress:
    """Rich progress bars with counts, elapsed time and ETA."""

    def __init__(self, console=None):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self._progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console, transient=False,
        )

    def __enter__(self):
        self._progress.start()
        return self

    def __exit__(self, *exc):
        self._progress.stop()

    def task(self, description: str, total: int | None) -> Callable[[], None]:
        task_id = self._progress.add_task(description, total=total)
        return lambda: self._progress.advance(task_id)
