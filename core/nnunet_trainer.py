"""Online tumor synthesis in nnU-Net v2 training: a batchgeneratorsv2 transform and the trainer that uses it.

Needs nnU-Net (``pip install "freetumor[nnunet]"``; on a CPU machine pin torch in the same command).
nnU-Net finds the trainer through ``nnUNet_extTrainer`` (``freetumor nnunet trainer-path`` prints it)::

    export nnUNet_extTrainer="$(freetumor nnunet trainer-path)"
    nnUNetv2_train DATASET 3d_fullres FOLD -tr nnUNetTrainerFreeTumor

The facts of the dataset (labels, CT normalisation, spacing) are read by
:func:`freetumor_cli.core.nnunet.patch_synthesis`; the tumor is inserted by
:func:`freetumor_cli.core.nnunet.synthesize_in_patch`, the MONAI transforms' array function.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from freetumor_cli.core.errors import FreetumorError
from freetumor_cli.core.nnunet import (
    SETTINGS_FILE,
    NnunetSynthesisConfig,
    PatchSynthesis,
    patch_synthesis,
    synthesis_config_from_env,
    synthesize_in_patch,
)
from freetumor_cli.core.outputs import write_text_atomic


class TumorSynthesisTransform(BasicTransform):
    """Insert one rule-based tumor into an organ of an nnU-Net training patch holding one and no real tumor.

    On nnU-Net's samples as they are: ``image`` a float tensor ``(C, X, Y, Z)`` normalised by nnU-Net's
    preprocessing, ``segmentation`` an integer tensor ``(C, X, Y, Z)`` whose channel 0 holds the labels
    (``-1`` where the patch reaches beyond its case: neither organ nor tumor, left as it is). The CT
    channel and the labels change in place, as nnU-Net's own transforms change them.

    Randomness: its own ``numpy.random.Generator`` from ``setup.config.seed``. In another process than the
    one that made it (nnU-Net's augmentation workers, which inherit a copy) it draws its stream from the
    seed and a number of that process's global numpy generator, which nnU-Net seeds per worker: every
    worker then has its own tumors.

    Attributes:
        setup: the dataset's facts and the settings.
        patches: the patches this process saw; ``synthesized``: those that got a tumor.
    """

    def __init__(self, setup: PatchSynthesis) -> None:
        super().__init__()
        self.setup = setup
        self.rng = np.random.default_rng(setup.config.seed)
        self._process = os.getpid()
        self.patches = 0
        self.synthesized = 0

    def _generator(self) -> np.random.Generator:
        if os.getpid() != self._process:  # a worker's copy: not the parent's stream
            self._process = os.getpid()
            self.rng = np.random.default_rng([self.setup.config.seed, int(np.random.randint(2**31))])
        return self.rng

    def apply(self, data_dict: dict[str, Any], **params: Any) -> dict[str, Any]:
        image, segmentation = data_dict.get("image"), data_dict.get("segmentation")
        if image is None or segmentation is None:
            return data_dict
        rng = self._generator()
        self.patches += 1
        prob = self.setup.config.prob
        if prob < 1.0 and not rng.random() < prob:
            return data_dict
        # numpy views of the tensors: the tumor is written into the sample itself, no copy of the patch
        result = synthesize_in_patch(image.numpy(), segmentation[0].numpy(), self.setup, rng, in_place=True)
        self.synthesized += result is not None
        return data_dict


def insert_after_spatial(chain: ComposeTransforms, transform: BasicTransform) -> ComposeTransforms:
    """``chain`` with ``transform`` right after its spatial transform (after the return to 3D, with nnU-Net's
    pseudo-2D augmentation), so the intensity augmentations that follow treat the tumor as the rest.

    Raises:
        RuntimeError: the chain has no ``SpatialTransform`` (an nnU-Net this trainer does not know).
    """
    steps = list(chain.transforms)
    spatial = next((i for i, t in enumerate(steps) if isinstance(t, SpatialTransform)), None)
    if spatial is None:
        raise RuntimeError("nnU-Net's training transforms hold no SpatialTransform: this nnU-Net is not supported")
    at = spatial + 1
    if at < len(steps) and isinstance(steps[at], Convert2DTo3DTransform):
        at += 1
    return ComposeTransforms([*steps[:at], transform, *steps[at:]])


class nnUNetTrainerFreeTumor(nnUNetTrainer):
    """nnU-Net's default trainer plus FreeTumor's online synthesis in its training patches.

    Every training patch that holds an organ and no real tumor gets one rule-based tumor (with
    probability ``prob``), right after the spatial augmentation, so noise, blur, brightness, contrast,
    low resolution, gamma and mirroring treat it as the rest of the patch. Validation patches are left
    as they are. Settings (:class:`~freetumor_cli.core.nnunet.NnunetSynthesisConfig`): the class
    attribute ``synthesis`` (a subclass may change it), then ``$FREETUMOR_NNUNET_CONFIG`` (a YAML file),
    then ``$FREETUMOR_NNUNET_SET`` (``key=value`` items). What is synthesized is written to
    ``freetumor_synthesis.json`` in the fold's folder. No quality control: every tumor is kept.
    """

    synthesis: NnunetSynthesisConfig = NnunetSynthesisConfig()
    tumor_synthesis: PatchSynthesis | None = None

    def initialize(self) -> None:
        if not self.was_initialized:
            try:
                self.tumor_synthesis = self.read_tumor_synthesis()
            except FreetumorError as exc:  # a user's mistake: one line, not a traceback
                print(f"freetumor: error: {exc}", file=sys.stderr)
                raise SystemExit(exc.exit_code) from None
            if self.local_rank == 0:
                summary = json.dumps(self.tumor_synthesis.summary(), indent=2)
                write_text_atomic(os.path.join(self.output_folder, SETTINGS_FILE), summary + "\n")
            organs = ", ".join(
                f"{o.name} ({o.value}, tumor {o.tumor_value})" for o in self.tumor_synthesis.labels.organs
            )
            self.print_to_log_file(f"freetumor: online tumors in {organs}; settings in {SETTINGS_FILE}")
        super().initialize()

    def read_tumor_synthesis(self) -> PatchSynthesis:
        """The settings and the dataset's facts, from the plans, ``dataset.json`` and the environment."""
        configuration = self.configuration_manager
        return patch_synthesis(
            self.dataset_json["labels"],
            spacing=configuration.spacing,
            normalization_schemes=configuration.normalization_schemes,
            intensity_properties=self.plans_manager.foreground_intensity_properties_per_channel,
            transpose_forward=self.plans_manager.transpose_forward,
            config=synthesis_config_from_env(type(self).synthesis),
        )

    def get_training_transforms(
        self,
        patch_size: Any,
        rotation_for_DA: Any,
        deep_supervision_scales: Any,
        mirror_axes: Any,
        do_dummy_2d_data_aug: bool,
        use_mask_for_norm: Any = None,
        is_cascaded: bool = False,
        foreground_labels: Any = None,
        regions: Any = None,
        ignore_label: Any = None,
    ) -> BasicTransform:
        chain = super().get_training_transforms(
            patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes, do_dummy_2d_data_aug,
            use_mask_for_norm=use_mask_for_norm, is_cascaded=is_cascaded, foreground_labels=foreground_labels,
            regions=regions, ignore_label=ignore_label,
        )  # fmt: skip
        if self.tumor_synthesis is None:
            self.tumor_synthesis = self.read_tumor_synthesis()
        return insert_after_spatial(chain, TumorSynthesisTransform(self.tumor_synthesis))
