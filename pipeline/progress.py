"""Progress bars for work that takes more than a moment: tqdm with rate and ETA on stderr when it is a
terminal; nothing with --quiet, on ranks other than 0, or when stderr is redirected (logs, CI).
"""

from __future__ import annotations

import sys


def on_terminal() -> bool:
    """Whether a bar drawn on stderr would be seen (not a log file or a pipe)."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def progress(iterable=None, *, desc: str, unit: str, quiet: bool = False, total: int | None = None, **options):
    """A tqdm bar over `iterable` (or updated by hand up to `total`); a silent one when it would not be
    seen. `options` go to tqdm (postfix, leave, ...)."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=quiet or not on_terminal(),
                dynamic_ncols=True, **options)
