# Cordon — build, test and run. `make run` and `make test` are the quick start (README).

CARGO  ?= cargo
TARGET := x86_64-unknown-linux-gnu
# The agent and the probes run inside arbitrary root filesystems, so they are linked statically.
STATIC_RUSTFLAGS := -C target-feature=+crt-static
STATIC_DIR := target/$(TARGET)/release

# Debian packages the host needs: busybox for the test root filesystem, e2fsprogs for the
# per-sandbox disk images, bubblewrap as the benchmark baseline, debootstrap (and util-linux's
# unshare) to build the default snapshot (`cordon prepare`), python3-venv for the official-client
# suites; docker-registry (the real OCI registry the snapshot tests start on loopback), skopeo (to
# push test images to it and as the image-pull benchmark baseline), apache2-utils (htpasswd
# for the registry's basic auth), chromium (headless, opens a service URL's browser_url),
# redis-tools (redis-cli, the real client the tunnel tests drive through a tunnel),
# qemu-system-x86 (the microvm backend), binutils (objcopy trims the agent in the microVM
# initramfs), and curl, git and openssl (the egress tests' real tools and their test CAs).
APT_PACKAGES := busybox-static e2fsprogs util-linux iproute2 bubblewrap debootstrap python3-venv \
  docker-registry skopeo apache2-utils chromium redis-tools qemu-system-x86 binutils curl git \
  openssl

.PHONY: all deps agent build test lint bench run clients-test

all: build

deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	command -v node >/dev/null && command -v npm >/dev/null || missing="$$missing nodejs npm"; \
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
	$(MAKE) clients-test

# The official-client compatibility suites (tests/clients/): the unchanged `langsmith` Python and
# npm clients (and deepagents, both languages) against a fresh `cordon serve`, once per pinned
# set; venvs and node_modules are built from PyPI and npm into .cache/clients/ and reused while
# the pins are unchanged. Node comes from Debian (nodejs, npm) when the machine has none.
clients-test: deps agent
	$(CARGO) build -p cordon
	$(CARGO) build -p cordon-testkit --example test-registries
	tests/clients/run.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

bench: deps agent
	$(CARGO) build --release -p cordon -p cordon-runtime -p cordon-bench
	./target/release/cordon-bench

# `make run` serves the API on loopback with a local key; override any of these, e.g.
# `make run CORDON_API_KEY=$(openssl rand -hex 16)`. The first start prepares the default
# snapshot (minutes); later starts take seconds.
CORDON_LISTEN   ?= 127.0.0.1:8080
CORDON_DATA_DIR ?= /var/lib/cordon
CORDON_API_KEY  ?= cordon-local-key

run: build
	./target/release/cordon serve --listen $(CORDON_LISTEN) --data-dir $(CORDON_DATA_DIR) \
	  --api-key $(CORDON_API_KEY)
