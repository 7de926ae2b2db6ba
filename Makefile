# aiodp: every target is a thin wrapper; CI (.ci/run) and humans run the same commands.
SHELL := /bin/bash
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev
RUN_STAMP := $(VENV)/.installed-run
PROTO  := protos/deviceplugin/v1beta1/api.proto
PODRES_PROTO := protos/podresources/v1/api.proto
DRA_PROTOS := protos/pluginregistration/v1/api.proto protos/dra/v1/api.proto protos/dra/v1beta1/api.proto \
	protos/dra-health/v1alpha1/api.proto protos/dra-health/v1/api.proto
PROTOC = $(BIN)/python -m grpc_tools.protoc -I protos \
	--python_betterproto2_opt=client_generation=async,server_generation=async

.DEFAULT_GOAL := help
.PHONY: help install run test test-matrix manifests dashboard e2e cluster-e2e chaos unit integration lint typecheck proto proto-check bench wheels wheels-image gpu-check helm-lint image image-test clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z0-9-]+:.*## / {printf "  make %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/python -m compileall -q aiodp  # bytecode, as pip makes for site-packages
	touch $(STAMP)

$(RUN_STAMP): pyproject.toml
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	$(BIN)/python -m compileall -q aiodp  # bytecode, as pip makes for site-packages
	touch $(RUN_STAMP)

install: $(STAMP) ## create .venv and install aiodp with all extras (editable)

run: $(RUN_STAMP) ## the demo: plugin on 8 simulated H100s against the embedded kubelet stand-in (installs only the runtime)
	$(BIN)/python -m aiodp demo

test: lint proto-check ## lint, proto-check, unit, property, integration and chart tests (no Go)
	$(BIN)/python -m pytest -q --ignore=tests/e2e --ignore=tests/cluster --cov --cov-report=term

test-matrix: ## make test's pytest run on Python 3.11, 3.12 and 3.13 (pyenv), each in .venv-3.x
	@set -e; for v in 3.11 3.12 3.13; do \
		py=$$(ls -d $$HOME/.pyenv/versions/$$v*/bin/python 2>/dev/null | head -1); \
		[ -n "$$py" ] || py=$$(command -v python$$v) || { echo "test-matrix: no Python $$v" >&2; exit 1; }; \
		[ -x .venv-$$v/bin/python ] || $$py -m venv .venv-$$v; \
		.venv-$$v/bin/pip install --quiet --upgrade pip && .venv-$$v/bin/pip install --quiet -e '.[dev]'; \
		echo "== Python $$v"; .venv-$$v/bin/python -m pytest -q --ignore=tests/e2e --ignore=tests/cluster; \
	done

chaos: $(STAMP) ## attacks and normal-use runs at full size on a plugin process: one table (<= 10 min)
	$(BIN)/python -m tests.chaos

e2e: $(STAMP) ## build the kubelet's device manager, plugin and DRA managers, kube-apiserver, kube-scheduler, etcd (Go, cached); test against them
	bash tests/e2e/build.sh
	@report=$$(mktemp) && \
	AIODP_E2E_REPORT=$$report $(BIN)/python -m pytest -q tests/e2e; rc=$$?; \
	echo; echo "e2e figures:"; cat $$report; rm -f $$report; exit $$rc

cluster-e2e: $(STAMP) ## a real node: kubelet, containerd, control plane (Go, cached); the image and chart installed, pods get GPUs (root)
	@report=$$(mktemp) && \
	AIODP_CLUSTER_REPORT=$$report bash tests/cluster/run.sh; rc=$$?; \
	echo; echo "cluster-e2e figures:"; cat $$report; rm -f $$report; exit $$rc

unit: $(STAMP) ## unit and property tests only
	$(BIN)/python -m pytest -q tests/unit tests/property

integration: $(STAMP) ## integration tests only (real sockets, stand-in kubelet, grpcio client)
	$(BIN)/python -m pytest -q tests/integration

lint: $(STAMP) ## ruff format check, ruff check, import-linter, mypy strict
	$(BIN)/ruff format --check aiodp tests bench scripts
	$(BIN)/ruff check aiodp tests bench scripts
	$(BIN)/lint-imports
	$(MAKE) --no-print-directory typecheck

typecheck: $(STAMP) ## mypy: strict on aiodp/, untyped defs allowed but checked in tests/, bench/, scripts/
	$(BIN)/mypy

proto: $(STAMP) ## regenerate aiodp/gen/deviceplugin/, aiodp/gen/podresources/ and aiodp/gen/dra/ from protos/ with betterproto2
	PATH=$(abspath $(BIN)):$$PATH $(PROTOC) --python_betterproto2_out=aiodp/gen/deviceplugin $(PROTO)
	mkdir -p aiodp/gen/podresources aiodp/gen/dra
	PATH=$(abspath $(BIN)):$$PATH $(PROTOC) --python_betterproto2_out=aiodp/gen/podresources $(PODRES_PROTO)
	PATH=$(abspath $(BIN)):$$PATH $(PROTOC) --python_betterproto2_out=aiodp/gen/dra $(DRA_PROTOS)

