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
from typing import Optional, Sequence

from ..errors import MedSegXError

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


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ..errors import Cancelled

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Cancelled as exc:
        print(f"medsegx: {exc}", file=sys.stderr)
        return EXIT_CANCELLED
    except MedSegXError as exc:
        print(f"medsegx: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("medsegx: interrupted; nothing was written", file=sys.stderr)
        return EXIT_CANCELLED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
