"""The freetumor library: everything the command line does, callable from Python.

What a module may import at its top:

- the registry and the configs (``registry``, ``config``, ``synthesis_config``, ``errors``, ``datasets``): the
  standard library and PyYAML only, so the command line starts instantly (``tests/test_cli_startup.py``);
- the other modules: numpy, scipy and nibabel (``io``, ``preview``), with torch and MONAI imported inside the
  functions that need them;
- except the modules that are torch or MONAI code through and through (``gan``, ``transforms``,
  ``nnunet_trainer``), which import them at the top; only ``nnunet`` imports one of them (``transforms``)
  at its own top.
"""

import logging as _logging
import os as _os
from typing import TypeAlias as _TypeAlias

PathLike: _TypeAlias = str | _os.PathLike[str]
"""What a path argument accepts, everywhere in the library: a string or a path-like object."""

# MONAI announces at import, once per process (loader workers too), that an optional GPU DICOM decoder
# is absent whenever pydicom is installed; freetumor reads DICOM with dicom2nifti and never uses it.
_logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(_logging.ERROR)
