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

.PHONY: install demo test acceptance lint bench-overhead gpu-data gpu-check clean

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

# Acceptance commands at full size that are too long for every `make test` (each has a reduced twin
# there): cnn on all of Fashion-MNIST for 3 epochs, about 150 s on 2 cores.
acceptance: install
	$(PYTHON) -m pytest -q -m acceptance

lint:
	ruff check src tests benchmarks
	mypy

bench-overhead: install
	$(PYTHON) benchmarks/overhead/run.py

# CIFAR-10 for benchmarks/gpu/methods.py and the AG News subset for the language-model part, into the
# git-ignored data/ of this checkout (methods.py uses synthetic CIFAR-shaped tensors when it is absent).
SHARED_CIFAR ?= ../shared/datasets/cifar10-jpeg.tar.gz
SHARED_AG_NEWS ?= ../shared/datasets/ag_news_small
gpu-data:
	@mkdir -p data
	@if [ -f data/cifar10-jpeg.tar.gz ]; then echo "data/cifar10-jpeg.tar.gz is there"; \
	elif [ -f "$(SHARED_CIFAR)" ]; then cp "$(SHARED_CIFAR)" data/ && echo "copied $(SHARED_CIFAR) to data/"; \
	else echo "no $(SHARED_CIFAR): benchmarks/gpu/methods.py will use synthetic CIFAR-shaped tensors"; fi
	@if [ -d data/ag_news_small ]; then echo "data/ag_news_small is there"; \
	elif [ -d "$(SHARED_AG_NEWS)" ]; then cp -r "$(SHARED_AG_NEWS)" data/ && echo "copied $(SHARED_AG_NEWS) to data/"; \
	else echo "no $(SHARED_AG_NEWS): the language-model part of gpu-check will fail (no text data)"; fi

# On a GPU machine (no network): gpu-marked tests + benchmarks/gpu/ + the language-model benchmark at
# the issue's batch shape, one summary table, under 10 minutes.
# Deliberately not depending on `install`: nothing is pip-installed there (see benchmarks/gpu/README.md).
gpu-check:
	PYTHON=$(PYTHON) bash benchmarks/gpu/check.sh

clean:
	rm -rf runs build dist .pytest_cache src/*.egg-info
