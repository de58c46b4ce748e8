#!/bin/sh
# `make dist`: the sdist, then the binary wheel built from that sdist (so the sdist is shown to
# be complete), repaired by auditwheel to a manylinux tag, then the Debian package made from that
# wheel (scripts/deb.sh; its dependencies come from the wheelhouse `make venv` downloaded). libkeyutils.so.1 stays a system
# library (every host that runs the resolver has it: /sbin/request-key comes with it), so
# auditwheel is told not to graft it into the wheel. Usage: scripts/dist.sh [OUTDIR]
set -eu
out=${1:-dist}
venv=${VENV:-.venv}
raw=$(mktemp -d "${TMPDIR:-/tmp}/kmskeys-dist.XXXXXX")
trap 'rm -rf "$raw"' EXIT
# The interpreter's own LDSHARED may carry `-Wl,-rpath` to wherever it was built (pyenv's does):
# the wheel's modules need no RPATH, and must not name a directory of the build machine.
export LDSHARED="${CC:-cc} -shared"
# No build isolation: the build requirements are in the dev venv (`make venv`), so no index is
# needed and the build is the same offline as on a runner.
"$venv/bin/python" -m build --no-isolation --outdir "$raw" .
mkdir -p "$out"
cp "$raw"/kmskeys-*.tar.gz "$out"/
# manylinux2014 (glibc 2.17), so Amazon Linux 2 (glibc 2.26) installs it: asked for, not "auto",
# so that a compiled file that needs a newer glibc symbol fails the build here rather than
# quietly narrowing the tag (docs/packaging.md says what pins each file's version).
PATH="$venv/bin:$PATH" "$venv/bin/auditwheel" repair --plat "manylinux2014_$(uname -m)" \
	--exclude libkeyutils.so.1 --wheel-dir "$out" "$raw"/kmskeys-*.whl
scripts/deb.sh "$out"/kmskeys-*.whl "${WHEELHOUSE:-$venv/wheelhouse}" "$out"
