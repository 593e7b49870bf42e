"""freetumor: synthesize realistic tumors into CT scans and train tumor segmentation models.

The command-line app lives in :mod:`freetumor_cli.app`; the library in :mod:`freetumor_cli.core`.
``from freetumor_cli import synthesize_tumors`` is the in-memory API (nibabel images or arrays in and
out, no files); the MONAI transforms are in :mod:`freetumor_cli.core.transforms`.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["SynthesizedImage", "__version__", "synthesize_tumors"]


def __getattr__(name: str) -> Any:  # lazy: `import freetumor_cli` (and the CLI) stays instant
    if name in ("synthesize_tumors", "SynthesizedImage"):
        from freetumor_cli.core import synthesize

        return getattr(synthesize, name)
    raise AttributeError(f"module 'freetumor_cli' has no attribute {name!r}")
