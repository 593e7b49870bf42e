from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from freetumor_cli.core import registry
from freetumor_cli.core.errors import GeometryError, LabelError
from freetumor_cli.core.io import load_volume
from freetumor_cli.core.label_maps import (
    check_same_grid,
    choose_scheme,
    grid_problem,
    integer_problem,
    label_values,
    lookup_table,
    relabel,
)
from freetumor_cli.core.synthesize import organ_labels_in_region

from .conftest import volume


def test_task_remaps_match_design() -> None:
    assert registry.TASKS["pancreas"].remap == {3: 1, 4: 2}
    assert registry.TASKS["kidney"].remap == {5: 1, 6: 2}
    assert registry.TASKS["liver"].labels == {0: "background", 1: "liver", 2: "liver_tumor"}
    from freetumor_cli.core.datasets import DATASETS, canonical_dataset

    assert DATASETS["Dataset220_KiTS2023"].remap == {1: 5, 2: 6, 3: 5}
    assert DATASETS["Dataset007_Pancreas"].remap == {1: 3, 2: 4}
    assert canonical_dataset("lits") == "Dataset003_Liver" and canonical_dataset("unknown") is None


def test_totalsegmentator_map_covers_both_kidneys_and_lung_lobes() -> None:
    kidney = registry.foreign_to_region("totalsegmentator", registry.ORGANS["kidney"])
    assert kidney[2] == kidney[3] == 5 and kidney[5] == 1 and kidney[7] == 3 and 1 not in kidney  # spleen dropped
    lung = registry.foreign_to_region("totalsegmentator", registry.ORGANS["lung"])
    assert lung == {i: 1 for i in range(10, 15)}
    assert registry.foreign_to_region("binary", registry.ORGANS["pancreas"]) == {1: 3}


def test_registry_module_is_pure_data() -> None:
    import subprocess
    import sys

    code = "import sys; import freetumor_cli.core.registry; print('numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize(
    ("values", "organ", "scheme"),
    [
        ([0, 1], "pancreas", "binary"),
        ([0, 1], "liver", "binary"),
        ([0, 1, 2, 5, 7, 12], "kidney", "totalsegmentator"),  # beyond freetumor's values
        ([0, 1, 2], "lung", "freetumor"),  # TotalSegmentator's reading (spleen, right kidney) shows no lung
        ([0, 1, 3, 5], "lung", "totalsegmentator"),
    ],
)
def test_auto_reads_a_map_the_only_way_it_can_be_read(values: list[int], organ: str, scheme: str) -> None:
    target = registry.ORGANS[organ]
    assert choose_scheme(values, target.region, binary=True).scheme == scheme


@pytest.mark.parametrize(
    ("values", "organ"),
    [
        ([0, 1, 2, 3, 4, 5], "liver"),  # TotalSegmentator --roi_subset: spleen, kidneys, gallbladder, liver
        ([0, 1, 3, 5], "liver"),  # freetumor: liver, pancreas, kidney; TotalSegmentator: spleen, left kidney, liver
        ([0, 1, 3, 5], "pancreas"),
        ([0, 1, 3], "kidney"),  # freetumor: liver and pancreas, no kidney; TotalSegmentator: a left kidney
        ([0, 1, 2], "liver"),
    ],
)
def test_auto_refuses_a_map_that_reads_two_ways(values: list[int], organ: str) -> None:
    """A map whose values mean organs in both schemes is refused, naming the flag that settles it (read as
    freetumor's scheme, a --roi_subset map put liver tumors into the spleen), unless freetumor wrote it."""
    target = registry.ORGANS[organ]
    choice = choose_scheme(values, target.region, binary=True)
    assert choice.scheme is None
    assert "--label-scheme freetumor or --label-scheme totalsegmentator" in choice.reason, choice.reason
    assert choose_scheme(values, target.region, binary=True, freetumor_file=True).scheme == "freetumor"
    arr = np.zeros((6, 6, 6), np.uint8)
    arr.flat[: len(values)] = values
    with pytest.raises(LabelError, match="mean different organs in freetumor's scheme and in TotalSegmentator's"):
        organ_labels_in_region(volume(arr), target, "auto")


