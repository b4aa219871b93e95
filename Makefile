# The whole set-up on a fresh machine is `make test` or `make demo`: each creates .venv/ when it is
# missing, installs the pinned requirements into it, then runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-stamp

# CUDA extension esvit_kernels._C (csrc/): built in place by `make build` (and so by `make test`) when a
# CUDA toolkit is found; ninja keeps build/ so a second build recompiles only what changed. CI compiles
# for one architecture to keep its time sane; set TORCH_CUDA_ARCH_LIST for your GPU (e.g. "8.0;9.0").
CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
TORCH_CUDA_ARCH_LIST ?= 9.0
MAX_JOBS ?= 2
export CUDA_HOME

.PHONY: test build demo lint venv clean gpu-check

# First contact with a GPU (tools/gpu_check.py): install, env, build, tests/gpu, compute-sanitizer, benchmark
# headline, OUT/summary.md, within 540 s. Uses .venv's Python only where it exists and sees a CUDA device, else
# python3 (the GPU machines' own). Without a GPU it is a dry run (exit 0) that says what it skipped and why.
OUT ?= gpu-check-out
gpu-check:
	@if [ -x $(PY) ] && $(PY) -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; \
	  then GPY=$(PY); else GPY=$(PYTHON); fi; \
	  echo "gpu-check with $$GPY -> $(OUT)"; $$GPY tools/gpu_check.py --out $(OUT) $(GPU_CHECK_ARGS)

$(STAMP): requirements.txt pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	ESVIT_KERNELS_BUILD_CUDA=0 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

build: $(STAMP)
	TORCH_CUDA_ARCH_LIST="$(TORCH_CUDA_ARCH_LIST)" MAX_JOBS=$(MAX_JOBS) $(PY) setup.py -q build_ext --inplace

test: build
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

# The whole story on the embedded (generated) dataset, fresh each time: environment report, fused kernels vs
# the reference, EsViT pretraining (tiny Swin on the CPU for a few minutes; Swin-T on the fused kernels when a
# GPU is present), then k-NN / linear probe / correspondence of the pretrained vs a random-init backbone.
demo: $(STAMP)
	$(PY) -m esvit_kernels
	TRITON_INTERPRET=$$($(PY) -c "import torch; print(0 if torch.cuda.is_available() else 1)") \
	  $(PY) -m esvit_kernels.demo
	$(PY) -m esvit demo --output runs/demo --fresh

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf build *.egg-info esvit_kernels/_C*.so .pytest_cache
