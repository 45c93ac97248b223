"""Terminal progress for the CLI: phase lines, and a bar while RAM is copied.

rich is imported on the first line drawn: a `--json` run (tooling, Ansible,
the apt hook) never pays for it (~30 ms of start-up).
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING

from liveupgrade.report import UpgradeEvent

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress


class ProgressDisplay:
    """Receives engine events; draws on stderr only when it is a terminal."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._console: Console | None = None
        self._progress: Progress | None = None
        self._task: int | None = None

    @property
    def console(self) -> Console:
        if self._console is None:
            from rich.console import Console
            self._console = Console(stderr=True)
        return self._console

    def __call__(self, event: UpgradeEvent) -> None:
        if not self.enabled:
            return
        if event.phase == "progress":
            if event.ram_total:
                self._bar(event)
            return
        self._stop_bar()
        self.console.print(f"[bold]{event.phase:>11}[/bold]  {event.message}")

    def _bar(self, event: UpgradeEvent) -> None:
        if not self.console.is_terminal:
            return
        if self._progress is None:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TransferSpeedColumn,
            )
            self._progress = Progress(TextColumn("   transfer"), BarColumn(), DownloadColumn(),
                                      TransferSpeedColumn(), console=self.console, transient=True)
            self._progress.start()
            self._task = self._progress.add_task("ram", total=event.ram_total)
        assert self._task is not None
        self._progress.update(self._task, completed=event.ram_transferred or 0,  # type: ignore[arg-type]
                              total=event.ram_total)

    def _stop_bar(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> ProgressDisplay:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop_bar()
