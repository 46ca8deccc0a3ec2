"""Downloading published weights through huggingface_hub into our cache.

The cache lives under ``$MEDSEGX_HOME`` (default ``~/.medsegx``): ``hub/`` holds huggingface_hub's own cache
(so interrupted downloads resume and files are shared), ``weights/`` holds folders made by
``medsegx weights import``. ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` are read when a download starts (not only
when huggingface_hub is first imported), so mirrors and offline mode behave as users expect.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

from ..errors import MedSegXError, WeightsError
from ..progress import CancelToken, ProgressCallback, check, report
from .checkpoints import one_line


@dataclass(frozen=True)
class PublishedWeights:
    repo_id: str
    required: Tuple[str, ...]          # the download fails without these
    optional: Tuple[str, ...]          # fetched when the repository has them
    description: str
    licence: str = ""                  # shown to the user before a download starts
    home_page: str = ""


PUBLISHED = {
    "segvol": PublishedWeights(
        repo_id="BAAI/SegVol",
        required=("pytorch_model.bin",),
        # The tokenizer ships with the weights; either tokenizer.json or vocab.json + merges.txt is enough.
        optional=("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                  "special_tokens_map.json", "config.json"),
        description="SegVol (BAAI), official weights, 724 MB, Apache-2.0",
        licence="Apache-2.0",
        home_page="https://huggingface.co/BAAI/SegVol",
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
             cancel: Optional[CancelToken] = None, disk_factor: float = 1.0) -> Path:
    """Fetch published weights ``name`` (see ``PUBLISHED``) and return the local folder holding them.

    Online, the files' sizes are read first and the download is refused when the disk holding the cache lacks
    ``disk_factor`` times their size (a caller converting the weights afterwards asks for more). Progress reports
    bytes and rate; ``cancel`` stops mid-file. Every file whose server ETag is a sha256 (large files on the Hub)
    is verified after the download. A failed, refused or cancelled download removes what it added to the cache.
    """
    if name not in PUBLISHED:
        raise WeightsError(f"unknown published weights {name!r}; known: {', '.join(sorted(PUBLISHED))}")
    cache = hub_cache_dir()
    before = _cache_contents(cache)
    try:
        return _download(PUBLISHED[name], revision, progress, cancel, disk_factor)
    except BaseException:
        _remove_added(cache, before)
        raise


def _download(entry: PublishedWeights, revision: str, progress: Optional[ProgressCallback],
              cancel: Optional[CancelToken], disk_factor: float) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    offline = _offline()
    endpoint = os.environ.get("HF_ENDPOINT") or None
    folder: Optional[Path] = None
    files = [(f, True) for f in entry.required] + [(f, False) for f in entry.optional]
    sizes, etags = ({}, {}) if offline else _remote_sizes(entry, files, revision, endpoint)
    if sizes:
        check_free_space(hub_cache_dir(), int(sum(sizes.values()) * disk_factor), f"downloading {entry.repo_id}")
    meter = _ByteMeter(progress, cancel, sum(sizes.values()))
    for index, (filename, required) in enumerate(files):
        check(cancel)
        if not sizes:
            report(progress, index / len(files), f"{entry.repo_id}: {filename}")
        meter.start(filename, sizes.get(filename, 0))
        try:
            local = hf_hub_download(entry.repo_id, filename, revision=revision, cache_dir=str(hub_cache_dir()),
                                    endpoint=endpoint, local_files_only=offline, tqdm_class=meter.bar)
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
        except MedSegXError:   # Cancelled (from the byte meter) or our own errors: as they are
            raise
        except Exception as exc:  # HTTP and file-system errors from the hub client
            raise WeightsError(f"{entry.repo_id}: downloading {filename} failed ({type(exc).__name__}: "
                               f"{one_line(exc)})") from exc
        meter.finish()
        if not offline:
            _verify_sha256(Path(local), etags.get(filename), entry.repo_id)
        folder = Path(local).parent
    report(progress, 1.0, f"{entry.repo_id} ready")
    return folder  # all files of one revision share one snapshot folder


# ---- download helpers: sizes, free space, byte progress, verification, clean-up ------------------------------
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _remote_sizes(entry: PublishedWeights, files, revision: str, endpoint: Optional[str]) -> Tuple[dict, dict]:
    """(filename -> size in bytes, filename -> ETag) for the files the server has; ({}, {}) when unreachable
    (the download then reports the problem with its own message)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError

    sizes, etags = {}, {}
    for filename, _required in files:
        try:
            meta = get_hf_file_metadata(hf_hub_url(entry.repo_id, filename, revision=revision, endpoint=endpoint))
        except EntryNotFoundError:
            continue   # reported (required) or skipped (optional) by the download itself
        except Exception:
            return {}, {}
        sizes[filename] = int(meta.size or 0)
        etags[filename] = (meta.etag or "").strip('"').lower()
    return sizes, etags


