"""The training data path under faults: thousands of crops from a 1.5 mm phantom, a sample that raises,
a case that cannot be read, a damaged case store."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("monai")
torch = pytest.importorskip("torch")

from freetumor_cli.core.errors import InputError  # noqa: E402
from freetumor_cli.core.phantom import make_phantom  # noqa: E402
from freetumor_cli.core.prepare import PrepareConfig, prepare, read_manifest  # noqa: E402
from freetumor_cli.core.preprocess import PreprocessConfig, Preprocessing  # noqa: E402
from freetumor_cli.core.seg_data import (  # noqa: E402
    MAX_REPLACEMENTS,
    CropDataset,
    Pipeline,
    SampleError,
    crop_transforms,
)
from freetumor_cli.core.store import CaseData, CaseSource, class_locations, open_store  # noqa: E402
from freetumor_cli.core.training import collate_crops  # noqa: E402

from .conftest import write_phantom_root  # noqa: E402

PP15 = Preprocessing.for_region("abdomen", spacing_mm=(1.5, 1.5, 1.5))


class MemorySource:
    """A case source over in-memory cases; ``broken`` names cases whose load raises."""

    def __init__(self, cases: Mapping[str, CaseData], broken: frozenset[str] = frozenset()) -> None:
        self.cases, self.broken = dict(cases), broken
        self.preprocessing = PP15

    def load(self, entry: Mapping[str, Any]) -> CaseData:
        if entry["case"] in self.broken:
            raise InputError(f"cannot read case {entry['case']} (truncated gzip stream)")
        return self.cases[str(entry["case"])]

    load_raw = load


@pytest.fixture(scope="module")
def phantom_cases() -> dict[str, CaseData]:
    """Two phantom abdomens on the method's 1.5 mm grid, windowed as the store holds them."""
    cases = {}
    for seed in (0, 1):
        p = make_phantom((120, 104, 72), (1.5, 1.5, 1.5), seed=seed)
        image = np.clip((p.ct.array.astype(np.float32) + 175) / 425, 0, 1)
        label = p.labels.array.astype(np.uint8)
        locations, counts = class_locations(label, image, key=f"case{seed}")
        cases[f"case{seed}"] = CaseData(image, label, p.ct.affine, locations, counts, p.ct.affine, label.shape)
    return cases


def entries(n: int) -> list[dict[str, Any]]:
    return [{"dataset": "Phantom", "case": f"case{i % 2}", "image": "-", "label": "-"} for i in range(n)]


def test_thousands_of_training_crops_at_the_method_grid(phantom_cases: dict[str, CaseData]) -> None:
    """2,400 crops of 32³ at 1.5 mm (the 5 mm placement grid is then 3 voxels: slivers fall between its
    samples), every organ of the abdomen, online rule-based synthesis and augmentation: none raises,
    and organ parts cut by the crop's faces get tumors too."""
    pipeline = Pipeline(task="all", preprocessing=PP15, roi=(32, 32, 32), crops_per_volume=4, synthesize=True)
    dataset = CropDataset(entries(600), MemorySource(phantom_cases), pipeline, crop_transforms(pipeline), seed=5)
    tumors = at_face = 0
    for index in range(len(dataset)):
        crops = dataset[index]
        assert crops[0]["incidents"] == [], crops[0]["incidents"]
        for crop in crops:
            mask = crop["synth_mask"][0].numpy()
            if not mask.any():
                continue
            tumors += 1
            label = crop["label"][0].numpy()
            assert set(np.unique(label[mask]).tolist()) <= {2, 4, 6}
            faces = [mask[0], mask[-1], mask[:, 0], mask[:, -1], mask[:, :, 0], mask[:, :, -1]]
            at_face += any(f.any() for f in faces)
    assert tumors > 500 and at_face > 20, (tumors, at_face)


