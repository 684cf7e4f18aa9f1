# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv/ and
# install the project into it the first time (and again whenever pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# Without CUDA take the CPU build of torch: the local CPU wheel where the machine has one
	# (then its dependencies from the index), else PyTorch's CPU index. An unpinned torch would
	# pull a multi-GB CUDA build.
	if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(BIN)/python -c "import torch" 2>/dev/null; then \
		if $(BIN)/pip install --quiet --no-deps --no-index torch==2.13.0 2>/dev/null; then \
			$(BIN)/pip install --quiet torch==2.13.0; \
		else \
			$(BIN)/pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu; \
		fi; \
	fi
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

# The tests also launch DeepSpeed ZeRO-2/3 on CPU processes: DeepSpeed without compiled ops.
$(TEST_STAMP): $(STAMP)
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet -e ".[test,deepspeed]"
	touch $(TEST_STAMP)

demo: $(STAMP)
	$(BIN)/chatpipe run configs/tiny.yaml --run-dir runs/tiny

test: $(TEST_STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf runs $(VENV)
