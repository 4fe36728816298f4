# Chest X-ray pneumonia classifier: preprocess -> shard -> train -> evaluate, locally or on Kubernetes.
# `make help` lists the targets. Every target installs what it needs into .venv first.

SHELL := /usr/bin/env bash -o pipefail
# TensorFlow's C++ start-up chatter (oneDNN, CUDA probes) would drown the stage logs.
export TF_CPP_MIN_LOG_LEVEL ?= 2
.SHELLFLAGS := -ec
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python

## Local pipeline
ARCHIVE ?=
WORKERS ?= 1
CONFIG ?= $(if $(ARCHIVE),jobs/configs/local.yaml,jobs/configs/demo.yaml)
DATA_ROOT ?= $(if $(ARCHIVE),data/local,data/demo)
DEMO_ARCHIVE ?= data/demo/raw/demo-chest-xray.zip
DEMO_IMAGES ?= 300
SET ?=
# Evaluated once (a plain ?= would call `date` again at every use).
ifeq ($(origin RUN_ID), undefined)
RUN_ID := local-$(shell date -u +%Y%m%d-%H%M%S)
endif
STAGE_ARGS = --config $(CONFIG) --set data.root=$(DATA_ROOT) --set data.archive=$(or $(ARCHIVE),$(DEMO_ARCHIVE)) \
	--set train.run_id=$(RUN_ID) --set cluster.num_workers=$(WORKERS) $(foreach s,$(SET),--set $(s))

## Cluster
PROJECT ?= PROJECT
REGION ?= REGION
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo 0.1.0)
IMAGE ?= $(REGION)-docker.pkg.dev/$(PROJECT)/pneumonia/pneumonia:$(VERSION)
BASE_IMAGE ?= tensorflow/tensorflow:2.21.0-gpu
BAKE_WEIGHTS ?= 0
CONTEXT ?=
NAMESPACE ?= pneumonia
BUCKET ?=
GPUS_PER_WORKER ?= 1
GPU_TYPE ?= nvidia-l4
DRY_RUN ?=
# 0: train-cluster uses IMAGE as it is (already pushed, or local to the cluster test bed's nodes)
PUSH ?= 1
K8S_FLAGS ?=

## Local control plane (tests/cluster/testbed.py, docs/cluster-local.md)
CLUSTER_NAME ?= pneumonia
CLUSTER_KUBECONFIG ?= $(HOME)/.kube/pneumonia-$(CLUSTER_NAME).yaml

## Tests and benchmarks
PYTEST_ARGS ?=
# Test processes (pytest-xdist); 0 runs the suite in this process.
TEST_JOBS ?= 2
BENCH_ARGS ?=
# bench/bench_quality.py's own flags, e.g. QUALITY_ARGS='--rates 0.2' (the acceptance case alone)
QUALITY_ARGS ?=
# --fresh: rebuild the stand-in base and the image from scratch (a cold run)
IMAGE_TEST_ARGS ?=

.PHONY: help
help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "Variables (local):   ARCHIVE=path.zip WORKERS=$(WORKERS) CONFIG=$(CONFIG) DATA_ROOT=$(DATA_ROOT)"
	@echo "                     SET='key=value ...' RUN_ID=id (resume or re-evaluate) DEMO_IMAGES=$(DEMO_IMAGES)"
	@echo "Variables (cluster): PROJECT REGION BUCKET=gs://bucket/prefix IMAGE (default: tag from git describe)"
	@echo "                     WORKERS GPUS_PER_WORKER=$(GPUS_PER_WORKER) GPU_TYPE=$(GPU_TYPE) NAMESPACE=$(NAMESPACE)"
	@echo "                     CONTEXT ARCHIVE RUN_ID DRY_RUN=1 K8S_FLAGS='...' BASE_IMAGE BAKE_WEIGHTS=$(BAKE_WEIGHTS)"
	@echo "Variables (tests):   PYTEST_ARGS='...' TEST_JOBS=$(TEST_JOBS) BENCH_ARGS='...' IMAGE_TEST_ARGS=--fresh"
	@echo "Variables (local control plane): CLUSTER_NAME=$(CLUSTER_NAME) CLUSTER_KUBECONFIG=$(CLUSTER_KUBECONFIG)"
	@echo "                     PNEUMONIA_TEST_CLUSTER=name (cluster-test reuses that running cluster)"

.PHONY: setup
setup: $(VENV)/.setup-stamp ## Create .venv and install the package with its test tools (quick when done)

$(VENV)/.setup-stamp: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

.PHONY: demo-archive
demo-archive: setup ## Write the synthetic archive (real Kaggle layout) to DEMO_ARCHIVE
	test -f $(DEMO_ARCHIVE) || $(PY) -m pneumonia.data.demo --out $(DEMO_ARCHIVE) --num-images $(DEMO_IMAGES)

.PHONY: train-local
train-local: setup $(if $(ARCHIVE),,demo-archive) ## Run all four stages here (ARCHIVE=real.zip, WORKERS=2 for two workers)
	$(PY) jobs/preprocess.py $(STAGE_ARGS)
	$(PY) jobs/shard.py $(STAGE_ARGS)
ifeq ($(WORKERS),1)
	$(PY) jobs/train.py $(STAGE_ARGS)
else
	$(PY) -m pneumonia.training.local_workers --workers $(WORKERS) -- $(STAGE_ARGS)
endif
	$(PY) jobs/evaluate.py $(STAGE_ARGS)

