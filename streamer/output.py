"""Output files that are never half-written and never replace what they should not.

`animate` and `sample-clip` write through these: the target is checked first (a new file or
an existing regular file, in a writable folder, not one of the inputs; the container is
chosen by its extension), the file grows under a hidden name next to it and is renamed
only once complete, and SIGTERM / SIGHUP end the command the way Ctrl-C does, so the hidden
file is removed on every way out but SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import stat
import threading
from pathlib import Path
from typing import Iterable, Iterator

from .video import Container, container_for


class OutputPathError(ValueError):
    """An output path that must not be written (one line for the user)."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def check_output(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> tuple[Path, Container]:
    """The real path to write (symbolic links followed) and its container, or OutputPathError.

    Only a new file or an existing regular file is written; a device (/dev/null included), a
    FIFO or a socket is refused, never replaced: a video needs a seekable file, and renaming
    over a device node would destroy it.
    """
    given = Path(path)
    out = Path(os.path.realpath(given))
    try:
        mode = os.stat(out).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as e:
        raise OutputPathError(f"cannot use {given} as the output: {e.strerror or e}") from None
    if mode is not None and stat.S_ISDIR(mode):
        raise OutputPathError(f"output is a directory, expected a file name: {given}")
    if mode is not None and not stat.S_ISREG(mode):
        raise OutputPathError(f"output {given} is {_kind(mode)}: only a new file or a regular file is written "
                              "(it is never replaced); write to a file and copy it from there")
    try:
        container = container_for(out)
    except ValueError as e:
        raise OutputPathError(f"{e}; got {given}") from None
    folder = out.parent
    if not folder.is_dir():
        raise OutputPathError(f"output directory does not exist: {given.parent}")
    if not os.access(folder, os.W_OK):
        raise OutputPathError(f"cannot write to output directory: {given.parent}")
    if out in {Path(os.path.realpath(p)) for p in inputs if os.path.exists(p)}:
        raise OutputPathError(f"output would overwrite an input: {given}")
    return out, container


def _create_partial(out: Path) -> Path:
    """A new hidden file next to `out` (same file system, so the final rename is atomic).
    Unlike tempfile.mkstemp's 0600, it gets the permissions the umask gives any new file."""
    for _ in range(100):
        partial = out.parent / f".{out.name}.{secrets.token_hex(4)}.part"
        try:
            os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return partial
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file in {out.parent}")


@contextlib.contextmanager
def atomic_output(out: Path) -> Iterator[Path]:
    """Yields a hidden partial path next to `out`; renames it to `out` when the block ends
    normally and removes it on any exception (KeyboardInterrupt and SystemExit included).
    Checks again that `out` did not become something other than a regular file meanwhile."""
    partial = _create_partial(out)
    try:
        yield partial
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISREG(os.stat(out).st_mode):
                raise OutputPathError(f"output {out} became {_kind(os.stat(out).st_mode)} while it was "
                                      "written: it is not replaced")
        os.replace(partial, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        raise


@contextlib.contextmanager
def exit_cleanly_on_signals(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGHUP)) -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise SystemExit(128 + signal) in the main thread,
    as Ctrl-C raises KeyboardInterrupt: every `finally` and cleanup runs, and the exit status
    is the one a shell reports for the signal. Outside the main thread: no change."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    previous = {}
    for sig in signals:
        previous[sig] = signal.signal(sig, terminate)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
