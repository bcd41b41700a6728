"""SIGINT and SIGTERM end a run after a whole optimizer step, with a checkpoint of it."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from loralab.errors import LoralabError


class Interrupted(LoralabError):
    """SIGINT or SIGTERM: the run stopped after a whole optimizer step, with a checkpoint of it."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.exit_code = 128 + int(signum)
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint written to "
                         f"{checkpoint}", fix="rerun the same command to resume")


class StopRequests:
    """`with StopRequests() as stop:` — SIGINT and SIGTERM set `stop.signal` instead of killing the process, so
    the loop ends its optimizer step and saves; a second signal acts at once, as without this."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal: int | None = None
        self.previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.signal = signum
        signal.signal(signum, self.previous[signum] or signal.SIG_DFL)  # the second one is not caught

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():  # Python takes signals there alone
            for signum in self.SIGNALS:
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler or signal.SIG_DFL)
