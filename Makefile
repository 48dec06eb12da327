# Two commands do everything on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
# Python 3.11 to 3.13 (3.11 first: this machine's CPU build of torch is for 3.11).
PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3.13 || command -v python3)
PYTHON_OK := $(shell $(PYTHON) -c 'import sys; print(int((3, 11) <= sys.version_info[:2] <= (3, 13)))' 2>/dev/null)
ifneq ($(PYTHON_OK),1)
$(error $(PYTHON) is not Python 3.11, 3.12 or 3.13 (it is: $(shell $(PYTHON) --version 2>&1)); install one of those, or name it: make PYTHON=/path/to/python3.12)
endif
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTOS := $(shell find proto -name '*.proto' | sort)
GEN_STAMP := gen/.stamp
HRFLOW_VENV := .venv-hrflow
HRFLOW_STAMP := $(HRFLOW_VENV)/.installed
TEI_VENV := .venv-tei
TEI_STAMP := $(TEI_VENV)/.installed
PEERS_FASTEMBED_VENV := .venv-peers-fastembed
PEERS_INFINITY_VENV := .venv-peers-infinity
PEERS_STAMPS := $(PEERS_FASTEMBED_VENV)/.installed $(PEERS_INFINITY_VENV)/.installed
# Nothing reaches the Hugging Face hub unless asked: `make run HF_HUB_OFFLINE=0 MODEL_ID=...` downloads a model.
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

# The image: `make image` builds it with podman or docker, whichever is here.
IMAGE ?= embedding-service:latest
BASE_IMAGE ?=
BUILD_FLAGS ?=
CONTAINER_TOOL ?= $(shell command -v podman || command -v docker)

.PHONY: run test test-image image gen venv bench bench-mpnet bench-cpu load docs deploy clean

run: $(GEN_STAMP)  ## start server + Envoy (MODEL_ID=hub-id-or-folder, ARGS="--help" for every flag; Ctrl-C stops both)
	$(PY) -m service.run --replicas $(or $(REPLICAS),1) $(foreach m,$(MODEL_ID),--model-id $(m)) $(ARGS)

test: $(GEN_STAMP) $(HRFLOW_STAMP) $(TEI_STAMP)  ## every test but the image's, against a real Envoy, a real server and the real model
	$(PY) -m pytest -m 'not image' $(PYTEST_ARGS)

# The image's tests: build it (on a Debian base made here: no registry serves base images to this machine), run it,
# and run the pod from its filesystem. Needs root, podman, runc and mmdebstrap (tests/image.py installs what is missing).
test-image: $(GEN_STAMP)  ## build the image and test it: every API through its port, unprivileged, torch-free, SIGTERM drains, the pod
	$(PY) -m pytest -m image $(PYTEST_ARGS)

image:  ## build the image with podman or docker: IMAGE=name:tag, BASE_IMAGE=..., BUILD_FLAGS=...
	@test -n "$(CONTAINER_TOOL)" || { echo "make image needs podman or docker"; exit 1; }
	$(CONTAINER_TOOL) build $(if $(findstring podman,$(CONTAINER_TOOL)),--format docker) \
		$(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) $(BUILD_FLAGS) -t $(IMAGE) .
	@$(CONTAINER_TOOL) image inspect --format '{{.Size}}' $(IMAGE) | awk '{printf "built $(IMAGE): %.0f MB\n", $$1 / 1e6}'

venv: $(STAMP)

# The HrFlow SDK lives in its own environment: it installs stray top-level `tests` and `libs` packages.
$(HRFLOW_STAMP):
	@test -x $(HRFLOW_VENV)/bin/python || $(PYTHON) -m venv $(HRFLOW_VENV)
	$(HRFLOW_VENV)/bin/python -m pip install --quiet hrflow==1.9.0 numpy
	@touch $@

# Text Embeddings Inference's Python integrations, in their own environment: langchain-huggingface 1.2.1 (the last
# release that takes an endpoint URL) needs huggingface_hub<2, which the main environment pins at 2.4.0.
$(TEI_STAMP):
	@test -x $(TEI_VENV)/bin/python || $(PYTHON) -m venv $(TEI_VENV)
	$(TEI_VENV)/bin/python -m pip install --quiet langchain-huggingface==1.2.1 langchain-core==1.7.2 huggingface_hub==1.33.0 \
		llama-index-embeddings-text-embeddings-inference==0.6.0 llama-index-core==0.14.25 numpy==2.4.6
	@touch $@

# The peers of `make bench PEERS=1` (bench/peers.py), each in its own environment, every package pinned.
$(PEERS_FASTEMBED_VENV)/.installed: bench/peers/requirements-fastembed.txt
	@test -x $(PEERS_FASTEMBED_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_FASTEMBED_VENV)
	$(PEERS_FASTEMBED_VENV)/bin/python -m pip install --quiet -r $<
	@touch $@

# Infinity needs torch: the pinned CPU build first, as for .venv.
$(PEERS_INFINITY_VENV)/.installed: bench/peers/requirements-infinity.txt
	@test -x $(PEERS_INFINITY_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_INFINITY_VENV)
	$(PEERS_INFINITY_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(PEERS_INFINITY_VENV)/bin/python -m pip install --quiet -r $<
	@touch $@

# torch first and pinned: that build lies on this machine's disk; anything unpinned pulls a CUDA build.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	@# gen/ is generated after this install, so put it on the path with a .pth rather than a package mapping.
	$(PY) -c 'import site; open(site.getsitepackages()[0] + "/embedding-service-gen.pth", "w").write("$(CURDIR)/gen\n")'
	@touch $@

# Python stubs and the descriptor set Envoy's transcoder loads; generated, never committed or edited.
gen: $(GEN_STAMP)

$(GEN_STAMP): $(STAMP) $(PROTOS)
	@rm -rf gen && mkdir -p gen
	$(PY) -m service.tools.gen_protos
	@touch $@

bench: $(GEN_STAMP) $(if $(PEERS),$(PEERS_STAMPS))  ## throughput and latency against the baselines (PEERS=1: and fastembed, Infinity); writes bench/RESULTS.md and bench/MPNET.md
	$(PY) -m bench $(if $(PEERS),--peers) $(ARGS)
	$(MAKE) --no-print-directory bench-mpnet ARGS=

bench-cpu: $(GEN_STAMP)  ## what a request costs the server's CPU by shape, a short text against plain encode, a bulk stream against the engine; writes bench/CPU.md
	$(PY) -m bench.cpu $(ARGS)

bench-mpnet: $(GEN_STAMP) $(if $(PEERS),$(PEERS_STAMPS))  ## all-mpnet-base-v2 beside MiniLM, each against its baseline (PEERS=1: and Infinity); writes bench/MPNET.md
	$(PY) -m bench.second_model "$$($(PY) -m tests.second_model)" $(ARGS)

docs: $(STAMP)  ## regenerate the configuration and metrics references in docs/
	$(PY) -m service.tools.docs

deploy: $(GEN_STAMP)  ## render deploy/ and envoy.yaml from the config (CONFIG=file)
	$(PY) -m service.deploy $(if $(CONFIG),--config $(CONFIG))
	$(PY) -m service.envoy $(if $(CONFIG),--config $(CONFIG)) > envoy.yaml

load: $(GEN_STAMP)  ## 64 clients, every dialect, 60 s x 2 through Envoy; writes bench/LOAD.md
	$(PY) -m bench.load $(ARGS)

clean:
	rm -rf gen .pytest_cache
