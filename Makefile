# Shoal's entry points. `make run` starts the whole stack on this machine, `make test` runs every test; both are
# idempotent and work as root on Debian from a fresh clone. Only `system-deps` touches the system (apt-get).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Touched after a successful install: pip runs again only when pyproject.toml is newer than this.
STAMP := $(VENV)/.installed
STATE_DIR ?= $(or $(SHOAL_STATE_DIR),.shoal)

.PHONY: venv system-deps prometheus test-deps run test lint bench schemas dashboards clean mutation soak

venv: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# pyfuse3 is then rebuilt with the project's patch (deploy/pyfuse3: the kernel's no-open mode), once per venv; its
# build needs libfuse3's headers, so every target that makes the venv (lint, schemas...) installs them first.
$(STAMP): pyproject.toml deploy/pyfuse3/no-open.patch deploy/pyfuse3/install.sh | $(BIN)/python system-deps
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[dev]'
	sh deploy/pyfuse3/install.sh $(BIN)/python
	touch $(STAMP)

# FUSE 3 (fusermount3, libfuse3 and its pkg-config file) is needed by the agent's mounts. As root with apt-get it
# is installed; anywhere else we say what to install and carry on, since nothing before the agent needs it.
system-deps: prometheus
	@if command -v fusermount3 >/dev/null 2>&1 && pkg-config --exists fuse3 2>/dev/null; then \
		:; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "Installing fuse3, libfuse3-dev and pkg-config with apt-get"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q fuse3 libfuse3-dev pkg-config \
			|| echo "WARNING: apt-get could not install fuse3, libfuse3-dev and pkg-config; FUSE mounts will not work"; \
	else \
		echo "NOTE: install fuse3, libfuse3-dev and pkg-config with your package manager (needed for FUSE mounts)"; \
	fi

# Prometheus (Debian's package) for `shoal up` and the dashboard test. Unpacked into a project folder rather than
# installed, since installing the package starts a system service; libs/cli/stack/prometheus.py finds it there
# (or on PATH). Unpacked in a temporary folder and moved into place, so an interrupted run leaves nothing half-made.
PROMETHEUS_DIR := .shoal/tools/prometheus
prometheus:
	@if [ -x "$(PROMETHEUS_DIR)/usr/bin/prometheus" ] || command -v prometheus >/dev/null 2>&1; then \
		:; \
	elif command -v apt-get >/dev/null 2>&1 && command -v dpkg >/dev/null 2>&1; then \
		echo "Fetching Debian's prometheus package into $(PROMETHEUS_DIR) (unpacked, not installed)"; \
		work=$$(mktemp -d) && \
		{ (cd "$$work" && apt-get download -q prometheus) \
		  || { [ "$$(id -u)" = 0 ] && apt-get update -q && (cd "$$work" && apt-get download -q prometheus); }; } && \
		dpkg -x "$$work"/prometheus_*.deb "$$work/root" && mkdir -p "$$(dirname $(PROMETHEUS_DIR))" && \
		rm -rf "$(PROMETHEUS_DIR)" && mv "$$work/root" "$(PROMETHEUS_DIR)" \
		|| echo "WARNING: could not fetch Debian's prometheus package; shoal up runs without Prometheus"; \
		rm -rf "$$work"; \
	else \
		echo "NOTE: put prometheus and promtool on PATH (or set PROMETHEUS_URL) to see Shoal's metrics"; \
	fi

# fio reads the mounts in the tests (fio --verify); installed like the FUSE packages.
test-deps: system-deps
	@if command -v fio >/dev/null 2>&1; then \
		:; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "Installing fio with apt-get"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q fio \
			|| echo "WARNING: apt-get could not install fio; the fio test will fail"; \
	else \
		echo "NOTE: install fio with your package manager (the tests read mounts with it)"; \
	fi

# `make run SECURE=1`: NATS with TLS and a user per process (shoal up --secure; docs/security.md).
run: system-deps venv
	$(BIN)/shoal up $(if $(SECURE),--secure)

# Tests run in four workers, each taking the next test as it finishes one (worksteal): most integration tests wait
# on servers and mounts more than they compute (1.5 of 2 cores busy on average), so four workers on two cores took
# 8.2 min where two workers, a file each, took 13-15 (one file, test_loader.py, alone took two minutes).
test: test-deps venv
	$(BIN)/pytest -q -p no:cacheprovider -n 4 --dist worksteal --durations=25

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

