#!/bin/sh
# PASS/FAIL: two short quickstart runs (lr 3e-3 and 1e-3), then `pith runs compare`: two rows
# with each run's last val loss, and a PNG (its 8-byte signature) written where asked.
. "$(dirname "$0")/../common.sh"
need_pith
for lr in 3e-3 1e-3; do
  "$PITH" train --set train.steps=6 --set "train.lr=$lr" --set "train.out=\"$TMP/lr$lr\"" > /dev/null 2> "$TMP/err" \
    || fail "pith train: $(tail -n 1 "$TMP/err")"
done
"$PITH" runs compare "$TMP/lr3e-3" "$TMP/lr1e-3" --png "$TMP/cmp.png" > "$TMP/out" 2> "$TMP/err" \
  || fail "pith runs compare: $(tail -n 1 "$TMP/err")"
cat "$TMP/out" | sed 's/^/  /'
val() { tail -n 1 "$1/metrics.jsonl" | sed -n 's/.*"val_loss":\([-0-9.eE+]*\).*/\1/p' | awk '{ printf "%.4f", $1 }'; }
for r in lr3e-3 lr1e-3; do
  grep -q "$TMP/$r .* $(val "$TMP/$r") " "$TMP/out" || fail "no row for $r with val loss $(val "$TMP/$r")"
done
[ "$(head -c 4 "$TMP/cmp.png" | tail -c 3)" = "PNG" ] || fail "no PNG at $TMP/cmp.png"
pass "two runs tabulated with their val losses, plot written ($(wc -c < "$TMP/cmp.png") bytes)"
