"""The built-in demo: a phantom CT, then a synthetic tumor in each abdominal organ.

It goes through the same file-level code as ``freetumor synthesize``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from freetumor_cli.core.io import save_volume
from freetumor_cli.core.labels import ABDOMINAL_ORGANS
from freetumor_cli.core.phantom import make_phantom
from freetumor_cli.core.synthesis_config import SynthesizeConfig
from freetumor_cli.core.synthesize import Case, CaseResult, synthesize_case


@dataclass
class DemoResult:
    """What the demo wrote."""

    out_dir: Path
    phantom_image: Path
    phantom_labels: Path
    results: dict[str, CaseResult] = field(default_factory=dict)


def run_demo(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    shape: tuple[int, int, int] = (160, 160, 96),
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0),
    on_step: Callable[[str], None] | None = None,
) -> DemoResult:
    """Make a phantom and synthesize one tumor in the liver, the pancreas and a kidney.

    Outputs, all re-created on every run: ``phantom/imagesTr/phantom_0000.nii.gz`` with
    ``phantom/labelsTr/phantom.nii.gz`` (an nnU-Net-style data root), and
    ``synthetic/<organ>/phantom_synthetic{.nii.gz,_label.nii.gz,.json,_preview.png}``.
    """
    out = Path(out_dir)
    step = on_step or (lambda _message: None)
    step("making a phantom abdominal CT")
    phantom = make_phantom(shape, spacing, seed=seed)
    image_path = save_volume(phantom.ct.array, phantom.ct, out / "phantom" / "imagesTr" / "phantom_0000.nii.gz")
    labels_path = save_volume(
        phantom.labels.array, phantom.ct, out / "phantom" / "labelsTr" / "phantom.nii.gz", label=True
    )
    result = DemoResult(out, image_path, labels_path)
    case = Case(image_path, labels_path, "phantom")
    for organ in ABDOMINAL_ORGANS:
        step(f"synthesizing a tumor in the {organ}")
        config = SynthesizeConfig(organ=organ, size="mix", count=1, seed=seed, preview=True, overwrite=True)
        result.results[organ] = synthesize_case(case, config, out / "synthetic" / organ)
    return result