.PHONY: test
test: setup ## Run the test suite (slow end-to-end tests included; the control plane's are cluster-test's)
	$(PY) -m pytest -n $(TEST_JOBS) --dist worksteal -m 'not cluster' $(PYTEST_ARGS)

.PHONY: test-fast
test-fast: setup ## Run the tests without the slow end-to-end ones
	$(PY) -m pytest -n $(TEST_JOBS) --dist worksteal -m 'not slow and not cluster' $(PYTEST_ARGS)

.PHONY: cluster-build
cluster-build: ## Build the local control plane's binaries and Kueue that are missing (Go 1.26; ~/.cache/pneumonia-k8s)
	tests/cluster/build.sh
	tests/cluster/build-kueue.sh

.PHONY: cluster-up
cluster-up: setup ## Start a local control plane on 127.0.0.1 (real API server, etcd, controllers, scheduler; simulated GKE nodes)
	$(PY) tests/cluster/testbed.py up --name $(CLUSTER_NAME) --kubeconfig $(CLUSTER_KUBECONFIG)

.PHONY: cluster-down
cluster-down: setup ## Stop and delete the local control plane CLUSTER_NAME
	$(PY) tests/cluster/testbed.py down --name $(CLUSTER_NAME) --kubeconfig $(CLUSTER_KUBECONFIG)

.PHONY: cluster-local
cluster-local: setup cluster-up ## The demo pipeline through the local control plane: image built, bucket stand-in, `kubectl apply -f manifests/`, pods as podman containers (root)
	$(PY) tests/cluster/local.py --kubeconfig $(CLUSTER_KUBECONFIG)

.PHONY: cluster-local-launcher
cluster-local-launcher: setup cluster-up ## The same with the launcher: `make train-cluster PUSH=0` with the built image, then its status and logs
	$(PY) tests/cluster/local.py --launcher --kubeconfig $(CLUSTER_KUBECONFIG) --cluster-name $(CLUSTER_NAME)

.PHONY: cluster-test
cluster-test: setup ## Run the tests against a real control plane (one of their own, or PNEUMONIA_TEST_CLUSTER=name)
	tests/cluster/build.sh >/dev/null
	tests/cluster/build-kueue.sh >/dev/null
	$(PY) -m pytest -m cluster --ignore=tests/cluster/test_job_faults.py $(PYTEST_ARGS)

# Apart from cluster-test because of its time: the five cases take about 17 minutes on 2 cores (two
# workers in containers each). CI runs both (.ci/run).
.PHONY: cluster-faults
cluster-faults: setup ## The fault matrix through the real Job controller, pods as podman containers (root; slow)
	tests/cluster/build.sh >/dev/null
	$(PY) -m pytest -p no:xdist tests/cluster/test_job_faults.py $(PYTEST_ARGS)

.PHONY: image-test
image-test: setup ## Build the image on a stand-in base (podman, mmdebstrap; root) and run every stage in it as the pods do
	$(PY) tests/image/run.py $(IMAGE_TEST_ARGS)

.PHONY: lint
lint: setup ## Lint Python (ruff), the Dockerfile (hadolint) and the manifests (kubernetes-validate)
	$(VENV)/bin/ruff check src jobs tests bench
	$(VENV)/bin/hadolint Dockerfile
	$(VENV)/bin/kubernetes-validate --strict -k 1.30.0 -k 1.37.0 manifests/*.yaml

.PHONY: bench
bench: setup ## Benchmarks: shard/loader throughput, training images/s, quality against a known ceiling (bench/results/)
	$(PY) bench/bench_data.py $(BENCH_ARGS)
	$(PY) bench/bench_train.py $(BENCH_ARGS)
	$(PY) bench/bench_quality.py $(QUALITY_ARGS)

.PHONY: image
image: ## Build the image IMAGE (BASE_IMAGE=tensorflow/tensorflow:2.21.0 for CPU, BAKE_WEIGHTS=1; needs Docker)
	docker build --build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg BAKE_WEIGHTS=$(BAKE_WEIGHTS) \
		--build-arg VERSION=$(VERSION) --build-arg REVISION=$$(git rev-parse HEAD 2>/dev/null || echo unknown) \
		-t $(IMAGE) .

.PHONY: push
push: image ## Build and push IMAGE to its registry
	docker push $(IMAGE)

.PHONY: train-cluster
train-cluster: setup $(if $(DRY_RUN)$(filter 0,$(PUSH)),,push) ## Push the image, upload ARCHIVE, launch and follow the Jobs (BUCKET=gs://... [DRY_RUN=1] [PUSH=0: IMAGE is already where the nodes get it])
	$(PY) -m pneumonia.k8s run --namespace $(NAMESPACE) --image $(IMAGE) \
		$(if $(filter command line environment,$(origin WORKERS)),--workers $(WORKERS)) --gpus-per-worker $(GPUS_PER_WORKER) --gpu-type $(GPU_TYPE) \
		$(if $(BUCKET),--bucket $(BUCKET)) $(if $(CONTEXT),--context $(CONTEXT)) \
		$(if $(filter command line environment,$(origin RUN_ID)),--run-id $(RUN_ID)) \
		$(if $(ARCHIVE),--archive $(ARCHIVE)) $(if $(DRY_RUN),--dry-run) $(K8S_FLAGS)

.PHONY: clean
clean: ## Remove local data, results and caches (keeps .venv)
	rm -rf data bench/results .pytest_cache
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +

.PHONY: distclean
distclean: clean ## Also remove .venv
	rm -rf $(VENV)
