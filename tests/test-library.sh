#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# libqcow.so, the shared library for programs (make builds it in lib/):
#   - its soname is libqcow.so.0, with the usual links;
#   - it exports exactly the functions qcow.h declares: no internal
#     function (qcow_errorf, qcow_lock_image, ...) and no data.  The list
#     of declarations comes from the compiler (gcc -aux-info), not from
#     the script that writes the version script;
#   - it needs no symbol it does not say where to find (-z defs).

. "$(dirname "$0")/functions.sh"
require nm readelf
lib=$QCOW_BUILD/lib/libqcow.so.0
[ -f "$lib" ] || die "$lib not found: run make"
header=$TESTS_DIR/../core/qcow.h

soname=$(readelf -d "$lib" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')
[ "$soname" = libqcow.so.0 ] || die "soname is '$soname', not libqcow.so.0"
[ "$(readlink "$QCOW_BUILD/lib/libqcow.so")" = libqcow.so.0 ] ||
    die "lib/libqcow.so is not a link to libqcow.so.0"
version=$(sed -n 's/^#define QCOW_LIB_VERSION "\(.*\)"/\1/p' "$header")
[ "$(readlink "$lib")" = "libqcow.so.$version" ] ||
    die "lib/libqcow.so.0 is not a link to libqcow.so.$version"

# The functions qcow.h declares.
if command -v gcc >/dev/null 2>&1; then
    gcc -fsyntax-only -aux-info "$TMPD/aux" -x c "$header"
    grep "^/\* [^ ]*qcow\.h:" "$TMPD/aux" | sed 's|^/\*[^*]*\*/ ||; s| (.*||; s|.*[ *]||' |
        sort -u > "$TMPD/declared"
else
    "$TESTS_DIR/../libqcow/exports" "$header" > "$TMPD/declared"
fi
[ "$(wc -l < "$TMPD/declared")" -ge 30 ] || die "only $(wc -l < "$TMPD/declared") declarations found in qcow.h"

# What the library exports, and of which kind (T: function).
nm -D --defined-only "$lib" | awk '{ print $3 }' | sort > "$TMPD/exported"
nm -D --defined-only "$lib" | awk '$2 != "T" { print }' > "$TMPD/not-functions"
if ! diff -u "$TMPD/declared" "$TMPD/exported"; then
    die "libqcow.so's exports differ from qcow.h's functions (- declared, + exported)"
fi
[ ! -s "$TMPD/not-functions" ] || { cat "$TMPD/not-functions"; die "exported symbols that are not functions"; }
echo "$(wc -l < "$TMPD/exported") functions exported, as declared in qcow.h"

# Everything it uses is found in the libraries it names.
if command -v ldd >/dev/null 2>&1 && [ "$SANITIZE" != 1 ]; then
    ldd -r "$lib" > "$TMPD/ldd" 2>&1
    if grep -q "undefined symbol" "$TMPD/ldd"; then
        cat "$TMPD/ldd"
        die "undefined symbols in libqcow.so"
    fi
fi
