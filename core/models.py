"""Segmentation networks: what it takes to rebuild one (:class:`ModelConfig`) and the network itself.

Their checkpoints (``model.safetensors`` + ``model.json``) are read and written by
:mod:`freetumor_cli.core.checkpoints`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from freetumor_cli.core.errors import ConfigError, InputError
from freetumor_cli.core.preprocess import Preprocessing
from freetumor_cli.core.registry import (
    MODELS,
    ORGANS,
    REGIONS,
    TASKS,
    RegionName,
    TaskName,
    check_choices,
    tasks_with_organ,
)

ModelName = Literal["swinunetr", "unet", "unet-tiny"]
assert get_args(ModelName) == MODELS, "the registry's MODELS are the command line's choices"


@dataclass(frozen=True)
class ModelConfig:
    """What it takes to rebuild a network and use it.

    Attributes:
        name: ``swinunetr`` (SwinUNETR v2, feature size 48: the method's), ``unet`` (MONAI UNet 16..256,
            for CPUs) or ``unet-tiny`` (8..32, for tests and the demo).
        out_channels: classes predicted.
        roi: sliding-window / crop size in voxels.
        task: the task the network serves (a registry task: its cases, organs and tumors).
        preprocessing: the chain the network was trained with (its region is the task's: the label space).
        labels: output channel -> the class it predicts, by its name in the region's label space: the
            task's classes, or only its tumors (the authors' COVID-19 baseline: background, lesion; the
            lung is background to it). Empty: the task's classes.
        feature_size: SwinUNETR's width (48 is the method's "B"; VoCo's L and H are 96 and 192).
    """

    name: ModelName = "swinunetr"
    out_channels: int = 3
    roi: tuple[int, int, int] = REGIONS["abdomen"].roi
    task: TaskName = "liver"
    preprocessing: Preprocessing = field(default_factory=lambda: Preprocessing.for_region("abdomen"))
    labels: dict[str, str] = field(default_factory=dict)
    feature_size: int = 48

    def __post_init__(self) -> None:
        check_choices(self)
        if self.preprocessing.region != TASKS[self.task].region:
            raise ValueError(
                f"a {self.task} network works in the {TASKS[self.task].region}, its preprocessing is the "
                f"{self.preprocessing.region}'s"
            )
        if self.labels:
            names = REGIONS[self.region].labels.values()
            if sorted(self.labels) != sorted(str(c) for c in range(self.out_channels)):
                raise ValueError(f"labels must name the channels 0..{self.out_channels - 1}, got {sorted(self.labels)}")
            if self.labels["0"] != "background" or not set(self.labels.values()) <= set(names):
                raise ValueError(f"labels must be classes of the {self.region} with 0 background, got {self.labels}")

    @property
    def region(self) -> RegionName:
        """The region of the task (its label space)."""
        return self.preprocessing.region

    def class_names(self) -> dict[int, str]:
        """Output channel -> the name of the class it predicts, in the region's label space."""
        if self.labels:
            return {int(c): name for c, name in sorted(self.labels.items(), key=lambda kv: int(kv[0]))}
        return dict(TASKS[self.task].labels)

    def region_values(self) -> dict[int, int]:
        """Output channel -> the region label value it predicts (channel 0: background, 0)."""
        value_of = {name: value for value, name in REGIONS[self.region].labels.items()}
        return {channel: value_of[name] for channel, name in self.class_names().items()}

    @property
    def region_class_names(self) -> tuple[str, ...]:
        """The region-space names of the classes the network predicts, background excluded."""
        return tuple(name for channel, name in self.class_names().items() if channel)

    def tumor_channel(self, organ: str) -> int:
        """The output channel meaning "tumor of ``organ``" (what quality control and the critic read).

        Raises:
            ConfigError: the network does not predict that organ's tumors.
        """
        target = ORGANS[organ]
        for channel, value in self.region_values().items():
            if target.region == self.region and value == target.tumor_value:
                return channel
        raise ConfigError(
            f"a {self.task} network of classes {', '.join(self.class_names().values())} does not segment {organ} tumors",
            hint=f"use a network of a task that includes {organ}: {', '.join(tasks_with_organ(organ))}",
        )


def build_model(config: ModelConfig) -> Any:
    """The torch module for ``config`` (in_channels 1)."""
    from monai.networks.nets import UNet

    if config.name == "swinunetr":
        from monai.networks.nets import SwinUNETR

        return SwinUNETR(in_channels=1, out_channels=config.out_channels, feature_size=config.feature_size, use_v2=True)
    channels: tuple[int, ...]
    if config.name == "unet":
        channels, res = (16, 32, 64, 128, 256), 2
    elif config.name == "unet-tiny":
        channels, res = (8, 16, 32), 1
    else:
        raise InputError(f"unknown model {config.name!r}; choose swinunetr, unet or unet-tiny")
    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=config.out_channels,
        channels=channels,
        strides=(2,) * (len(channels) - 1),
        num_res_units=res,
        norm="batch",
    )
