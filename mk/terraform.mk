# terraform/: checkov runs from its own venv, so its pinned dependencies never fight the
# project's dev dependencies in .venv. The terraform tests call .venv-checkov/bin/checkov.

CHECKOV_VENV    := .venv-checkov
CHECKOV_VERSION ?= 3.3.30

TEST_PREREQS += $(CHECKOV_VENV)/.installed

.PHONY: checkov

$(CHECKOV_VENV)/.installed: mk/terraform.mk | deps
	@test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install -q --upgrade pip
	$(CHECKOV_VENV)/bin/python -m pip install -q 'checkov==$(CHECKOV_VERSION)'
	@touch $@

# Offline by design: no platform API key, no download of external checks or guidelines.
checkov: $(CHECKOV_VENV)/.installed
	BC_SKIP_MAPPING=TRUE CKV_NO_DOWNLOAD=TRUE $(CHECKOV_VENV)/bin/checkov --quiet --compact \
		--skip-download --framework terraform -d terraform

# The modules applied and used against a local moto server (scripts/demo_terraform.py): the
# real terraform with the offline provider mirror, the roles it creates encrypting and decrypting
# through a real resolver install, then terraform destroy.
.PHONY: demo-terraform
demo-terraform: deps venv compile
	$(PY) scripts/demo_terraform.py
