"""One terminal shared by progress bars, log lines and warnings.

A line printed while a tqdm bar is drawn lands on the bar's line ("Launching 3 jobs
locally" glued to the sweep bar). Everything the harness says therefore goes through
``tqdm.write``, which clears the bars, prints the line and redraws them: the warnings of
:func:`say`, and Hydra's own log lines through :class:`BarSafeHandler`, which the primary
config installs for the launcher's and the jobs' console logging.
"""

from __future__ import annotations

import logging
import sys

from tqdm.auto import tqdm


def say(message: str, err: bool = True) -> None:
    """Print one line above any progress bar (to stderr unless ``err=False``)."""
    tqdm.write(message, file=sys.stderr if err else sys.stdout)


class BarSafeHandler(logging.StreamHandler):
    """A console log handler that writes above the progress bars instead of onto them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)
