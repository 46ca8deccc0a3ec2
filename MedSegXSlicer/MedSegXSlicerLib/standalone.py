"""Run the Logic on plain Python with the PyPI ``slicer-core`` package: a real MRML scene without the Slicer app.

Inside Slicer (``Slicer --no-main-window --python-script ...``) the application already provides the scene and
the module logics, and :func:`ensure_application` does nothing. On plain Python it does what Slicer's application
does at startup, for the parts the Logic and ``slicer.util`` use: one scene, the application logic, the colour,
volumes, segmentations and markups module logics (the segmentations logic registers the labelmap/surface
converters when it gets the scene), and ``slicer.mrmlScene`` / ``slicer.modules.<name>.logic()`` /
``slicer.app.coreIOManager()`` so that ``slicer.util.loadVolume``, ``loadSegmentation`` and ``saveNode`` work
unchanged through Slicer's own storage nodes.
"""
from __future__ import annotations

import types
from pathlib import Path

import slicer

_MODULE_LOGICS = (("Volumes", "vtkSlicerVolumesLogic"), ("Segmentations", "vtkSlicerSegmentationsModuleLogic"),
                  ("Markups", "vtkSlicerMarkupsLogic"))


def is_slicer_application() -> bool:
    """True inside the real Slicer application (where ``slicer.app`` is a qSlicerApplication)."""
    app = getattr(slicer, "app", None)
    return app is not None and hasattr(app, "applicationName")


class StorageNodeIOManager:
    """The four ``qSlicerCoreIOManager`` calls ``slicer.util`` makes, done with Slicer's storage nodes."""

    def __init__(self, scene, logics: dict):
        self.scene = scene
        self.logics = logics

    def fileType(self, fileName):
        return "SegmentationFile" if ".seg." in Path(fileName).name else "VolumeFile"

    def loadNodes(self, fileType, properties, loadedNodes, userMessages=None):
        file_name, name = properties["fileName"], properties.get("name") or None
        if fileType == "SegmentationFile":
            node = self.logics["Segmentations"].LoadSegmentationFromFile(file_name, False, name)
        else:
            name = name or Path(file_name).name.split(".")[0]
            node = self.logics["Volumes"].AddArchetypeVolume(file_name, name, int(bool(properties.get("labelmap"))))
        if node:
            loadedNodes.AddItem(node)
        return node is not None

    def fileWriterFileType(self, node):
        return node.GetClassName()

    def saveNodes(self, fileType, properties, userMessages=None):
        node = self.scene.GetNodeByID(properties["nodeID"])
        storage = node.GetStorageNode()
        if storage is None:
            storage = self.scene.AddNode(node.CreateDefaultStorageNode())
            node.SetAndObserveStorageNodeID(storage.GetID())
        storage.SetFileName(properties["fileName"])
        return bool(storage.WriteData(node))


def make_application():
    """A fresh scene with the application and module logics; returns a namespace (scene, app_logic, logics)."""
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    colors = app_logic.GetColorLogic()
    colors.SetMRMLScene(scene)
    colors.AddDefaultColorNodes()  # display nodes of volumes and labelmaps need the default colour tables
    app_logic.SetModuleLogic("Colors", colors)  # the volumes logic looks it up by this name
    logics = {}
    for name, class_name in _MODULE_LOGICS:
        logic = getattr(slicer, class_name)()
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app_logic)
        app_logic.SetModuleLogic(name, logic)
        logics[name] = logic
    return types.SimpleNamespace(scene=scene, app_logic=app_logic, logics=logics)


_installed = None  # keeps the application logic alive: the module logics hold only weak references to it


def install_application(application) -> None:
    """Point ``slicer.mrmlScene``, ``slicer.modules`` and ``slicer.app`` at ``application``."""
    global _installed
    _installed = application
    slicer.mrmlScene = application.scene
    slicer.modules = types.SimpleNamespace(**{
        name.lower(): types.SimpleNamespace(logic=(lambda logic=logic: logic))
        for name, logic in application.logics.items()})
    io_manager = StorageNodeIOManager(application.scene, application.logics)
    slicer.app = types.SimpleNamespace(coreIOManager=lambda: io_manager)


def ensure_application():
    """Inside Slicer: nothing (returns None). On plain Python: build and install a scene (returns it)."""
    if is_slicer_application() or getattr(slicer, "mrmlScene", None) is not None:
        return None
    application = make_application()
    install_application(application)
    return application
