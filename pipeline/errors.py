"""Errors a user can cause and fix, and how values read in their messages.

The CLI prints any TLError as one `error: ...` line and exits with code 2; anything else is a bug.
"""


def listed(values) -> str:
    """Values as words for a message: `0.1, 1, 10` (`none` when empty), never a Python list."""
    values = list(values)
    return ", ".join(f"{value:g}" if isinstance(value, float) else str(value) for value in values) or "none"


def counted(number: int, thing: str, things: str | None = None) -> str:
    """A number of things for a message: '1 epoch', '5 epochs', '3 classes'."""
    return f"{number:,} {thing if number == 1 else things or thing + 's'}"


def install_extra(extra: str) -> str:
    """How to add an optional capability: tl is installed from its checkout (it is not on PyPI, where a
    package of that name is another project's)."""
    return f"pip install -e '.[{extra}]' in tl's checkout"


class ListingProblem(OSError):
    """A sample its listing already refuses (no label, a repeated key, a label not among --classes): recorded
    in its own words, not as a file the system could not read."""


def unreadable(exc: BaseException) -> str:
    """The reason recorded for a sample that could not be used: the exception's type and first line
    (`OSError: truncated`), or a listing's own words."""
    text = str(exc).splitlines()[0] if str(exc) else "unreadable"
    return text if isinstance(exc, ListingProblem) else f"{type(exc).__name__}: {text}"


class TLError(Exception):
    """A mistake in the input, the configuration or the environment; the message says what to do."""


class ConfigError(TLError):
    """A config file or option that cannot be used."""


class DataError(TLError):
    """A data set that is missing, empty or unreadable."""


class BackboneError(TLError):
    """An unknown backbone or layer, or weights that do not fit."""


class CacheError(TLError):
    """A cache that is missing, locked, stale, incomplete or corrupt."""


class HeadError(TLError):
    """A head file that is not one, or a head used on codes it was not trained for."""


class FinetuneError(TLError):
    """A finetune run, model file or export that cannot start or go on as asked."""


class Occupied(TLError):
    """An output that holds what only --overwrite (or --resume) takes over. `path` and `state` say what
    it holds, for callers whose remedy differs (tl run has neither flag)."""

    def __init__(self, path, state: str, remedy: str):
        self.path, self.state = path, state
        super().__init__(f"{path} {state}; {remedy}")


class CacheOccupied(Occupied, CacheError):
    """A cache folder holding another cache, or shards, that only --overwrite replaces."""


class ForeignFile(Occupied):
    """An output file that tl did not write (not a tl head or model file): replaced only when told."""


class CheckpointOccupied(Occupied, FinetuneError):
    """A finetune's checkpoint holding an earlier run: --resume continues it, --overwrite replaces it."""
