#!/bin/sh
# PASS/FAIL: scaffold (or take plugins/NAME) -> build -> `pith plugins check` -> select in TOML -> 10 steps.
. "$(dirname "$0")/../common.sh"
need_pith
NAME=${1:-}
DIRARG=""
if [ -z "$NAME" ]; then
  NAME=skill-check-router
  "$PITH" plugins new --kind router --name "$NAME" --dir "$TMP" >/dev/null || fail "pith plugins new"
  # target/plugin-tests is shared with tests/tests/plugins.rs, so dependencies build once.
  CARGO_TARGET_DIR="$ROOT/target/plugin-tests" cargo build --quiet --manifest-path "$TMP/$NAME/Cargo.toml" \
    || fail "the scaffolded crate does not build"
  mkdir -p "$TMP/plugins" && cp "$ROOT/target/plugin-tests/debug/libskill_check_router.so" "$TMP/plugins/"
  DIRARG="--plugin-dir $TMP/plugins"
else
  [ -f "$ROOT/plugins/$NAME/Cargo.toml" ] || fail "no plugins/$NAME/Cargo.toml"
  CRATE=$(sed -n 's/^name *= *"\(.*\)"/\1/p' "$ROOT/plugins/$NAME/Cargo.toml" | head -n 1)
  (cd "$ROOT" && cargo build --release --quiet -p "$CRATE") || fail "plugins/$NAME does not build"
  SO="$ROOT/target/release/lib$(echo "$CRATE" | tr - _).so"
  [ -f "$SO" ] || fail "no $SO (is plugins/$NAME a cdylib?)"
  # pith loads the .so next to it; another pith (PITH_BIN) gets it through --plugin-dir.
  if [ "$(cd "$(dirname "$PITH")" && pwd)" != "$ROOT/target/release" ]; then
    mkdir -p "$TMP/plugins" && cp "$SO" "$TMP/plugins/" && DIRARG="--plugin-dir $TMP/plugins"
  fi
fi
OUT=$("$PITH" plugins check "$NAME" $DIRARG 2>&1) || fail "pith plugins check $NAME: $(echo "$OUT" | tail -n 1)"
echo "$OUT" | grep -q '^PASS' || fail "pith plugins check $NAME printed no PASS"
KIND=$("$PITH" plugins list $DIRARG | awk -v n="$NAME" '$2 == n { print $1; exit }')
[ -n "$KIND" ] || fail "$NAME is not in \`pith plugins list\`"
cp "$ROOT/configs/quickstart.toml" "$TMP/run.toml"
select_plugin "$TMP/run.toml" "$KIND" "$NAME"
"$PITH" train "$TMP/run.toml" $DIRARG --set train.steps=10 --set "train.out=\"$TMP/run\"" \
  --set train.eval_every=0 >"$TMP/log" 2>&1 || fail "training with $NAME: $(tail -n 1 "$TMP/log")"
N=$(grep -c '"loss":[-0-9]' "$TMP/run/metrics.jsonl")
[ "$N" = 10 ] || fail "expected 10 finite losses in metrics.jsonl, found $N"
pass "$KIND \`$NAME\`: plugin check passed, selected in TOML, 10 training steps with finite loss"
