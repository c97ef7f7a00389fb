# Two entry points on a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned so pip takes the CPU wheel that lies on disk here (a bare `torch` pulls a multi-GB CUDA build).
TORCH_SPEC ?= torch==2.13.0
# Triton for the fused cascade's tests, run on the CPU by its interpreter (a CUDA torch brings its own Triton).
# 3.8.0, not 3.6.0: 3.6.0's interpreter fails under numpy 2.4 (int() of a 1-element array); ~16 s from this disk.
TRITON_SPEC ?= triton==3.8.0
DEMO_DIR ?= demo_out
# The device check (bench/gpu_check.py): inputs made here, carried to a GPU machine, run there with its own python3.
GPU_INPUTS ?= .gpu_check
GPU_OUT ?= gpu_check_out
GPU_SITE ?= /tmp/asym3d-gpu-site
# What the check needs that the device image lacks, for its Python 3.12: simplejpeg (training shards are JPEG) and
# ffmpeg-python with imageio-ffmpeg's ffmpeg binary (the check runs extract-flow on real clips there).
GPU_WHEELS ?= simplejpeg==1.9.0 ffmpeg-python==0.2.0 future==1.0.0 imageio-ffmpeg==0.7.0

.PHONY: setup test demo clean gpu-check-inputs gpu-check

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)" "$(TRITON_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

demo: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh $(DEMO_DIR)

gpu-check-inputs: setup
	$(BIN)/python bench/gpu_check.py --prepare $(GPU_INPUTS)
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
		-d $(GPU_INPUTS)/wheels $(GPU_WHEELS)
	du -sh $(GPU_INPUTS)

# No .venv: the device's python3 has torch with CUDA; the wheels go to a scratch site-packages.
gpu-check:
	python3 -m pip install --quiet --no-index --no-deps --no-compile --target $(GPU_SITE) $(GPU_INPUTS)/wheels/*.whl
	PYTHONPATH=$(GPU_SITE) PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --inputs $(GPU_INPUTS) --out $(GPU_OUT) \
		$(if $(GPU_SECTIONS),--sections $(GPU_SECTIONS))

clean:
	rm -rf $(VENV) $(DEMO_DIR) $(GPU_OUT) *.egg-info