proto-check: $(STAMP) ## fail when aiodp/gen/deviceplugin/, aiodp/gen/podresources/ or aiodp/gen/dra/ differs from what protos/ generates
	@tmp=$$(mktemp -d) && mkdir $$tmp/api $$tmp/podresapi $$tmp/draapi && \
	PATH=$(abspath $(BIN)):$$PATH $(PROTOC) --python_betterproto2_out=$$tmp/api $(PROTO) >/dev/null && \
	PATH=$(abspath $(BIN)):$$PATH $(PROTOC) --python_betterproto2_out=$$tmp/podresapi $(PODRES_PROTO) >/dev/null && \
	PATH=$(abspath $(BIN)):$$PATH $(PROTOC) --python_betterproto2_out=$$tmp/draapi $(DRA_PROTOS) >/dev/null && \
	diff -r -x __pycache__ $$tmp/api aiodp/gen/deviceplugin && diff -r -x __pycache__ $$tmp/podresapi aiodp/gen/podresources && \
	diff -r -x __pycache__ $$tmp/draapi aiodp/gen/dra && \
	echo "proto-check: aiodp/gen/deviceplugin, aiodp/gen/podresources and aiodp/gen/dra are up to date"; \
	rc=$$?; rm -rf $$tmp; exit $$rc

bench: $(STAMP) ## tables: preferred allocation, Allocate vs the floor, /metrics, 1,024 replicas, DRA, start-up, RSS, per-call profile, patches/, vs grpc-go (with make e2e's peers)
	$(BIN)/python -m compileall -q aiodp  # starts are timed as installed: from bytecode
	$(BIN)/python -m bench

wheels: $(STAMP) ## download what gpu-check installs (CPython 3.12, x86-64) into wheelhouse/
	mkdir -p wheelhouse && rm -f wheelhouse/*.whl && $(BIN)/pip wheel --quiet --no-deps -w wheelhouse .
	$(BIN)/pip download --quiet -d wheelhouse --only-binary=:all: --implementation cp \
		--python-version 3.12 --abi cp312 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any \
		wheelhouse/aiodp-*.whl pytest==9.2.0 pytest-asyncio==1.5.0 pytest-timeout==2.4.0 looptime==0.9

wheels-image: $(STAMP) ## download what the image build installs (CPython 3.11; x86-64 and aarch64) into wheelhouse/
	mkdir -p wheelhouse && rm -f wheelhouse/*.whl
	for arch in x86_64 aarch64; do \
		$(BIN)/pip download --quiet -d wheelhouse --only-binary=:all: --implementation cp \
			--python-version 3.11 --abi cp311 --platform manylinux_2_17_$$arch \
			--platform manylinux2014_$$arch --platform manylinux_2_28_$$arch --platform any \
			'setuptools>=77' -r <($(BIN)/python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml","rb"))["project"]["dependencies"]))') \
			|| exit 1; \
	done

gpu-check: ## on a machine with an NVIDIA GPU: tests/gpu + a real-NVML smoke run (from wheelhouse/)
	bash scripts/gpu-check.sh

dashboard: $(STAMP) ## regenerate the chart's Grafana dashboard JSON and its render, docs/dashboard.svg
	$(BIN)/python scripts/dashboard.py generate
	$(BIN)/python scripts/dashboard.py render

manifests: $(STAMP) ## render the chart into deployments/static/ (plain manifests; a test checks they match)
	$(BIN)/python scripts/manifests.py

helm-lint: $(STAMP) ## lint and render the chart (Helm SDK), validate it against Kubernetes schemas
	$(BIN)/python -m pytest -q tests/helm

image: $(STAMP) ## hadolint, then build the image tagged as the chart names it (needs a Docker engine)
	$(BIN)/hadolint Dockerfile
	v=$$($(BIN)/python -c 'import aiodp; print(aiodp.__version__)') && \
	repo=$$(awk '/^  repository:/ {print $$2; exit}' charts/nvidia-gpu/values.yaml) && \
	docker build --build-arg VERSION=$$v --build-arg COMMIT=$$(git rev-parse --short=12 HEAD) \
		--build-arg CREATED=$$(date -u +%Y-%m-%dT%H:%M:%SZ) -t $$repo:$$v .

image-test: wheels-image ## prove the image offline: own dockerd, debootstrap base, --network=none build, demo inside
	PATH=$(abspath $(BIN)):$$PATH bash scripts/image-test.sh

clean: ## remove the virtual environment and caches
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
