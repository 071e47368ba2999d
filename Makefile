# SPDX-License-Identifier: BSD-3-Clause
# nbdkit-qcow-plugin: one plain GNU make file.
#   make            build ./qcow.so, ./qcow-filter.so, ./qcow-tool,
#                   lib/libqcow.so and the man pages
#   make run        install missing dependencies, build, serve disk.qcow2
#   make check      install missing dependencies, build, run every test
#   make check SANITIZE=1   the same under ASan + UBSan (build in build-san/)
#   make bench      benchmark against qemu-nbd and a raw file
#   make install    install plugin, tool, man pages, library, header and qcow.pc
#   make deb        install missing dependencies, build Debian packages in build-deb/

CC      ?= cc
PKG_CONFIG ?= pkg-config
PREFIX  ?= /usr/local
BINDIR  ?= $(PREFIX)/bin
LIBDIR  ?= $(PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include
MANDIR  ?= $(PREFIX)/share/man
PKGCONFIGDIR ?= $(LIBDIR)/pkgconfig
# Where nbdkit looks for plugins and filters (outside PREFIX: installed
# anywhere else, nbdkit would not find them by their short names).
PLUGINDIR ?= $(shell $(PKG_CONFIG) --variable=plugindir nbdkit 2>/dev/null || echo $(PREFIX)/lib/nbdkit/plugins)
FILTERDIR ?= $(shell $(PKG_CONFIG) --variable=filterdir nbdkit 2>/dev/null || echo $(PREFIX)/lib/nbdkit/filters)
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
ALL_CFLAGS = $(CFLAGS_BASE) $(CPPFLAGS) $(CFLAGS)
LIBS    = -pthread -lz -lzstd

# The shared library: the core with only qcow.h's functions exported.
# SOVERSION changes with every incompatible change to qcow.h (a function
# removed or changed, a struct's layout changed); the file name carries
# the library version (QCOW_LIB_VERSION in qcow.h).
VERSION   := $(shell sed -n 's/^\#define QCOW_LIB_VERSION "\(.*\)"/\1/p' core/qcow.h)
SOVERSION  = 0
LIB       := $(O)/lib/libqcow.so.$(VERSION)
LIB_LINKS := $(O)/lib/libqcow.so.$(SOVERSION) $(O)/lib/libqcow.so
LIB_MAP   := $(O)/obj/libqcow.map
ifneq ($(SANITIZE),1)
LIB_LDFLAGS = -Wl,-z,defs
endif
EXAMPLE   := $(O)/examples/qcow-example

CORE_SRCS := $(wildcard core/*.c)
CORE_OBJS := $(patsubst core/%.c,$(O)/obj/core/%.o,$(CORE_SRCS))
TOOL_SRCS := $(wildcard tool/*.c)
TOOL_OBJS := $(patsubst tool/%.c,$(O)/obj/tool/%.o,$(TOOL_SRCS))
UNIT_SRCS := $(wildcard tests/unit-*.c)
UNIT_BINS := $(patsubst tests/%.c,$(O)/tests/%,$(UNIT_SRCS))

# What the plugin and the filter share (common/).
SHIM_OBJS := $(O)/obj/common/params.o $(O)/obj/common/shim.o
PLUGIN  := $(O)/qcow.so
FILTER  := $(O)/qcow-filter.so
TOOL    := $(O)/qcow-tool
FLOOR   := $(O)/bench-floor.so
POWERLOSS := $(O)/tests/powerloss-filter.so
MAN     := nbdkit-qcow-plugin.1
FILTER_MAN := nbdkit-qcow-filter.1
TOOLMAN := qcow-tool.1

# Debian packages needed to build, test and benchmark.
DEPS_BUILD = gcc clang make pkg-config nbdkit nbdkit-plugin-dev zlib1g-dev libzstd-dev perl
DEPS_TEST  = qemu-utils libnbd-bin python3-libnbd fio libguestfs-tools fdisk e2fsprogs valgrind nginx xz-utils
DEPS = $(DEPS_BUILD) $(DEPS_TEST)

.PHONY: all deps run check bench install clean fuzz fuzz-build unit examples deb deb-deps
all: $(PLUGIN) $(FILTER) $(TOOL) $(MAN) $(FILTER_MAN) $(TOOLMAN) $(FLOOR) $(LIB_LINKS)

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

$(O)/obj/tool/%.o: tool/%.c tool/*.h core/*.h
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) -c -o $@ $<

$(O)/libqcowcore.a: $(CORE_OBJS)
	@rm -f $@
	ar rcs $@ $^

$(PLUGIN): $(O)/obj/plugin/qcow.o $(SHIM_OBJS) $(O)/libqcowcore.a plugin/exports.syms
	$(CC) -shared $(LDFLAGS_SAN) $(LDFLAGS) -Wl,--version-script=plugin/exports.syms \
	  -o $@ $(O)/obj/plugin/qcow.o $(SHIM_OBJS) $(O)/libqcowcore.a $(LIBS)

$(FILTER): $(O)/obj/filter/qcow-filter.o $(SHIM_OBJS) $(O)/libqcowcore.a filter/exports.syms
	$(CC) -shared $(LDFLAGS_SAN) $(LDFLAGS) -Wl,--version-script=filter/exports.syms \
	  -o $@ $(O)/obj/filter/qcow-filter.o $(SHIM_OBJS) $(O)/libqcowcore.a $(LIBS)

$(LIB_MAP): core/qcow.h libqcow/exports
	@mkdir -p $(dir $@)
	libqcow/exports --map $< > $@.tmp && mv $@.tmp $@

$(LIB): $(CORE_OBJS) $(LIB_MAP)
	@mkdir -p $(dir $@)
	$(CC) -shared $(LDFLAGS_SAN) $(LDFLAGS) $(LIB_LDFLAGS) \
	  -Wl,-soname,libqcow.so.$(SOVERSION) -Wl,--version-script=$(LIB_MAP) \
	  -Wl,--no-undefined-version -o $@ $(CORE_OBJS) $(LIBS)

$(O)/lib/libqcow.so.$(SOVERSION): $(LIB)
	ln -sf $(notdir $<) $@

$(O)/lib/libqcow.so: $(O)/lib/libqcow.so.$(SOVERSION)
	ln -sf $(notdir $<) $@

# examples/: programs using the library as its users do (-lqcow).
$(EXAMPLE): examples/qcow-example.c core/qcow.h $(LIB_LINKS)
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) $(LDFLAGS_SAN) $(LDFLAGS) -o $@ $< -L$(O)/lib -lqcow

examples: $(EXAMPLE)

# bench/floor.c: a plugin that does no work, nbdkit's own cost in the bench.
$(FLOOR): bench/floor.c
	$(CC) $(ALL_CFLAGS) -shared $(LDFLAGS_SAN) $(LDFLAGS) -o $@ $<

$(TOOL): $(TOOL_OBJS) $(O)/libqcowcore.a
	$(CC) $(LDFLAGS_SAN) $(LDFLAGS) -o $@ $^ $(LIBS)

$(O)/tests/%: tests/%.c $(O)/libqcowcore.a core/qcow.h
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) $(LDFLAGS_SAN) $(LDFLAGS) -o $@ $< $(O)/libqcowcore.a $(LIBS)

# tests/powerloss-filter.c: an nbdkit filter logging writes for the
# power-loss tests (QCOW_VIA=powerloss in tests/functions.sh).
$(POWERLOSS): tests/powerloss-filter.c
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) -Wno-unused-parameter -shared $(LDFLAGS_SAN) $(LDFLAGS) -o $@ $<

unit: $(UNIT_BINS) $(POWERLOSS)

nbdkit-qcow-%.1: nbdkit-qcow-%.pod
	pod2man --section=1 --center="nbdkit" --release="nbdkit-qcow-plugin" \
	  --name=$(basename $@) $< > $@

$(TOOLMAN): qcow-tool.pod
	pod2man --section=1 --center="nbdkit-qcow-plugin" \
	  --release="nbdkit-qcow-plugin $(VERSION)" --name=qcow-tool $< > $@.tmp
	mv $@.tmp $@

# $(call apt_install,PACKAGES): install those missing (as root), or say
# exactly what to run.
apt_install = @missing=""; for p in $(1); do \
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

deps:
	$(call apt_install,$(DEPS))

disk.qcow2: | $(TOOL)
	$(TOOL) create $@ 1G

run: deps
	$(MAKE) all
	$(MAKE) disk.qcow2
	nbdkit -f -v $(abspath $(PLUGIN)) file=$(abspath disk.qcow2)

check: deps
	$(MAKE) all unit examples
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
	install -D -m 755 $(PLUGIN) $(DESTDIR)$(PLUGINDIR)/nbdkit-qcow-plugin.so
	install -D -m 755 $(FILTER) $(DESTDIR)$(FILTERDIR)/nbdkit-qcow-filter.so
	install -D -m 755 $(TOOL) $(DESTDIR)$(BINDIR)/qcow-tool
	install -D -m 644 $(MAN) $(DESTDIR)$(MANDIR)/man1/$(MAN)
	install -D -m 644 $(TOOLMAN) $(DESTDIR)$(MANDIR)/man1/$(TOOLMAN)
	install -D -m 644 $(FILTER_MAN) $(DESTDIR)$(MANDIR)/man1/$(FILTER_MAN)
	install -D -m 644 $(LIB) $(DESTDIR)$(LIBDIR)/$(notdir $(LIB))
	ln -sf $(notdir $(LIB)) $(DESTDIR)$(LIBDIR)/libqcow.so.$(SOVERSION)
	ln -sf libqcow.so.$(SOVERSION) $(DESTDIR)$(LIBDIR)/libqcow.so
	install -D -m 644 core/qcow.h $(DESTDIR)$(INCLUDEDIR)/qcow.h
	@mkdir -p $(DESTDIR)$(PKGCONFIGDIR)
	sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@LIBDIR@|$(LIBDIR)|' \
	  -e 's|@INCLUDEDIR@|$(INCLUDEDIR)|' -e 's|@VERSION@|$(VERSION)|' \
	  libqcow/qcow.pc.in > $(DESTDIR)$(PKGCONFIGDIR)/qcow.pc
	if [ -z "$(DESTDIR)" ] && [ "$$(id -u)" = 0 ]; then ldconfig; fi

# Debian packages (debian/), built from a copy of the sources in build-deb/
# so that the tree and its build stay as they are: build-deb/*.deb.
# Their build dependencies are debian/control's; lintian, if installed,
# checks the result.
DEB_DIR = build-deb
DEB_SRC = $(DEB_DIR)/nbdkit-qcow-plugin-$(VERSION)

deb-deps:
	$(call apt_install,dpkg-dev debhelper)
	@if ! dpkg-checkbuilddeps >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "Installing the build dependencies of debian/control"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get build-dep -y -qq ./ >/dev/null || exit 1; \
	  else \
	    echo "Missing build dependencies. Run:  sudo apt-get build-dep -y ./"; exit 1; \
	  fi; \
	fi

deb: deb-deps
	@v=$$(dpkg-parsechangelog -S Version); if [ "$${v%%-*}" != "$(VERSION)" ]; then \
	  echo "debian/changelog is at $$v, core/qcow.h at $(VERSION): add a changelog entry"; exit 1; fi
	rm -rf $(DEB_DIR)
	mkdir -p $(DEB_SRC)
	if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then \
	  git ls-files -z --cached --others --exclude-standard | \
	    tar --null --ignore-failed-read -T - -cf - | tar -xf - -C $(DEB_SRC); \
	else \
	  tar --exclude=./$(DEB_DIR) -cf - . | tar -xf - -C $(DEB_SRC); \
	fi
	cd $(DEB_SRC) && dpkg-buildpackage -b -us -uc
	rm -rf $(DEB_SRC)
	@ls -l $(DEB_DIR)
	if command -v lintian >/dev/null; then lintian --fail-on error $(DEB_DIR)/*.changes; fi

clean:
	rm -rf obj build-san build-fuzz tests/unit-*.o tests/powerloss-filter.so qcow.so bench-floor.so qcow-tool libqcowcore.a $(MAN) tests/unit-test-bins
	rm -rf qcow-filter.so $(FILTER_MAN)
	rm -rf lib examples/qcow-example $(TOOLMAN) $(DEB_DIR)
	rm -rf ./tests/bin
