"""The freetumor library: everything the command line does, callable from Python.

Modules import numpy/scipy at most at top level; torch and MONAI are imported inside the functions
that need them, so ``import freetumor_cli.core.registry`` stays instant.
"""

import logging as _logging

# MONAI announces at import, once per process (loader workers too), that an optional GPU DICOM decoder
# is absent whenever pydicom is installed; freetumor reads DICOM with dicom2nifti and never uses it.
_logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(_logging.ERROR)
