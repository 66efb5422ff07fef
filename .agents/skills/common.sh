# Sourced by every skill's check.sh: ROOT (the repo), PITH (the binary), TMP (scratch), pass/fail.
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
PITH=${PITH_BIN:-$ROOT/target/release/pith}
TMP=$(mktemp -d "${TMPDIR:-/tmp}/pith-skill.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
export PITH_PLUGIN_PATH=
pass() { echo "PASS: $*"; exit 0; }
fail() { echo "FAIL: $*"; exit 1; }
need_pith() { [ -x "$PITH" ] || fail "no $PITH; run \`cargo build --release\` first (or set PITH_BIN)"; }
# The first TOML table of KIND in FILE replaced by `plugin = NAME` only (balance_loss: appended).
select_plugin() { # FILE KIND NAME
  if [ "$2" = balance_loss ]; then printf '\n[[balance_loss]]\nplugin = "%s"\n' "$3" >> "$1"; return; fi
  awk -v k="[$2]" -v n="$3" '
    $0 == k { print; print "plugin = \"" n "\""; skip = 1; next }
    /^\[/ { skip = 0 }
    !skip { print }' "$1" > "$1.new" && mv "$1.new" "$1"
  grep -q "^\[$2\]" "$1" || printf '\n[%s]\nplugin = "%s"\n' "$2" "$3" >> "$1"
}
