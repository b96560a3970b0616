# Rampart. `make demo` runs the main job on embedded defaults; `make test` runs
# every test, ruff and mypy. `make setup` (a dependency of both) installs what a
# fresh Debian 12 machine lacks; it is idempotent and cheap when nothing is missing.

# Debian's interpreter, as on a device (a venv on an interpreter under /root
# would not be usable by other users of the machine).
PYTHON ?= /usr/bin/python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-stamp
# Debian packages the tests use (real tools, not mocks).
DEB_PACKAGES := minisign python3-venv nginx openssl util-linux postgresql wrk chromium cryptsetup-bin \
	openssh-client curl dbus rauc rauc-service squashfs-tools shellcheck casync \
	sbsigntool systemd-boot-efi ovmf qemu-system-x86 binutils \
	busybox-static lvm2 kmod debootstrap e2fsprogs cpio \
	swtpm swtpm-tools qemu-utils tpm2-tools libtss2-tcti-device0 libtss2-tcti-swtpm0 \
	nftables strongswan-charon strongswan-swanctl libstrongswan-standard-plugins charon-systemd

# The virtual testbed: build (cached), install, boot 1.0.0 under Secure Boot, update to
# 1.0.1 from rampart serve, reboot into it, show the fleet (docs/testbed.md).
.PHONY: setup demo testbed test check unit vm bench clean distclean

setup: $(STAMP) .cache/kernel/vmlinuz

# The Debian kernel the image tests and the testbed boot (scripts/fetch-kernel.sh).
.cache/kernel/vmlinuz: scripts/fetch-kernel.sh | $(STAMP)
	sh scripts/fetch-kernel.sh

$(STAMP): pyproject.toml Makefile scripts/setup-debian.sh scripts/setup-users.sh
	sh scripts/setup-debian.sh $(DEB_PACKAGES)
	sh scripts/setup-users.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[server,build,test]'
	touch $(STAMP)

demo: setup
	sh scripts/demo.sh

testbed: setup
	rm -rf testbed-work
	$(BIN)/rampart testbed demo --work testbed-work

# Static checks: shell, ruff (lint, format, complexity), mypy --strict on src, tests and
# bench, and the import contracts of docs/architecture.md. No root, no apt, no network:
# it runs the tools `make setup` put in the virtual environment and says so if they
# are missing.
check:
	@for tool in $(BIN)/ruff $(BIN)/mypy $(BIN)/lint-imports; do test -x $$tool || \
		{ echo "make check: $$tool is missing; run 'make setup' once (root, network)" >&2; exit 2; }; done
	@command -v shellcheck >/dev/null || \
		{ echo "make check: shellcheck is missing; run 'make setup' once (root, network)" >&2; exit 2; }
	shellcheck --severity=warning scripts/*.sh
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts
	$(BIN)/mypy
	$(BIN)/lint-imports

# Every test that boots no virtual machine.
unit: setup
	$(BIN)/pytest -q -m "not vm"

# The virtual-machine tests: the testbed scenarios beside the other VM tests
# (scripts/test.sh).
vm: setup
	sh scripts/test.sh $(BIN)/pytest -q -m vm

# check, then unit and vm together: the testbed scenarios in one pytest process
# beside every other test in another (scripts/test.sh); TEST_PARALLEL=0 runs one
# pytest over everything.
test: setup
	$(MAKE) check
	sh scripts/test.sh $(BIN)/pytest -q

bench: setup
	$(BIN)/python bench/sign_verify.py
	$(BIN)/python bench/update.py
	$(BIN)/python bench/download.py
	$(BIN)/python bench/server.py
	$(BIN)/python bench/verity.py
	$(BIN)/python bench/incremental.py
	$(BIN)/python bench/tuf.py
	$(BIN)/python bench/tuf_sign.py

clean:
	rm -rf build demo-work testbed-work .pytest_cache .mypy_cache .ruff_cache .hypothesis

distclean: clean
	rm -rf $(VENV) .cache
