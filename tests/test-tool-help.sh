#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# qcow-tool's help and manual:
#   - --version prints QCOW_LIB_VERSION;
#   - every command listed by --help answers COMMAND --help (status 0,
#     "Usage: qcow-tool COMMAND ..."), also with -h and after other
#     arguments, but not after "--";
#   - qcow-tool.pod has a section for every command (and none for a
#     command the tool does not have) which documents every option the
#     command's usage names;
#   - the man pages render without warnings from man/groff.

. "$(dirname "$0")/functions.sh"
[ -x "$QCOW_TOOL" ] || die "$QCOW_TOOL not found: run make"
top=$TESTS_DIR/..
pod=$top/qcow-tool.pod

version=$(sed -n 's/^#define QCOW_LIB_VERSION "\(.*\)"/\1/p' "$top/core/qcow.h")
[ "$("$QCOW_TOOL" --version)" = "qcow-tool $version" ] || die "--version: $("$QCOW_TOOL" --version)"
[ "$("$QCOW_TOOL" -V)" = "qcow-tool $version" ] || die "-V"

"$QCOW_TOOL" --help > "$TMPD/help"
cmp -s "$TMPD/help" <("$QCOW_TOOL" -h) || die "-h differs from --help"
# The commands: "  NAME ARGS" lines between "Commands:" and the next blank line.
commands=$(sed -n '/^Commands:/,/^$/s/^  \([a-z][a-z0-9-]*\)\( .*\)\{0,1\}$/\1/p' "$TMPD/help")
[ "$(echo "$commands" | wc -w)" -ge 7 ] || die "--help lists only: $commands"
if "$QCOW_TOOL" >/dev/null 2>&1; then die "no command: status 0"; fi
if "$QCOW_TOOL" no-such-command >/dev/null 2>&1; then die "unknown command: status 0"; fi

# pod section of command $1: from "=head2 $1" to the next heading.
section ()
{
    awk -v c="$1" '/^=head/ { on = ($0 == "=head2 " c) ; next } on' "$pod"
}

for c in $commands; do
    "$QCOW_TOOL" "$c" --help > "$TMPD/$c.help" || die "$c --help: status $?"
    head -n 1 "$TMPD/$c.help" | grep -q "^Usage: qcow-tool $c\( \|$\)" ||
        die "$c --help does not start with its usage"
    [ "$(wc -l < "$TMPD/$c.help")" -ge 3 ] || die "$c --help says nothing"
    cmp -s "$TMPD/$c.help" <("$QCOW_TOOL" "$c" -h) || die "$c -h differs from $c --help"
    cmp -s "$TMPD/$c.help" <("$QCOW_TOOL" "$c" some-file --help) ||
        die "$c FILE --help differs from $c --help"
    if "$QCOW_TOOL" "$c" -- --help >/dev/null 2>&1; then
        die "$c -- --help: status 0 (a file named --help)"
    fi
    section "$c" > "$TMPD/$c.pod"
    [ -s "$TMPD/$c.pod" ] || die "qcow-tool.pod has no '=head2 $c' section"
    # The usage (up to the first blank line) names the options.
    for opt in $(sed '/^$/q' "$TMPD/$c.help" | { grep -o -- '--[a-z][a-z-]*' || true; } | sort -u); do
        grep -q "B<$opt\b" "$TMPD/$c.pod" || die "qcow-tool.pod: $c: $opt is not documented"
        grep -q -- "$opt" <(sed '1,/^$/d' "$TMPD/$c.help") || die "$c --help: $opt is not explained"
    done
    grep -q "^ qcow-tool $c\b" <(sed -n '/^=head1 SYNOPSIS/,/^=head1 DESCRIPTION/p' "$pod") ||
        die "qcow-tool.pod: $c is not in the SYNOPSIS"
done
for c in $(sed -n '/^=head1 COMMANDS/,/^=head1 /s/^=head2 //p' "$pod"); do
    echo "$commands" | grep -qx "$c" || die "qcow-tool.pod documents '$c', which qcow-tool does not have"
done
echo "commands: $(echo $commands)"

# The man pages, as lintian checks them.
if command -v man >/dev/null 2>&1; then
    for page in "$top/qcow-tool.1" "$top/nbdkit-qcow-plugin.1"; do
        [ -f "$page" ] || die "$page not found: run make"
        LC_ALL=C.UTF-8 MANROFFSEQ='' MANWIDTH=80 \
            man --warnings -E UTF-8 -l -Tutf8 -Z "$page" 2>"$TMPD/man.err" >/dev/null
        [ ! -s "$TMPD/man.err" ] || { cat "$TMPD/man.err"; die "$(basename "$page"): warnings"; }
    done
fi
