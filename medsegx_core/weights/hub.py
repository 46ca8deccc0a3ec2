"""Downloading published weights through huggingface_hub into our cache.

The cache lives under ``$MEDSEGX_HOME`` (default ``~/.medsegx``): ``hub/`` holds huggingface_hub's own cache
(so interrupted downloads resume and files are shared), ``weights/`` holds folders made by
``medsegx weights import``. ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` are read when a download starts (not only
when huggingface_hub is first imported), so mirrors and offline mode behave as users expect.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

from ..errors import WeightsError
from ..progress import CancelToken, ProgressCallback, check, report
from .checkpoints import one_line


@dataclass(frozen=True)
class PublishedWeights:
    repo_id: str
    required: Tuple[str, ...]          # the download fails without these
    optional: Tuple[str, ...]          # fetched when the repository has them
    description: str


PUBLISHED = {
    "segvol": PublishedWeights(
        repo_id="BAAI/SegVol",
        required=("pytorch_model.bin",),
        # The tokenizer ships with the weights; either tokenizer.json or vocab.json + merges.txt is enough.
        optional=("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                  "special_tokens_map.json", "config.json"),
        description="SegVol (BAAI), official weights, 724 MB, Apache-2.0",
    ),
}


def medsegx_home() -> Path:
    return Path(os.environ.get("MEDSEGX_HOME") or Path.home() / ".medsegx").expanduser()


def hub_cache_dir() -> Path:
    return medsegx_home() / "hub"


def weights_dir() -> Path:
    return medsegx_home() / "weights"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def download(name: str, revision: str = "main", progress: Optional[ProgressCallback] = None,
             cancel: Optional[CancelToken] = None) -> Path:
    """Fetch published weights ``name`` (see ``PUBLISHED``) and return the local folder holding them."""
    if name not in PUBLISHED:
        raise WeightsError(f"unknown published weights {name!r}; known: {', '.join(sorted(PUBLISHED))}")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    entry = PUBLISHED[name]
    offline = _offline()
    endpoint = os.environ.get("HF_ENDPOINT") or None
    folder: Optional[Path] = None
    files = [(f, True) for f in entry.required] + [(f, False) for f in entry.optional]
    for index, (filename, required) in enumerate(files):
        check(cancel)
        report(progress, index / len(files), f"{entry.repo_id}: {filename}")
        try:
            local = hf_hub_download(entry.repo_id, filename, revision=revision, cache_dir=str(hub_cache_dir()),
                                    endpoint=endpoint, local_files_only=offline)
        except LocalEntryNotFoundError:
            if not required:
                continue
            if offline:
                raise WeightsError(f"{entry.repo_id}: {filename} is not in the cache {hub_cache_dir()} and "
                                   f"HF_HUB_OFFLINE is set; download once online (unset HF_HUB_OFFLINE) or "
                                   f"import a local copy with 'medsegx weights import FILE'") from None
            raise WeightsError(f"{entry.repo_id}: cannot reach {endpoint or 'the Hugging Face Hub'} to download "
                               f"{filename}; check the connection or HF_ENDPOINT, or import a local copy with "
                               f"'medsegx weights import FILE'") from None
        except EntryNotFoundError:
            if required:
                raise WeightsError(f"{entry.repo_id}@{revision} has no {filename}; the repository layout changed, "
                                   f"download it by hand and use 'medsegx weights import FILE'") from None
            continue
        except Exception as exc:  # HTTP and file-system errors from the hub client
            raise WeightsError(f"{entry.repo_id}: downloading {filename} failed ({type(exc).__name__}: "
                               f"{one_line(exc)})") from exc
        folder = Path(local).parent
    report(progress, 1.0, f"{entry.repo_id} ready")
    return folder  # all files of one revision share one snapshot folder
