"""Only here because cffi's out-of-line build hooks into setuptools through setup() keywords,
for the hit-path extension beside it (kmskeys/_hitpath.c), and for the `kmskeys` script.

Both compiled modules use the limited API of Python 3.11 (`_hitpath.c` defines Py_LIMITED_API;
cffi's generated module does under py_limited_api), so the wheel is tagged cp311-abi3: one wheel
for every CPython from 3.11 on.
"""

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
    # The launcher pip writes for a console_scripts entry point imports `re`; this one does not.
    scripts=["bin/kmskeys"],
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
