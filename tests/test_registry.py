"""The registry of regions, organs and tasks, and what is derived from it."""

from __future__ import annotations

import pytest

from freetumor_cli.core import registry
from freetumor_cli.core.errors import ConfigError
from freetumor_cli.core.registry import ORGANS, REGIONS, TASKS


@pytest.mark.parametrize("name", list(ORGANS))
def test_tumor_value_is_organ_value_plus_one(name: str) -> None:
    organ = ORGANS[name]
    space = REGIONS[organ.region].labels
    assert organ.tumor_value == organ.value + 1
    assert space[organ.value] == name
    assert space[organ.tumor_value] in (f"{name}_tumor", "lesion")
    for task in TASKS.values():  # and in every task that segments it
        if name in task.organs:
            to_task = task.region_to_task()
            assert to_task[organ.tumor_value] == to_task[organ.value] + 1


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_remap_maps_into_its_space_and_back(name: str) -> None:
    task = TASKS[name]
    region = REGIONS[task.region]
    to_task, to_region = task.region_to_task(), task.task_to_region()
    assert sorted(task.labels) == list(range(task.out_channels)) and task.labels[0] == "background"
    for value, class_name in region.labels.items():
        if value == 0:
            continue
        if value in to_task:
            assert to_task[value] in task.labels
            assert task.labels[to_task[value]] == class_name  # the class keeps its name
            assert to_region[to_task[value]] == value  # and maps back
        else:
            assert value not in {ORGANS[o].value for o in task.organs}
    assert sorted(to_region) == list(range(1, task.out_channels))
    assert task.region_class_names == tuple(region.labels[to_region[t]] for t in sorted(to_region))


def test_design_label_spaces() -> None:
    assert TASKS["all"].out_channels == 7 and TASKS["covid"].out_channels == 3
    assert TASKS["kidney"].labels == {0: "background", 1: "kidney", 2: "kidney_tumor"}
    assert TASKS["all"].organ_values == {1: "liver", 3: "pancreas", 5: "kidney"}
    assert TASKS["all"].tumor_values == (2, 4, 6) and TASKS["pancreas"].tumor_values == (2,)
    assert registry.generator_channels("abdomen") == 3 and registry.generator_channels("chest") == 1
    assert [ORGANS[o].generator_channel for o in ("liver", "pancreas", "kidney", "lung")] == [0, 1, 2, 0]


@pytest.mark.parametrize(
    ("baseline", "organ", "channel"),
    [
        ("all", "liver", 2),
        ("all", "pancreas", 4),
        ("all", "kidney", 6),
        ("liver", "liver", 2),
        ("pancreas", "pancreas", 2),
        ("kidney", "kidney", 2),
        ("covid", "lung", 2),
    ],
)
def test_quality_control_channel_of_each_organ_and_baseline_task(baseline: str, organ: str, channel: int) -> None:
    assert TASKS[baseline].tumor_channel(organ) == channel


def test_a_baseline_without_the_organ_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"does not segment pancreas tumors.*pancreas, all"):
        TASKS["liver"].tumor_channel("pancreas")


def test_region_defaults_come_from_the_library() -> None:
    from freetumor_cli.core.train_seg import TrainSegConfig, model_config_for
    from freetumor_cli.core.train_synth import TrainSynthConfig

    chest = TrainSegConfig(task="covid", model="unet").resolved()
    assert chest.roi == (192, 192, 32) and chest.spacing_mm == (1.25, 1.25, 5.0)
    model = model_config_for(TrainSegConfig(task="covid", model="unet").resolved())
    assert (model.region, model.roi, model.preprocessing.window_hu, model.out_channels) == (
        "chest",
        (192, 192, 32),
        (-1000.0, 500.0),
        3,
    )
    abdomen = TrainSegConfig(task="pancreas").resolved()
    assert abdomen.roi == (96, 96, 96) and abdomen.epochs == 100 and abdomen.labelled_repeats == 1
    explicit = TrainSegConfig(task="covid", model="unet", roi=(96, 96, 96)).resolved()
    assert explicit.roi == (96, 96, 96)  # an explicit crop is kept
    assert TrainSynthConfig(region="chest").weight() == 0.5 and TrainSynthConfig().weight() == 0.1
    with pytest.raises(ConfigError, match="SwinUNETR needs"):
        TrainSegConfig(task="covid", roi=(32, 32, 32)).resolved()


