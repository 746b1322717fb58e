# Two commands do all the set-up on a fresh machine (see README.md):
#   make demo   create .venv, install everything, run the main job (ebm pipeline) on the embedded digits
#   make test   same install, then the whole test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.ebm-installed
LAVA_VERSION := 0.10.0
TORCHATTACKS_VERSION := 3.5.1
AUTOATTACK_VERSION := 0.2.0
RAY_VERSION := 2.60.0
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install demo test browser bench-quick data clean

install: $(STAMP)

# Re-run only when the install inputs change: a second `make test` reinstalls nothing.
$(STAMP): Makefile requirements.txt setup.cfg pyproject.toml hardware/lava_compat.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade "pip>=23" "setuptools>=68" wheel
	$(PIP) install -r requirements.txt
	# Ray runs the sharded work of --cluster (docs/scaling.md). Optional for users (pip install -e .[cluster], the
	# same pin in setup.cfg); installed here so that `make test` covers it. Its wheel leaves numpy<2 alone.
	$(PIP) install ray==$(RAY_VERSION)
	# torchattacks declares torchvision (GBs of CUDA wheels) and an old requests it never imports; pyautoattack
	# (the official AutoAttack code) declares nothing: both are installed without dependencies.
	$(PIP) install --no-deps torchattacks==$(TORCHATTACKS_VERSION) pyautoattack==$(AUTOATTACK_VERSION)
	# lava-nc declares python<3.11 and numpy<2: install it without its metadata's constraints...
	$(PIP) install --no-deps --ignore-requires-python lava-nc==$(LAVA_VERSION)
	# ...and apply the one-line Python 3.11 fix (ByteEncoder must be a frozen dataclass).
	$(PY) hardware/lava_compat.py
	$(PIP) install --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The main job: the whole study (ebm pipeline) on the embedded digits; it prints where report.html is.
demo: $(STAMP)
	$(VENV)/bin/ebm pipeline --dataset digits --out-dir runs/demo

test: $(STAMP) browser
	$(PY) -m pytest -q --durations=15 tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

bench-quick: $(STAMP)
	$(PY) benchmarks/relax.py --quick

# Headless Chromium for the report's browser test (tests/test_pipeline.py), from Debian, when missing.
browser:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update && $(SUDO) apt-get install -y chromium chromium-driver; }

# Real Fashion-MNIST, offline, from Debian (the benchmarks use it; tests that need it skip without it).
data:
	test -d /usr/share/datasets/fashion-mnist || (apt-get update && apt-get install -y dataset-fashion-mnist)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
