"""Which domain errors exist, what each one means to a caller, and how they quote input.

Every message or log line that quotes outside input (a peer's request, a file, the
environment) quotes it through `cut` or `brief`: bounded, whatever was sent. A 1 MB device
ID echoed whole into a gRPC trailer costs minutes of HPACK encoding on the loop.
"""

import reprlib
from collections.abc import Iterable, Sequence
from typing import Final

QUOTE_WIDTH: Final = 64
"""Characters of one quoted value kept in a message; the rest becomes `...`."""
QUOTE_ITEMS: Final = 5
"""Values of a list quoted in a message; the rest is counted (`and 3 more`)."""

_repr = reprlib.Repr()
_repr.maxstring = QUOTE_WIDTH
_repr.maxother = QUOTE_WIDTH
_repr.maxlong = QUOTE_WIDTH
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = QUOTE_ITEMS
_repr.maxlevel = 3


def cut(value: object) -> str:
    """A bounded repr of an outside value for a message: `'abc...xyz'`, lists shortened."""
    return _repr.repr(value)


def cut_text(text: str, width: int = QUOTE_WIDTH) -> str:
    """Outside text (no quotes added) cut to about `width` characters."""
    text = str(text)
    if len(text) <= width:
        return text
    half = max(width // 2 - 2, 1)
    return f"{text[:half]}...{text[-half:]} ({len(text)} chars)"


ERROR_WIDTH: Final = 240
"""Characters of one error in a log line: enough for a path and the reason after it."""


def cut_error(error: BaseException, width: int = ERROR_WIDTH) -> str:
    """An error for a log line, `Type: message`, in at most about `width` characters. The
    longest words (paths, IDs) are cut in their middle first, so that the reason, usually at
    the end, stays whole: `...libnvidia-ml.so.1: Library Not Found`, never `...Library No`."""
    message = str(error)
    words = f"{type(error).__name__}: {message}".split(" ") if message else [type(error).__name__]
    while len(" ".join(words)) > width:
        i = max(range(len(words)), key=lambda k: len(words[k]))
        word = words[i]
        if len(word) <= 24:
            break
        keep = max(len(word) - (len(" ".join(words)) - width) - 3, 20)
        words[i] = f"{word[: keep // 2]}...{word[len(word) - (keep - keep // 2) :]}"
    text = " ".join(words)
    return text if len(text) <= width else cut_text(text, width)


def brief(values: Sequence[str], sep: str = ", ") -> str:
    """The first few values, each cut short, then how many more: `a, b, c and 7 more`."""
    shown = sep.join(cut_text(v) for v in values[:QUOTE_ITEMS])
    more = len(values) - QUOTE_ITEMS
    return f"{shown} and {more} more" if more > 0 else shown


class AiodpError(Exception):
    """Base of every error aiodp raises on purpose."""


class ConfigError(AiodpError):
    """A flag, environment variable or file holds a value we cannot use (exit code 2)."""


class ListenError(AiodpError):
    """An address we were told to serve on cannot be bound (in use, not ours): exit 1."""


class InvalidRequest(AiodpError):
    """A gRPC request that can never succeed as sent: INVALID_ARGUMENT."""


class UnknownDevice(InvalidRequest):
    """A request names device IDs this resource never advertised."""

    def __init__(self, ids: Iterable[str]) -> None:
        self.ids = tuple(ids)
        super().__init__("unknown device id(s): " + brief(self.ids))


class UnhealthyDevice(AiodpError):
    """A request names devices that are Unhealthy now: FAILED_PRECONDITION."""

    def __init__(self, ids: Iterable[str], reasons: Iterable[str] = ()) -> None:
        self.ids = tuple(ids)
        detail = brief([r for r in reasons if r], sep="; ")
        msg = "unhealthy device id(s): " + brief(self.ids)
        super().__init__(f"{msg} ({detail})" if detail else msg)


class BackendError(AiodpError):
    """The device backend (NVML, the simulated-devices file) failed."""


class BackendUnavailable(BackendError):
    """The backend cannot answer at all right now (library missing, driver gone)."""
