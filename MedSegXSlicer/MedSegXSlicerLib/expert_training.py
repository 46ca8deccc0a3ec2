""""Learn from my segments" as a job: checks, then ConMoAE experts fine-tuned on the engine thread (experts.py
prepares the cases and trains) on top of the model boxes run, the pack written to
``$MEDSEGX_HOME/experts/<name>.safetensors``. Every segment name must resolve through the anatomy hierarchy (or
the user's mapping) before anything runs; selecting the new pack is the caller's step.

The base: LiteMedSAM (with the LiteMedSAM pack in use, if any) when boxes run LiteMedSAM (the default:
``ModelChoice.box_weights``), trained slice by slice; else SegVol's weights in use with their pack. Either follows
its kind's default recipe (``medsegx finetune --base``'s: ``cli.finetune.DEFAULT_RECIPES``), with the steps and
settings given here in place of the recipe's. Every segment the user drew trains: no structure is held out for
validation (the recipes' ``val_fraction`` would hold out whole structures, which the pack would then never learn)
unless the caller asks for it.
"""
from __future__ import annotations

from typing import Mapping, Optional

from medsegx_core.errors import InputError
from medsegx_core.progress import CancelToken, ProgressCallback

from medsegx_core import registry

from . import box_mode, experts, segvol_mode
from .install import Dependencies
from .model_choice import ModelChoice
from .worker import BackgroundTask, EngineWorker


def as_list(nodes) -> list:
    return list(nodes) if isinstance(nodes, (list, tuple)) else [nodes]


def recipe_settings(kind: str, **changes):
    """``FinetuneSettings`` of the default recipe for the registry ``kind`` with ``changes`` (field: value) made,
    the recipe record naming what was changed."""
    from dataclasses import replace

    from medsegx_core.cli.finetune import DEFAULT_RECIPES, settings_from_recipe

    settings = settings_from_recipe(DEFAULT_RECIPES[kind])
    changed = sorted(name for name, value in changes.items() if getattr(settings, name) != value)
    record = dict(settings.recipe or {}, overrides=changed) if changed else settings.recipe
    return replace(settings, recipe=record, **changes)


class ExpertTraining:
    """Expert packs trained from the user's segmentations, queued on the Logic's engine thread."""

    def __init__(self, choice: ModelChoice, worker: EngineWorker, dependencies: Dependencies):
        self._choice, self._worker, self._dependencies = choice, worker, dependencies

    @staticmethod
    def unresolved_segment_names(segmentation_nodes, mapping: Optional[Mapping[str, str]] = None) -> dict:
        """Segment name -> suggestions for names the anatomy hierarchy does not know (ask the user for these)."""
        return experts.unresolved_segment_names(as_list(segmentation_nodes), mapping)

    def start(self, volume_nodes, segmentation_nodes, pack_name: str, mapping: Optional[Mapping[str, str]],
              steps: Optional[int] = None, cancel: Optional[CancelToken] = None, **settings) -> BackgroundTask:
        """``steps``: None for the recipe's; ``settings``: more ``FinetuneSettings`` fields (batch_size,
        val_fraction, val_every, lr, ...). The model trained is the one boxes run (see the module docstring)."""
        volumes, segmentations = as_list(volume_nodes), as_list(segmentation_nodes)
        if len(volumes) != len(segmentations) or not volumes:
            raise InputError(f"give one segmentation per volume ({len(volumes)} volumes, {len(segmentations)} "
                             f"segmentations)")
        missing = experts.unresolved_segment_names(segmentations, mapping)
        if missing:
            raise InputError("these segment names are not in the anatomy hierarchy; map each to a known structure "
                             "(or 'NAME@PARENT' for a new one): " + "; ".join(
                                 f"'{name}'" + (f" (did you mean {', '.join(hints[:3])}?)" if hints else "")
                                 for name, hints in missing.items()))
        self._dependencies.require()
        pairs = [experts.prepare_pair(v, s, mapping) for v, s in zip(volumes, segmentations)]
        box_weights = self._choice.box_weights()
        if box_weights is not None:
            kind, spec, load_model = registry.LITEMEDSAM, self._choice.box_spec(box_weights), box_mode.load_model
        else:
            kind, spec, load_model = registry.SEGVOL, self._choice.segvol_spec(self._choice.check_weights()), \
                segvol_mode.load_model
        if steps is not None:
            settings["steps"] = int(steps)
        finetune_settings = recipe_settings(kind, **{"val_fraction": 0.0, **settings})
        destination = experts.pack_path(pack_name)

        def run(progress: ProgressCallback, cancel_token: CancelToken):
            return experts.train(pairs, spec, destination, finetune_settings, load_model, progress, cancel_token,
                                 slices=kind == registry.LITEMEDSAM)

        return BackgroundTask(self._worker.submit(run, cancel, description=f"train experts {destination.name}"),
                              "training", f"train experts '{destination.stem}'")
