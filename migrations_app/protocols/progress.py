"""Progress of a backfill: a bar on a terminal, a periodic log line anywhere else."""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

log = logging.getLogger(__name__)


class Progress:
    """A one-line bar with heights/s and ETA on a terminal; on anything else a log line every
    `log_every` seconds (so a worker's logs stay quiet and structured)."""

    def __init__(self, stream: TextIO | None = None, *, log_every: float = 30.0, width: int = 30):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.log_every, self.width = log_every, width
        self.started = time.monotonic()
        self.last_log = 0.0
        self.first_done: int | None = None

    def update(self, *, label: str, done: int, total: int, note: str = "") -> None:
        now = time.monotonic()
        if self.first_done is None:
            self.first_done, self.started = done, now
        elapsed = max(now - self.started, 1e-6)
        rate = (done - self.first_done) / elapsed
        remaining = max(total - done, 0)
        eta = remaining / rate if rate > 0 else None
        if self.tty:
            filled = int(self.width * done / total) if total > 0 else self.width
            bar = "#" * filled + "-" * (self.width - filled)
            eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta is not None else "--:--:--"
            pct = 100.0 * done / total if total > 0 else 100.0
            line = f"{label} [{bar}] {pct:5.1f}% {done}/{total} heights {rate:,.0f} h/s ETA {eta_text} {note}"
            self.stream.write(f"\r{line}\x1b[K")
            self.stream.flush()
        elif now - self.last_log >= self.log_every:
            self.last_log = now
            log.info(
                "migration progress",
                extra={"label": label, "done": done, "total": total, "rate": round(rate, 1), "eta_s": eta},
            )

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
