"""The folder nnU-Net searches for external trainers (``nnUNet_extTrainer``; ``freetumor nnunet trainer-path``).

nnU-Net imports each module here by its bare name: this folder holds only the one that names freetumor's
trainer, defined in :mod:`freetumor_cli.core.nnunet_trainer`.
"""

from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).resolve().parent


def trainer_search_problem() -> str | None:
    """Why ``nnUNetv2_train -tr nnUNetTrainerFreeTumor`` would not find the trainer here, or None.

    Before it looks in ``nnUNet_extTrainer``, nnU-Net imports every trainer module of its own, among them
    the Primus trainers, which import timm, which imports torchvision: a torchvision that does not import
    beside this torch (PyPI's builds are made for PyPI's CUDA builds of torch) stops the search.
    """
    import importlib.util

    if importlib.util.find_spec("nnunetv2") is None:
        return 'nnunetv2 is not installed: pip install torch==2.13.0 -e ".[nnunet]" (README, "With nnU-Net")'
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # a RuntimeError from its C++ operators, or an ImportError
        return (
            f"nnUNetv2_train cannot search for external trainers here: its search imports torchvision, which "
            f"fails beside this torch ({type(exc).__name__}: {exc}); install the torchvision made for this "
            f'build of torch (README, "With nnU-Net")'
        )
    return None
