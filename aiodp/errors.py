"""Which domain errors exist, and what each one means to a caller."""

from collections.abc import Iterable


class AiodpError(Exception):
    """Base of every error aiodp raises on purpose."""


class ConfigError(AiodpError):
    """A flag, environment variable or file holds a value we cannot use (exit code 2)."""


class InvalidRequest(AiodpError):
    """A gRPC request that can never succeed as sent: INVALID_ARGUMENT."""


class UnknownDevice(InvalidRequest):
    """A request names device IDs this resource never advertised."""

    def __init__(self, ids: Iterable[str]) -> None:
        self.ids = tuple(ids)
        super().__init__("unknown device id(s): " + ", ".join(self.ids))


class UnhealthyDevice(AiodpError):
    """A request names devices that are Unhealthy now: FAILED_PRECONDITION."""

    def __init__(self, ids: Iterable[str], reasons: Iterable[str] = ()) -> None:
        self.ids = tuple(ids)
        detail = "; ".join(r for r in reasons if r)
        msg = "unhealthy device id(s): " + ", ".join(self.ids)
        super().__init__(f"{msg} ({detail})" if detail else msg)


class BackendError(AiodpError):
    """The device backend (NVML, the simulated-devices file) failed."""


class BackendUnavailable(BackendError):
    """The backend cannot answer at all right now (library missing, driver gone)."""
