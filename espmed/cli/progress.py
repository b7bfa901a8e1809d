"""Rich progress for `espmed export`: one line per stage, ticked when it finishes; notes printed above.

`export()` reports through a plain `progress(event, text)` callback; this is the CLI's display of it.
"""

from __future__ import annotations

from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn


class Stages:
    """A context manager and an `espmed.export.targets.Progress` callback."""

    def __init__(self) -> None:
        self.progress = Progress(
            SpinnerColumn(finished_text="[green]✓"), TextColumn("{task.description}"), TimeElapsedColumn()
        )
        self._open: list[TaskID] = []  # stages started and not yet finished, innermost last

    def __enter__(self) -> Stages:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def __call__(self, event: str, text: str) -> None:
        if event == "start":
            self._open.append(self.progress.add_task(text, total=1))
        elif event == "finish" and self._open:
            self.progress.update(self._open.pop(), completed=1)
        elif event == "note":
            self.progress.console.print(text, highlight=False)
