"""Progress bars for work that takes more than a moment: tqdm with rate and ETA on stderr at a terminal;
nothing with --quiet, on ranks other than 0, or when stdout or stderr is redirected (logs, CI, CSV).
"""

from __future__ import annotations

import sys


def on_terminal() -> bool:
    """Whether the command talks to a person at a terminal: stdout and stderr both are one (a redirected
    stdout means the output is kept in a file or piped on, and a bar would only be noise around it)."""
    return all(bool(getattr(stream, "isatty", None) and stream.isatty()) for stream in (sys.stdout, sys.stderr))


def progress(iterable=None, *, desc: str, unit: str, quiet: bool = False, total: int | None = None, **options):
    """A tqdm bar over `iterable` (or updated by hand up to `total`); a silent one when it would not be
    seen. `options` go to tqdm (postfix, leave, ...)."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=quiet or not on_terminal(),
                dynamic_ncols=True, **options)
