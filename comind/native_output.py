"""TensorFlow's start-up lines, kept off a user's terminal.

Importing TensorFlow 2.21 writes absl's "All log messages before
absl::InitializeLog()" warning and INFO lines about oneDNN and CPU features
straight to file descriptor 2, whatever ``TF_CPP_MIN_LOG_LEVEL`` says
(TensorFlow issue 100442), twice. They say nothing a user acts on, so on a
terminal they are caught while TensorFlow is imported and dropped, unless
the import fails (then they are shown: they may say why) or the log level
is debug. Where stderr is a file (``comind local``'s logs, a container's
log) they are written as they come.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def caught(shown: bool) -> Iterator[None]:
    """Catches what is written to file descriptor 2 inside, and shows it only if ``shown`` or on an error."""
    if shown:
        yield
        return
    sys.stderr.flush()
    terminal = os.dup(2)
    with tempfile.TemporaryFile() as written:
        os.dup2(written.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            sys.stderr.flush()
            os.dup2(terminal, 2)
            os.close(terminal)
            if failed:
                written.seek(0)
                sys.stderr.buffer.write(written.read())
                sys.stderr.flush()


def shown(log_level: str) -> bool:
    """Whether the start-up lines are shown: at debug level, and wherever stderr is not a terminal."""
    return log_level == "debug" or not sys.stderr.isatty()
