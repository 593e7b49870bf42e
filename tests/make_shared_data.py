"""Make the real-CT test case in ``../shared/data/totalseg_abdomen`` from TotalSegmentator's test files.

The tests that need a real CT use it when it is there and skip otherwise. To get it, download the two
reference files of the TotalSegmentator repository (Apache-2.0) and derive the rest::

    base=https://raw.githubusercontent.com/wasserth/TotalSegmentator/0e65a448/tests/reference_files
    mkdir -p ../shared/data/totalseg_abdomen && cd ../shared/data/totalseg_abdomen
    curl -LO $base/example_ct_sm.nii.gz && curl -LO $base/example_seg.nii.gz
    cd - && python tests/make_shared_data.py ../shared/data/totalseg_abdomen

It writes ``ct.nii.gz`` and ``totalseg_labels.nii.gz`` (the downloads, renamed), ``organs.nii.gz``
(liver 1, pancreas 3, kidney 5: freetumor's abdomen labels) and ``lung.nii.gz`` (the lobes as lung 1).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from freetumor_cli.core.io import load_volume, save_volume
from freetumor_cli.core.registry import ORGANS


def make(folder: Path) -> None:
    for download, name in (("example_ct_sm.nii.gz", "ct.nii.gz"), ("example_seg.nii.gz", "totalseg_labels.nii.gz")):
        if (folder / download).is_file():
            (folder / download).replace(folder / name)
        if not (folder / name).is_file():
            raise SystemExit(f"{folder / name} is missing: download {download} first (see this script's doc)")
    ct = load_volume(folder / "ct.nii.gz")
    totalseg = load_volume(folder / "totalseg_labels.nii.gz", what="labels").array
    organs = np.zeros(totalseg.shape, dtype=np.uint8)
    for name in ("liver", "pancreas", "kidney"):
        organs[np.isin(totalseg, ORGANS[name].totalseg_ids)] = ORGANS[name].value
    lung = np.isin(totalseg, ORGANS["lung"].totalseg_ids).astype(np.uint8)
    save_volume(organs, ct, folder / "organs.nii.gz", label=True)
    save_volume(lung, ct, folder / "lung.nii.gz", label=True)
    counts = {n: int((organs == ORGANS[n].value).sum()) for n in ("liver", "pancreas", "kidney")}
    print(f"wrote {folder}: organs {counts}, lung {int(lung.sum())} voxels")


if __name__ == "__main__":
    make(
        Path(
            sys.argv[1]
            if len(sys.argv) > 1
            else Path(__file__).resolve().parents[2] / "shared" / "data" / "totalseg_abdomen"
        )
    )
