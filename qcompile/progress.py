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
        return self  # the display starts with the first task, so an early error prints only itself

    def __exit__(self, *exc):
        if self._progress.live.is_started:
            self._progress.stop()

    def task(self, description: str, total: int | None) -> Callable[[], None]:
        if not self._progress.live.is_started:
            self._progress.start()
        task_id = self._progress.add_task(description, total=total)
        return lambda: self._progress.advance(task_id)