def test_a_label_map_freetumor_wrote_is_read_in_its_scheme(tmp_path: Path) -> None:
    from freetumor_cli.core.io import save_volume

    arr = np.zeros((6, 6, 6), np.uint8)
    arr.flat[:4] = [0, 1, 3, 5]
    path = save_volume(arr, volume(arr), tmp_path / "labels.nii.gz", label=True)
    region, scheme = organ_labels_in_region(load_volume(path), registry.ORGANS["liver"], "auto")
    assert scheme == "freetumor"
    np.testing.assert_array_equal(region, arr)


def test_totalsegmentator_labels_map_onto_the_shared_organ_file(totalseg_case: Path) -> None:
    ts = load_volume(totalseg_case / "totalseg_labels.nii.gz")
    organs = load_volume(totalseg_case / "organs.nii.gz")
    for name in ("liver", "pancreas", "kidney"):
        region, scheme = organ_labels_in_region(ts, registry.ORGANS[name], "auto")
        assert scheme == "totalsegmentator"
        np.testing.assert_array_equal(region, organs.array)
        same, scheme = organ_labels_in_region(organs, registry.ORGANS[name], "freetumor")
        np.testing.assert_array_equal(same, organs.array)
    lung, scheme = organ_labels_in_region(ts, registry.ORGANS["lung"], "auto")
    np.testing.assert_array_equal(lung, load_volume(totalseg_case / "lung.nii.gz").array)


def test_values_outside_scheme_and_absent_organ_are_label_errors() -> None:
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[0, 0, 0] = 1
    arr[1, 1, 1] = 3
    with pytest.raises(LabelError, match="no kidney"):
        organ_labels_in_region(volume(arr), registry.ORGANS["kidney"], "freetumor")
    arr[2, 2, 2] = 9
    with pytest.raises(LabelError, match="outside freetumor"):
        organ_labels_in_region(volume(arr), registry.ORGANS["liver"], "freetumor")
    with pytest.raises(LabelError, match="not a binary mask"):
        organ_labels_in_region(volume(arr), registry.ORGANS["liver"], "binary")
    with pytest.raises(LabelError, match="non-integer"):
        organ_labels_in_region(volume(arr + 0.5), registry.ORGANS["liver"], "auto")


def test_mapped_labels_keep_their_voxels_whatever_the_memory_layout() -> None:
    # A TotalSegmentator map held in memory as a transposed view: neither C- nor Fortran-ordered.
    arr = np.zeros((3, 4, 5), np.uint8)
    arr[1, 2, 3] = 5  # liver
    arr[0, 1, 4] = 2  # kidney_right
    view = np.ascontiguousarray(arr.transpose(1, 0, 2)).transpose(1, 0, 2)
    assert not view.flags.c_contiguous and not view.flags.f_contiguous
    region, _ = organ_labels_in_region(volume(view), registry.ORGANS["liver"], "totalsegmentator")
    assert region[1, 2, 3] == registry.ORGANS["liver"].value
    assert region[0, 1, 4] == registry.ORGANS["kidney"].value
    assert np.count_nonzero(region) == 2


def test_label_map_checks_return_their_reason() -> None:
    assert integer_problem(np.array([0, 1, 2], np.uint8)) is None
    assert integer_problem(np.array([0.0, 2.0])) is None
    assert integer_problem(np.array([0.0, np.nan])) == "holds non-integer values"
    assert integer_problem(np.array([0.5])) == "holds non-integer values"
    assert label_values(np.array([[3, -2], [3, 0]])).tolist() == [-2, 0, 3]
    assert label_values(np.array([0, 70000, 5])).tolist() == [0, 5, 70000]
    assert label_values(np.zeros((0, 2), np.uint8)).tolist() == []
    table = lookup_table({1: 2, 300: 1}, 4)
    assert table.dtype == np.uint8 and table.tolist() == [0, 2, 0, 0]
    fortran = np.asfortranarray(np.array([[0, 1], [5, 1]], np.int16))
    mapped = relabel(fortran, {1: 7})
    assert mapped.flags.f_contiguous and mapped.tolist() == [[0, 7], [0, 7]]
    a = volume(np.zeros((2, 3, 4)))
    assert grid_problem(a, volume(np.zeros((2, 3, 4)))) is None
    assert grid_problem(a, volume(np.zeros((2, 3, 5)))) == "have different shapes ((2, 3, 4) and (2, 3, 5))"
    with pytest.raises(GeometryError, match=r"image \(in memory\) and labels \(in memory\) have different shapes"):
        check_same_grid(a, volume(np.zeros((2, 3, 5))))
