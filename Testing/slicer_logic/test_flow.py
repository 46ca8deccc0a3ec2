"""The keyboard-driven flow through the Logic on a real CT (slicer-core scene): point lists made for include and
exclude clicks, the box placed with one call, a refine click re-uses the volume's encoding, the latency and the
model/device of each result in the status line, clearing the clicks."""
from __future__ import annotations

import re

import pytest

import scene_builders as sb
from scene_builders import ct, imported_weights  # noqa: F401 (fixtures)
from MedSegXSlicerLib import MedSegXSlicerLogic, mrml_conversion


@pytest.fixture
def logic(imported_weights):
    logic = MedSegXSlicerLogic(weightsPath=imported_weights, device="cpu")
    yield logic
    logic.cleanup()


def test_click_refine_clear_and_next_segment(ct, logic):
    scene = ct.GetScene()
    include = logic.createPointsNode("MedSegX include points", color=(0.2, 0.9, 0.3))
    exclude = logic.createPointsNode("MedSegX exclude points", negative=True)
    assert not mrml_conversion.is_negative_node(include) and mrml_conversion.is_negative_node(exclude)
    assert tuple(round(c, 3) for c in include.GetDisplayNode().GetSelectedColor()) == (0.2, 0.9, 0.3)

    include.AddControlPoint(*sb.world_of_voxel(ct, (45, 55, 15)))
    task = logic.startSegmentation(ct, None, text="liver", pointsNode=include, negativePointsNode=exclude)
    task.job.wait()
    first = logic.finishSegmentation(task)
    assert re.fullmatch(r"Done: 'liver' from weights 'tiny' on cpu \w+ in \d+\.\d s\.", task.status), task.status
    assert task.latency_s > 0 and logic.sessions.volume_encodings == 1

    exclude.AddControlPoint(*sb.world_of_voxel(ct, (90, 30, 20)))       # a refine click
    task = logic.startSegmentation(ct, task.segmentation_node, text="liver", pointsNode=include,
                                   negativePointsNode=exclude, segmentId=first)
    task.job.wait()
    assert logic.finishSegmentation(task) == first
    assert logic.sessions.volume_encodings == 1                          # the encoding was re-used
    assert task.prompts.points[-1].positive is False and task.latency_s > 0

    assert logic.clearPrompts(include, exclude, None) == 2
    assert include.GetNumberOfControlPoints() == exclude.GetNumberOfControlPoints() == 0
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1


def test_box_placement_is_one_call(slicer_app):
    scene = slicer_app.scene
    roi = MedSegXSlicerLogic.startPlacingBox(None, "MedSegX box")
    interaction = scene.GetNodeByID("vtkMRMLInteractionNodeSingleton")
    selection = scene.GetNodeByID("vtkMRMLSelectionNodeSingleton")
    assert roi.IsA("vtkMRMLMarkupsROINode") and roi.GetName() == "MedSegX box"
    assert interaction.GetCurrentInteractionMode() == interaction.Place
    assert selection.GetActivePlaceNodeID() == roi.GetID()
    interaction.SetCurrentInteractionMode(interaction.ViewTransform)
    assert MedSegXSlicerLogic.startPlacingBox(roi) is roi                 # an existing box is re-placed
    assert interaction.GetCurrentInteractionMode() == interaction.Place
    assert scene.GetNumberOfNodesByClass("vtkMRMLMarkupsROINode") == 1