def test_arms_that_differ_in_intensity_insert_the_same_tumor_into_every_crop(
    phantom_cases: dict[str, CaseData],
) -> None:
    """The paired experiment's arms: rules, rules of another contrast and the generator's geometry put
    the same tumor into each crop of a sample, not only into the first (crop by crop, 40 samples × 4)."""
    from dataclasses import replace

    from freetumor_cli.core.synthesis_config import SynthesisConfig

    def masks(pipeline: Pipeline, rules: SynthesisConfig | None = None) -> list[np.ndarray]:
        dataset = CropDataset(entries(40), MemorySource(phantom_cases), pipeline, crop_transforms(pipeline, rules), 3)
        return [crop["synth_mask"][0].numpy() for i in range(len(dataset)) for crop in dataset[i]]

    common = {"task": "liver", "preprocessing": PP15, "roi": (32, 32, 32), "crops_per_volume": 4}
    rules = masks(Pipeline(**common, synthesize=True))  # type: ignore[arg-type]
    stronger = masks(
        Pipeline(**common, synthesize=True),  # type: ignore[arg-type]
        replace(SynthesisConfig(), abdomen_hu_change=(150.0, 250.0)),
    )
    geometry = masks(Pipeline(**common, geometry_only=True))  # type: ignore[arg-type]
    unaugmented = masks(Pipeline(**common, synthesize=True, augment=False))  # type: ignore[arg-type]
    assert len(rules) == 160 and sum(m.any() for m in rules) > 40
    for k, (a, b, c) in enumerate(zip(rules, stronger, geometry, strict=True)):
        assert np.array_equal(a, b) and np.array_equal(a, c), f"crop {k} (crop {k % 4} of its sample) differs"
    # The augmentation has a stream of its own: without it, the same tumors, only not flipped or rotated.
    assert [int(m.sum()) for m in unaugmented] == [int(m.sum()) for m in rules]
    # No synthesis (synth_prob 0) draws no tumor and leaves the crops as they are.
    none = masks(Pipeline(**common, synthesize=True, synth_prob=0.0))  # type: ignore[arg-type]
    assert not any(m.any() for m in none)


def test_a_sample_that_raises_is_replaced_and_reported(phantom_cases: dict[str, CaseData]) -> None:
    pipeline = Pipeline(task="liver", preprocessing=PP15, roi=(32, 32, 32), crops_per_volume=2, synthesize=True)
    source = MemorySource(phantom_cases, broken=frozenset({"case1"}))
    dataset = CropDataset(entries(4), source, pipeline, crop_transforms(pipeline), seed=1)
    dataset.set_epoch(3)
    crops = dataset[1]  # case1 cannot be read: the next case (case0) stands in, with a seed of its own
    assert len(crops) == 2 and all(int(c["sample_index"]) == 1 for c in crops)
    (incident,) = crops[0]["incidents"]
    assert incident["kind"] == "bad_sample" and incident["sample"] == 1 and incident["epoch"] == 3
    assert incident["case"] == "Phantom/case1" and "truncated gzip" in incident["error"]
    assert isinstance(incident["seed"], int)
    again = dataset[1]  # reproducible: the same replacement, the same crops
    torch.testing.assert_close(again[0]["image"], crops[0]["image"], rtol=0, atol=0)
    batch = collate_crops([dataset[0], crops])
    assert [i["sample"] for i in batch["incidents"]] == [1] and batch["image"].shape[0] == 4


def test_a_bug_in_synthesis_is_replaced_not_fatal(
    phantom_cases: dict[str, CaseData], monkeypatch: pytest.MonkeyPatch
) -> None:
    from freetumor_cli.core import transforms

    calls = {"n": 0}
    real = transforms.synthesize_in_crop

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ValueError("zero-size array to reduction operation minimum which has no identity")
        return real(*args, **kwargs)

    monkeypatch.setattr(transforms, "synthesize_in_crop", flaky)
    pipeline = Pipeline(task="liver", preprocessing=PP15, roi=(32, 32, 32), crops_per_volume=2, synthesize=True)
    dataset = CropDataset(entries(2), MemorySource(phantom_cases), pipeline, crop_transforms(pipeline), seed=1)
    crops = dataset[0]
    assert [i["kind"] for i in crops[0]["incidents"]] == ["bad_sample"]
    assert "zero-size array" in crops[0]["incidents"][0]["error"]


