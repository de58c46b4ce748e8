# Packaging: `make dist` builds dist/ (the sdist and a manylinux abi3 wheel, scripts/dist.sh),
# and the wheelhouse the wheel test installs from without an index: the wheels of the client's
# one dependency (cffi, with its own), fetched once when the venv is made, so that the test
# runs offline (tests/packaging, docs/packaging.md).

WHEELHOUSE := $(VENV)/wheelhouse

TEST_PREREQS += $(WHEELHOUSE)/.downloaded

.PHONY: dist

dist: deps venv
	rm -rf dist
	scripts/dist.sh dist

$(WHEELHOUSE)/.downloaded: $(VENV)/.installed
	$(PY) -m pip download -q --only-binary=:all: -d $(WHEELHOUSE) \
		"cffi==$$($(PY) -c 'import importlib.metadata as m; print(m.version("cffi"))')"
	@touch $@
