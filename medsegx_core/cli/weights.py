"""``medsegx weights``: import published checkpoints into our format, download the official ones, list them."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._progress import progress_bar


def register(subparsers) -> None:
    parser = subparsers.add_parser("weights", help="import, download and list model weights")
    actions = parser.add_subparsers(dest="weights_command", metavar="ACTION")
    actions.required = True

    imp = actions.add_parser("import", help="convert a published SegVol or MedSegX checkpoint to our safetensors "
                                            "format")
    imp.add_argument("path", help="checkpoint file (pytorch_model.bin, SegVol_v1.pth, .safetensors) or a folder; "
                                  "for MedSegX the SAM ViT-B checkpoint (with --trained), a merged file or our folder")
    imp.add_argument("--trained", metavar="FILE",
                     help="MedSegX's trained tensors (medsegx_vit_b.pth) that go with the SAM checkpoint PATH")
    imp.add_argument("--decoder-heads", type=int, default=8,
                     help="MedSegX: attention heads of the mask decoder (no tensor shape records it; SAM: 8)")
    imp.add_argument("-o", "--output", help="destination folder (default: $MEDSEGX_HOME/weights/<name>)")
    imp.add_argument("--name", help="name of the imported weights (default: the model preset's name)")
    imp.add_argument("--tokenizer", help="folder of tokenizer files, when they are not beside the checkpoint")
    imp.add_argument("--config", help="model config.json, for checkpoints whose widths match no preset")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing destination folder")
    imp.set_defaults(func=run_import)

    down = actions.add_parser("download", help="download published weights through the Hugging Face Hub")
    down.add_argument("name", choices=["segvol"], help="which published weights")
    down.add_argument("--revision", default="main", help="repository revision (branch, tag or commit)")
    down.set_defaults(func=run_download)

    listing = actions.add_parser("list", help="list imported and downloaded weights")
    listing.set_defaults(func=run_list)


def run_import(args: argparse.Namespace) -> int:
    from ..errors import OutputError
    from ..weights.hub import weights_dir
    from ..weights.medsegx2d import is_medsegx_checkpoint
    from ..weights.store import load_model, save_model, sha256_of

    if args.output and Path(args.output).exists() and not args.overwrite:
        raise OutputError(f"output folder {args.output} already exists; choose another -o or pass --overwrite")
    if is_medsegx_checkpoint(Path(args.path).expanduser(), args.trained):
        return _import_medsegx(args)
    model = load_model(Path(args.path).expanduser(), tokenizer=args.tokenizer, config=args.config)
    source_file = Path(model.weights_source)
    if model.text_encoder.tokenizer is None:
        print("medsegx: warning: no tokenizer files found beside the weights; text prompts will not work with "
              "the imported weights (pass --tokenizer DIR)", file=sys.stderr)
    output = Path(args.output) if args.output else weights_dir() / (args.name or model.config.name)
    bar, update = progress_bar("import")
    try:
        update(0.0, "sha256 of the source")
        record = {"path": str(source_file.resolve()), "layout": model.weights_layout,
                  "sha256": sha256_of(source_file), "size_bytes": source_file.stat().st_size}
        folder = save_model(model, output, source=record, overwrite=args.overwrite, progress=update)
    finally:
        bar.close()
    print(f"imported {source_file.name} ({record['layout']} layout, sha256 {record['sha256'][:12]}...) "
          f"as {model.config.name!r} -> {folder}")
    return 0


def _import_medsegx(args: argparse.Namespace) -> int:
    """MedSegX's 2D model (split SAM + trained pair, merged file, or our folder) into our folder format."""
    from ..weights.hub import weights_dir
    from ..weights.medsegx2d import import_medsegx

    output = Path(args.output) if args.output else weights_dir() / (args.name or "medsegx")
    bar, update = progress_bar("import")
    try:
        folder = import_medsegx(Path(args.path).expanduser(), output, trained=args.trained,
                                decoder_heads=args.decoder_heads, overwrite=args.overwrite, progress=update)
    finally:
        bar.close()
    print(f"imported MedSegX 2D weights ({args.path}{' + ' + args.trained if args.trained else ''}) -> {folder}")
    return 0


def run_download(args: argparse.Namespace) -> int:
    from ..weights.hub import download

    bar, update = progress_bar(f"download {args.name}")
    try:
        folder = download(args.name, revision=args.revision, progress=update)
    finally:
        bar.close()
    print(folder)
    return 0


def run_list(args: argparse.Namespace) -> int:
    from ..weights.hub import PUBLISHED, hub_cache_dir, weights_dir
    from ..weights.medsegx2d import describe_folder
    from ..weights.store import KIND_KEY, MEDSEGX2D_KIND, is_medsegx_folder, read_config_record

    rows = []
    if weights_dir().is_dir():
        for folder in sorted(p for p in weights_dir().iterdir() if p.is_dir() and is_medsegx_folder(p)):
            record = read_config_record(folder)
            source = record.get("source") or {}
            if record.get(KIND_KEY) == MEDSEGX2D_KIND:
                files = source.get("files") or [{}]
                rows.append(f"imported    {folder.name:<16} {describe_folder(folder)}, source "
                            f"{source.get('layout', '?')} sha256 {str(files[0].get('sha256', '-'))[:12]} {folder}")
                continue
            rows.append(f"imported    {folder.name:<16} model {record['model'].get('name', '?'):<12} "
                        f"source sha256 {str(source.get('sha256', '-'))[:12]:<12} {folder}")
    for name, entry in sorted(PUBLISHED.items()):
        repo_cache = hub_cache_dir() / ("models--" + entry.repo_id.replace("/", "--")) / "snapshots"
        for snapshot in sorted(repo_cache.glob("*")) if repo_cache.is_dir() else []:
            if any((snapshot / f).exists() for f in entry.required):
                rows.append(f"downloaded  {name:<16} {entry.repo_id} revision {snapshot.name[:12]} {snapshot}")
    print("\n".join(rows) if rows else
          "no weights yet: 'medsegx weights download segvol' or 'medsegx weights import FILE'")
    return 0
