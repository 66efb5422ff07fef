#!/bin/sh
# PASS/FAIL: `pith plan`'s parameter memory agrees with the parameter count and the optimizer
# state actually checkpointed after one training step.
. "$(dirname "$0")/../common.sh"
need_pith
CFG=${1:-$ROOT/configs/quickstart.toml}
[ $# -gt 0 ] && shift
"$PITH" plan "$CFG" "$@" > "$TMP/plan" 2>&1 || fail "pith plan: $(tail -n 1 "$TMP/plan")"
TOTAL=$(awk '$1 == "all" { print $2 }' "$TMP/plan")
MIB=$(sed -n 's/^parameter memory.*: \([0-9.]*\) MiB$/\1/p' "$TMP/plan")
[ -n "$TOTAL" ] && [ -n "$MIB" ] || fail "pith plan printed no \`all\` row or parameter memory line"
"$PITH" train "$CFG" "$@" --set train.steps=1 --set "train.out=\"$TMP/run\"" --set train.eval_batches=1 \
  > "$TMP/log" 2>&1 || fail "1-step run: $(tail -n 1 "$TMP/log")"
CK=$(ls -d "$TMP"/run/checkpoints/step_* | tail -n 1)
tensors() { # number of tensors in a safetensors file (entries with a dtype in its JSON header)
  n=$(od -An -t u8 -N 8 "$1" | tr -d ' ')
  dd if="$1" bs=1 skip=8 count="$n" 2>/dev/null | grep -o '"dtype"' | wc -l
}
P=$(tensors "$CK/model.safetensors"); S=$(tensors "$CK/optimizer.safetensors")
[ "$P" -gt 0 ] || fail "no parameters in the checkpoint"
STATES=$((S / P))
WANT=$(awk -v t="$TOTAL" -v s="$STATES" 'BEGIN { printf "%.1f", t * 4 * (2 + s) / 1048576 }')
[ "$WANT" = "$MIB" ] || fail "plan says $MIB MiB; $TOTAL params × 4 B × (2 + $STATES states) = $WANT MiB"
echo "  params $TOTAL (active/token $(awk '$1 == "all" { print $3 }' "$TMP/plan")), $STATES optimizer states/param"
echo "  $(grep 'FLOPs/token' "$TMP/plan" | cut -c1-60)"
pass "parameter memory $MIB MiB = $TOTAL × 4 B × (2 + $STATES)"
