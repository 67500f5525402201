# Cordon — build, test and run. `make run` and `make test` are the quick start (README).

CARGO  ?= cargo
TARGET := x86_64-unknown-linux-gnu
# The agent and the probes run inside arbitrary root filesystems, so they are linked statically.
STATIC_RUSTFLAGS := -C target-feature=+crt-static
STATIC_DIR := target/$(TARGET)/release

# Debian packages the host needs: busybox for the test root filesystem, e2fsprogs for the
# per-sandbox disk images, bubblewrap as the benchmark baseline, debootstrap (and util-linux's
# unshare) to build the default snapshot (`cordon prepare`).
APT_PACKAGES := busybox-static e2fsprogs util-linux iproute2 bubblewrap debootstrap

.PHONY: all deps agent build test lint bench run

all: build

deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

# The static in-sandbox binaries: the agent (PID 1 of every sandbox) and the security probes.
agent:
	RUSTFLAGS="$(STATIC_RUSTFLAGS)" $(CARGO) build --release --target $(TARGET) \
	  -p cordon-agent -p cordon-probe

build: deps agent
	$(CARGO) build --release

test: deps agent
	$(CARGO) test --workspace

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

bench: deps agent
	$(CARGO) run --release -p cordon-bench

# Until `cordon serve` lands, `make run` prepares the default snapshot (minutes the first time,
# then instant) and runs a command in a throwaway sandbox booted on it.
DEMO_COMMAND := echo "hello from $$(hostname)"; id; python3 --version; echo "uid map: $$(cat /proc/self/uid_map)"

run: build
	layer=$$(./target/release/cordon prepare | awk '/layer:/ {print $$2}') && \
	./target/release/cordon sandbox exec --shell /bin/bash --rootfs "$$layer" -- '$(DEMO_COMMAND)'
