#!/bin/sh
# PASS/FAIL: `pith plugins check` for every listed component + the model's and layers' gradient tests.
. "$(dirname "$0")/../common.sh"
need_pith
"$PITH" plugins list "$@" > "$TMP/list" || fail "pith plugins list $*"
N=0
while read -r KIND NAME _; do
  [ "$KIND" = KIND ] && continue
  OUT=$("$PITH" plugins check "$NAME" --kind "$KIND" "$@" 2>&1) || fail "$KIND $NAME: $(echo "$OUT" | tail -n 1)"
  echo "  $(echo "$OUT" | tail -n 1)"
  N=$((N + 1))
done < "$TMP/list"
[ "$N" -gt 0 ] || fail "no components listed"
(cd "$ROOT" && cargo test -q -p pith --lib -- model:: layers:: > "$TMP/tests" 2>&1) \
  || fail "cargo test -p pith --lib model:: layers:: failed: $(grep -E 'panicked|FAILED' "$TMP/tests" | head -n 3)"
grep -q 'test result: ok' "$TMP/tests" || fail "the model tests did not run"
pass "$N components pass their gradient/determinism checks; model:: and layers:: tests pass"
