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
run: build env ## Set up, start every service, print addresses and grpcurl calls; Ctrl-C stops all
	@scripts/run.sh

.PHONY: test
test: env ## Set up, then run the whole test suite against real PostgreSQL and Redis
	@source .run/env && $(CARGO) nextest run --workspace --no-fail-fast $(TEST_ARGS)

.PHONY: bench
bench: env ## Release build; 1,000,000 keys generated in one call and exported by the real binaries (keys/s, MB/s, peak memory)
	$(CARGO) build --release -p trainingkeys-enrollment -p trainingkeys-key-issuance
	@source .run/env && "$${CARGO_TARGET_DIR:-target}/release/keys-bench"

.PHONY: lint
lint: ## rustfmt, clippy -D warnings, buf lint
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	@scripts/buf.sh lint

.PHONY: down
down: ## Stop the throwaway PostgreSQL and Redis
	@scripts/env.sh down

.PHONY: clean
clean: down ## Stop everything and delete local state (.run/)
	rm -rf .run
