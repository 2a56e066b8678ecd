"""gpu_provider's errors as Qiskit users catch them: also a ``QiskitError``.

``gpu_provider.errors`` imports nothing from Qiskit, so the engine can raise
its errors anywhere. The front ends pass every such error through
:func:`as_qiskit_error` on its way out, so code written for Qiskit catches it
with ``except QiskitError`` (as it catches Aer's ``AerError``), while
``except gpu_provider.InvalidOptionError`` or ``except ValueError`` still work.
"""

from __future__ import annotations

import functools
import threading
from typing import Callable, TypeVar

from qiskit.exceptions import QiskitError

from .errors import GPUProviderError

F = TypeVar("F", bound=Callable)

_FLAVOURS: dict[type, type] = {}
_LOCK = threading.Lock()


def _keep_state(self, *args, **kwargs) -> None:
    """A twin's state is copied from its original (and ``args`` set by ``BaseException``)."""


def _reduce(self):
    base = next(cls for cls in type(self).__mro__[1:] if cls not in _FLAVOURS.values())
    return _rebuild, (base, self.args, dict(self.__dict__))


def _rebuild(cls: type, args: tuple, state: dict) -> GPUProviderError:
    twin = _qiskit_flavour(cls)(*args)
    twin.__dict__.update(state)
    return twin


def _qiskit_flavour(cls: type) -> type:
    """``cls`` with ``QiskitError`` added to its bases, made once per class."""
    with _LOCK:
        flavour = _FLAVOURS.get(cls)
        if flavour is None:
            flavour = type(
                cls.__name__,
                (cls, QiskitError),
                {
                    "__module__": cls.__module__,
                    "__qualname__": cls.__qualname__,
                    "__doc__": cls.__doc__,
                    "__str__": BaseException.__str__,  # QiskitError's would quote the message
                    "__init__": _keep_state,
                    "__reduce__": _reduce,
                },
            )
            _FLAVOURS[cls] = flavour
        return flavour


def as_qiskit_error(error: GPUProviderError) -> GPUProviderError:
    """The same error (type, message, attributes, traceback), also a ``QiskitError``."""
    if isinstance(error, QiskitError):
        return error
    flavour = _qiskit_flavour(type(error))
    twin = flavour(*error.args)
    twin.__dict__.update(error.__dict__)
    twin.message = str(error)
    twin.__cause__ = error.__cause__
    twin.__suppress_context__ = error.__suppress_context__
    return twin.with_traceback(error.__traceback__)


def raises_qiskit_errors(function: F) -> F:
    """Decorate a front-end entry point so its gpu_provider errors are also ``QiskitError``s."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except GPUProviderError as error:
            if isinstance(error, QiskitError):
                raise
            raise as_qiskit_error(error) from error.__cause__

    return wrapper  # type: ignore[return-value]
