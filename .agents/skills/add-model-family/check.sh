#!/bin/sh
# PASS/FAIL: every family `pith import hf` accepts is tested (tests/tests/hf.rs), in the
# transformers parity script and documented; the model, layers and hf tests and the hf
# end-to-end tests pass.
. "$(dirname "$0")/../common.sh"
need_pith
# The accepted architectures, as the refusal of an unknown one lists them.
mkdir -p "$TMP/x" && echo '{"architectures": ["NoSuchForCausalLM"]}' > "$TMP/x/config.json"
"$PITH" import hf "$TMP/x" --out "$TMP/run" > "$TMP/log" 2>&1 && fail "pith import hf accepted an unknown architecture"
ARCHS=$(sed -n 's/.*Pith imports //p' "$TMP/log" | tr -d ',')
[ -n "$ARCHS" ] || fail "could not read the accepted architectures from: $(tail -n 1 "$TMP/log")"
for A in $ARCHS; do
  grep -q "\"$A\"" "$ROOT/tests/tests/hf.rs" || fail "$A: not in tests/tests/hf.rs (add an Arch variant)"
  C=$(echo "$A" | sed 's/ForCausalLM$/Config/')
  grep -q "\"$C\"" "$ROOT/scripts/hf_parity.py" || fail "$A: $C is not in scripts/hf_parity.py FAMILIES"
  grep -q "$A" "$ROOT/docs/interop.md" || fail "$A: not in docs/interop.md"
done
command -v cargo > /dev/null 2>&1 || fail "cargo is not on PATH (the tests need it)"
why() { grep -E 'panicked|FAILED|error' "$1" | head -n 3 | grep . || tail -n 2 "$1"; }
(cd "$ROOT" && cargo test -q -p pith --lib -- model:: layers:: hf:: > "$TMP/t1" 2>&1) || fail "model/layers/hf unit tests: $(why "$TMP/t1")"
(cd "$ROOT" && cargo test -q -p pith-tests --test hf > "$TMP/t2" 2>&1) || fail "tests/tests/hf.rs: $(why "$TMP/t2")"
pass "$(echo "$ARCHS" | wc -w) families ($ARCHS) tested, in hf_parity.py and docs; model, layers, hf tests pass"
