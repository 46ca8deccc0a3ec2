"""Getting weights: the official SegVol weights downloaded through the engine's hub code, or a checkpoint file the
user has (SegVol's ``pytorch_model.bin`` / ``.pth`` / safetensors, tokenizer files beside it) converted into our
weights folder under ``$MEDSEGX_HOME/weights``. Both run on the engine thread with progress and Cancel; a failed or
cancelled download leaves nothing in the cache. Choosing the result as the weights in use is the caller's step.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from medsegx_core.progress import CancelToken, ProgressCallback, report, scaled

from . import models, segvol_mode
from .install import Dependencies
from .worker import BackgroundTask, EngineWorker


def import_destination() -> Path:
    """Where "Import official checkpoint" writes the converted weights (found first by the engine's default)."""
    from medsegx_core.weights.default import OFFICIAL_NAME
    from medsegx_core.weights.hub import weights_dir
    return weights_dir() / OFFICIAL_NAME


def convert_checkpoint(source: Path, destination: Path, record: dict, progress: Optional[ProgressCallback],
                       cancel: CancelToken) -> Path:
    """A SegVol checkpoint (or folder) saved as our weights folder, with where it came from (engine thread)."""
    from medsegx_core.weights.store import save_model

    report(progress, 0.0, f"converting {Path(source).name}")
    model = segvol_mode.load_model(str(source))
    cancel.raise_if_cancelled()
    return save_model(model, destination, source=record, overwrite=True, progress=progress, cancel=cancel)


class ModelDownloads:
    """Downloads and checkpoint imports, queued on the Logic's engine thread."""

    def __init__(self, worker: EngineWorker, dependencies: Dependencies):
        self._worker, self._dependencies = worker, dependencies

    def start_download(self, name: str = "segvol", cancel: Optional[CancelToken] = None) -> BackgroundTask:
        """Download the published weights ``name`` into ``$MEDSEGX_HOME`` and convert them into ``weights/<name>``
        (``weights/segvol`` for the official ones); progress in bytes and rate."""
        from medsegx_core.weights.default import OFFICIAL_NAME

        self._dependencies.require()
        destination = import_destination() if name == OFFICIAL_NAME else import_destination().parent / name

        def run(progress: ProgressCallback, cancel_token: CancelToken):
            from medsegx_core.weights.hub import download
            folder = download(name, progress=scaled(progress, 0.0, 0.9), cancel=cancel_token, disk_factor=2.0)
            return convert_checkpoint(folder, destination, {"downloaded_from": models.published_entry(name).repo_id,
                                                            "snapshot": str(folder)},
                                      scaled(progress, 0.9, 1.0), cancel_token)

        return BackgroundTask(self._worker.submit(run, cancel, description=f"download {name}"), "download",
                              f"download {name}")

    def import_checkpoint(self, checkpoint, destination=None, progress: Optional[ProgressCallback] = None,
                          cancel: Optional[CancelToken] = None) -> Path:
        """Convert a checkpoint file into our weights folder (default: where the official weights go); blocks
        the calling thread while the engine thread converts. Returns the folder."""
        self._dependencies.require()
        source = Path(checkpoint).expanduser()
        destination = Path(destination).expanduser() if destination else import_destination()

        def run(progress_cb: ProgressCallback, cancel_token: CancelToken):
            return convert_checkpoint(source, destination, {"imported_from": str(source)}, progress_cb,
                                      cancel_token)

        return self._worker.submit(run, cancel, description=f"import {source}").wait(on_progress=progress)
