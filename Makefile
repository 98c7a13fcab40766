# embedlab — `make demo` runs every phase on Fashion-MNIST; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED_KERAS := $(wildcard ../shared/keras/models)

.PHONY: install demo test lint bench clean fashion-mnist

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# Fashion-MNIST offline: Debian's package when we are root and it is missing
# (online, keras.datasets downloads it instead).
fashion-mnist:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && [ ! -d "$${KERAS_HOME:-$$HOME/.keras}/datasets/fashion-mnist" ] \
	    && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's dataset-fashion-mnist"; \
	  apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	  (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1) || \
	  echo "could not install dataset-fashion-mnist; keras.datasets will try to download it"; \
	fi

# KERAS_HOME defaults to ../shared/keras when that folder exists (offline ImageNet
# weights for MobileNet 0.25); set KERAS_HOME yourself to use another cache.
demo: install fashion-mnist
	$(if $(SHARED_KERAS),KERAS_HOME=$${KERAS_HOME:-$(abspath ../shared/keras)}) \
	  $(PY) run.py all --config configs/demo.yaml
	$(PY) run.py export --run demo
	@echo "reports: $(abspath reports/demo/index.html) (pretrained space)"
	@echo "         $(abspath reports/demo/comparison.html) (pretrained vs trained heads)"
	@echo "serve the best model's bundle: $(PY) run.py serve --bundle runs/demo/bundle   (then open http://127.0.0.1:8000/)"

lint: install
	$(VENV)/bin/ruff check .

test: install lint
	$(PY) -m pytest -q

bench: install
	$(PY) bench/bench_extract_pipeline.py
	$(PY) bench/bench_retrieval.py --output bench/RESULTS_retrieval.md

clean:
	rm -rf runs reports/demo tfrecords/fashion_mnist*
