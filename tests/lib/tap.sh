# SPDX-License-Identifier: GPL-2.0-or-later
# Minimal TAP producer for shell tests (sourced).  Every check counts; the
# plan is printed at the end, and the script's status is non-zero when any
# check failed.

tap_count=0
tap_failures=0

ok() {
    tap_count=$((tap_count + 1))
    echo "ok $tap_count - $*"
}

not_ok() {
    tap_count=$((tap_count + 1))
    tap_failures=$((tap_failures + 1))
    echo "not ok $tap_count - $*"
}

diag() {
    echo "$*" | sed 's/^/# /'
}

# check DESCRIPTION COMMAND...: ok when COMMAND succeeds.
check() {
    _tap_desc=$1
    shift
    if "$@"; then ok "$_tap_desc"; else not_ok "$_tap_desc"; fi
}

# contains FILE TEXT: FILE holds the fixed string TEXT (shows FILE if not).
contains() {
    if grep -qF -- "$2" "$1"; then
        return 0
    fi
    diag "'$2' not found in $1:"
    diag "$(tail -n 20 "$1")"
    return 1
}

done_testing() {
    echo "1..$tap_count"
    [ "$tap_failures" -eq 0 ]
}
