"""The case store: crops equal to the raw path's, stale and damaged cases never read, parts, resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("monai")
torch = pytest.importorskip("torch")

from freetumor_cli.core.parallel import select_part  # noqa: E402
from freetumor_cli.core.prepare import PrepareConfig, build_case_store, prepare, read_manifest  # noqa: E402
from freetumor_cli.core.preprocess import PreprocessConfig, Preprocessing  # noqa: E402
from freetumor_cli.core.seg_data import CropDataset, Pipeline, crop_transforms, sample_crop_origins  # noqa: E402
from freetumor_cli.core.store import CaseSource, CaseStore, StoreMiss, open_store  # noqa: E402

from .conftest import write_phantom_root  # noqa: E402

PP = Preprocessing.for_region("abdomen", spacing_mm=(4.0, 4.0, 4.0))
CONFIG = PrepareConfig(folds=2, seed=1, preprocessing=PreprocessConfig(abdomen_spacing_mm=(4.0, 4.0, 4.0)))


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    root = write_phantom_root(tmp_path / "root", labelled=2, organ_only=2)
    out = tmp_path / "prepared"
    prepare(root, out, CONFIG)
    return out


def entries(prepared: Path) -> list[dict[str, object]]:
    return read_manifest(prepared)


def test_a_crop_from_the_store_equals_the_raw_path(prepared: Path) -> None:
    store = open_store(prepared, PP)
    assert store is not None
    pipeline = Pipeline(task="liver", preprocessing=PP, roi=(32, 32, 32), crops_per_volume=3, synthesize=True)
    cases = [e for e in entries(prepared) if e["dataset"] == "BTCV"] + [
        e for e in entries(prepared) if e["dataset"] != "BTCV"
    ]
    stored = CropDataset(cases, CaseSource(PP, store), pipeline, crop_transforms(pipeline), seed=3)
    raw = CropDataset(cases, CaseSource(PP, None), pipeline, crop_transforms(pipeline), seed=3)
    synthesized = 0
    for index in range(len(cases)):
        for a, b in zip(stored[index], raw[index], strict=True):
            assert bool(a["from_store"]) and not bool(b["from_store"])
            torch.testing.assert_close(a["label"], b["label"], rtol=0, atol=0)
            torch.testing.assert_close(a["synth_mask"], b["synth_mask"], rtol=0, atol=0)
            torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=1e-3)  # float16 on disk: 2^-11
            synthesized += int(a["synth_mask"].any())
    assert synthesized > 0  # the crops held organs, and tumors went into them alike


def test_crop_sampling_follows_the_ratio_and_stays_inside() -> None:
    locations = {0: np.array([[1, 1, 1], [30, 30, 30]], np.int32), 1: np.array([[10, 10, 10]], np.int32)}
    rng = np.random.default_rng(0)
    origins = sample_crop_origins(
        (40, 40, 20), (16, 16, 32), locations, {0: 2, 1: 1}, {1}, pos=1, neg=0, num=20, rng=rng
    )
    for origin in origins:
        assert origin.tolist() == [2, 2, -6]  # centred on the organ voxel, padded along the short axis
    origins = sample_crop_origins(
        (40, 40, 20), (16, 16, 16), locations, {0: 2, 1: 1}, {1}, pos=0, neg=1, num=50, rng=rng
    )
    assert {tuple(o) for o in origins} == {(0, 0, 0), (22, 22, 4)}  # background centres, moved inside


def test_stale_and_damaged_cases_are_detected_and_rebuilt(prepared: Path) -> None:
    store = open_store(prepared, PP)
    assert store is not None
    records = entries(prepared)
    stale, damaged, flipped = records[0], records[1], records[2]
    # An edited label file: the stored case no longer matches its source.
    label = Path(str(stale["label"]))
    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 10**9))
    with pytest.raises(StoreMiss, match="source files changed"):
        store.read(stale)
    assert CaseSource(PP, store).load(stale).origin == "raw"  # never read from the store
    # A truncated array file.
    image = store.case_folder(damaged) / "image.b2nd"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    with pytest.raises(StoreMiss, match="damaged"):
        store.read(damaged)
    assert CaseSource(PP, store).load(damaged).origin == "raw"
    # A flipped byte of the same size: only the checksum sees it.
    path = store.case_folder(flipped) / "label.b2nd"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert "checksum" in (store.verify(flipped) or "")
    _, result = build_case_store(prepared, CONFIG)
    assert (result.rebuilt, result.reused, result.built) == (3, len(records) - 3, 0)
    assert all(store.verify(r) is None for r in records)
    assert store.read(stale).origin == "store"


def test_parts_cover_the_list_once_and_an_interrupted_build_resumes(prepared: Path) -> None:
    items = list(range(23))
    parts = [select_part(items, 4, i) for i in range(4)]
    assert sorted(x for p in parts for x in p) == items
    config = PrepareConfig(preprocessing=PreprocessConfig(abdomen_spacing_mm=(6.0, 6.0, 6.0)))

    class Killed(Exception):
        pass

    built: list[str] = []

    def kill_after_two(name: str, what: str) -> None:
        built.append(name)
        if len(built) == 2:
            raise Killed

    with pytest.raises(Killed):
        build_case_store(prepared, config, on_case_done=kill_after_two)
    done = [build_case_store(prepared, config, num_parts=2, part_id=i)[1] for i in range(2)]
    assert sum(r.reused for r in done) == 2 and sum(r.built for r in done) == len(entries(prepared)) - 2
    store = CaseStore(prepared / "store", config.preprocessing.for_region("abdomen"))
    assert all(store.verify(r) is None for r in entries(prepared))
    assert not list(store.folder.rglob(".tmp-*"))


def test_a_store_elsewhere_is_found_through_store_json(tmp_path: Path) -> None:
    root = write_phantom_root(tmp_path / "root", labelled=1, organ_only=1)
    out, elsewhere = tmp_path / "prepared", tmp_path / "shared" / "store"
    result = prepare(root, out, CONFIG, store_dir=elsewhere)
    assert result.store is not None and result.store.built == 2 and not (out / "store").exists()
    assert json.loads((out / "store.json").read_text())["path"] == str(elsewhere.resolve())
    store = open_store(out, PP)
    assert store is not None and store.folder.parent == elsewhere.resolve()
