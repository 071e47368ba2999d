# SPDX-License-Identifier: BSD-3-Clause
# nbdkit-qcow-plugin: one plain GNU make file.
#   make            build ./qcow.so, ./qcow-filter.so, ./qcow-tool and the
#                   man pages
#   make run        install missing dependencies, build, serve disk.qcow2
#   make check      install missing dependencies, build, run every test
#   make check SANITIZE=1   the same under ASan + UBSan (build in build-san/)
#   make bench      benchmark against qemu-nbd and a raw file
#   make install    install plugin, tool and man page under $(PREFIX)

CC      ?= cc
PREFIX  ?= /usr/local
SANITIZE ?=
CFLAGS_BASE = -std=gnu11 -O2 -g -fPIC -pthread -Wall -Wextra -Werror \
              -D_GNU_SOURCE -fvisibility=hidden -Icore
ifeq ($(SANITIZE),1)
O       := build-san
CFLAGS_BASE += -O1 -fno-omit-frame-pointer -fsanitize=address,undefined \
               -fno-sanitize-recover=undefined
LDFLAGS_SAN = -fsanitize=address,undefined
else
O       := .
endif
CFLAGS  ?=
ALL_CFLAGS = $(CFLAGS_BASE) $(CFLAGS)
LIBS    = -pthread -lz -lzstd

