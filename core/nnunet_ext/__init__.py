"""The folder nnU-Net searches for external trainers (``nnUNet_extTrainer``; ``freetumor nnunet trainer-path``).

nnU-Net imports each module here by its bare name: this folder holds only the one that names freetumor's
trainer, defined in :mod:`freetumor_cli.core.nnunet_trainer`.
"""
