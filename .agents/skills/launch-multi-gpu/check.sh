#!/bin/sh
# PASS/FAIL: N ranks (`pith launch --gpus N`, default 2) train the quickstart for 6 steps with the
# losses of one rank (|Δ| <= 1e-4 per step on the CPU, 3e-2 with train.device="cuda": bf16).
# The flags go to both runs; the one-rank run drops [parallel] (so `--set parallel.ep=2` checks
# expert parallelism against one rank).
. "$(dirname "$0")/../common.sh"
need_pith
N=2
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then N=$1; shift; fi
RUN="--set train.steps=6 --set train.eval_every=0 --set train.log_every=1"
# shellcheck disable=SC2086
"$PITH" train $RUN --set "train.out=\"$TMP/one\"" "$@" --set parallel.ep=1 --set parallel.dp=0 > /dev/null 2> "$TMP/one.err" || fail "1 rank: $(tail -n 1 "$TMP/one.err")"
# shellcheck disable=SC2086
"$PITH" launch --gpus "$N" $RUN --set "train.out=\"$TMP/n\"" "$@" > /dev/null 2> "$TMP/n.err" || fail "$N ranks: $(grep -m 1 error "$TMP/n.err")"
TOL=1e-4
echo "$*" | grep -q cuda && TOL=3e-2
losses() { sed -n 's/.*"loss":\([-0-9.eE+]*\).*/\1/p' "$1/metrics.jsonl" | tr '\n' ' '; }
load1() { head -n 1 "$1/metrics.jsonl" | sed -n 's/.*"load_per_layer":\(\[\[[^]]*\]\).*/\1/p'; }
A=$(losses "$TMP/one") B=$(losses "$TMP/n")
echo "  1 rank:   $A"
echo "  $N ranks: $B"
GAP=$(awk -v a="$A" -v b="$B" 'BEGIN { n = split(a, x, " "); split(b, y, " "); m = 0
  for (i = 1; i <= n; i++) { d = x[i] - y[i]; if (d < 0) d = -d; if (d > m) m = d } print m }')
[ "$(echo "$A" | wc -w)" -eq 6 ] && [ "$(echo "$B" | wc -w)" -eq 6 ] || fail "expected 6 steps from each run"
awk -v g="$GAP" -v t="$TOL" 'BEGIN { exit !(g <= t) }' || fail "losses differ by up to $GAP (> $TOL)"
[ "$TOL" != 1e-4 ] || [ "$(load1 "$TMP/one")" = "$(load1 "$TMP/n")" ] || fail "step 1's expert loads differ"
pass "$N ranks train the same run as one: losses within $GAP (tolerance $TOL)"
