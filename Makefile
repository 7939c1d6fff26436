# xds-relay: the two commands.
#   make run    builds, starts the example management server and a relay in front of it
#   make test   runs clippy and every test: Rust unit and end-to-end tests, gRPC's own xDS
#               client, and the docker-compose chaos scenarios when a Docker engine is reachable
#   make bench  runs the benchmark suite and rewrites its section of BENCHMARKS.md
#   make fuzz   runs every fuzz target for FUZZ_SECONDS (default 60) with cargo-fuzz
#   make descriptors  rebuilds src/admin/envoy-api-descriptors.bin from envoy-types' protos

CARGO ?= cargo
PYTHON ?= python3
VENV := tests/interop/.venv

.PHONY: run test build browser lint bench fuzz test-rust test-interop test-deploy test-chaos chaos descriptors clean

build:
	$(CARGO) build --workspace --bins

run: build
	@echo "example management server on 127.0.0.1:18000 (stats on :18001); relay xDS on 127.0.0.1:9991, admin on http://127.0.0.1:6070"
	@./target/debug/example-management-server --interval 10s & \
	  origin=$$!; trap 'kill $$origin 2>/dev/null' EXIT INT TERM; \
	  ./target/debug/xds-relay

test: build browser lint test-rust test-interop test-deploy test-chaos

# Clippy on every target with warnings as errors, under the bans of clippy.toml (time from
# tokio, no mutation of the environment).
lint:
	@if $(CARGO) clippy --version >/dev/null 2>&1; then \
	  $(CARGO) clippy --workspace --all-targets -- -D warnings; \
	else \
	  echo "SKIPPED: clippy: the toolchain has no clippy component (rustup component add clippy)"; \
	fi

# End-to-end tests that replay attacks (greedy clients, floods, slowloris, churn) against the
# relay's limits; test-rust runs them against the release relay.
# They are modules of the one end-to-end test binary (tests/e2e).
ATTACKS := test(/^(limits_connections|limits_requests|cardinality|cache_churn|origin_validation)::/)
ATTACK_FILTERS := limits_connections:: limits_requests:: cardinality:: cache_churn:: origin_validation::

# The ring page test drives headless Chromium (Debian package); without it that test skips.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "Chromium unavailable: the ring page browser test will be skipped"

bench:
	$(PYTHON) example/bench/run.py

test-rust:
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
	  $(CARGO) nextest run --workspace --no-fail-fast -E 'not (binary_id(xds-relay::e2e) & $(ATTACKS))'; \
	else \
	  $(CARGO) test --workspace --no-fail-fast; \
	fi
	# The attack tests replay each attack on the relay's limits against the release build, as
	# fleets run it (the test harness itself stays a debug build).
	$(CARGO) build --release --bin xds-relay
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
	  XDS_RELAY_BIN=$(CURDIR)/target/release/xds-relay $(CARGO) nextest run --no-fail-fast --test e2e -E '$(ATTACKS)'; \
	else \
	  XDS_RELAY_BIN=$(CURDIR)/target/release/xds-relay $(CARGO) test --no-fail-fast --test e2e -- $(ATTACK_FILTERS); \
	fi
	# The Criterion micro-benchmarks, each run once in test mode so they keep compiling.
	$(CARGO) test --bench keyer --bench fanout

# Coverage-guided fuzzing (cargo-fuzz, libFuzzer) of every decoder of outside bytes, on the
# stable toolchain: `-s none` (no sanitizer; the relay is safe Rust) with debug assertions on.
# The committed seeds in fuzz/corpus/<target>/ are read; new inputs go to
# target/fuzz/corpus/<target>/; a failing input is saved in fuzz/artifacts/<target>/.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := wire_skim discovery_request delta_discovery_request peer_messages origin_response bootstrap rules keyer
FUZZ_FLAGS := -s none -a --target-dir $(CURDIR)/target/fuzz

fuzz:
	@command -v cargo-fuzz >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked
	$(CARGO) fuzz build $(FUZZ_FLAGS)
	@mkdir -p target/fuzz/logs; failed=""; \
	for t in $(FUZZ_TARGETS); do \
	  mkdir -p target/fuzz/corpus/$$t; start=$$(date +%s); \
	  if $(CARGO) fuzz run $(FUZZ_FLAGS) $$t $(CURDIR)/target/fuzz/corpus/$$t $(CURDIR)/fuzz/corpus/$$t -- \
	      -max_total_time=$(FUZZ_SECONDS) -timeout=10 -print_final_stats=1 >target/fuzz/logs/$$t.log 2>&1; \
	  then result=ok; else result=FAILED; failed="$$failed $$t"; fi; \
	  execs=$$(sed -n 's/^stat::number_of_executed_units: *//p' target/fuzz/logs/$$t.log); \
	  rate=$$(sed -n 's/^stat::average_exec_per_sec: *//p' target/fuzz/logs/$$t.log); \
	  printf '%-24s %-6s %10s executions in %3ss (%s exec/s)\n' $$t $$result "$${execs:-?}" $$(( $$(date +%s) - start )) "$${rate:-?}"; \
	done; \
	if [ -n "$$failed" ]; then \
	  echo "fuzz targets failed:$$failed (inputs in fuzz/artifacts/, logs in target/fuzz/logs/)"; exit 1; \
	fi

$(VENV)/.installed: tests/interop/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/interop/requirements.txt
	touch $@

test-interop: build $(VENV)/.installed
	XDS_RELAY_BIN_DIR=$(CURDIR)/target/debug $(VENV)/bin/python -m pytest -v tests/interop

# The Kubernetes manifests against the Kubernetes schemas, offline (kubernetes-validate from PyPI).
test-deploy:
	deploy/kubernetes/validate.sh

# The chaos scenarios need a Docker engine; without one they are skipped, and the run says so.
test-chaos:
	cd chaos-tests && $(PYTHON) -m unittest -q
	@if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then \
	  $(PYTHON) chaos-tests/run.py; \
	else \
	  echo "SKIPPED: chaos scenarios: no reachable Docker engine (docker info failed)"; \
	fi

chaos:
	$(PYTHON) chaos-tests/run.py

# The Envoy API descriptor set the admin API renders resources with: every .proto of the
# locked envoy-types, compiled by the locked vendored protoc (or $$PROTOC).
descriptors:
	scripts/regen-descriptors.sh

clean:
	$(CARGO) clean
	rm -rf $(VENV)
