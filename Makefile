# bitsmith: `make run` runs the operator (on a local control plane when there is no cluster); `make test` runs
# every test.
CARGO ?= cargo
BIN := target/release/bitsmith
EXAMPLES_PORT ?= 8765

IMAGE ?= ghcr.io/bitsmith-dev/bitsmith:$(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)

.PHONY: build test crds bench fuzz run fetch lint image clean install

build:
	$(CARGO) build --release --locked

# bitsmith and its kubectl plugin name (`kubectl bitsmith …`) on the PATH, under PREFIX.
PREFIX ?= $(HOME)/.local
install: build
	install -d $(PREFIX)/bin
	install -m 0755 $(BIN) $(PREFIX)/bin/bitsmith
	ln -sf bitsmith $(PREFIX)/bin/kubectl-bitsmith

# Starts the S3 server the tests need (installing it on first use), runs every test, stops it.
test:
	scripts/with-test-env.sh $(CARGO) test --locked

# The archive readers' fuzz test at length: FUZZ_ITERATIONS generated and mutated zips and tgzs each (`make
# test` runs 2000), from FUZZ_SEED.
FUZZ_ITERATIONS ?= 200000
FUZZ_SEED ?= 1
fuzz:
	BITSMITH_FUZZ_ITERATIONS=$(FUZZ_ITERATIONS) BITSMITH_FUZZ_SEED=$(FUZZ_SEED) \
		$(CARGO) test --locked --lib archive::fuzz

# Regenerate the committed CRDs from the Rust types, for kubectl (crds/) and for the Helm chart.
crds:
	$(CARGO) run --quiet --locked -- crd --out-dir crds
	$(CARGO) run --quiet --locked -- crd --out-dir charts/bitsmith/crds

# Throughput, memory and latency, printed as tables: the pipeline, the controller, the API.
bench:
	scripts/with-test-env.sh $(CARGO) bench --locked --bench pipeline --bench controller --bench api --bench archive --bench push

# The operator against the current kubeconfig's cluster; without one, on a local control plane with the CRDs
# and examples/ applied (scripts/run.sh).
run: build
	scripts/run.sh

# Without any cluster: serve examples/ on loopback and fetch its Packages and Droplet into .bitsmith/store.
fetch: build
	@python3 -m http.server --bind 127.0.0.1 --directory examples $(EXAMPLES_PORT) >/dev/null 2>&1 & \
	server=$$!; trap 'kill $$server' EXIT; \
	for i in $$(seq 1 50); do curl -sf -o /dev/null http://127.0.0.1:$(EXAMPLES_PORT)/ && break; sleep 0.1; done; \
	$(BIN) fetch -f examples/packages.yaml -f examples/droplet.yaml --allow-source-cidr 127.0.0.1/32

# The container image (Dockerfile): needs a Docker engine with BuildKit.
image:
	docker build -t $(IMAGE) .

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

clean:
	$(CARGO) clean
	rm -rf .bitsmith
