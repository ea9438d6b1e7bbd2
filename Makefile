# ppcr: `make train` runs the default job, `make test` runs the tests; both install first if needed.
PYTHON     ?= python3
VENV       ?= .venv
# The torch build, by name (README "Two commands"): TORCH=cu12 for a CUDA 12.x GPU machine, TORCH=cpu for
# a CPU-only one; or TORCH_SPEC given whole. `make check-install` resolves every TORCH_SPEC_* with pip.
TORCH_SPEC_pypi := torch==2.14.1 torchvision==0.29.1
TORCH_SPEC_cu12 := torch==2.10.0 torchvision==0.25.0
TORCH_SPEC_cpu  := torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu
TORCH      ?= pypi
TORCH_SPEC ?= $(TORCH_SPEC_$(TORCH))
CONFIG     ?= launch/configs/default.yaml
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.ppcr-installed
SHARDS     := shards/synthetic_unc/manifest.json

.PHONY: install test shards models pretrain train eval figures bench soak clean-data

# LOCKED=1 installs deepspeed and ppcr's dependencies at the versions the test suite passed with
# (constraints.txt; torch stays TORCH_SPEC's); without it, the newest that setup.cfg's bounds allow.
LOCKED     ?=
PIN        := $(if $(LOCKED),-c constraints.txt)

# Reinstalled when the package metadata, the constraints or this file change (the stamp is then stale).
$(STAMP): setup.cfg pyproject.toml Makefile constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel
	$(PY) -m pip install $(TORCH_SPEC)
	DS_BUILD_OPS=0 $(PY) -m pip install --no-build-isolation $(PIN) deepspeed
	$(PY) -m pip install --no-build-isolation $(PIN) -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Dry-run pip resolutions of every TORCH_SPEC_* with deepspeed and ppcr on top (installs nothing).
.PHONY: check-install
check-install: | $(STAMP)
	$(PY) launch/check_install.py

# Lint and format first (ruff, pyproject.toml; seconds), then the suite on TEST_WORKERS pytest-xdist workers, a
# test file to a worker (its module fixtures built once), the cores shared out between them (tests/conftest.py).
# Most tests start processes (2 DeepSpeed ranks, a launcher) that leave a core idle while one imports or waits:
# 2 workers on 2 cores took `make test` from 15:45 to 11:42, using at most 14 GB of memory.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

$(SHARDS): $(CONFIG) | $(STAMP)
	$(VENV)/bin/ppcr-shards synth --config $(CONFIG)
	$(VENV)/bin/ppcr-shards build --refer-root data/refer --dataset synthetic --split-by unc \
		--images data/images/synthetic --out shards/synthetic_unc
	$(VENV)/bin/ppcr-shards verify shards/synthetic_unc

shards: $(SHARDS)

# The tiny MLLM and SAM the default recipe names: committed pretrained weights (make pretrain remakes
# them); ppcr-tiny writes random-initialised ones only where a recipe's are missing.
MODELS := launch/pretrained/tiny-llava/config.json
$(MODELS): $(CONFIG) | $(STAMP)
	$(VENV)/bin/ppcr-tiny --config $(CONFIG)

models: $(MODELS)

# Pretrain the tiny backbones the recipe names (ppcr-pretrain: vision tower, grounding, SAM) on
# synthetic scenes of their own seed; rewrites model.mllm_path and model.sam_checkpoint.
pretrain: | $(STAMP)
	$(VENV)/bin/ppcr-pretrain --config $(CONFIG) $(ARGS)

clean-data:
	rm -rf data/refer/synthetic data/images/synthetic shards/synthetic_unc

# The default job: the tiny model on the synthetic set, ZeRO-3 over NPROC ranks (CPU ranks without a GPU).
# Re-running resumes from the run's latest checkpoint; ARGS adds overrides (ARGS="train.max_steps=100").
NPROC ?= 2
ARGS  ?=
train: $(SHARDS) $(MODELS)
	$(VENV)/bin/deepspeed --num_gpus $(NPROC) launch/train.py --config $(CONFIG) $(ARGS)

# Evaluate by generation on every eval split: CKPT is a run directory (its latest checkpoint), a
# checkpoint directory or a saved model; ABLATIONS=1 adds the ablation rows.
CKPT ?= runs/default
eval: $(SHARDS) | $(STAMP)
	$(VENV)/bin/deepspeed --num_gpus $(NPROC) launch/eval.py --checkpoint $(CKPT) $(if $(ABLATIONS),--ablations) $(ARGS)

# The README's pictures from CKPT's latest checkpoint: make eval's mask grid and Prec@X plot, and the
# demo answering one bundled example in headless Chromium (chromium and chromium-driver installed).
DEMO_EXAMPLE ?= --image ppcr/eval/demo_examples/val_1207.jpg --expression "the square on the left"
figures: eval
	cp $(CKPT)/eval/$$(cat $(CKPT)/checkpoints/latest)/masks.png launch/figures/default_val_masks.png
	cp $(CKPT)/eval/$$(cat $(CKPT)/checkpoints/latest)/prec_at_x.png launch/figures/default_prec_at_x.png
	$(PY) launch/demo_screenshot.py --checkpoint $(CKPT) $(DEMO_EXAMPLE) --out launch/figures/demo.png

# The benchmark suite (not timed tests): data pipeline, training step against a plain loop, profile,
# memory, scaling; writes runs/bench/results.md and results.json.
bench: $(SHARDS) $(MODELS)
	$(PY) launch/bench.py --config $(CONFIG) $(ARGS)

# The GPU check: Qwen2.5-VL-7B + SAM ViT-H built from their published configs with random weights (no
# download), a few ZeRO-3 bf16 steps on one GPU at the recipe's sizes; step time, samples/s, peak memory
# against the estimator, MFU in runs/gpu_check/gpu_check.md. ARGS adds options, e.g. ARGS="--steps 10".
.PHONY: gpu-check
gpu-check: | $(STAMP)
	$(PY) launch/gpu_check.py $(ARGS)

# A long run (SOAK_STEPS steps, periodic checkpoints and validation) and the check that host memory
# stays flat and step time does not grow; writes runs/soak/soak.md. Not part of `make test`.
SOAK_STEPS ?= 4000
soak: $(SHARDS) $(MODELS)
	$(PY) launch/soak.py --config $(CONFIG) --nproc $(NPROC) --steps $(SOAK_STEPS) $(ARGS)