def test_a_sample_whose_replacements_all_fail_stops_with_one_line(phantom_cases: dict[str, CaseData]) -> None:
    pipeline = Pipeline(task="liver", preprocessing=PP15, roi=(32, 32, 32), crops_per_volume=1)
    source = MemorySource(phantom_cases, broken=frozenset({"case0", "case1"}))
    dataset = CropDataset(entries(3), source, pipeline, crop_transforms(pipeline), seed=1)
    with pytest.raises(SampleError, match=f"sample 2 and {MAX_REPLACEMENTS} replacements failed") as info:
        dataset[2]
    assert "\n" not in str(info.value) and "Phantom/case0" in str(info.value)


@pytest.fixture
def stored(tmp_path: Path) -> Path:
    root = write_phantom_root(tmp_path / "root", labelled=1, organ_only=1)
    out = tmp_path / "prepared"
    prepare(root, out, PrepareConfig(folds=2, seed=1, preprocessing=PreprocessConfig(abdomen_spacing_mm=(4.0,) * 3)))
    return out


def garble(path: Path, *, offset_fraction: float = 0.5, size: int = 4096, seed: int = 0) -> None:
    """Overwrite ``size`` bytes in the middle of a file with random bytes (its size stays the same)."""
    data = bytearray(path.read_bytes())
    start = int(len(data) * offset_fraction)
    data[start : start + size] = np.random.default_rng(seed).bytes(min(size, len(data) - start))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["image.b2nd", "label.b2nd"])
def test_a_damaged_store_chunk_is_read_from_the_raw_files(stored: Path, name: str) -> None:
    pp = Preprocessing.for_region("abdomen", spacing_mm=(4.0, 4.0, 4.0))
    store = open_store(stored, pp)
    assert store is not None
    records = read_manifest(stored)
    pipeline = Pipeline(task="liver", preprocessing=pp, roi=(32, 32, 32), crops_per_volume=4, augment=False)
    raw = CropDataset(records, CaseSource(pp, None), pipeline, crop_transforms(pipeline), seed=2)
    expected = [raw[i] for i in range(len(records))]
    for k, record in enumerate(records):
        garble(store.case_folder(record) / name, seed=k)
    damaged = CropDataset(records, CaseSource(pp, store), pipeline, crop_transforms(pipeline), seed=2)
    noticed = 0
    for i in range(len(records)):
        crops = damaged[i]
        noticed += sum(x["kind"] == "store_damaged" for x in crops[0]["incidents"])
        for a, b in zip(crops, expected[i], strict=True):
            torch.testing.assert_close(a["label"], b["label"], rtol=0, atol=0)
            torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=1e-3)
    assert noticed >= 1  # at least one crop touched a garbled chunk, and said so


def test_a_training_run_survives_a_case_it_cannot_read(stored: Path, tmp_path: Path) -> None:
    """Its stored copy garbled and its raw file truncated: the run replaces its samples, logs each with
    its case and seed in run.log, counts them in metrics.jsonl, and finishes."""
    import gzip
    import json

    from freetumor_cli.core.train_seg import TrainSegConfig, train_segmentation

    pp = Preprocessing.for_region("abdomen", spacing_mm=(4.0, 4.0, 4.0))
    store = open_store(stored, pp)
    assert store is not None
    bad = next(r for r in read_manifest(stored) if r["role"] == "tumor-labelled")
    garble(store.case_folder(bad) / "image.b2nd")
    image = Path(str(bad["image"]))
    image.write_bytes(gzip.compress(image.read_bytes()[:4000])[:2000])
    config = TrainSegConfig(
        task="liver", model="unet-tiny", roi=(32, 32, 32), spacing_mm=(4.0, 4.0, 4.0), workers=0, max_steps=4,
        labelled_repeats=2, mode="freesyn",
    )  # fmt: skip
    summary = train_segmentation(stored, tmp_path / "run", config)
    assert summary.steps == 4
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    counts = [r["bad_samples"] for r in rows if "loss" in r]
    assert counts == sorted(counts) and counts[-1] >= 1  # cumulative, and the bad case was drawn
    log = (tmp_path / "run" / "run.log").read_text()
    assert log.count(f"case {bad['dataset']}/{bad['case']} (seed ") == counts[-1]
    assert "drawn again from the next case" in log


