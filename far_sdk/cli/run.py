"""What the three commands (``far``, ``far-export``, ``far-train``) share: their parser, and how they fail.

:class:`ArgumentParser` shows every flag's default in ``--help``, answers an unknown flag or a bad choice with
the closest valid one ("did you mean"), and takes a bundle as a positional argument or ``--bundle``
(:func:`add_bundle_argument`). Every failure ends the command with one line on stderr,
``PROG COMMAND: error: WHAT``, and the exit status of :data:`far_sdk.errors.EXIT_CODES` (2 usage, 3 bad input
file, 4 runtime failure, 130 Ctrl-C, 1 a bug); errors name parameters by their flags
(:func:`far_sdk.errors.spelled_as`). A closed stdout (``far info | head -1``) is not a failure. Setting
``FAR_TRACEBACK=1`` adds the traceback after the line, for bug reports.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from far_sdk.errors import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    InvalidArgumentError,
    check_choice,
    did_you_mean,
    exit_code_for,
    spelled_as,
)


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help with each flag's default appended, unless its help already states one or there is none
    (None, False, an empty list: "not given")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, d = action.help or "", action.default
        if "default" in text or d is None or d is False or d is argparse.SUPPRESS or d == [] or not text:
            return text
        shown = ",".join(map(str, d)) if isinstance(d, (list, tuple)) else str(d)
        return f"{text} (default: {shown})".replace("%", "%%").replace("%%(", "%(")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with defaults in ``--help``, "did you mean" for unknown flags and bad choices, a one-line error
    (``PROG: error: MESSAGE (see PROG --help)``) and exit status 2."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None):  # type: ignore[override]
        args = list(sys.argv[1:] if args is None else args)
        self._check_flags(args)
        return super().parse_known_args(args, namespace)

    def _check_flags(self, args: list[str]) -> None:
        """An unknown ``--flag`` is an error naming the closest known one, before any other check (a misspelt
        ``--bundle`` is reported as such, not as a missing one). A subcommand checks its own flags."""
        known = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
        commands = {n for a in self._actions if isinstance(a, argparse._SubParsersAction) for n in a.choices}
        for token in args:
            if token == "--" or token in commands:
                return
            flag = token.split("=", 1)[0]
            if not flag.startswith("--") or flag == "--" or flag in known:
                continue
            if self.allow_abbrev and sum(k.startswith(flag) for k in known) == 1:
                continue  # argparse's unique abbreviation
            self.error(f"unknown flag {flag}{did_you_mean(flag, known)}")

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        """A value outside ``choices``: far_sdk's wording of that rule (check_choice), with "did you mean"."""
        if action.choices is not None and value not in action.choices:
            name = "/".join(action.option_strings) or (action.metavar or action.dest).lower()
            try:
                check_choice(name, value, tuple(map(str, action.choices)))
            except InvalidArgumentError as e:
                raise argparse.ArgumentError(None, str(e)) from None


def add_bundle_argument(p: argparse.ArgumentParser) -> None:
    """The bundle, as the first positional argument or ``--bundle`` (read with :func:`bundle_of`)."""
    what = "bundle directory (engines/NAME) or hub:OWNER/REPO[@REVISION] (a bundle on the Hugging Face Hub)"
    p.add_argument("bundle", nargs="?", metavar="BUNDLE", help=what)
    p.add_argument("--bundle", dest="bundle_flag", metavar="BUNDLE", help="the bundle, as a flag")


def bundle_of(a: argparse.Namespace, *, optional: bool = False) -> str | None:
    """The bundle :func:`add_bundle_argument` read: given once, as an argument or by ``--bundle`` (None when
    ``optional`` and not given)."""
    given, flag = a.bundle, a.bundle_flag
    if given and flag and given != flag:
        raise InvalidArgumentError(f"two bundles given: {given} and --bundle {flag}; give one")
    if not (given or flag or optional):
        raise InvalidArgumentError("give a bundle: the first argument (e.g. engines/far-demo) or --bundle")
    return given or flag


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


def run_command(
    prog: str, run: Callable[[], int], *, interrupted: str = "interrupted", flags: Mapping[str, str] | None = None
) -> int:
    """Run ``run()`` and turn every way it can fail into one stderr line and a documented status. ``flags``
    (parameter name -> flag) make the errors name the command's flags (far_sdk.errors.arg)."""
    try:
        with spelled_as(flags or {}), warnings.catch_warnings():
            warnings.showwarning = _one_line_warning(prog)  # a warning is one line too: "PROG: warning: ..."
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


def _one_line_warning(prog: str) -> Callable[..., None]:
    def show(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
        _say(f"{prog}: warning: {' '.join(str(message).split())}")

    return show


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