def check_free_space(folder: Path, needed_bytes: int, what: str) -> None:
    """WeightsError when the disk holding ``folder`` (or its nearest existing parent) has less free space."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise WeightsError(f"{what} needs {needed_bytes / 1e6:.0f} MB but only {free / 1e6:.0f} MB are free on the "
                           f"disk holding {folder}; free some space or set MEDSEGX_HOME to a folder on a larger disk")


class _ByteMeter:
    """Bytes, rate and cancellation for huggingface_hub's download loop (its ``tqdm_class`` hook)."""

    def __init__(self, progress: Optional[ProgressCallback], cancel: Optional[CancelToken], total: int):
        self.progress, self.cancel, self.total = progress, cancel, total
        self.done_before = 0
        self.file, self.file_size, self.file_done, self.started = "", 0, 0, time.monotonic()

    def start(self, filename: str, size: int) -> None:
        self.file, self.file_size, self.file_done, self.started = filename, size, 0, time.monotonic()

    def finish(self) -> None:
        self.done_before += self.file_size

    def update(self, n: int) -> None:
        check(self.cancel)   # raised inside huggingface_hub's loop: it removes its temporary file
        self.file_done += n
        if self.progress is None:
            return
        rate = self.file_done / max(time.monotonic() - self.started, 1e-6)
        size = f" of {self.file_size / 1e6:.1f}" if self.file_size else ""
        fraction = (self.done_before + self.file_done) / self.total if self.total else 0.0
        report(self.progress, fraction, f"{self.file}: {self.file_done / 1e6:.1f}{size} MB at {rate / 1e6:.1f} MB/s")

    @property
    def bar(self) -> Callable:
        meter = self

        class Bar:
            def __init__(self, **_kwargs):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def update(self, n=1):
                meter.update(n)

            def close(self):
                pass

        return Bar


def _verify_sha256(local: Path, etag: Optional[str], repo_id: str) -> None:
    """The Hub's ETag of a large (LFS) file is its sha256: check the bytes on disk against it."""
    if not etag or not _SHA256.match(etag):
        return
    from .store import sha256_of

    blob = local.resolve()
    actual = sha256_of(blob)
    if actual != etag:
        for path in (local, blob):
            path.unlink(missing_ok=True)
        raise WeightsError(f"{repo_id}: {local.name} failed its checksum (sha256 {actual[:12]}... instead of "
                           f"{etag[:12]}...); the file was removed: download again, or import a copy you trust")


def _cache_contents(cache: Path) -> set:
    return set(cache.rglob("*")) | {cache} if cache.exists() else set()


def _remove_added(cache: Path, before: set) -> None:
    """Remove files and folders that appeared under ``cache`` since ``before`` (deepest first)."""
    if not cache.exists():
        return
    for path in sorted(_cache_contents(cache) - before, key=lambda p: len(p.parts), reverse=True):
        try:
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            else:
                path.unlink()
        except OSError:
            pass   # a folder still holding older files stays
