"""Progress reporting. Library code calls `progress.task(description, total)` and the returned `advance()`;
the CLI passes a rich-backed reporter, the Python API reports nothing unless given one."""

from __future__ import annotations

from typing import Callable


class RichProgress:
    """Rich progress bars with counts, elapsed time and ETA.

    `RichProgress.stage` is the label of the task any reporter started last and `stage_done` whether it is
    complete: what the CLI names when Ctrl-C stops a command.
    """

    stage: str | None = None
    stage_done: bool = False
    _stage_token: object = None

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
        token = object()
        RichProgress.stage, RichProgress.stage_done, RichProgress._stage_token = description, False, token
        left = total

        def advance() -> None:
            nonlocal left
            self._progress.advance(task_id)
            if left is not None:
                left -= 1
                if left <= 0 and RichProgress._stage_token is token:
                    RichProgress.stage_done = True

        return advance
