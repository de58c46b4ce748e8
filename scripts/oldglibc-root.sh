#!/bin/sh
# The older-glibc stand-in that tests/packaging/test_oldglibc.py installs the wheel into: a
# Debian 11 (bullseye) root made by debootstrap from Debian's packages, whose glibc (2.31) is
# older than the 2.34 a wheel built here used to need. Bullseye's python3 is 3.9 and the wheel is
# cp311-abi3, so CPython 3.11 is built into it from Debian 12's python3.11 source package (the
# upstream tarball, without Debian's patches: it only has to run the test). No ssl module: the
# test's pip installs from files. A few minutes, once per machine. Usage: oldglibc-root.sh DIR
set -eu
dir=$1
suite=bullseye
rm -rf "$dir"
debootstrap --variant=minbase --include=gcc,make,libc6-dev,zlib1g-dev,xz-utils \
	"$suite" "$dir" >"$dir.log" 2>&1 || { tail -20 "$dir.log" >&2; exit 1; }
# The source comes from the newer suite, through the root's own mirror.
sed -n "s/^deb \(.*\) $suite main\$/deb-src \1 bookworm main/p" "$dir/etc/apt/sources.list" \
	>"$dir/etc/apt/sources.list.d/python-source.list"
chroot "$dir" sh -eu -c '
	apt-get update -q >/dev/null
	mkdir -p /usr/src/python && cd /usr/src/python
	apt-get source --download-only -q python3.11 >/dev/null 2>&1
	tar xzf python3.11_*.orig.tar.gz
	cd Python-3.11.*
	./configure -q --prefix=/opt/python3.11 --without-ensurepip --disable-test-modules >/dev/null
	make -s -j"$(nproc)" >/dev/null 2>&1
	make -s install >/dev/null 2>&1
	cd / && rm -rf /usr/src/python /var/lib/apt/lists/* /var/cache/apt/archives/*.deb
	/opt/python3.11/bin/python3.11 -c "import zlib, venv"
' >>"$dir.log" 2>&1 || { tail -20 "$dir.log" >&2; exit 1; }
rm -f "$dir.log"
touch "$dir/.built"
