# Training Keys — `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help
CARGO ?= cargo
REPLICAS ?= 1
export CARGO_TERM_COLOR ?= auto

.PHONY: help
help: ## List the targets
	@grep -hE '^[a-z][a-z-]*:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

.PHONY: env
env: ## Install and start the throwaway PostgreSQL and Redis (or use DATABASE_URL / REDIS_URL)
	@scripts/env.sh up

.PHONY: build
build: ## Build every crate
	$(CARGO) build --workspace --bins

.PHONY: run
run: build env ## Set up, start every service (REPLICAS=N: N redemption replicas behind haproxy); Ctrl-C stops all
	@REPLICAS=$(REPLICAS) scripts/run.sh

.PHONY: demo
demo: ## With `make run` going in another terminal: seed a class, an event key and a subscription pool, print redeem calls
	@ENROLLMENT_URL=https://127.0.0.1:$${ENROLLMENT_PORT:-50051} KEY_ISSUANCE_URL=https://127.0.0.1:$${KEY_ISSUANCE_PORT:-50052} \
		REDEMPTION_URL=https://127.0.0.1:$${REDEMPTION_PORT:-50053} $(CARGO) run -q -p trainingkeys-bench --bin loadgen -- demo

.PHONY: token
token: ## Print a bearer token: ROLE=<role> (repeatable as ROLE="a b"), ORG=<org> (default acme), SUB=<subject>; uses make run's signing key
	@$(CARGO) build -q -p trainingkeys-devtools
	@$${CARGO_TARGET_DIR:-target}/debug/tk-dev init --dir .run/dev
	@$${CARGO_TARGET_DIR:-target}/debug/tk-dev token --dir .run/dev $(foreach r,$(or $(ROLE),$(error ROLE is required, e.g. make token ROLE=student SUB=<user id>)),--role $(r)) --org $(or $(ORG),acme) --sub $(or $(SUB),dev)

.PHONY: interop
interop: ## With `make run` going: a Python client built from server reflection alone enrolls 5 students into 3 seats
	@source scripts/lib.sh && venv_install 'grpc_reflection, grpc_status' grpcio grpcio-reflection grpcio-status
	@.run/venv/bin/python tests/interop/reflection_client.py 127.0.0.1:$${ENROLLMENT_PORT:-50051}

.PHONY: smoke
smoke: ## With `make run` going: run every grpcurl call of the README's "Calling it", in order; fails on any error
	@scripts/smoke.sh

.PHONY: test
test: env ## Set up, then run the whole test suite against real PostgreSQL and Redis
	@scripts/env.sh drop-test-dbs
	@source .run/env && $(CARGO) nextest run --workspace --no-fail-fast $(TEST_ARGS)

.PHONY: bench
bench: env ## Release build; key generation/export figures, then every redemption scenario vs its reference (bench/results.md)
	$(CARGO) build --release --workspace --bins
	@scripts/bench.sh

.PHONY: chaos
chaos: env ## Fault-injection suite, long form: bigger herds, repeated rounds (make test runs a short form)
	@source .run/env && CHAOS_STUDENTS=$${CHAOS_STUDENTS:-1000} CHAOS_ROUNDS=$${CHAOS_ROUNDS:-3} \
		$(CARGO) nextest run -p trainingkeys-tests --no-fail-fast chaos

.PHONY: lint
lint: ## rustfmt, clippy -D warnings, buf lint, and every Kubernetes overlay rendered and validated offline (CI runs it)
	$(CARGO) fmt --all --check
	@$(CARGO) metadata --locked --format-version 1 >/dev/null || { echo "Cargo.lock is out of date: commit it (the Dockerfile builds --locked)" >&2; exit 1; }
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	@scripts/buf.sh lint
	@scripts/k8s.sh

.PHONY: lint-k8s
lint-k8s: ## Render every Kubernetes overlay and validate it offline
	@scripts/k8s.sh

.PHONY: breaking
breaking: ## buf breaking: the contract changed only compatibly since BASE (default: the parent commit)
	@scripts/buf.sh breaking --against '.git#ref=$(or $(BASE),HEAD~1)'

.PHONY: down
down: ## Stop the throwaway PostgreSQL and Redis
	@scripts/env.sh down

.PHONY: clean
clean: ## Stop the throwaway servers and delete local state (.run/, and root's PostgreSQL data kept outside the clone)
	@scripts/env.sh clean
	rm -rf .run
