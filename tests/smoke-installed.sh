#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# tests/smoke-installed.sh - a short test of the installed Debian packages
# (make deb; apt-get install ./build-deb/{nbdkit-qcow-plugin,libqcow0,
# libqcow0-dev}_*.deb), through their installed names only and outside
# the source tree:
#   - nbdkit finds the plugin by its short name (nbdinfo, a write and a
#     read back with nbdsh), and the filter by its short name;
#   - qcow-tool create, info and check; man finds the man pages;
#   - the example shipped in libqcow0-dev builds with
#     pkg-config --cflags --libs qcow, uses /usr's libqcow.so.0, and runs.
# Not run by tests/run (it needs the packages installed).  Exit status 0
# if all passed.

set -euo pipefail
export PATH=/usr/bin:/bin:$PATH
export LC_ALL=C
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
step () { echo "--- $*"; }

step "installed packages"
dpkg-query -W nbdkit-qcow-plugin libqcow0 libqcow0-dev
plugindir=$(pkg-config --variable=plugindir nbdkit)
filterdir=$(pkg-config --variable=filterdir nbdkit)
version=$(pkg-config --modversion qcow)
[ "$(qcow-tool --version)" = "qcow-tool $version" ]
test -f "$plugindir/nbdkit-qcow-plugin.so"

step "qcow-tool create, info"
qcow-tool create disk.qcow2 64M
qcow-tool info disk.qcow2 | tee info.txt
grep -q "^virtual size: 64 MiB" info.txt

step "nbdkit qcow (short name): nbdinfo, write, read back"
nbdkit -U - qcow file=disk.qcow2 --run 'nbdinfo "$uri"' | tee nbdinfo.txt
grep -q "export-size: 67108864" nbdinfo.txt
nbdkit -U - qcow disk.qcow2 \
    --run 'nbdsh -u "$uri" -c "h.pwrite(b\"qcow\" * 2048, 1 << 20); h.flush()"'
nbdkit -U - -r qcow disk.qcow2 \
    --run 'nbdsh -u "$uri" -c "assert h.pread(8192, 1 << 20) == b\"qcow\" * 2048"'
nbdkit qcow --dump-plugin | grep "^qcow_version=$version$"

step "nbdkit --filter=qcow (short name): the image over the file plugin"
[ -f "$filterdir/nbdkit-qcow-filter.so" ]
nbdkit -U - -r --filter=qcow file disk.qcow2 \
    --run 'nbdsh -u "$uri" -c "assert h.pread(8192, 1 << 20) == b\"qcow\" * 2048"'
man -w nbdkit-qcow-filter

step "qcow-tool check"
qcow-tool check disk.qcow2

step "man pages"
man -w qcow-tool nbdkit-qcow-plugin

step "the example program, with pkg-config"
example=/usr/share/doc/libqcow0-dev/examples/qcow-example.c
# shellcheck disable=SC2046
cc -Wall -Wextra -Werror -o qcow-example "$example" $(pkg-config --cflags --libs qcow)
ldd qcow-example | grep -E "libqcow\.so\.0 => (/usr)?/lib/[^ ]*/libqcow\.so\.0"
./qcow-example example.qcow2
if command -v qemu-img >/dev/null; then
    qemu-img check -f qcow2 example.qcow2
fi
echo "smoke test of the installed packages: all passed"
