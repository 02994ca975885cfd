# minillm — `make demo` runs the whole pipeline on the bundled sample world on CPU;
# `make reproduce` trains the papers' ablations on it (runs/reproduce/report.md);
# `make test` runs the test suite. All create .venv on first use.
PY      ?= python3
VENV    ?= .venv
# The CPU build of torch. GPU users: install the CUDA build of torch into $(VENV) first
# (see README); pip then keeps it, because the project only asks for torch>=2.4.
TORCH   ?= torch==2.13.0
BIN      = $(VENV)/bin
RUN     ?= runs/demo
DATA    ?= data/sample
SEED    ?= 1337

.PHONY: setup test demo reproduce bench clean
setup: $(VENV)/.installed
$(VENV)/.installed: setup.cfg
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test,eval]"
	touch $@

# Two pytest workers, one test file each at a time (module fixtures are built once): the tests are mostly
# single-threaded subprocesses, so the two cores of the reference machine halve the wall time.
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

demo: setup
	bash demo/demo.sh $(BIN)/python $(DATA) $(RUN) $(SEED)

reproduce: setup
	$(BIN)/python scripts/reproduce.py --out runs/reproduce

bench: setup
	$(BIN)/python bench/bench_train_step.py --preset small --seq-len 512 --batch-size 2

clean:
	rm -rf $(RUN) $(DATA)
