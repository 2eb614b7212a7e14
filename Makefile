# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# A bare `torch` requirement pulls several GB of CUDA wheels; pin the CPU build when torch is missing.
TORCH_PIN ?= torch==2.13.0
# Triton runs the CUDA compression kernels; without a GPU its interpreter runs them in the tests. The
# wheel is large (~290 MB, ~1 GB installed), so it is pinned here rather than in the dev extras, and
# left alone when present (CUDA builds of torch bring their own matching triton).
TRITON_PIN ?= triton==3.9.0
# A new folder per run: a finished demo is never overwritten, and `make demo` can be run again.
DEMO_OUT ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: install demo test lint bench-overhead clean

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install --quiet "$(TORCH_PIN)"
	@$(PYTHON) -c "import triton" 2>/dev/null || $(PIP) install --quiet "$(TRITON_PIN)"
	@$(PIP) install --quiet --disable-pip-version-check -e ".[dev]"

# The main job: backprop, Features Replay, DDG, DNI and hybrid likelihood-ratio training side by side on
# Fashion-MNIST (digits when it is nowhere), two stages each; -o copies=32 reaches only ulr.
demo: install
	$(PYTHON) -m gradkit compare --model cnn --data fashion-mnist --fallback-data digits \
		--epochs 3 --limit-train 12000 --limit-test 5000 --methods bp,fr:2,ddg:2,dni:2,ulr:2 -o copies=32 \
		--out $(DEMO_OUT)
	$(PYTHON) -m gradkit memory --model cnn --data fashion-mnist --threads 1 \
		--activations exact,int8,int4,int2,naive8 \
	|| $(PYTHON) -m gradkit memory --model cnn --data digits --threads 1 --activations exact,int8,int4,int2,naive8

test: install
	$(PYTHON) -m pytest -q

lint:
	ruff check src tests benchmarks
	mypy

bench-overhead: install
	$(PYTHON) benchmarks/overhead/run.py

clean:
	rm -rf runs build dist .pytest_cache src/*.egg-info
