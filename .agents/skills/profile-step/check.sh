#!/bin/sh
# PASS/FAIL: one profiled training step on the GPU. `pith bench [CONFIG] --set train.device=cuda
# --warmup 1 --steps 2 --profile` (default: the built-in quickstart); its last stdout line is JSON:
# PASS if `profile_ms` has >= 3 ops with positive GPU time and tokens_per_s > 0. Prints the three
# heaviest ops. Needs a CUDA GPU: without one it FAILS and says so (it cannot measure anything).
. "$(dirname "$0")/../common.sh"
need_pith
CFG=
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then CFG=$1; shift; fi
# shellcheck disable=SC2086
"$PITH" bench $CFG --set train.device=cuda --warmup 1 --steps 2 --profile "$@" > "$TMP/out" 2> "$TMP/err"
RC=$?
NOGPU=$(grep -h -m 1 -E 'no NVIDIA driver|no usable GPU' "$TMP/err" "$TMP/out")
[ -n "$NOGPU" ] && fail "needs a CUDA GPU; none here (pith: $(echo "$NOGPU" | sed 's/^error: //' | cut -c1-160))"
[ "$RC" -eq 0 ] || fail "pith bench: $(tail -n 1 "$TMP/err")"
JSON=$(tail -n 1 "$TMP/out")
num() { echo "$JSON" | sed -n "s/.*\"$1\":\([-0-9.eE+]*\).*/\1/p"; }
TPS=$(num tokens_per_s)
# profile_ms {"op name": ms, ...}: op names hold no `"` or `}`.
echo "$JSON" | sed -n 's/.*"profile_ms":{\([^}]*\)}.*/\1/p' | grep -o '"[^"]*":[-0-9.eE+]*' \
  | awk '{ i = match($0, /":[-0-9.eE+]*$/); printf "%s\t%s\n", substr($0, i + 2), substr($0, 2, i - 2) }' \
  | sort -t "$(printf '\t')" -k1,1 -g -r > "$TMP/ops"
[ -n "$TPS" ] || fail "pith bench printed no JSON line with tokens_per_s: $JSON"
OPS=$(awk -F '\t' '$1 > 0' "$TMP/ops" | wc -l)
TOTAL=$(awk -F '\t' '{ s += $1 } END { printf "%.3f", s }' "$TMP/ops")
echo "  step $(num median_step_ms) ms (median), $TPS tokens/s, MFU $(num mfu) (of the measured GEMM peak), peak $(num peak_gib) GiB reserved"
grep '^profile of one step' "$TMP/out" | sed 's/^/  /'
echo "  heaviest ops (ms of GPU time in one step, share of $TOTAL ms):"
head -n 3 "$TMP/ops" | awk -F '\t' -v t="$TOTAL" '{ printf "    %9.3f ms %5.1f%%  %s\n", $1, 100 * $1 / t, $2 }'
[ "$OPS" -ge 3 ] || fail "the profile has $OPS ops with positive GPU time (want >= 3)"
awk -v x="$TPS" 'BEGIN { exit !(x > 0) }' || fail "tokens_per_s is $TPS"
pass "profiled one CUDA step: $OPS ops with GPU time, $TOTAL ms in kernels and GEMMs, $TPS tokens/s"
