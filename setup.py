"""Only here because cffi's out-of-line build hooks into setuptools through setup() keywords,
and for the hit-path extension beside it (kmskeys/_hitpath.c)."""

from setuptools import Extension, setup

setup(
    cffi_modules=["kmskeys/_build_keyutils.py:ffibuilder"],
    ext_modules=[
        Extension(
            "kmskeys._hitpath",
            ["kmskeys/_hitpath.c"],
            libraries=["keyutils"],
            define_macros=[("Py_LIMITED_API", "0x030B0000")],
            py_limited_api=True,
        )
    ],
)
