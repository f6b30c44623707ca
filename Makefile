# Two commands do all set-up on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
# GPU users: make TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126" ...
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
export SWIN_BOB_DATA ?= $(HOME)/.cache/swin_bob
PYTEST_ARGS ?=

.PHONY: venv data demo test test-label label-system bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, so nothing later can pull a different (CUDA) build from the registry
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dask,dev]"
	touch $@

venv: $(VENV)/.installed

data: venv
	$(PY) -m custom.sample_data

demo: data
	$(PY) -m custom.demo

test: data
	$(PY) -m pytest -q $(PYTEST_ARGS)

# MONAI Label 0.8.5 in its own venv (see README "MONAI Label"); about 6 min and 8 GB the first time
.venv-label/.installed: scripts/label_env.sh scripts/label_constraints.txt
	scripts/label_env.sh .venv-label

# Orthanc (+ DICOMweb, GDCM plugins) and dicom3tools from Debian for the PACS round trip (root or sudo)
label-system:
	scripts/label_system.sh

test-label: data .venv-label/.installed label-system
	$(PY) -m pytest -q -m label tests/test_monai_label.py
	$(PY) -m pytest -q tests/test_dicom_seg.py -k dciodvfy  # the DICOM-SEG check that needs dicom3tools

bench: data
	@for b in benchmarks/*.py; do echo "# $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) demo_output .pytest_cache
