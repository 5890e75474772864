# SPDX-License-Identifier: GPL-2.0-or-later
#
# make          build qemu-system-x86_64 with the qdedup overlay, and our own targets
# make check    build everything, the test guest image, and run every test
# make help     list the targets
#
# On an unconfigured tree, the first target that needs a build runs
# './configure --install-deps' (see docs/build.md).

BUILD_DIR ?= build
QEMU_SRC := $(BUILD_DIR)/qemu
QEMU_BUILD := $(BUILD_DIR)/qemu-build
OWN_BUILD := $(BUILD_DIR)/own
GUEST_DIR := $(BUILD_DIR)/guest
QEMU_BIN := $(QEMU_BUILD)/qemu-system-x86_64

NO_CONFIG_GOALS := help clean distclean
ifneq ($(filter-out $(NO_CONFIG_GOALS),$(or $(MAKECMDGOALS),all)),)
include $(BUILD_DIR)/config.mak
endif

# Make remakes an included makefile it has a rule for, then restarts.
$(BUILD_DIR)/config.mak:
	@echo "make: $(BUILD_DIR) is not configured yet: running ./configure --install-deps"
	./configure --build-dir=$(BUILD_DIR) --install-deps

ifeq ($(CCACHE),yes)
# Debian's wrapper directory first; base dir and no cwd hash so that a clone
# at another path still hits the cache.
export PATH := /usr/lib/ccache:$(PATH)
export CCACHE_BASEDIR := $(abspath $(BUILD_DIR))
export CCACHE_NOHASHDIR := 1
endif

.PHONY: all qemu overlay own guest demo bench check check-quick install help clean distclean

all: qemu own

overlay:
	@echo "== overlay: copying qdedup's QEMU-side files into $(QEMU_SRC)"
	@scripts/overlay-sync.sh . $(QEMU_SRC)

qemu: overlay
	@echo "== qemu: ninja -C $(QEMU_BUILD) qemu-system-x86_64"
	@ninja -C $(QEMU_BUILD) qemu-system-x86_64
	@scripts/firmware-links.sh $(QEMU_BUILD)

own:
	@echo "== own: ninja -C $(OWN_BUILD)"
	@ninja -C $(OWN_BUILD)

guest:
	@echo "== guest: test guest image in $(GUEST_DIR)"
	@scripts/guest/build-image.sh --cache-dir=$(CACHE_DIR) $(GUEST_DIR)

# The main job: four guests getting smaller, live, until Ctrl-C (scripts/demo).
demo: all guest
	@scripts/demo/demo.py

# qdedup beside KSM on the same guests, one workload, all modes (root; long).
WORKLOAD ?= identical
bench: all guest
	@python3 scripts/bench/ksm-compare.py --workload $(WORKLOAD)

check: all guest
	@echo "== check: meson test -C $(OWN_BUILD)"
	@meson test -C $(OWN_BUILD) --print-errorlogs $(TESTFLAGS); \
	    scripts/test-summary.py $(OWN_BUILD)/meson-logs/testlog.json

# Into $(DESTDIR)$(PREFIX) (PREFIX from ./configure --prefix, /usr/local by
# default): qemu-system-x86_64 with the overlay, the broker and its systemd
# unit, qemu-dedup-ctl, the deploy/ rules and the docs (docs/operations.md).
install: all
	@echo "== install: into $(DESTDIR)$(PREFIX)"
	@install -D -m 0755 $(QEMU_BIN) "$(DESTDIR)$(PREFIX)/bin/qemu-system-x86_64"
	@meson install -C $(OWN_BUILD) --no-rebuild --quiet $(if $(DESTDIR),--destdir "$(DESTDIR)")

# Only the tests that need no QEMU build.
check-quick: own
	@meson test -C $(OWN_BUILD) --print-errorlogs --no-suite qemu $(TESTFLAGS); \
	    scripts/test-summary.py $(OWN_BUILD)/meson-logs/testlog.json

help:
	@echo "Targets:"
	@echo "  all (default)  qemu-system-x86_64 with the overlay, and qdedup's own targets"
	@echo "  qemu           only qemu-system-x86_64 ($(QEMU_BIN))"
	@echo "  own            only qdedup's own meson targets ($(OWN_BUILD))"
	@echo "  guest          the test guest image ($(GUEST_DIR))"
	@echo "  demo           four guests with memory-dedup and a live dashboard (Ctrl-C ends it)"
	@echo "  bench          qdedup against KSM, WORKLOAD=idle|identical|half-unique|zero-heavy|churn"
	@echo "  check          build everything and run every test"
	@echo "  install        install into \$$(DESTDIR)$(PREFIX)"
	@echo "  check-quick    run the tests that need no QEMU"
	@echo "  clean          remove build products, keep the configured trees"
	@echo "  distclean      remove $(BUILD_DIR) entirely"
	@echo "Variables: BUILD_DIR=$(BUILD_DIR), TESTFLAGS (extra 'meson test' flags)"

clean:
	@if [ -f $(QEMU_BUILD)/build.ninja ]; then ninja -C $(QEMU_BUILD) -t clean >/dev/null; fi
	@if [ -f $(OWN_BUILD)/build.ninja ]; then ninja -C $(OWN_BUILD) -t clean >/dev/null; fi
	rm -rf $(GUEST_DIR)

distclean:
	rm -rf $(BUILD_DIR)
