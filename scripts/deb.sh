#!/bin/sh
# The Debian package, from the wheel `make dist` just built: a private venv under /usr/lib/kmskeys
# (Debian's python3.11, the wheel with its `resolver` extra, every dependency from the
# wheelhouse: no index), the systemd units, a root-only config skeleton made by the resolver's
# own code, and the maintainer scripts in packaging/deb/ (docs/packaging.md, "The Debian
# package"). Usage: scripts/deb.sh WHEEL WHEELHOUSE OUTDIR
set -eu
wheel=$1
wheelhouse=$2
out=$3
venv=${VENV:-.venv}
# The interpreter of the hosts (Debian 12's); the venv's lib/python3.11 ties the package to it.
python=/usr/bin/python3.11
prefix=/usr/lib/kmskeys
src=packaging/deb

[ -x "$python" ] || { echo "deb.sh: $python is missing (Debian's python3.11 package)" >&2; exit 1; }
version=$(basename "$wheel" | cut -d- -f2)-1
arch=$(dpkg --print-architecture)
stage=$(mktemp -d "${TMPDIR:-/tmp}/kmskeys-deb.XXXXXX")
trap 'rm -rf "$stage"' EXIT
root=$stage/root
target=$root$prefix

umask 022
"$python" -m venv --without-pip "$target"
# pip from the dev venv, running in the new venv's interpreter. No index and no configuration
# of this machine: only the wheel and the wheelhouse (mk/packaging.mk).
env -i PATH=/usr/bin:/bin HOME="$stage" PIP_CONFIG_FILE=/dev/null \
	"$venv/bin/python" -m pip --python "$target/bin/python" install -q --no-index \
	--only-binary=:all: --no-compile --no-cache-dir --disable-pip-version-check \
	--find-links "$wheelhouse" "$wheel[resolver]"
# pip records where the wheel came from: a directory of the build machine.
rm -f "$target"/lib/python3*/site-packages/kmskeys-*.dist-info/direct_url.json
# The venv's scripts and pyvenv.cfg name the staging directory: name the installed one.
grep -rlI -- "$root" "$target" | while read -r file; do sed -i "s|$root||g" "$file"; done
# The config skeleton: what `kmskeys-resolver install` writes when there is none, root's alone.
# -B: no bytecode that names the staging directory.
mkdir -p "$root/etc/kmskeys/secrets" "$root/etc/default" "$root/lib/systemd/system" \
	"$root/usr/bin" "$root/usr/sbin" "$root/usr/share/doc/kmskeys" "$root/DEBIAN"
"$target/bin/python" -B -I -c '
import sys
from kmskeys.contract import DEFAULT_PREFIX
from resolver.config import DEFAULT_BLOB_DIR
from resolver.install import default_config_text
sys.stdout.write(default_config_text(DEFAULT_PREFIX, DEFAULT_BLOB_DIR))
' >"$root/etc/kmskeys/resolver.toml"
chmod 0600 "$root/etc/kmskeys/resolver.toml"
cp "$src/default" "$root/etc/default/kmskeys"
# Bytecode now, with the installed paths in it; dpkg keeps the sources' mtimes, so it stays
# valid, Python never writes its own, and `dpkg -r` leaves no stray file behind.
"$target/bin/python" -m compileall -q -j 0 -s "$root" -p / "$target/lib"
# The units the wheel carries, with the resolver named by its path (systemd's own PATH would
# find a pip-installed kmskeys-resolver in /usr/local/bin first).
for unit in "$target"/lib/python3*/site-packages/resolver/data/*.service; do
	sed "s|^ExecStart=kmskeys-resolver |ExecStart=$prefix/bin/kmskeys-resolver |" "$unit" \
		>"$root/lib/systemd/system/$(basename "$unit")"
done
ln -s "../lib/kmskeys/bin/kmskeys" "$root/usr/bin/kmskeys"
# A wrapper, not a link: install writes the path it was run as into the rule, and the rule must
# name the venv's script whichever way an admin calls it (postinst's and theirs then agree).
printf '#!/bin/sh\nexec %s "$@"\n' "$prefix/bin/kmskeys-resolver" >"$root/usr/sbin/kmskeys-resolver"
chmod 0755 "$root/usr/sbin/kmskeys-resolver"
cp README.md docs/*.md "$root/usr/share/doc/kmskeys/"
cp "$src/copyright" "$root/usr/share/doc/kmskeys/copyright"

for script in postinst prerm postrm; do
	install -m 0755 "$src/$script" "$root/DEBIAN/$script"
done
printf '%s\n' /etc/kmskeys/resolver.toml /etc/default/kmskeys >"$root/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@INSTALLED_SIZE@/$size/" \
	"$src/control.in" >"$root/DEBIAN/control"
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -print | sed 's|^\./||' | sort |
	xargs md5sum) >"$root/DEBIAN/md5sums"
chmod -R go-w "$root"
if grep -rl -- "$stage" "$root"; then
	echo "deb.sh: the files above name the staging directory" >&2
	exit 1
fi
mkdir -p "$out"
dpkg-deb --root-owner-group -Zxz -z6 --build "$root" "$out/kmskeys_${version}_$arch.deb" >/dev/null
echo "$out/kmskeys_${version}_$arch.deb"
