"""freetumor: synthesize realistic tumors into CT scans and train tumor segmentation models.

The command-line app lives in :mod:`freetumor_cli.app`; the library in :mod:`freetumor_cli.core`.
"""

__version__ = "0.1.0"
