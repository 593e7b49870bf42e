"""The source-dataset registry: folder names, aliases, roles, label conventions and file naming. Pure data.

A data root holds one folder per source dataset (DESIGN §4). ``fetch-labels`` uses this registry to
recognise the Hugging Face repository's top-level folders; ``prepare`` uses it to scan, pair and remap.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from freetumor_cli.core import PathLike
from freetumor_cli.core.registry import REGIONS, RegionName

Role = Literal["tumor", "organ"]
Naming = Literal["nnunet", "btcv", "covid"]


@dataclass(frozen=True)
class DatasetSpec:
    """One source dataset.

    Attributes:
        name: the folder name in the data root.
        region: the registry region whose label space its labels are in (after ``remap``).
        role: ``tumor`` when its labels hold real tumors, ``organ`` when organ-only.
        remap: source label value -> region value; None when the labels are already in the region space.
        naming: how images and labels are named (nnU-Net, BTCV's img/label, Covid19_20's _ct/_seg).
        aliases: other folder names meaning the same dataset (case-insensitive).
        layout_remaps: sub-folder name -> the remap of labels found under it (None: already in the
            region space), for copies of the dataset whose labels were redone (the authors' Covid19_20
            ``Train_lungmask/``: 1 lung, 2 lesion).
    """

    name: str
    region: RegionName
    role: Role
    remap: Mapping[int, int] | None = None
    naming: Naming = "nnunet"
    aliases: tuple[str, ...] = field(default_factory=tuple)
    layout_remaps: Mapping[str, Mapping[int, int] | None] = field(default_factory=dict)

    def remap_for(self, label: PathLike) -> Mapping[int, int] | None:
        """The remap of a label file: its layout's when it lies under one of ``layout_remaps``' folders."""
        for folder, remap in self.layout_remaps.items():
            if folder in Path(label).parts:
                return remap
        return self.remap


def _organ(name: str, *aliases: str, region: str = "abdomen") -> DatasetSpec:
    return DatasetSpec(name, region, "organ", None, "nnunet", aliases)


DATASETS: Mapping[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec("Dataset003_Liver", "abdomen", "tumor", {1: 1, 2: 2}, aliases=("LiTS", "Task03_Liver", "liver")),
        DatasetSpec(
            "Dataset007_Pancreas",
            "abdomen",
            "tumor",
            {1: 3, 2: 4},
            aliases=("Task07_Pancreas", "MSD_Pancreas", "pancreas"),
        ),
        DatasetSpec(
            "Dataset220_KiTS2023", "abdomen", "tumor", {1: 5, 2: 6, 3: 5}, aliases=("KiTS23", "KiTS2023", "kits")
        ),
        DatasetSpec(
            "Covid19_20",
            "chest",
            "tumor",
            {1: 2},
            "covid",
            aliases=("COVID-19-20", "covid19"),
            layout_remaps={"Train_lungmask": None},
        ),
        DatasetSpec("BTCV", "abdomen", "organ", None, "btcv", aliases=("btcv",)),
        _organ("Flare22", "FLARE22"),
        _organ("Flare23", "FLARE23"),
        _organ("Amos2022", "AMOS", "AMOS22"),
        _organ("WORD"),
        _organ("PANORAMA"),
        _organ("AbdomenCT-1K", "AbdomenCT1K"),
        _organ("CHAOS"),
        _organ("Dataset082_TCIA_Pancreas-CT", "TCIA_Pancreas-CT", "Pancreas-CT"),
        _organ("Dataset009_Spleen", "Task09_Spleen"),
        _organ("Dataset010_Colon", "Task10_Colon"),
        _organ("Dataset224_AbdomenAtlas1.0", "AbdomenAtlas1.0", "AbdomenAtlas"),
        _organ("MELA"),
        _organ("3Dircadb1_convert", "3Dircadb1", "3Dircadb"),
        _organ("TCIAcovid19", region="chest"),
        _organ("stoic21", "STOIC2021", region="chest"),
        _organ("LIDC", "LIDC-IDRI", region="chest"),
    )
}

_BY_ALIAS: Mapping[str, str] = {
    alias.lower(): spec.name for spec in DATASETS.values() for alias in (spec.name, *spec.aliases)
}


def canonical_dataset(folder: str) -> str | None:
    """The registry name of a dataset folder (by name or alias, case-insensitive), or None."""
    return _BY_ALIAS.get(folder.lower())


def _validate() -> None:
    for spec in DATASETS.values():
        labels = REGIONS[spec.region].labels
        if spec.remap is not None and not set(spec.remap.values()) <= set(labels):
            raise AssertionError(f"dataset {spec.name}: its remap leaves the {spec.region} label space")


_validate()
