"""Progress output that suits where it goes: a tqdm bar on a terminal, plain lines in a log.

tqdm redraws its bar with carriage returns; written to a file (CI, ``> log.txt``) every redraw
stays as a partial line, thousands per run. Off a terminal, :func:`progress` prints one plain
line per tenth of the work instead, or one per :meth:`Progress.mark` (the training loop marks
each epoch), and never a carriage return.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from typing import IO, Any

__all__ = ["PLAIN_ENV", "Progress", "is_terminal", "progress"]

#: Set to ``1`` to get plain lines even on a terminal, ``0`` to get a bar even in a log.
PLAIN_ENV = "FEATURESCOPE_PLAIN_PROGRESS"


def is_terminal(stream: IO[str]) -> bool:
    """Whether ``stream`` is an interactive terminal (where a redrawn bar belongs)."""
    forced = os.environ.get(PLAIN_ENV)
    if forced is not None and forced.strip() in ("0", "1"):
        return forced.strip() == "0"
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if isatty is not None else False
    except ValueError:  # a closed stream
        return False


class Progress:
    """The part of tqdm's interface featurescope uses, drawn as a bar or as plain lines.

    Args:
        total: units of work in all (batches, images).
        desc: what is being done, e.g. ``"alexnet"``.
        unit: the unit's name.
        initial: units already done (a resumed run).
        stream: where to write; default ``sys.stderr``.
        per_tenth: off a terminal, print a line each tenth of ``total``; with ``False`` only
            :meth:`mark` prints.
        enabled: ``False`` prints nothing at all.

    Example:
        >>> import io
        >>> log = io.StringIO()
        >>> with Progress(20, "extract", unit="img", stream=log) as bar:
        ...     for _ in range(4):
        ...         bar.update(5)
        >>> print(log.getvalue().splitlines()[0].split(" in ")[0])
        extract: 5/20 img (25%)
        >>> "\\r" in log.getvalue()
        False
    """

    def __init__(
        self,
        total: int,
        desc: str,
        *,
        unit: str = "it",
        initial: int = 0,
        stream: IO[str] | None = None,
        per_tenth: bool = True,
        enabled: bool = True,
    ) -> None:
        self.total = max(int(total), 0)
        self.desc = desc
        self.unit = unit
        self.n = int(initial)
        self.stream: IO[str] = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.per_tenth = per_tenth
        self.started = time.perf_counter()
        self._postfix = ""
        self._tenth = self._tenths_done()
        self._bar: Any = None
        if enabled and is_terminal(self.stream):
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=self.total,
                initial=self.n,
                desc=desc,
                unit=unit,
                file=self.stream,
                dynamic_ncols=True,
                leave=False,
            )

    @property
    def plain(self) -> bool:
        """Whether this writes plain lines (enabled, not on a terminal)."""
        return self.enabled and self._bar is None

    def _tenths_done(self) -> int:
        return (10 * self.n) // self.total if self.total else 10

    def _line(self) -> str:
        pct = f" ({100 * self.n // self.total}%)" if self.total else ""
        seconds = time.perf_counter() - self.started
        return (
            f"{self.desc}: {self.n}/{self.total} {self.unit}{pct} in {seconds:.1f} s{self._postfix}"
        )

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units done."""
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.plain and self.per_tenth:
            tenth = self._tenths_done()
            if tenth > self._tenth:
                self._tenth = tenth
                self._print(self._line())

    def set_description(self, desc: str) -> None:
        """Rename what is being done (e.g. ``"alexnet epoch 2/4"``)."""
        self.desc = desc
        if self._bar is not None:
            self._bar.set_description(desc)

    def set_postfix(self, **values: Any) -> None:
        """Show ``key=value`` pairs after the count (losses, accuracies)."""
        self._postfix = "".join(f", {k}={v}" for k, v in values.items())
        if self._bar is not None:
            self._bar.set_postfix(values)

    def mark(self) -> None:
        """Off a terminal, print the current line now (one per epoch); on one, nothing."""
        if self.plain:
            self._print(self._line())

    def close(self) -> None:
        """Remove the bar (on a terminal)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def progress(
    total: int,
    desc: str,
    *,
    unit: str = "it",
    initial: int = 0,
    enabled: bool = True,
    per_tenth: bool = True,
    stream: IO[str] | None = None,
) -> Iterator[Progress]:
    """A :class:`Progress` as a context manager; see there for the arguments."""
    bar = Progress(
        total,
        desc,
        unit=unit,
        initial=initial,
        stream=stream,
        per_tenth=per_tenth,
        enabled=enabled,
    )
    try:
        yield bar
    finally:
        bar.close()
