"""Library warnings and log lines, held back while a CLI command runs (see ``qcore.cli``'s docstring).

``torch_logs_held_back()`` turns torch's stderr log lines into warnings of category ``LibraryLog`` so that
``warnings.catch_warnings(record=True)`` records them; ``chatter(w)`` says whether a recorded warning is
library chatter the user cannot act on; ``show_warnings`` prints recorded warnings as Python would have.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import sysconfig
import warnings


class LibraryLog(UserWarning):
    """A log record of torch's, held back like a warning while a command runs (see the module docstring)."""


class _AsWarning(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        warnings.warn_explicit(f"{record.levelname} {record.name}: {record.getMessage()}", LibraryLog,
                               record.pathname, record.lineno)


@contextlib.contextmanager
def torch_logs_held_back():
    """While a command runs, every torch logger with its own stderr handler (torch._logging gives one to
    torch, torch.onnx, torch.export, torch._export.*, ...) logs into the warning record instead. Other
    handlers (the TORCH_TRACE file handler) are left alone."""
    import torch  # noqa: F401 -- its loggers and their stderr handlers exist once it is imported

    handler, saved = _AsWarning(), {}
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and (name == "torch" or name.startswith("torch.")) and logger.handlers \
                and all(type(h) is logging.StreamHandler for h in logger.handlers):
            saved[logger] = logger.handlers
            logger.handlers = [handler]
    try:
        yield
    finally:
        for logger, handlers in saved.items():
            logger.handlers = handlers


_LIBRARY_DIRS = tuple({sysconfig.get_paths()[k] for k in ("purelib", "platlib", "stdlib")})


def chatter(w: warnings.WarningMessage) -> bool:
    """Library chatter: torch's log lines, and deprecations raised inside installed packages or the standard
    library (where torch.export's pytree FutureWarnings point: copyreg), which the user cannot act on."""
    return issubclass(w.category, LibraryLog) or (
        issubclass(w.category, (FutureWarning, DeprecationWarning)) and str(w.filename).startswith(_LIBRARY_DIRS))


def show_warnings(caught: list) -> None:
    """Print warnings recorded by ``warnings.catch_warnings(record=True)`` to stderr, as Python would have."""
    for w in caught:
        print(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line), end="", file=sys.stderr)
