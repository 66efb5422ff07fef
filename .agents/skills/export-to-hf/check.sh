#!/bin/sh
# 3-step quickstart → export hf → files → import hf → eval-logits: export, re-import and checkpoint agree.
. "$(dirname "$0")/../common.sh"
need_pith
command -v python3 >/dev/null 2>&1 || fail "python3 is needed to compare eval-logits JSON"
"$PITH" train "$ROOT/configs/quickstart.toml" --set train.steps=3 --set train.eval_every=0 \
  --set "train.out=\"$TMP/run\"" > "$TMP/log" 2>&1 || fail "3-step run: $(tail -n 1 "$TMP/log")"
"$PITH" export hf "$TMP/run" "$TMP/hf" > "$TMP/log" 2>&1 || fail "pith export hf: $(tail -n 1 "$TMP/log")"
[ -f "$TMP/hf/config.json" ] || fail "export wrote no config.json"
if [ -f "$TMP/hf/model.safetensors.index.json" ]; then :; else
  [ -f "$TMP/hf/model.safetensors" ] || fail "export wrote neither model.safetensors nor model.safetensors.index.json"
fi
"$PITH" import hf "$TMP/hf" --out "$TMP/imp" > "$TMP/log" 2>&1 || fail "pith import hf of the export: $(tail -n 1 "$TMP/log")"
TOK=1,2,3,4,5,6,7,8,9,10,11,12
for m in run hf imp; do
  "$PITH" eval-logits "$TMP/$m" --tokens $TOK > "$TMP/$m.json" 2> "$TMP/log" || fail "eval-logits $m: $(tail -n 1 "$TMP/log")"
done
python3 - "$TMP" <<'PY' || fail "the export does not reproduce the checkpoint (above)"
import json, os, sys
d = sys.argv[1]
cfg = json.load(open(os.path.join(d, "hf", "config.json")))
if not cfg.get("architectures"): print("config.json names no architecture"); sys.exit(1)
idx = os.path.join(d, "hf", "model.safetensors.index.json")
if os.path.exists(idx):
    missing = {f for f in json.load(open(idx))["weight_map"].values() if not os.path.exists(os.path.join(d, "hf", f))}
    if missing: print("shards missing: %s" % sorted(missing)); sys.exit(1)
ref = json.load(open(os.path.join(d, "run.json")))
flat = lambda rows: [x for r in rows for x in r]
bad = 0
for m in ("hf", "imp"):
    got = json.load(open(os.path.join(d, m + ".json")))
    a, b = flat(ref["logits"]), flat(got["logits"])
    dl = max(abs(x - y) for x, y in zip(a, b)) if len(a) == len(b) and a else float("inf")
    dloss = abs(ref["loss"] - got["loss"])
    print("%s vs checkpoint: max |dlogit| %.2e, |dloss| %.2e (%s)" % (m, dl, dloss, cfg["architectures"][0]))
    bad += not (dl <= 1e-5 and dloss <= 1e-6)
sys.exit(1 if bad else 0)
PY
python3 -c 'import transformers, torch' 2>/dev/null \
  && echo "note: transformers is importable here: python3 scripts/hf_parity.py $PITH also checks the round trip through transformers"
pass "export hf: config.json + weights; import hf accepts it; eval-logits of export and re-import equal the checkpoint's (|dlogit| <= 1e-5)"
