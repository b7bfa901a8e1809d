"""Progress for `espmed export`: one line per stage, ticked when it finishes; notes printed above.

`export()` reports through a plain `progress(event, text)` callback; this is the CLI's display of it.
In a terminal the stages are live spinner lines; in a log or pipe each stage is printed whole once it
finishes (a live display there would be drawn once, cut to 80 columns).
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn


class Stages:
    """A context manager and an `espmed.export.targets.Progress` callback."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self.live = self.console.is_terminal
        self.progress = Progress(
            SpinnerColumn(finished_text="[green]✓"), TextColumn("{task.description}"), TimeElapsedColumn(),
            console=self.console,
        )
        self._open: list[TaskID] = []  # live: stages started and not yet finished, innermost last
        self._started: list[tuple[str, float]] = []  # plain: (text, start time), innermost last

    def __enter__(self) -> Stages:
        if self.live:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.live:
            self.progress.stop()

    def __call__(self, event: str, text: str) -> None:
        if not self.live:
            self._plain(event, text)
        elif event == "start":
            self._open.append(self.progress.add_task(text, total=1))
        elif event == "finish" and self._open:
            self.progress.update(self._open.pop(), completed=1)
        elif event == "note":
            self.progress.console.print(text, highlight=False)

    def _plain(self, event: str, text: str) -> None:
        if event == "start":
            self._started.append((text, time.perf_counter()))
        elif event == "finish" and self._started:
            name, start = self._started.pop()
            self.console.print(f"✓ {name} ({time.perf_counter() - start:.1f} s)", highlight=False, soft_wrap=True)
        elif event == "note":
            self.console.print(text, highlight=False, soft_wrap=True)
