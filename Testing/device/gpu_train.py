"""Train the base model on a lent GPU machine in one call, and bring the result back (not a test; CI has no GPU).

The GPU machine (the library's ``device`` tool) starts bare, sees only this repository and what ``carry`` names,
has torch but neither MONAI nor our readers' packages, may run one command for at most 10 minutes and returns at
most 8 files of 16 MB (64 MB in all) from ``$OUT``. So the run is prepared here and is one command there:

1. Here, once: the prepared training set (every case of ../shared/data, preprocessed, with the frozen sentence
   embeddings: the GPU machine then needs neither the volumes, SimpleITK nor the MiniLM package) and MONAI as a
   wheel, both in folders that git ignores and ``carry`` names::

       echo /.carry/ >> .git/info/exclude; mkdir -p .carry/whl
       python -m medsegx_core.training.train_starter --data ../shared/data --prepare .carry/bundle.npz
       python Testing/device/gpu_train.py slim --recipe starter_stage9_heldout --bundle .carry/bundle.npz \\
           --out .carry/heldout.npz          # only the recipe's cases: 11 of the 38 MB
       python -m pip download --no-deps --only-binary=:all: -d .carry/whl monai==1.6.1

2. There, one ``run`` (carry ``[".carry/heldout.npz", ".carry/whl"]``, timeout_s 600; ``--minutes`` leaves two minutes for packing)::

       python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/whl/*.whl &&
       PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 python3 Testing/device/gpu_train.py train
           --recipe starter_stage9_heldout --init medsegx_core/resources/starter
           --bundle .carry/heldout.npz --out $OUT --minutes 8

   It trains with ``--device cuda`` and DataLoader workers on the machine's cores (the sampler's augmentation runs
   on the CPU and is what bounds the step rate), stops cleanly at the deadline (SIGINT: the loop finishes its step;
   the training state of the last checkpoint stays), and packs the weights folder, the training state (when the
   schedule did not finish) and the log into one tar split into 15 MB parts, plus ``summary.json`` (steps done,
   steps per second, exit code, GPU).

3. Here: ``python Testing/device/gpu_train.py unpack FILES_AT DEST`` joins the parts and unpacks
   ``DEST/weights`` (load with ``--weights DEST/weights``, e.g. ``Testing/benchmarks/eval_starter.py``) and, for an
   unfinished schedule, ``DEST/weights.train-state.safetensors``. A later call continues it exactly: carry that
   state file too (24 MB; the weights are not needed) and add ``--resume-from DEST`` (the same recipe and --init).

The recipe decides the weights (seed, steps, batch, schedule, held-out patients); this script only says where and
for how long the run happens, so what it brings back is reproducible from the recipe (``--resume`` continues
bit for bit on the same machine kind).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PART_BYTES = 15 * 1024 * 1024       # under the 16 MB a returned file may hold
STEP_LINE = "step "


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _gpu_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device here: run on the GPU machine, or pass --device cpu for a dry run")
        return torch.cuda.get_device_name(0)
    return "cpu"


def train(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    run_dir = work / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    weights = run_dir / "weights"
    resume = []
    if args.resume_from:
        # A later call continues the schedule from the state an earlier call brought back.
        # Only the training state is needed (the weights are written again at the next checkpoint), so a resumed
        # call may carry the state file alone.
        state = Path(args.resume_from) / "weights.train-state.safetensors"
        if not state.is_file():
            raise SystemExit(f"--resume-from {args.resume_from}: no weights.train-state.safetensors there; unpack "
                             f"the earlier call's parts into it ('gpu_train.py unpack') and carry that file")
        shutil.copy2(state, run_dir / "weights.train-state.safetensors")
        resume = ["--resume"]
    workers = args.workers if args.workers is not None else max(0, _cpu_count() - 2)
    command = [sys.executable, "-m", "medsegx_core.training.train_starter", "--recipe", args.recipe,
               "--bundle", str(args.bundle), "--out", str(weights), "--device", args.device,
               "--workers", str(workers), "--threads", str(args.threads),
               "--checkpoint-every", str(args.checkpoint_every)] + resume
    if args.init:
        command += ["--init", str(args.init)]
    if args.stop_after is not None:
        command += ["--stop-after", str(args.stop_after)]
    summary = {"recipe": args.recipe, "command": command, "gpu": _gpu_name(args.device), "workers": workers,
               "minutes": args.minutes}
    print(f"[gpu_train] {summary['gpu']}, {workers} workers: {' '.join(command)}", flush=True)
    log_path = run_dir / "train.log"
    began = time.monotonic()
    deadline = began + args.minutes * 60
    with open(log_path, "w", encoding="utf-8") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT),
                                 env={**os.environ, "PYTHONUNBUFFERED": "1"})
        interrupted = False
        while child.poll() is None:
            if time.monotonic() > deadline and not interrupted:
                child.send_signal(signal.SIGINT)        # the loop stops after its step; the state stays whole
                interrupted = True
                deadline = time.monotonic() + args.grace
            elif interrupted and time.monotonic() > deadline:
                child.kill()
                break
            time.sleep(1)
        code = child.wait()
    elapsed = time.monotonic() - began
    lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    summary.update(exit_code=code, interrupted_at_deadline=interrupted, elapsed_s=round(elapsed, 1),
                   last_lines=lines[-12:])
    state = run_dir / "weights.train-state.safetensors"
    steps_done, steps_planned = _steps(weights)
    finished = code == 0 and steps_planned is not None and steps_done >= steps_planned
    members = [p for p in (weights, log_path) if p.exists()]
    if state.exists() and not finished:
        members.append(state)
    summary.update(steps_done=steps_done, steps_planned=steps_planned, schedule_finished=finished,
                   state_included=state in members,
                   steps_per_s_overall=round(steps_done / elapsed, 2) if steps_done else None)  # start-up included
    parts = _pack(members, run_dir, out / "result.tar")
    summary["parts"] = [p.name for p in parts]
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    print(json.dumps({k: v for k, v in summary.items() if k != "last_lines"}, indent=1))
    print("\n".join(summary["last_lines"]))
    return 0 if code in (0, 130) and weights.exists() else 1


def _steps(weights: Path):
    """(steps done, steps the recipe's schedule spans) recorded in the saved weights; (0, None) if none were saved."""
    try:
        source = json.loads((weights / "config.json").read_text(encoding="utf-8")).get("source", {})
        return int(source.get("steps_done") or 0), int(source["steps_planned"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0, None


def _pack(members, base: Path, tar_path: Path):
    """One tar of ``members`` (relative to ``base``) split into PART_BYTES parts; the tar itself is removed."""
    with tarfile.open(tar_path, "w") as tar:
        for member in members:
            tar.add(member, arcname=str(member.relative_to(base)))
    parts = []
    with open(tar_path, "rb") as handle:
        index = 0
        while True:
            chunk = handle.read(PART_BYTES)
            if not chunk:
                break
            part = tar_path.with_name(f"{tar_path.name}.part{index:02d}")
            part.write_bytes(chunk)
            parts.append(part)
            index += 1
    tar_path.unlink()
    return parts


def slim(args: argparse.Namespace) -> int:
    """Keep only the cases the recipe trains on (the carried tree is limited to 64 MB; the clinical thorax CT alone
    is 27 MB of the full prepared set, and a held-out recipe never reads it)."""
    from medsegx_core.training.starter_bundle import load_bundle, save_bundle
    from medsegx_core.training.starter_data import case_specs
    from medsegx_core.training.train_starter import parse_args

    recipe = parse_args(["--recipe", args.recipe])
    keys = [spec.key for spec in case_specs(recipe.cases, recipe.exclude_patient)]
    cases, vocabulary, pooled = load_bundle(args.bundle, keys=keys)
    save_bundle(args.out, cases, vocabulary, pooled, overwrite=True)
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.1f} MB): {', '.join(c.key for c in cases)}")
    return 0


def unpack(args: argparse.Namespace) -> int:
    """Join ``result.tar.partNN`` from FILES_AT and unpack into DEST (weights/, the state, train.log)."""
    source, dest = Path(args.files_at), Path(args.dest)
    parts = sorted(source.glob("result.tar.part*"))
    if not parts:
        print(f"no result.tar.part* in {source}", file=sys.stderr)
        return 1
    dest.mkdir(parents=True, exist_ok=True)
    joined = dest / ".result.tar"
    with open(joined, "wb") as handle:
        for part in parts:
            handle.write(part.read_bytes())
    with tarfile.open(joined) as tar:
        for member in tar.getmembers():     # our own archive, but never write outside DEST
            target = (dest / member.name).resolve()
            if dest.resolve() not in target.parents or not (member.isfile() or member.isdir()):
                raise SystemExit(f"refusing archive member {member.name}")
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:
            tar.extractall(dest)
    joined.unlink()
    summary = source / "summary.json"
    if summary.exists():
        shutil.copy2(summary, dest / "summary.json")
    print(f"unpacked {len(parts)} part(s) into {dest}: {', '.join(sorted(p.name for p in dest.iterdir()))}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    run = sub.add_parser("train", help="on the GPU machine: train one recipe until done or the deadline, pack")
    run.add_argument("--recipe", required=True, help="a shipped recipe name or file (decides the weights)")
    run.add_argument("--bundle", required=True, type=Path, help="the prepared training set (train_starter --prepare)")
    run.add_argument("--out", required=True, type=Path, help="where the parts and summary.json go ($OUT there)")
    run.add_argument("--init", type=Path, help="earlier weights the recipe continues from (its 'init')")
    run.add_argument("--resume-from", type=Path, help="a folder unpacked from an earlier call, to continue")
    run.add_argument("--minutes", type=float, default=8.0, help="training time before a clean stop")
    run.add_argument("--grace", type=float, default=60.0, help="seconds a stopped run gets to finish its step")
    run.add_argument("--device", default="cuda")
    run.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: cores - 2)")
    run.add_argument("--threads", type=int, default=2, help="torch threads of the training process")
    run.add_argument("--checkpoint-every", type=int, default=250)
    run.add_argument("--stop-after", type=int, default=None, help="a dry run's step limit")
    run.add_argument("--work", type=Path, default=Path("/tmp/medsegx_gpu_train"), help="scratch folder")
    run.set_defaults(func=train)
    thin = sub.add_parser("slim", help="here: a prepared set holding only the cases a recipe trains on")
    thin.add_argument("--recipe", required=True)
    thin.add_argument("--bundle", required=True, type=Path, help="the full prepared set")
    thin.add_argument("--out", required=True, type=Path)
    thin.set_defaults(func=slim)
    back = sub.add_parser("unpack", help="here: join and unpack what a call brought back")
    back.add_argument("files_at", help="the folder the returned files are in")
    back.add_argument("dest", help="where to unpack (weights/, the training state, train.log)")
    back.set_defaults(func=unpack)
    args = parser.parse_args(argv)
    from medsegx_core.errors import MedSegXError

    try:
        return args.func(args)
    except MedSegXError as exc:      # a wrong recipe or prepared set: say what, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
