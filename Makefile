# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch (training, export) is pinned exactly in pyproject.toml: a looser spec pulls the CUDA build.
EXTRAS_DEMO := runtime,local
EXTRAS_TEST := runtime,local,train,dev

.PHONY: demo test venv train clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is needed"' \
		|| { echo "error: Python 3.11 or newer is needed"; exit 1; }
	@$(PYTHON) -m venv $(VENV) || { echo "error: python3 -m venv failed; on Debian/Ubuntu: apt install python3-venv"; exit 1; }
	$(BIN)/python -m pip install --quiet --upgrade pip

# Re-install when pyproject.toml changes.
$(VENV)/.installed-%: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[$*]"
	@rm -f $(VENV)/.installed-*
	@touch $@

venv: $(VENV)/.installed-$(EXTRAS_TEST)

demo: $(VENV)/.installed-$(EXTRAS_DEMO)
	$(BIN)/sluice demo --seconds $${DEMO_SECONDS:-60} --json demo-summary.json

test: $(VENV)/.installed-$(EXTRAS_TEST)
	$(BIN)/python -m pytest

# Retrain the bundled models (about 10 minutes on 2 cores) and re-measure their accuracy.
train: $(VENV)/.installed-$(EXTRAS_TEST)
	$(BIN)/python -m streams.training.train --model all --out engines/models

clean:
	rm -rf $(VENV) .sluice demo-summary.json
