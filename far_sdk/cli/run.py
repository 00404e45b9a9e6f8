"""What the three commands (``far``, ``far-export``, ``far-train``) share: how they fail.

Every failure ends the command with one line on stderr, ``PROG COMMAND: error: WHAT``, and the
exit status of :data:`far_sdk.errors.EXIT_CODES` (2 usage, 3 bad input file, 4 runtime failure,
130 Ctrl-C, 1 a bug). A closed stdout (``far info | head -1``) is not a failure. Setting
``FAR_TRACEBACK=1`` adds the traceback after the line, for bug reports.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

from far_sdk.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, InvalidArgumentError, exit_code_for


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (``PROG: error: MESSAGE (see PROG --help)``) and exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return v


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in text:
        text = f"{text}: {exc.filename}"
    return text


def run_command(prog: str, run: Callable[[], int], *, interrupted: str = "interrupted") -> int:
    """Run ``run()`` and turn every way it can fail into one stderr line and a documented status."""
    try:
        rc = run()
        sys.stdout.flush()  # a closed pipe surfaces here, not as a warning at interpreter exit
        return rc
    except BrokenPipeError:
        _drop_stdout()
        return EXIT_OK
    except KeyboardInterrupt:
        _close_progress_bars()
        _say(f"{prog}: {interrupted}")
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - the one place every error becomes a line and a status
        _close_progress_bars()
        code = exit_code_for(e)
        if code == EXIT_INTERNAL:
            _say(
                f"{prog}: internal error: {type(e).__name__}: {one_line(e)} "
                "(a bug in far-sdk; set FAR_TRACEBACK=1 for the traceback and please report it)"
            )
        else:
            _say(f"{prog}: error: {one_line(e)}")
        if os.environ.get("FAR_TRACEBACK"):
            traceback.print_exc()
        return code


def _close_progress_bars() -> None:
    """Close (and so clear) progress bars an exception left open, so the error line starts a line of its own."""
    tqdm = sys.modules.get("tqdm")
    if tqdm is None:
        return
    for bar in list(getattr(tqdm.tqdm, "_instances", ())):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - interrupted inside the bar's own __init__: just end its line
            _say("")


def _say(line: str) -> None:
    with contextlib.suppress(OSError):  # stderr may be closed too; the status still tells
        print(line, file=sys.stderr, flush=True)


def _drop_stdout() -> None:
    """After EPIPE: point stdout at /dev/null so the interpreter's final flush does not complain."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


# ---- output paths, checked before any work starts --------------------------------------------------


def check_writable_file(path: str | os.PathLike, option: str, *, suffixes: tuple[str, ...] | None = None) -> Path:
    """Check that ``path`` can be written as a file: an allowed suffix, not a directory, and its
    (nearest existing) parent directory accepts a new file — tried for real, since permission bits
    do not tell root about read-only filesystems. Raises :class:`InvalidArgumentError` naming ``option``."""
    p = Path(path)
    if p.is_dir():
        raise InvalidArgumentError(f"{option} {p} is a directory; give a file name")
    if suffixes is not None and p.suffix.lower() not in suffixes:
        raise InvalidArgumentError(
            f"{option} {p}: unsupported file type {p.suffix or '(none)'!r}; use one of {', '.join(suffixes)}"
        )
    check_writable_dir(p.parent, option, shown=p)
    return p


def check_writable_dir(d: str | os.PathLike, option: str, *, shown: os.PathLike | str | None = None) -> None:
    """Check that a new entry can be created in ``d`` (or in its nearest existing ancestor, where
    ``d`` will be created), by creating and removing a probe file."""
    d = Path(d) if str(d) else Path(".")
    shown = shown if shown is not None else d
    probe_dir = d
    while not probe_dir.exists():
        if probe_dir.is_symlink():  # a dangling link: creating through it is not what the user meant
            raise InvalidArgumentError(f"{option} {shown}: {probe_dir} is a dangling symbolic link")
        if probe_dir.parent == probe_dir:
            break
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise InvalidArgumentError(f"{option} {shown}: {probe_dir} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".far-write-probe.", dir=probe_dir)
    except OSError as e:
        raise InvalidArgumentError(f"{option} {shown}: cannot write in {probe_dir} ({e.strerror or e})") from e
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
