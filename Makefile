# interest-stream: the two commands are `make demo` and `make test`.
# Both install what is missing (a .venv with the package, Debian's redis-server, the Kafka
# jars from Maven Central) and are idempotent: a second run reinstalls nothing.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
EVENTS ?= 0
RATE   ?= 20
PYTEST_ARGS ?=

.PHONY: install infra browser demo test models evaluate quality bench scaling clean

# One resolution for everything, so click stays < 8.4 for faust-streaming; the build
# backend's warnings are silenced (its errors still fail the install).
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	PYTHONWARNINGS=ignore $(PY) -m pip install --quiet -e '.[export,dev]'
	@touch $(STAMP)

install: $(STAMP)

infra: install
	$(PY) -m streams install

demo: infra
	$(PY) -m streams demo --events $(EVENTS) --rate $(RATE)

# Debian's Chromium, for the dashboard's browser test
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

test: infra browser
	$(PY) -m pytest $(PYTEST_ARGS)

models: install
	$(PY) -m model_export build --out artifacts/ml-100k

evaluate: install
	$(PY) -m model_export evaluate --bundle artifacts/ml-100k --lags --json artifacts/eval-ml-100k.json --plot artifacts/eval-ml-100k.png

quality: install
	$(PY) -m model_export quality --seeds 0 1 2 --json artifacts/quality.json

bench: infra
	$(PY) -m streams bench --json artifacts/bench.json

# build and evaluate time and peak RSS against data size (docs/benchmarks.md; about 40 minutes)
scaling: install
	$(PY) -m model_export scaling --scales 1x1 10x10 100x1 --epochs 1 --json artifacts/scaling.json --plot artifacts/scaling.png

clean:
	rm -rf .state artifacts
