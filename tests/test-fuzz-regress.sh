#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# test-fuzz-regress.sh - the fuzz targets' inputs as regression tests.
#
# Builds every fuzz target (fuzz/fuzz-*.c) as an ordinary program
# (-DFUZZ_STANDALONE: a main() that runs the files named on the command
# line) against "$QCOW_BUILD/libqcowcore.a", with ASan and UBSan when
# SANITIZE=1, and runs each over fuzz/regress/ (inputs that once crashed
# a target) and fuzz/corpus/ (the seed images).  Any crash, sanitizer
# report or hang fails the test.

. "$(dirname "$0")/functions.sh"
requires gcc --version

top=$(dirname "$TESTS_DIR")
lib="$QCOW_BUILD/libqcowcore.a"
[ -f "$lib" ] || die "$lib not found: run make"
cflags=(-std=gnu11 -g -O1 -D_GNU_SOURCE -DFUZZ_STANDALONE -I"$top/core"
        -Wall -Wextra -Werror)
if [ "$SANITIZE" = 1 ]; then
    cflags+=(-fno-omit-frame-pointer -fsanitize=address,undefined
             -fno-sanitize-recover=undefined)
    export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:${ASAN_OPTIONS:-}"
    export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}"
fi

inputs=()
for d in "$top/fuzz/regress" "$top/fuzz/corpus"; do
    [ -d "$d" ] && [ -n "$(ls -A "$d")" ] && inputs+=("$d")
done
[ ${#inputs[@]} -gt 0 ] || die "no inputs in fuzz/regress or fuzz/corpus"

targets=0
for src in "$top"/fuzz/fuzz-*.c; do
    [ -f "$src" ] || continue
    name=$(basename "$src" .c)
    bin="$TMPD/$name"
    gcc "${cflags[@]}" -o "$bin" "$src" "$lib" -lz -lzstd -pthread ||
        die "cannot build $name"
    status=0
    TMPDIR=$TMPD timeout 300 "$bin" "${inputs[@]}" > "$TMPD/$name.log" 2>&1 || status=$?
    runs=$(grep -c '^running ' "$TMPD/$name.log" || true)
    if [ $status -ne 0 ] ||
       grep -E -q 'runtime error|AddressSanitizer|LeakSanitizer' "$TMPD/$name.log"; then
        tail -n 40 "$TMPD/$name.log" >&2
        last=$(grep '^running ' "$TMPD/$name.log" | tail -n 1)
        die "$name failed (exit status $status) on ${last#running }"
    fi
    echo "$name: $runs inputs passed"
    targets=$((targets + 1))
done
[ $targets -gt 0 ] || die "no fuzz targets found in fuzz/"
