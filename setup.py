"""Only here because cffi's out-of-line build hooks into setuptools through setup() keywords."""

from setuptools import setup

setup(cffi_modules=["kmskeys/_build_keyutils.py:ffibuilder"])
