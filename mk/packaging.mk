# Packaging: `make dist` builds dist/ (scripts/dist.sh): the sdist, the manylinux2014 abi3 wheel
# and the Debian package (scripts/deb.sh, packaging/deb/). The package and the wheel tests
# install from the wheelhouse, without an index: the wheels of the client's dependency (cffi),
# the resolver's (botocore, cryptography) and the encryptor's (boto3), at the dev venv's
# versions, with theirs, fetched once when the venv is made (tests/packaging,
# docs/packaging.md; test_roles.py installs every role of the README that way).

WHEELHOUSE := $(VENV)/wheelhouse
# The package's venv is made from Debian 12's python3.11 (scripts/deb.sh) and needs it installed.
APT_PACKAGES += python3.11

TEST_PREREQS += $(WHEELHOUSE)/.downloaded

.PHONY: dist

dist: deps venv $(WHEELHOUSE)/.downloaded
	rm -rf dist
	scripts/dist.sh dist

# pip too: the older-glibc root's interpreter has none (tests/packaging/test_oldglibc.py).
$(WHEELHOUSE)/.downloaded: $(VENV)/.installed mk/packaging.mk
	$(PY) -m pip download -q --only-binary=:all: -d $(WHEELHOUSE) \
		$$($(PY) -c 'import importlib.metadata as m; print(*(f"{d}=={m.version(d)}" for d in ("cffi", "boto3", "botocore", "cryptography", "pip")))')
	@touch $@

# The older-glibc stand-in the wheel test installs into: Debian 11 by debootstrap, with
# CPython 3.11 built from Debian's source package (scripts/oldglibc-root.sh; a few minutes, once).
# Not a TEST_PREREQ: the suite builds it in background at nice 19 while the other tiers run, and
# the tests that need it run last (tests/support/slowbuild.py).
APT_PACKAGES += debootstrap
OLDGLIBC_ROOT := .oldglibc-root

$(OLDGLIBC_ROOT)/.built: scripts/oldglibc-root.sh | deps
	scripts/oldglibc-root.sh $(OLDGLIBC_ROOT)

# A clean Debian 12 root where the package's maintainer scripts run in a chroot: a group
# database and a request-key.d of its own (scripts/debian-root.sh; about a minute, once).
DEBIAN_ROOT := .debian-root
TEST_PREREQS += $(DEBIAN_ROOT)/.built

$(DEBIAN_ROOT)/.built: scripts/debian-root.sh | deps
	scripts/debian-root.sh $(DEBIAN_ROOT)

.PHONY: clean-packaging
clean: clean-packaging
clean-packaging:
	rm -rf $(OLDGLIBC_ROOT) $(OLDGLIBC_ROOT).log $(DEBIAN_ROOT) $(DEBIAN_ROOT).log
