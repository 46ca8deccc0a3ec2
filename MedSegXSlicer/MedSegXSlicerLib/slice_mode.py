"""MedSegX slice mode in Slicer (no Qt): MedSegX's published 2D model on one slice of a volume, or propagated to its
neighbours, from an ROI one slice thick (or drawn on a slice view) and a structure name.

```python
logic = SliceModeLogic(weightsPath)                 # a folder from 'medsegx weights import' (kind medsegx2d)
segment_id = logic.segment(volumeNode, roiNode, segmentationNode, text="liver", propagate=True)
```
The volume may be a 2D picture loaded in Slicer (a one-slice scalar volume, or an RGB vector volume whose colours
the model sees). The engine's ``SlicePredictor`` is kept between calls and the volume is handed to it again only
when its voxels or geometry changed. ``installed_medsegx2d_models`` lists the MedSegX folders in
``$MEDSEGX_HOME/weights``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np

from medsegx_core.errors import InputError, WeightsError
from medsegx_core.progress import CancelToken, ProgressCallback

from . import mrml_conversion, segment_writer
from .appearance import segment_appearance


def installed_medsegx2d_models() -> List[Path]:
    """MedSegX 2D folders installed in ``$MEDSEGX_HOME/weights`` (the engine registry's list; the Models panel
    lists them through ``models.medsegx2d_entries``)."""
    from medsegx_core import registry
    return registry.installed(registry.MEDSEGX2D)


def slice_volume_from_node(volume_node, modality: Optional[str] = None):
    """(engine Volume, colours or None) of a scalar volume, a one-slice picture, or an RGB(A) picture."""
    import slicer

    from medsegx_core.data.validation import blank_value, check_finite, count_nonfinite
    from medsegx_core.data.volume import Volume

    label = f"volume '{volume_node.GetName()}'"
    rgb = None
    if volume_node.IsA("vtkMRMLVectorVolumeNode"):
        pixels = np.asarray(slicer.util.arrayFromVolume(volume_node))
        if pixels.ndim != 4 or pixels.shape[-1] not in (3, 4) or pixels.dtype != np.uint8:
            raise InputError(f"{label}: {pixels.shape[-1] if pixels.ndim == 4 else 1} components of {pixels.dtype}; "
                             f"MedSegX reads grey volumes and 8-bit RGB pictures")
        if pixels.shape[0] != 1:
            raise InputError(f"{label}: an RGB volume of {pixels.shape[0]} slices; a grey-level volume is needed "
                             f"(convert it with Volumes > Convert to scalar volume, luminance); colour is read only "
                             f"for 2D pictures")
        rgb = np.ascontiguousarray(pixels[..., :3])
        array = np.round(rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.uint8)
    else:
        array = np.array(slicer.util.arrayFromVolume(volume_node), copy=True)
        if array.ndim != 3 or array.shape[0] > 1:
            return mrml_conversion.volume_from_node(volume_node, modality), None   # the usual checks
    spacing, origin, directions = mrml_conversion.geometry_from_matrix(
        mrml_conversion.world_ijk_to_ras(volume_node))
    volume = Volume(array, spacing, origin, directions,
                    modality=modality or mrml_conversion.volume_modality(volume_node), source=volume_node.GetName())
    check_finite(label, count_nonfinite(volume.array))
    if blank_value(volume.array) is not None:
        raise InputError(f"{label}: every pixel is {blank_value(volume.array):g} (a blank image); there is "
                         f"nothing to segment")
    return volume, rgb


class SliceModeLogic:
    """Slice mode's state: the weights, the engine's predictor, the volume it holds."""

    def __init__(self, weightsPath=None, device: str = "auto"):
        self.weightsPath = Path(weightsPath) if weightsPath else None
        self.device = device
        self._predictor = None
        self._predictor_key = None
        self._volume_key = None
        self.lastResult = None

    def _requirePredictor(self):
        from medsegx_core.slice_predictor import SlicePredictor
        from medsegx_core.weights.medsegx2d import load_medsegx_weights

        weights = self.weightsPath
        if weights is None:
            installed = installed_medsegx2d_models()
            if not installed:
                raise WeightsError("no MedSegX 2D model is installed: import one in the Models panel ('Import "
                                   "checkpoint': the SAM ViT-B checkpoint with medsegx_vit_b.pth) or run 'medsegx "
                                   "weights import SAM_CHECKPOINT --trained medsegx_vit_b.pth'")
            weights = installed[0]
        key = (str(weights), self.device)
        if self._predictor_key != key:
            self._predictor = SlicePredictor(load_medsegx_weights(weights), device=self.device)
            self._predictor_key, self._volume_key = key, None
        return self._predictor

    def predictor_intensity(self) -> str:
        """How the last volume's intensities were brought to the model's 8-bit input (for the status line)."""
        return self._predictor.intensity if self._predictor is not None else ""

    def segment(self, volumeNode, roiNode, segmentationNode=None, text: Optional[str] = None,
                modality: Optional[str] = None, sliceIndex: Optional[int] = None, propagate: bool = False,
                segmentName: Optional[str] = None, progress: Optional[ProgressCallback] = None,
                cancel: Optional[CancelToken] = None) -> str:
        """Segment the ROI's slice (or ``sliceIndex``; with ``propagate`` its neighbours too) into a new segment
        of ``segmentationNode`` (created when None), in the calling thread; returns the segment ID.
        ``self.lastResult`` keeps the engine's result (per-slice outputs, notes)."""
        run, task = self._prepare(volumeNode, roiNode, segmentationNode, text, modality, sliceIndex, propagate,
                                  segmentName)
        task.result = run(progress, cancel)
        return self.finish(task)

    def start(self, worker, volumeNode, roiNode, segmentationNode=None, text: Optional[str] = None,
              modality: Optional[str] = None, sliceIndex: Optional[int] = None, propagate: bool = False,
              segmentName: Optional[str] = None, cancel: Optional[CancelToken] = None) -> "SliceTask":
        """As ``segment``, with the engine work queued on ``worker`` (the Logic's thread, so Slicer keeps
        responding during a propagation); ``finish`` writes the result (main thread)."""
        run, task = self._prepare(volumeNode, roiNode, segmentationNode, text, modality, sliceIndex, propagate,
                                  segmentName)
        what = "propagate" if propagate else "segment a slice"
        task.job = worker.submit(run, cancel, description=f"MedSegX: {what} of '{volumeNode.GetName()}'")
        return task

    def _prepare(self, volumeNode, roiNode, segmentationNode, text, modality, sliceIndex, propagate, segmentName):
        """Main thread: read the volume and the box from their nodes; returns the engine work and its task."""
        if roiNode is None:
            raise InputError("MedSegX slice mode needs a box: place an ROI one slice thick on the structure (or "
                             "draw it on a slice view)")
        volume, rgb = slice_volume_from_node(volumeNode, modality)
        prompts = mrml_conversion.prompts_from_nodes(volume, volumeNode.GetName(), text=text,
                                                     roi_node=roiNode).prompts
        key = (mrml_conversion.volume_key(volumeNode), modality)

        def run(progress: Optional[ProgressCallback], cancel: Optional[CancelToken]):
            predictor = self._requirePredictor()
            if key != self._volume_key:
                predictor.set_volume(volume, modality=modality, rgb=rgb)
                self._volume_key = key
            return predictor.segment(prompts, slice_index=sliceIndex, propagate=propagate, progress=progress,
                                     cancel=cancel)

        return run, SliceTask(volumeNode, segmentationNode, segmentName)

    def finish(self, task: "SliceTask") -> str:
        """Write the engine's result as a new segment (main thread); re-raises the engine's error."""
        result = task.job.result() if task.job is not None else task.result
        volumeNode, segmentationNode = task.volume_node, task.segmentation_node
        if segmentationNode is None:
            segmentationNode = volumeNode.GetScene().AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                                       f"{volumeNode.GetName()} MedSegX")
            segmentationNode.CreateDefaultDisplayNodes()
            task.segmentation_node = segmentationNode
        name = task.segment_name or result.name or "segment"
        color, terminology = segment_appearance(name, segmentationNode.GetSegmentation().GetNumberOfSegments())
        self.lastResult = result
        segment_id = segment_writer.write_segment(
            segmentationNode, result.mask, mrml_conversion.world_ijk_to_ras(volumeNode), segment_id=None,
            name=name, color=color, terminology=terminology, reference_volume_node=volumeNode)
        task.status = f"MedSegX slice mode: '{name}' written"
        return segment_id


@dataclass
class SliceTask:
    """A slice-mode request in flight: the engine job (None when run in the calling thread) and where its
    result goes."""

    volume_node: object
    segmentation_node: Optional[object]
    segment_name: Optional[str]
    job: Optional[object] = None
    result: Optional[object] = None
    status: str = ""
    warnings: list = field(default_factory=list)
