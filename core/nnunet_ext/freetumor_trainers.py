"""freetumor's nnU-Net trainers, for nnU-Net's search of ``nnUNet_extTrainer`` (defined elsewhere, so that
nnU-Net's worker processes import them by their package name)."""

from freetumor_cli.core.nnunet_trainer import nnUNetTrainerFreeTumor

__all__ = ["nnUNetTrainerFreeTumor"]
