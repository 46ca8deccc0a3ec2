"""The ``medsegx`` command line.

Each subcommand lives in its own module of this package and exposes ``register(subparsers)``, which adds its
parser and sets ``func`` (``func(args) -> int``). Modules are discovered, so adding a command means adding a file.
User errors (``MedSegXError``) become one line on stderr and exit code 1; nothing else is swallowed.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import traceback
from typing import Callable, Optional, Sequence

from ..errors import Cancelled, MedSegXError

EXIT_USER_ERROR = 1
EXIT_CANCELLED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medsegx",
        description="Promptable CT/MRI segmentation (SegVol zoom-out-zoom-in, MedSegX adapter experts).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if module_info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        if hasattr(module, "register"):
            module.register(subparsers)
    return parser


def exit_code_of(program: str, work: Callable[[], Optional[int]], internal_error: Optional[int] = None) -> int:
    """Run ``work`` and turn its outcome into an exit code: its own (None = 0); a cancel, Ctrl+C or a user error
    (``MedSegXError``) as one line on stderr prefixed with ``program``. Any other exception is a bug: it
    propagates with its traceback, or with ``internal_error`` its traceback is printed and that code returned
    (the Slicer batch script, which must tell Slicer how to exit). Shared by ``medsegx`` and that script."""
    try:
        return int(work() or 0)
    except Cancelled as exc:
        print(f"{program}: {exc}", file=sys.stderr)
        return EXIT_CANCELLED
    except MedSegXError as exc:
        print(f"{program}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{program}: interrupted; nothing was written", file=sys.stderr)
        return EXIT_CANCELLED
    except Exception:  # noqa: BLE001 - a bug: keep the traceback
        if internal_error is None:
            raise
        traceback.print_exc()
        return internal_error


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return exit_code_of("medsegx", lambda: args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
