"""The freetumor library: everything the command line does, callable from Python.

Modules import numpy/scipy at most at top level; torch and MONAI are imported inside the functions
that need them, so ``import freetumor_cli.core.registry`` stays instant.
"""
