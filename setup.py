"""Only here because cffi's out-of-line build hooks into setuptools through setup() keywords,
for the hit-path extension beside it (kmskeys/_hitpath.c), for the resolver's small C program,
`resolver/kmskeys-gate` (resolver/gate.c), which the wheel carries as package data, and for the
`kmskeys` command: small static C programs (bin/) that answer a cached `kmskeys get` and the
common `kmskeys unprotect`, and exec the Python CLI, the script `kmskeys-py` installed beside
them, for everything else.

Both compiled modules use the limited API of Python 3.11 (`_hitpath.c` defines Py_LIMITED_API;
cffi's generated module does under py_limited_api), so the wheel is tagged cp311-abi3: one wheel
for every CPython from 3.11 on.
"""

import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# isort: split
# After setuptools: `distutils` is then setuptools' own copy (Python 3.12 has no other).
from distutils.ccompiler import new_compiler
from distutils.command.build_scripts import build_scripts
from distutils.sysconfig import customize_compiler

GATE_SOURCES = [
    "resolver/gate.c",
    "resolver/gate_daemon.c",
    "resolver/gate_request.c",
    "resolver/gate_subuid.c",
]
GATE = "kmskeys-gate"
# Static (and position-independent, so still randomised): every executable linked against glibc
# 2.34 or later needs __libc_start_main@GLIBC_2.34 from its start files, which would make the
# wheel manylinux_2_34. A static gate needs no glibc symbol at all, and it uses nothing static
# glibc cannot do (no NSS, no dlopen): the wheel stays manylinux2014 (docs/packaging.md).
GATE_LINK = ["-static-pie"]
# The facts and build stamp every compiled part shares (scripts/generate.py writes it).
CONTRACT_HEADER = "kmskeys/contract.h"
# The `kmskeys` command: a cached `get` in C (bin/kmskeys.c), the common `unprotect` in a program
# of its own (bin/unprotect.c: OpenSSL linked in would triple the start of every `get`), and the
# Python CLI (bin/kmskeys-py) for the rest. Both static, as the gate: no glibc symbol version,
# nothing for the dynamic loader to do at each start. They call request_key/keyctl by number (no
# libkeyutils); unprotect links the build machine's static libcrypto (libssl-dev), whose
# unused resolver and module-loading code makes the linker warn about static dlopen and
# getaddrinfo: neither is ever called (bin/unprotect.c reads no openssl.cnf).
PROGRAMS = {
    "kmskeys": (["bin/kmskeys.c", "bin/common.c"], []),
    "kmskeys-unprotect": (["bin/unprotect.c", "bin/common.c"], [":libcrypto.a"]),
}


class BuildExtAndGate(build_ext):
    """build_ext, plus the gate executable linked with the same compiler."""

    def run(self) -> None:
        super().run()
        objects = self.compiler.compile(
            GATE_SOURCES,
            output_dir=self.build_temp,
            include_dirs=[os.path.dirname(CONTRACT_HEADER)],
            depends=[CONTRACT_HEADER, "kmskeys/_wipe.h", "resolver/gate.h"],
            extra_postargs=["-O2", "-Wall"],
        )
        self.compiler.link_executable(
            objects, GATE, output_dir=self._gate_dir(), extra_postargs=GATE_LINK
        )

    def _gate_dir(self) -> str:
        # In place for editable installs and `build_ext --inplace`; else into the wheel's tree.
        if self.inplace or getattr(self, "editable_mode", False):
            return "resolver"
        return os.path.join(self.build_lib, "resolver")

    def get_outputs(self) -> list[str]:
        return [*super().get_outputs(), os.path.join(self._gate_dir(), GATE)]


class BuildScriptsAndCommand(build_scripts):
    """build_scripts (bin/kmskeys-py), plus the programs of the `kmskeys` command beside it.

    Scripts are installed from this command's build_dir, in a wheel and in an editable install
    alike, so the program is linked straight into it: build_scripts itself would read it as a
    text file to fix its #! line.
    """

    def run(self) -> None:
        super().run()
        compiler = new_compiler()
        customize_compiler(compiler)
        temp = self.get_finalized_command("build").build_temp
        for program, (sources, libraries) in PROGRAMS.items():
            # kmskeys/_wipe.h: the modules' wipe (glibc's explicit_bzero needs glibc 2.25).
            objects = compiler.compile(
                sources,
                output_dir=os.path.join(temp, program),
                include_dirs=["kmskeys"],
                extra_postargs=["-O2", "-Wall"],
            )
            compiler.link_executable(
                objects,
                program,
                output_dir=self.build_dir,
                libraries=libraries,
                extra_postargs=GATE_LINK,
            )


setup(
    cmdclass={"build_ext": BuildExtAndGate, "build_scripts": BuildScriptsAndCommand},
    cffi_modules=["kmskeys/_build_keyutils.py:ffibuilder"],
    ext_modules=[
        Extension(
            "kmskeys._hitpath",
            ["kmskeys/_hitpath.c"],
            depends=[
                CONTRACT_HEADER,
                "kmskeys/_wipe.h",
                "kmskeys/_hitpath_keys.h",
                "kmskeys/_names.h",
            ],
            define_macros=[("Py_LIMITED_API", "0x030B0000")],
            py_limited_api=True,
        )
    ],
    # The Python CLI the `kmskeys` command execs (BuildScriptsAndCommand adds that command). The
    # launcher pip writes for a console_scripts entry point imports `re`; this one does not.
    scripts=["bin/kmskeys-py"],
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
