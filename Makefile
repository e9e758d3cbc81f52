# pichat: `make run` (a local cluster answering a prompt) and `make test` set themselves up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PICHAT := $(VENV)/bin/pichat
STAMP := $(VENV)/.installed
WORKERS ?= 2
PROMPT ?= Hello, how are you?
PYTEST_ARGS ?=

# Docker: `make build`, `make up` / `down` / `logs`, `make swarm-deploy` / `swarm-rm`.
DOCKER ?= docker
IMAGE ?= pichat:latest
ARCH ?= $(shell uname -m | sed -e 's/x86_64/amd64/' -e 's/aarch64/arm64/')
PLATFORM ?= linux/$(ARCH)
BASE_IMAGE ?= python:3.11-slim-bookworm
BUILD_IMAGE ?= $(BASE_IMAGE)
DOCKER_BUILD_ARGS ?=
STACK ?= pichat
COMPOSE := scripts/compose.sh -f docker/compose.yml

.PHONY: install run test test-fast lint bench install-systemd install-ha build up down logs swarm-deploy \
	swarm-rm docker-e2e systemd-e2e clients-e2e fault-lab soak docs clean help

help:
	@echo "make run      start a router + $(WORKERS) workers on the default model and answer a prompt"
	@echo "make test     run the test suite"
	@echo "make bench    run the benchmarks (affinity vs round-robin, router overhead)"
	@echo "make docs     the documentation site (docs/, MkDocs Material) built offline into site/"
	@echo "make install  only set up $(VENV): llama-cpp-python built for this CPU, pichat, the default model"
	@echo "make install-systemd   (as root) pichat as systemd services in /opt/pichat"
	@echo "make install-ha        (as root, after install-systemd) two routers: etcd, keepalived"
	@echo "make build / up / down / logs       the Docker image and a compose cluster"
	@echo "make swarm-deploy / swarm-rm         the Swarm stack"
	@echo "make docker-e2e / systemd-e2e        deployment end-to-end checks (minutes; root)"
	@echo "make clients-e2e                     Open WebUI (Chromium), LangChain, ollama, openai against make run's cluster"
	@echo "make fault-lab                       faults on hosts in network namespaces (root)"
	@echo "make soak                            1000 clients, 3 minutes, workers killed at random"

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml scripts/install-llama.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	scripts/install-llama.sh $(PY)
	$(PY) -m pip install --quiet -e '.[test]'
	$(PICHAT) models default
	touch $@

run: install
	$(PICHAT) up --workers $(WORKERS) --prompt "$(PROMPT)"

test: install
	scripts/ensure-test-tools.sh
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

docs: install
	$(PY) scripts/docs_reference.py
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict
	@echo "the site is in site/ (open site/index.html)"

lint: install
	$(VENV)/bin/ruff check pichat tests bench

bench: install
	$(PY) bench/run.py

clients-e2e: install
	scripts/clients-e2e.sh $(PYTHON) $(PICHAT)

install-systemd:
	scripts/install-systemd.sh

install-ha:
	scripts/install-ha.sh

build:
	scripts/docker-wheelhouse.sh $(PLATFORM)
	$(DOCKER) build $(DOCKER_BUILD_ARGS) -f docker/Dockerfile --build-arg TARGETARCH=$(ARCH) \
		--build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg BUILD_IMAGE=$(BUILD_IMAGE) -t $(IMAGE) docker/

up:
	IMAGE=$(IMAGE) scripts/docker-keys.sh volume pichat_keys
	PICHAT_IMAGE=$(IMAGE) $(COMPOSE) up -d
	@echo "pichat is starting (workers load the model first): ./scripts/send_prompt.sh \"Hello\""

down:
	$(COMPOSE) down

logs:
	$(COMPOSE) logs --follow --tail 100

# The router's keys go into its volume on this manager; the workers get a join token
# (one use per node, an hour) and make key pairs of their own on their nodes.
# HA=1: also docker/stack-ha.yml, a second router on ROUTER2_NODE (its keys copied into its
# volume through ROUTER2_DOCKER_HOST, the engine of that manager) and etcd on ETCD_NODES
# (three node names); each defaults to this node.
HA ?=
ROUTER2_NODE ?=
ROUTER2_DOCKER_HOST ?=
ETCD_NODES ?=
swarm-deploy:
	IMAGE=$(IMAGE) scripts/docker-keys.sh volume $(STACK)_router-keys stack
	$(if $(HA),$(if $(ROUTER2_DOCKER_HOST),DOCKER_HOST=$(ROUTER2_DOCKER_HOST)) IMAGE=$(IMAGE) \
		scripts/docker-keys.sh volume $(STACK)_router2-keys stack)
	token=$$(IMAGE=$(IMAGE) scripts/docker-keys.sh invite $(STACK)_router-keys \
		"$$($(DOCKER) node ls -q | wc -l)") && \
	self=$$($(DOCKER) node inspect self --format '{{.Description.Hostname}}') && \
	etcd=($(or $(ETCD_NODES),$$self $$self $$self)) && \
	PICHAT_JOIN="$$token" PICHAT_IMAGE=$(IMAGE) PICHAT_ROUTER_NODE="$$self" \
	PICHAT_ROUTER2_NODE="$(or $(ROUTER2_NODE),$$self)" PICHAT_ETCD_NODE1="$${etcd[0]}" \
	PICHAT_ETCD_NODE2="$${etcd[1]}" PICHAT_ETCD_NODE3="$${etcd[2]}" \
		$(DOCKER) stack deploy -c docker/stack.yml $(if $(HA),-c docker/stack-ha.yml) $(STACK)

swarm-rm:
	$(DOCKER) stack rm $(STACK)

fault-lab: install
	$(PY) tests/faultlab/lab.py
	$(PY) tests/faultlab/ha.py

soak: install
	$(PY) tests/faultlab/soak.py --clients 1000 --minutes 3

docker-e2e: install
	scripts/ensure-tools.sh docker:docker.io dockerd:docker.io debootstrap:debootstrap
	scripts/docker-e2e.sh

systemd-e2e: install
	scripts/ensure-tools.sh docker:docker.io dockerd:docker.io debootstrap:debootstrap
	scripts/systemd-e2e.sh
	scripts/systemd-ha-e2e.sh

clean:
	rm -rf $(VENV) build site *.egg-info .pytest_cache
