"""Times of the Slicer Logic on a real CT (slicer-core scene, no Slicer app): several structures in one request,
the first structure (model load + reading + encoding) against each further one, then a refine click.

    python Testing/benchmarks/bench_slicer_structures.py [CT] [--text "liver, spleen, left kidney, right kidney"]

Weights: the engine's default (official SegVol if installed, else the bundled starter model); prints a table.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "MedSegXSlicer"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ct", nargs="?", default=str(REPO.parent / "shared/data/ct/totalseg_ct.nii.gz"))
    parser.add_argument("--text", default="liver, spleen, left kidney, right kidney")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    import slicer
    import vtk
    from MedSegXSlicerLib import MedSegXSlicerLogic, standalone

    standalone.ensure_application()
    volume = slicer.util.loadVolume(args.ct)
    logic = MedSegXSlicerLogic(device=args.device)
    try:
        print(f"{Path(args.ct).name}: {volume.GetImageData().GetDimensions()} voxels; {logic.modelLabel()}")
        started = time.perf_counter()
        task = logic.startSegmentation(volume, None, text=args.text)
        task.job.wait()
        ids = logic.finishSegmentation(task)
        total = time.perf_counter() - started
        for n, item in enumerate(task.finished):
            what = "first (load + encode + segment)" if n == 0 else "further"
            print(f"  {item.request.name:<14} {what:<32} {item.seconds:6.2f} s   ({item.result.runtime})")
        print(f"  all {len(ids)} structures, request to segments written: {total:.2f} s")

        # a refine click inside the first structure's result: the encoding is re-used
        segmentation = task.segmentation_node
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, ids[0], volume)
        k, j, i = np.argwhere(mask > 0).mean(axis=0).round().astype(int)
        vtk_matrix = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(vtk_matrix)
        ras = (slicer.util.arrayFromVTKMatrix(vtk_matrix) @ np.array([i, j, k, 1.0]))[:3]
        points = logic.createPointsNode("include")
        points.AddControlPoint(*ras)
        latencies = []
        for _ in range(3):
            refine = logic.startSegmentation(volume, segmentation, text=task.requests[0].name, pointsNode=points,
                                             segmentId=ids[0])
            refine.job.wait()
            logic.finishSegmentation(refine)
            latencies.append(refine.latency_s)
        print(f"  refine click (request to segment written), 3 runs: "
              + ", ".join(f"{s:.2f} s" for s in latencies) + f"; volume encodings: {logic.sessions.volume_encodings}")
    finally:
        logic.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
