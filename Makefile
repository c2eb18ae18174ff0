# Two commands on a fresh Debian machine with python3:  make demo   |   make test
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORK ?= work/tiny

.PHONY: demo test test-slow test-all test-triton venv clean bench

$(STAMP): setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[torch,test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m cheers_deploy.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -rfEs -m "not slow" tests

# the Triton repository and a real tritonserver on loopback (also part of `make test`); the first run installs
# tritonserver from the nvidia-pytriton wheel into ~/.cache/cheers-deploy/triton and tritonclient (--no-deps)
test-triton: $(STAMP)
	$(BIN)/python -m pytest -q -rfEs tests/test_triton.py

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -rfEs -m slow tests

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -rfEs -m "slow or not slow" tests

bench: $(STAMP)
	$(BIN)/cheers-deploy bench --workdir $(WORK) --backends torch,ort --out bench/results/cpu

clean:
	rm -rf $(VENV) work