def test_config_fields_take_registry_names_only() -> None:
    from freetumor_cli.core.config import build_config
    from freetumor_cli.core.synthesis_config import SynthesizeConfig
    from freetumor_cli.core.train_seg import TrainSegConfig

    with pytest.raises(ValueError, match="task must be one of 'liver', 'pancreas', 'kidney', 'covid', 'all'"):
        TrainSegConfig(task="brain")
    with pytest.raises(ValueError, match="organ must be one of"):
        SynthesizeConfig(organ="spleen")
    with pytest.raises(ConfigError, match="task must be one of"):
        build_config(TrainSegConfig, overrides=["task=brain"])
    assert build_config(TrainSegConfig, overrides=["task=kidney"]).task == "kidney"


@pytest.mark.parametrize(
    ("command", "option", "choices"),
    [
        (["train-seg"], "--organ", tuple(TASKS)),
        (["synthesize", "--in", "x.nii.gz"], "--organ", tuple(ORGANS)),
        (["synthesize", "--in", "x.nii.gz", "--organ", "liver"], "--size", (*registry.SIZE_CLASSES, "mix")),
        (["synthesize", "--in", "x.nii.gz", "--organ", "liver"], "--label-scheme", registry.LABEL_SCHEMES),
        (["train-synth", "--baseline", "b"], "--region", tuple(REGIONS)),
        (["evaluate"], "--label-space", tuple(registry.EVAL_SPACES)),
    ],
)
def test_command_choices_come_from_the_registry(command: list[str], option: str, choices: tuple[str, ...]) -> None:
    from typer.testing import CliRunner

    from freetumor_cli.app import app

    from .conftest import flat

    result = CliRunner().invoke(app, [*command, option, "nope"])
    assert result.exit_code == 2
    assert "'nope' is not one of " + ", ".join(repr(c) for c in choices) + "." in flat(result.output), result.output


def test_one_preprocessing_for_prepare_training_and_prediction() -> None:
    from freetumor_cli.core.models import ModelConfig
    from freetumor_cli.core.preprocess import PreprocessConfig, Preprocessing
    from freetumor_cli.core.train_seg import TrainSegConfig, model_config_for

    for region in REGIONS:
        assert PreprocessConfig().for_region(region) == Preprocessing.for_region(region)
    trained = model_config_for(TrainSegConfig(task="liver").resolved()).preprocessing
    assert trained == Preprocessing.for_region("abdomen") == ModelConfig().preprocessing
    assert trained.digest() != Preprocessing.for_region("abdomen", spacing_mm=(2, 2, 2)).digest()


def test_sampling_follows_the_original() -> None:
    from freetumor_cli.core.train_seg import TrainSegConfig
    from freetumor_cli.core.train_synth import TrainSynthConfig

    synth = TrainSynthConfig()
    assert (synth.volumes_per_batch, synth.crops_per_volume, synth.pos, synth.neg) == (4, 1, 1.0, 0.0)
    assert [synth.repeats(d) for d in ("Dataset003_Liver", "Dataset007_Pancreas", "Dataset220_KiTS2023")] == [
        200,
        100,
        100,
    ]
    assert TrainSynthConfig(labelled_repeats=3).repeats("Dataset003_Liver") == 3
    generalist = TrainSegConfig(task="all").resolved()
    assert [generalist.repeats(d) for d in ("Dataset003_Liver", "Dataset007_Pancreas", "Dataset220_KiTS2023")] == [
        4,
        2,
        1,
    ]
    assert TrainSegConfig(task="liver", mode="freesyn").resolved().repeats("Dataset003_Liver") == 10
    assert TrainSegConfig().cutmix and TrainSegConfig().mode == "onlylabeled"  # CutMix in every task
