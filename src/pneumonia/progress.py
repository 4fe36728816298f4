"""Progress of long loops: done / total, rate and time left, so a person waiting knows the run is alive.

On a terminal it is a live bar redrawn in place on stderr; elsewhere (a pod, a CI log) it is one
structured `progress` log event every `every_s` seconds or every `every_percent` of the work, which
`kubectl logs` shows. `configure` picks the mode once (the entrypoint's `configure_logging` calls
it); loops only create `Progress` objects or wrap an iterable with `track`.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO, TypeVar

import structlog

# structlog itself, not pneumonia.logs: logs.configure_logging configures this module, so importing
# logs from here would close a circle.
log = structlog.get_logger(__name__)

Item = TypeVar("Item")
BAR_WIDTH = 28


@dataclass(frozen=True)
class Settings:
    """How progress is shown; one set per process."""

    live: bool = False  # a bar redrawn in place (a terminal) instead of log lines
    # A log line at most this often when the work is slow...
    every_s: float = 10.0
    # ...and at this share of the work when it is fast, but never closer than min_gap_s: a demo
    # epoch of one second should not print ten lines.
    every_percent: float = 10.0
    min_gap_s: float = 2.0
    redraw_s: float = 0.2  # the live bar's refresh interval
    stream: TextIO | None = None  # None: sys.stderr at the time of writing (pytest swaps it)
    clock: Callable[[], float] = time.monotonic


_settings = Settings()


def configure(*, live: bool | None = None, **overrides: Any) -> Settings:
    """Sets the process-wide mode; `live` None means "stderr is a terminal". Returns the settings."""
    global _settings
    if live is None:
        live = sys.stderr.isatty()
    _settings = Settings(live=live, **overrides)
    return _settings


def settings() -> Settings:
    return _settings


class Progress:
    """Counts work done towards `total` and reports it as the configured mode says.

    `unit` names what is counted; `rate_unit` and `rate_scale` report the rate in other units
    (training counts steps and reports images/s: rate_scale = images per step). `start`: units
    already done before this process began (a resumed epoch); they count toward `total`, not the rate.
    """

    def __init__(self, what: str, total: int | None, *, unit: str = "images", rate_unit: str | None = None,
                 rate_scale: float = 1.0, start: int = 0, **fields: Any) -> None:
        self.what = what
        self.total = total
        self.unit = unit
        self.rate_unit = rate_unit or unit
        self.rate_scale = rate_scale
        self.fields = fields  # extra context on every log line (e.g. the epoch)
        self.done = start
        self._done_at_start = start
        self._settings = _settings
        self._start = self._settings.clock()
        self._last_report = self._start
        self._last_done = start
        self._closed = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, count: int = 1) -> None:
        """Counts `count` more units; reaching `total` closes the progress."""
        self.done += count
        if self.total and self.done >= self.total:
            self.close()
            return
        now = self._settings.clock()
        if self._due(now):
            self._report(now, final=False)

    def close(self) -> None:
        """The last report: the bar's final state and a newline, or one closing log line."""
        if self._closed:
            return
        self._closed = True
        self._report(self._settings.clock(), final=True)

    def snapshot(self, now: float) -> dict[str, Any]:
        """done, total, percent, rate (rate_unit per second since the start) and eta_s, rounded for logs."""
        elapsed = max(now - self._start, 1e-9)
        rate = (self.done - self._done_at_start) / elapsed
        values: dict[str, Any] = {"done": self.done, "total": self.total, "unit": self.unit,
                                  f"{self.rate_unit}_per_s": round(rate * self.rate_scale, 1),
                                  "elapsed_s": round(now - self._start, 1)}
        if self.total:
            values["percent"] = round(100.0 * self.done / self.total, 1)
            left = max(self.total - self.done, 0)
            values["eta_s"] = round(left / rate, 1) if rate > 0 else None
        return values

    def _due(self, now: float) -> bool:
        since = now - self._last_report
        if self._settings.live:
            return since >= self._settings.redraw_s
        if since >= self._settings.every_s:
            return True
        if not self.total or since < self._settings.min_gap_s:
            return False
        return 100.0 * (self.done - self._last_done) / self.total >= self._settings.every_percent

    def _report(self, now: float, *, final: bool) -> None:
        self._last_report, self._last_done = now, self.done
        values = self.snapshot(now)
        if self._settings.live:
            stream = self._settings.stream or sys.stderr
            stream.write("\r" + render_bar(self.what, values, self.rate_unit) + ("\n" if final else ""))
            stream.flush()
        else:
            log.info("progress done" if final else "progress", task=self.what, **values, **self.fields)


def render_bar(what: str, values: dict[str, Any], rate_unit: str) -> str:
    """`what [#####.....]  45/100  45%  12.3 images/s  0:04 left` (no total: count and rate only)."""
    rate = f"{values[f'{rate_unit}_per_s']:g} {rate_unit}/s"
    total = values["total"]
    if not total:
        return f"{what}  {values['done']} {values['unit']}  {rate}"
    filled = min(BAR_WIDTH, int(BAR_WIDTH * values["done"] / total))
    eta = values["eta_s"]
    left = "--:--" if eta is None else _clock(eta)
    return (f"{what} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {values['done']}/{total} "
            f"{values['percent']:3.0f}%  {rate}  {left} left")


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(math.ceil(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def track(items: Iterable[Item], what: str, total: int | None, *, count: Callable[[Item], int] = lambda _: 1,
          **options: Any) -> Iterator[Item]:
    """Yields `items`, counting each as `count(item)` units when it is handed out (a batch counts its
    images). The closing report comes with the item that reaches `total`, so a consumer that stops
    calling next() there (the shard writer) still gets it; an early exit gets none."""
    bar = Progress(what, total, **options)
    for item in items:
        bar.update(count(item))
        yield item
    bar.close()
