"""Where the module's resources and the engine are, in an installed extension and in a source checkout.

The repository keeps the module's resources (``.ui``, icons, ``requirements.txt``) in the top-level
``Resources/`` folder and the engine in ``medsegx_core/`` beside the module. The extension build copies both next
to the installed module (``<module dir>/Resources``, ``<module dir>/medsegx_core``); a source checkout added to
Slicer's "Additional module paths" has them one level up. Both layouts work without configuration.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parents[1]
REPOSITORY_DIR = MODULE_DIR.parent


def resource_path(relative: str) -> str:
    """Absolute path of a module resource such as ``"UI/MedSegXSlicer.ui"`` (installed layout first)."""
    for base in (MODULE_DIR / "Resources", REPOSITORY_DIR / "Resources"):
        candidate = base / relative
        if candidate.exists():
            return str(candidate)
    raise FileNotFoundError(f"MedSegX resource {relative!r} not found under {MODULE_DIR / 'Resources'} "
                            f"or {REPOSITORY_DIR / 'Resources'}: the extension is incompletely installed")


def ensure_engine_importable() -> None:
    """Make ``import medsegx_core`` work from a source checkout (the installed extension has it beside us)."""
    if importlib.util.find_spec("medsegx_core") is None and (REPOSITORY_DIR / "medsegx_core").is_dir():
        sys.path.insert(0, str(REPOSITORY_DIR))
