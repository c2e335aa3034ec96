# Set-up and the two entry points of README.md. Each target installs what it needs first.
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
CHROMEDRIVER := /usr/bin/chromedriver
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: install data browser demo test test-fast bench

install: $(VENV)/.installed

# PYTHONWARNINGS: setuptools' notice about editable installs is information, not a warning; the first screen
# stays ours.
$(VENV)/.installed: pyproject.toml requirements.lock
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install --quiet --no-deps -e .
	touch $@

data: $(FMNIST)

$(FMNIST):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist

# The headless browser of the report-page tests (tests/test_report_page.py): Debian's chromium and its driver.
browser: $(CHROMEDRIVER)

$(CHROMEDRIVER):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq chromium chromium-driver

# Its last line is the path of the demo's report.html.
demo: install data
	$(VENV)/bin/vitcompress convert vit_fmnist --recipe recipes/svd.yaml --out runs/demo --force

test: install data browser
	$(PY) -m pytest

# The inner loop (under 3 minutes on 2 cores): unit and component tests, without the whole-pipeline runs
# (@pytest.mark.slow), the end-to-end scenarios (tests/e2e/) and the torchrun tests (tests/distributed/).
test-fast: install data
	$(PY) -m pytest -m "not slow" --ignore=tests/e2e --ignore=tests/distributed

# Every benchmark number of README.md and docs/, on this machine in one run: the studies whose results files feed a
# generated block, the bench of every shipped recipe, then bench/pages.py renders every block from the results files.
bench: install data
	$(PY) bench/skip_study.py
	$(PY) bench/token_count.py
	$(PY) bench/quant_study.py
	$(PY) bench/shiftadd_study.py --runs 15 --shift-share 0.87
	$(PY) bench/shiftadd_blocks.py
	$(PY) bench/deploy.py
	$(PY) bench/finetune_throughput.py
	$(PY) bench/tune_study.py --part fmnist196 --trials 30
	$(PY) bench/tune_study.py --part deit_s --trials 12
	$(PY) bench/report_overhead.py
	$(PY) bench/convert_walltime.py
	$(PY) bench/run.py
	$(PY) bench/pages.py
