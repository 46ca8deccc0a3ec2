"""A small abdominal CT in Slicer's Sample Data module, for the self-test and the tutorial.

Nothing is copied into the repository: Slicer's ``SampleData`` downloads the file on first use into its cache
and checks its SHA256 (a file that does not match is refused). The CT is the 3 mm abdominal CT of
TotalSegmentator's test reference files (Apache-2.0), the same patient the project's tests use
(``../shared/data/ct/totalseg_ct.nii.gz``; a test checks that copy against the checksum registered here).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .resources import resource_path


@dataclass(frozen=True)
class SampleSource:
    category: str
    sample_name: str
    node_name: str
    file_name: str
    uri: str
    sha256: str
    thumbnail: Optional[str]   # a resource path (the module's icon)

    @property
    def checksum(self) -> str:
        return f"SHA256:{self.sha256}"


ABDOMINAL_CT = SampleSource(
    category="MedSegX",
    sample_name="MedSegXAbdominalCT",
    node_name="MedSegXAbdominalCT",
    file_name="MedSegXAbdominalCT.nii.gz",
    uri="https://github.com/wasserth/TotalSegmentator/raw/master/tests/reference_files/example_ct_sm.nii.gz",
    sha256="dbd3ae6d614d1d7ef3a46925c30c70038ed52da6b37fdd6afdc7b9b71387e3e1",
    thumbnail="Icons/MedSegXSlicer.png",
)

SOURCES = (ABDOMINAL_CT,)


def register(sample_data_module) -> None:
    """Register the sources with Slicer's ``SampleData`` module (called once Slicer has started)."""
    for source in SOURCES:
        sample_data_module.SampleDataLogic.registerCustomSampleDataSource(
            category=source.category, sampleName=source.sample_name,
            thumbnailFileName=resource_path(source.thumbnail) if source.thumbnail else None,
            uris=source.uri, fileNames=source.file_name, nodeNames=source.node_name,
            checksums=source.checksum, loadFileType="VolumeFile")