CORE_SRCS := $(wildcard core/*.c)
CORE_OBJS := $(patsubst core/%.c,$(O)/obj/core/%.o,$(CORE_SRCS))
UNIT_SRCS := $(wildcard tests/unit-*.c)
UNIT_BINS := $(patsubst tests/%.c,$(O)/tests/%,$(UNIT_SRCS))

# What the plugin and the filter share (common/).
SHIM_OBJS := $(O)/obj/common/params.o $(O)/obj/common/shim.o
PLUGIN  := $(O)/qcow.so
FILTER  := $(O)/qcow-filter.so
TOOL    := $(O)/qcow-tool
FLOOR   := $(O)/bench-floor.so
MAN     := nbdkit-qcow-plugin.1
FILTER_MAN := nbdkit-qcow-filter.1

# Debian packages needed to build, test and benchmark.
DEPS_BUILD = gcc clang make pkg-config nbdkit nbdkit-plugin-dev zlib1g-dev libzstd-dev perl
DEPS_TEST  = qemu-utils libnbd-bin python3-libnbd fio libguestfs-tools fdisk e2fsprogs valgrind
DEPS = $(DEPS_BUILD) $(DEPS_TEST)

.PHONY: all deps run check bench install clean fuzz fuzz-build unit
all: $(PLUGIN) $(FILTER) $(TOOL) $(MAN) $(FILTER_MAN) $(FLOOR)

$(O)/obj/core/%.o: core/%.c core/*.h
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) -c -o $@ $<

$(O)/obj/plugin/qcow.o: plugin/qcow.c core/*.h common/*.h
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) -Icommon -c -o $@ $<

# (nbdkit passes every filter callback next and handle; most go unused.)
$(O)/obj/filter/qcow-filter.o: filter/qcow-filter.c core/*.h common/*.h
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) -Wno-unused-parameter -Icommon -c -o $@ $<

$(O)/obj/common/%.o: common/%.c core/*.h common/*.h
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) -Icommon -c -o $@ $<

$(O)/obj/tool/qcow-tool.o: tool/qcow-tool.c core/*.h
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) -c -o $@ $<

$(O)/libqcowcore.a: $(CORE_OBJS)
	@rm -f $@
	ar rcs $@ $^

$(PLUGIN): $(O)/obj/plugin/qcow.o $(SHIM_OBJS) $(O)/libqcowcore.a plugin/exports.syms
	$(CC) -shared $(LDFLAGS_SAN) -Wl,--version-script=plugin/exports.syms \
	  -o $@ $(O)/obj/plugin/qcow.o $(SHIM_OBJS) $(O)/libqcowcore.a $(LIBS)

$(FILTER): $(O)/obj/filter/qcow-filter.o $(SHIM_OBJS) $(O)/libqcowcore.a filter/exports.syms
	$(CC) -shared $(LDFLAGS_SAN) -Wl,--version-script=filter/exports.syms \
	  -o $@ $(O)/obj/filter/qcow-filter.o $(SHIM_OBJS) $(O)/libqcowcore.a $(LIBS)

# bench/floor.c: a plugin that does no work, nbdkit's own cost in the bench.
$(FLOOR): bench/floor.c
	$(CC) $(ALL_CFLAGS) -shared $(LDFLAGS_SAN) -o $@ $<

$(TOOL): $(O)/obj/tool/qcow-tool.o $(O)/libqcowcore.a
	$(CC) $(LDFLAGS_SAN) -o $@ $^ $(LIBS)

$(O)/tests/%: tests/%.c $(O)/libqcowcore.a core/qcow.h
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) $(LDFLAGS_SAN) -o $@ $< $(O)/libqcowcore.a $(LIBS)

unit: $(UNIT_BINS)

nbdkit-qcow-%.1: nbdkit-qcow-%.pod
	pod2man --section=1 --center="nbdkit" --release="nbdkit-qcow-plugin" \
	  --name=$(basename $@) $< > $@

# Install what is missing (as root), or say exactly what to run.
deps:
	@missing=""; for p in $(DEPS); do \
	  dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "Installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null || exit 1; \
	  else \
	    echo "Missing packages. Run:  sudo apt-get install -y$$missing"; exit 1; \
	  fi; \
	fi

disk.qcow2: | $(TOOL)
	$(TOOL) create $@ 1G

run: deps
	$(MAKE) all
	$(MAKE) disk.qcow2
	nbdkit -f -v $(abspath $(PLUGIN)) file=$(abspath disk.qcow2)

check: deps
	$(MAKE) all unit
	QCOW_BUILD=$(abspath $(O)) SANITIZE=$(SANITIZE) tests/run

bench: deps
	$(MAKE) all
	bench/run

# libFuzzer targets (clang): fuzz/fuzz-*.c, each linked with the core.
FUZZ_SECONDS ?= 60
FUZZ_SRCS := $(wildcard fuzz/fuzz-*.c)
FUZZ_BINS := $(patsubst fuzz/%.c,build-fuzz/%,$(FUZZ_SRCS))
FUZZ_CFLAGS = -std=gnu11 -g -O1 -fno-omit-frame-pointer -D_GNU_SOURCE -Icore \
              -fsanitize=fuzzer,address,undefined -Wall -Wextra -Werror
build-fuzz/%: fuzz/%.c $(CORE_SRCS) core/*.h fuzz/*.h
	@mkdir -p $(dir $@)
	clang $(FUZZ_CFLAGS) -o $@ $< $(CORE_SRCS) $(LIBS)
fuzz-build: $(FUZZ_BINS)
fuzz: deps
	$(MAKE) fuzz-build
	FUZZ_SECONDS=$(FUZZ_SECONDS) fuzz/run

install: all
	install -D -m 755 $(PLUGIN) $(DESTDIR)$$(pkg-config --variable=plugindir nbdkit 2>/dev/null || echo $(PREFIX)/lib/nbdkit/plugins)/nbdkit-qcow-plugin.so
	install -D -m 755 $(TOOL) $(DESTDIR)$(PREFIX)/bin/qcow-tool
	install -D -m 755 $(FILTER) $(DESTDIR)$$(pkg-config --variable=filterdir nbdkit 2>/dev/null || echo $(PREFIX)/lib/nbdkit/filters)/nbdkit-qcow-filter.so
	install -D -m 644 $(MAN) $(DESTDIR)$(PREFIX)/share/man/man1/$(MAN)
	install -D -m 644 $(FILTER_MAN) $(DESTDIR)$(PREFIX)/share/man/man1/$(FILTER_MAN)

clean:
	rm -rf obj build-san build-fuzz tests/unit-*.o qcow.so qcow-filter.so bench-floor.so qcow-tool libqcowcore.a $(MAN) $(FILTER_MAN) tests/unit-test-bins
	rm -rf ./tests/bin
