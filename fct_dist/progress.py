"""Live progress: a bar on a terminal (tqdm), a log line every few seconds anywhere else (job logs,
CI, files), so long work always shows where it is. The one-line summary at the end is the caller's."""
from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger(__name__)


def rate(count: float, seconds: float) -> float:
    """count / seconds to four significant figures: a slow run's rate keeps its digits (0.1556/s, not 0.16)."""
    return float(f"{count / seconds:.4g}")


class Bar:
    """Progress of `total` units of work, with a postfix such as rows/s or the loss."""

    def __init__(self, desc: str, total: int, unit: str, every: float = 5.0):
        self.desc, self.total, self.unit, self.every = desc, total, unit, every
        self.n, self.last, self.postfix = 0, time.time(), ""
        shown = sys.stderr.isatty() and logging.getLogger("fct_dist").isEnabledFor(logging.INFO)
        self.tqdm = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True) if shown else None

    def update(self, n: int = 1, postfix: str = "") -> None:
        before, self.n, self.postfix = self.n, self.n + n, postfix or self.postfix
        if self.tqdm is not None:
            self.tqdm.set_postfix_str(self.postfix, refresh=False)
            self.tqdm.update(n)
        elif n and (time.time() - self.last >= self.every or before < self.total <= self.n):
            self.last = time.time()
            log.info("%s: %d/%d %s%s", self.desc, self.n, self.total, self.unit, f", {self.postfix}" if self.postfix else "")

    def goto(self, n: int, postfix: str = "") -> None:
        """Move to `n` units done (for progress read from elsewhere)."""
        self.update(max(0, n - self.n), postfix)

    def write(self, line: str) -> None:
        """A line that stays (an epoch's summary), printed above a live bar."""
        if self.tqdm is not None:
            self.tqdm.write(line, file=sys.stderr)
        else:
            log.info("%s", line)

    def close(self) -> None:
        if self.tqdm is not None:
            self.tqdm.close()
