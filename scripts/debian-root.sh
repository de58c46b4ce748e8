#!/bin/sh
# A clean Debian 12 root for tests/packaging/test_deb_lifecycle.py: debootstrap from Debian's
# packages, with what the kmskeys package depends on, so that its maintainer scripts run there
# (in a chroot) against a group database and a request-key.d of their own. Usage: DIR
set -eu
dir=$1
rm -rf "$dir"
debootstrap --variant=minbase --include=python3.11,keyutils,libkeyutils1,passwd \
	bookworm "$dir" >"$dir.log" 2>&1 || { tail -20 "$dir.log" >&2; exit 1; }
rm -rf "$dir.log" "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*
touch "$dir/.built"
