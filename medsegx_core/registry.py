"""The one registry of model kinds: what each is, how it is built, loaded and run.

Every place that must know "which kind of model is this" (the command line, the default-weights choice,
``medsegx weights list``, the Slicer batch script and Models panel) asks here instead of testing kinds itself:

```python
from medsegx_core import registry
kind = registry.kind_of(path)              # ModelKind of a folder of ours or a checkpoint file
model = kind.load(path)                    # safe loading (safetensors / torch.load(weights_only=True))
predictor = kind.predictor(model, device="auto", precision="auto")   # set_volume(volume), segment(prompts, ...)
registry.KINDS                             # in the order lists show them: the default for box prompts first
```

A kind: its config dataclass, a builder (random weights, for tests and training), a recogniser of its files, a
safe loader, its predictor class and a description. Predictors share one contract: ``set_volume(volume,
modality=None, ...)`` once, then ``segment(prompts, ...)`` many times from caches.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

PathLike = Union[str, Path]


@dataclass(frozen=True)
class ModelKind:
    name: str                          # the "kind" recorded in our folders' config.json
    title: str                         # what users read
    description: str
    slice_wise: bool                   # a 2D model run slice by slice (else volumetric)
    prompts: Tuple[str, ...]           # what it takes: "box", "points", "text"
    licence: str
    config_type: Callable[[], type]
    build: Callable[..., object]       # build(config=None) -> model with random weights, eval mode
    recognises: Callable[[Path], bool]
    load: Callable[..., object]        # load(path) -> model, eval mode
    predictor_type: Callable[[], type]

    def predictor(self, model, device: str = "auto", precision: str = "auto", **options):
        return self.predictor_type()(model, device=device, precision=precision, **options)


# ---- the kinds (imports are deferred so that listing kinds stays cheap) ----------------------------------------
LITEMEDSAM, SEGVOL, MEDSEGX2D = "litemedsam", "segvol", "medsegx2d"


def _litemedsam_config():
    from .modeling.litemedsam import LiteMedSAMConfig
    return LiteMedSAMConfig


def _litemedsam_build(config=None):
    from .modeling.litemedsam import LiteMedSAM
    return LiteMedSAM(config)


def _litemedsam_recognises(path: Path) -> bool:
    from .weights.litemedsam import is_litemedsam_checkpoint
    return is_litemedsam_checkpoint(path)


def _litemedsam_load(path: Optional[PathLike] = None, **_):
    from .weights.litemedsam import load_litemedsam
    return load_litemedsam(path)


def _litemedsam_predictor():
    from .volume_slice_predictor import VolumeSlicePredictor
    return VolumeSlicePredictor


def _segvol_config():
    from .modeling.config import SegVolConfig
    return SegVolConfig


def _segvol_build(config="tiny"):
    from .modeling.build import build_model
    return build_model(config)


def _segvol_recognises(path: Path) -> bool:
    return True    # the fallback: its loader says what a file is not


def _segvol_load(path: PathLike, tokenizer=None, **_):
    from .weights.store import load_model
    return load_model(path, tokenizer=tokenizer)


def _segvol_predictor():
    from .predictor import Predictor
    return Predictor


def _medsegx_config():
    from .modeling.medsegx2d import MedSegX2DConfig
    return MedSegX2DConfig


def _medsegx_build(config=None):
    from .modeling.medsegx2d import MedSegX2D
    return MedSegX2D(config)


def _medsegx_recognises(path: Path) -> bool:
    from .weights.medsegx2d import is_medsegx2d_checkpoint
    return is_medsegx2d_checkpoint(path)


def _medsegx_load(path: PathLike, trained=None, **_):
    from .weights.medsegx2d import load_medsegx_weights
    return load_medsegx_weights(path, trained)


def _medsegx_predictor():
    from .slice_predictor import SlicePredictor
    return SlicePredictor


KINDS: Dict[str, ModelKind] = {kind.name: kind for kind in (
    ModelKind(LITEMEDSAM, "LiteMedSAM",
              "pretrained 2D medical foundation model (TinyViT, distilled from MedSAM), box prompts, slice by slice; "
              "the default for boxes", True, ("box", "points"), "Apache-2.0",
              _litemedsam_config, _litemedsam_build, _litemedsam_recognises, _litemedsam_load, _litemedsam_predictor),
    ModelKind(SEGVOL, "SegVol",
              "volumetric promptable model (3D ViT, zoom-out-zoom-in): text, clicks and boxes; official weights or "
              "the bundled starter", False, ("text", "points", "box"), "MIT (official weights)",
              _segvol_config, _segvol_build, _segvol_recognises, _segvol_load, _segvol_predictor),
    ModelKind(MEDSEGX2D, "MedSegX 2D",
              "MedSegX's published 2D model (SAM ViT-B + ConMoAE experts), a box on one slice; slice mode",
              True, ("box", "text"), "see the MedSegX release",
              _medsegx_config, _medsegx_build, _medsegx_recognises, _medsegx_load, _medsegx_predictor),
)}

# Recognised in this order: the specific kinds first, SegVol (which accepts any other checkpoint) last.
RECOGNITION_ORDER = (MEDSEGX2D, LITEMEDSAM, SEGVOL)


def kind_named(name: str) -> ModelKind:
    try:
        return KINDS[name]
    except KeyError:
        raise KeyError(f"unknown model kind {name!r}; known: {', '.join(KINDS)}") from None


def kind_of(path: PathLike) -> ModelKind:
    """The kind of a folder of ours (its config.json says) or of a checkpoint file (recognised by content)."""
    from .weights.store import KIND_KEY, is_our_weights_folder, read_config_record

    from .errors import WeightsError

    path = Path(path).expanduser()
    if path.is_dir() and is_our_weights_folder(path):
        name = read_config_record(path).get(KIND_KEY, SEGVOL)
        if name not in KINDS:
            raise WeightsError(f"weights folder {path}: its config.json names the model kind {name!r}, which this "
                               f"version does not know ({', '.join(KINDS)}); update medsegx-core or remove the folder")
        return KINDS[name]
    for name in RECOGNITION_ORDER:
        if KINDS[name].recognises(path):
            return KINDS[name]
    return KINDS[SEGVOL]


def installed(kind_name: str):
    """Folders of ours of one kind in ``$MEDSEGX_HOME/weights``, sorted."""
    from .errors import WeightsError
    from .weights.hub import weights_dir
    from .weights.store import is_our_weights_folder

    folder = weights_dir()
    if not folder.is_dir():
        return []
    found = []
    for candidate in sorted(p for p in folder.iterdir() if p.is_dir() and is_our_weights_folder(p)):
        try:
            if kind_of(candidate).name == kind_name:
                found.append(candidate)
        except WeightsError:     # a folder of a kind this version does not know is not listed
            continue
    return found