# The control-plane bench, then the agent data-path bench, which compares Shoal's mount with rclone, s3fs and fio
# runs (Debian packages fio, rclone, s3fs; installed with apt-get as root when missing, else their rows say why),
# then the seed bench (N consumers of one model behind a bandwidth-limited store; SHOAL_BENCH_SEED_* settings),
# then the warm-up bench (a DataLoad on three agents against direct GETs; SHOAL_BENCH_WARMUP_* settings),
# then the scheduler bench (inventory fold rate against the JetStream ceiling, decision latency),
# then the metrics-cost bench (reads with the agent's metrics on against SHOAL_METRICS=off; SHOAL_BENCH_METRICS_*),
# then the load bench (10,000 datasets applied at once and at 500/s with 100 simulated agents; SHOAL_BENCH_LOAD_*).
# SHOAL_BENCH=control|agent|seed|warmup|scheduler|metrics|load runs one of them.
bench: system-deps venv
	@missing=""; for tool in fio rclone s3fs; do command -v $$tool >/dev/null 2>&1 || missing="$$missing $$tool"; done; \
	if [ -z "$$missing" ] || { [ -n "$(SHOAL_BENCH)" ] && [ "$(SHOAL_BENCH)" != agent ]; }; then \
		:; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "Installing$$missing with apt-get"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing \
			|| echo "WARNING: apt-get could not install$$missing; the agent bench reports those rows as missing"; \
	else \
		echo "NOTE: install$$missing with your package manager for the agent bench's peer rows"; \
	fi
	$(BIN)/python -m tests.bench

# Mutation testing of the agent's reader, its block cache and the bus against their fast tests (docs/mutation.md).
# Slow (tens of minutes on 2 cores) and never part of `make test`; results stay in mutants/ for `mutmut browse`.
mutation: venv
	$(BIN)/mutmut run --max-children $${MUTATION_JOBS:-2}
	$(BIN)/mutmut results

schemas: venv
	$(BIN)/shoal schemas docs/schemas

# Grafana dashboards as code: deploy/grafana/build.py writes deploy/grafana/dashboards/*.json (committed; a unit test
# fails when they differ from a fresh build).
dashboards: venv
	$(BIN)/python -m deploy.grafana.build

# Refuses while `shoal up` runs on this state directory: its servers would lose their files under them.
clean:
	@pid=$$(head -n 1 "$(STATE_DIR)/up.pid" 2>/dev/null || true); \
	if [ -n "$$pid" ] && kill -0 "$$pid" 2>/dev/null; then \
		echo "shoal up is running as PID $$pid; stop it with '$(BIN)/shoal down --state-dir $(STATE_DIR)' (or Ctrl-C) first"; exit 1; \
	fi
	rm -rf "$(STATE_DIR)"

# The CustomResourceDefinitions in deploy/crds, generated from the msgspec types of the events (libs/crds.py).
.PHONY: crds nats-auth
# deploy/nats-secure/auth.conf: the NATS users and permissions of libs/natsauth.py, for the nats-secure component;
# NODES="node-a node-b" gives those nodes' agents a user each (none by default, as committed).
nats-auth: venv
	$(BIN)/python -m libs.natsauth $(NODES) > deploy/nats-secure/auth.conf

crds: venv
	$(BIN)/python -m libs.crds deploy/crds

# The reliability soak: every test that records a fault (tests/reliability.py: kill -9 of each service and agent,
# NATS servers lost, the store failing, a full cache disk, skewed clocks), also those `make test` leaves out
# (SHOAL_SOAK=1: `pytest.mark.soak`, in any test file), and tests/fuzz at 10,000 examples each; then docs/reliability.md from the recorded rows
# (tests/soak/report.py), failed and skipped tests named there. Long (tens of minutes on 2 cores); not in `make test`.
# SOAK_WORKERS=1 on a busy machine: a mount process that takes more than the tests' 30 s to start fails them.
SOAK_WORKERS ?= 2
SOAK_ROWS ?= $(STATE_DIR)/reliability.jsonl
SOAK_JUNIT ?= $(STATE_DIR)/reliability-junit.xml
soak: test-deps venv
	@mkdir -p "$(STATE_DIR)"; rm -f "$(SOAK_ROWS)" "$(SOAK_JUNIT)"
	SHOAL_SOAK=1 SHOAL_RELIABILITY_REPORT="$(abspath $(SOAK_ROWS))" SHOAL_FUZZ_EXAMPLES=$${SHOAL_FUZZ_EXAMPLES:-10000} \
		$(BIN)/pytest -q -p no:cacheprovider -n $(SOAK_WORKERS) --dist loadfile --timeout 3600 --junitxml="$(SOAK_JUNIT)" \
		$$(grep -rlE --include='test_*.py' 'record_fault|pytest\.mark\.soak' tests) $$(test -d tests/fuzz && echo tests/fuzz); \
	status=$$?; $(BIN)/python -m tests.soak.report "$(SOAK_ROWS)" "$(SOAK_JUNIT)" docs/reliability.md || status=1; \
	exit $$status
