"""The exceptions of the bindings: one :class:`CalibrlError` subclass per ``calibrl_status``,
and the loading errors."""

from __future__ import annotations


class CalibrlError(RuntimeError):
    """A calibrl call failed. ``status`` is the library's ``calibrl_status`` number,
    ``status_name`` its name, and the message is the library's ``calibrl_last_error_message()``."""

    status: int = -1

    def __init__(self, message: str, status: int | None = None, status_name: str = ""):
        super().__init__(message)
        if status is not None:
            self.status = status
        self.status_name = status_name
        self.message = message


class NullArgumentError(CalibrlError, ValueError):
    status = 1


class InvalidArgumentError(CalibrlError, ValueError):
    status = 2


class ShapeError(CalibrlError, ValueError):
    status = 3


class DtypeError(CalibrlError, TypeError):
    status = 4


class DeviceError(CalibrlError, ValueError):
    status = 5


class NonFiniteError(CalibrlError, ValueError):
    status = 6


class ConfigError(CalibrlError, ValueError):
    status = 7


class CudaUnavailableError(CalibrlError):
    status = 8


class CudaError(CalibrlError):
    status = 9


class PanicError(CalibrlError):
    """The library caught an internal panic (a calibrl bug: please report it)."""

    status = 10


class BufferTooSmallError(CalibrlError):
    status = 11


class LayoutError(CalibrlError, ValueError):
    """A tensor's strides are not supported by the operation (e.g. non-contiguous)."""

    status = 12


#: ``calibrl_status`` number → exception class.
ERRORS = {
    cls.status: cls
    for cls in (
        NullArgumentError,
        InvalidArgumentError,
        ShapeError,
        DtypeError,
        DeviceError,
        NonFiniteError,
        ConfigError,
        CudaUnavailableError,
        CudaError,
        PanicError,
        BufferTooSmallError,
        LayoutError,
    )
}


class LibraryNotFoundError(CalibrlError, OSError):
    pass


class AbiMismatchError(CalibrlError, ImportError):
    pass


class MissingSymbolError(CalibrlError, NotImplementedError):
    """The loaded library does not export a function these bindings know about."""