def test_every_read_of_a_damaged_store_case_falls_back_to_the_raw_files(stored: Path, tmp_path: Path) -> None:
    """Validation and prediction read whole stored cases: a garbled one is read raw, with the same result."""
    import nibabel as nib

    from freetumor_cli.core.checkpoints import save_checkpoint
    from freetumor_cli.core.models import ModelConfig, build_model
    from freetumor_cli.core.predict import predict_cases
    from freetumor_cli.core.seg_data import case_for_validation

    pp = Preprocessing.for_region("abdomen", spacing_mm=(4.0, 4.0, 4.0))
    store = open_store(stored, pp)
    assert store is not None
    records = read_manifest(stored)
    raw = [case_for_validation(CaseSource(pp, None), r, "liver") for r in records]
    torch.manual_seed(0)
    config = ModelConfig(name="unet-tiny", out_channels=3, roi=(32, 32, 32), task="liver",
                         preprocessing=Preprocessing.for_region("abdomen", spacing_mm=(4.0, 4.0, 4.0)))  # fmt: skip
    checkpoint = save_checkpoint(build_model(config), config, tmp_path / "ckpt")
    expected, _, _ = predict_cases(checkpoint, records, tmp_path / "raw", device="cpu")
    for k, record in enumerate(records):
        garble(store.case_folder(record) / "image.b2nd", seed=10 + k)
    for record, (image, label) in zip(records, raw, strict=True):
        got_image, got_label = case_for_validation(CaseSource(pp, store), record, "liver")
        np.testing.assert_array_equal(got_label, label)
        np.testing.assert_allclose(got_image, image, atol=1e-6)
    written, _, source = predict_cases(checkpoint, records, tmp_path / "stored", device="cpu", prepared=stored)
    assert source.startswith("0 of")  # none came from the damaged store
    for a, b in zip(written, expected, strict=True):
        np.testing.assert_array_equal(np.asanyarray(nib.load(a).dataobj), np.asanyarray(nib.load(b).dataobj))


def test_a_persistent_loader_worker_draws_each_epochs_own_samples(phantom_cases: dict[str, CaseData]) -> None:
    """The loader's worker lives across epochs; the epoch it draws with is the one set before each: every
    epoch's samples are those of a loader without workers, bit for bit, and a replaced sample says so.
    (Their order is the sampler's: training's comes from Accelerate's seedable sampler, per epoch.)"""
    from freetumor_cli.core.training import make_loader

    pipeline = Pipeline(task="liver", preprocessing=PP15, roi=(32, 32, 32), crops_per_volume=1, synthesize=True)
    source = MemorySource(phantom_cases, broken=frozenset({"case1"}))

    def epochs(workers: int) -> list[list[dict[str, Any]]]:
        dataset = CropDataset(entries(3), source, pipeline, crop_transforms(pipeline), seed=5)
        loader = make_loader(dataset, batch_size=1, workers=workers, seed=5)
        drawn = []
        for epoch in (0, 1, 4):
            dataset.set_epoch(epoch)
            drawn.append(sorted(loader, key=lambda batch: int(batch["sample_index"][0])))
        return drawn

    inline, worker = epochs(0), epochs(1)
    for epoch, first, second in zip((0, 1, 4), inline, worker, strict=True):
        assert len(first) == len(second) == 3
        for a, b in zip(first, second, strict=True):
            torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=0)
            assert a["incidents"] == b["incidents"]
        (incident,) = [i for batch in second for i in batch["incidents"]]  # case1 is read in every epoch
        assert incident["epoch"] == epoch
    for first, second in itertools.pairwise(worker):  # another epoch, other crops of every sample
        assert not any(torch.equal(a["image"], b["image"]) for a, b in zip(first, second, strict=True))
