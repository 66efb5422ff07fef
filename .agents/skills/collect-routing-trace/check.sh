#!/bin/sh
# Records the routing of the first 100 quickstart tokens (2 steps) and verifies the file.
. "$(dirname "$0")/../common.sh"
need_pith
command -v python3 >/dev/null 2>&1 || fail "python3 is needed to read the trace"
"$PITH" train "$ROOT/configs/quickstart.toml" --set train.steps=2 --set train.eval_every=0 \
  --set "train.out=\"$TMP/run\"" --trace-routing "$TMP/trace.safetensors" --trace-tokens 100 \
  > "$TMP/log" 2>&1 || fail "train --trace-routing: $(tail -n 1 "$TMP/log")"
[ -f "$TMP/trace.safetensors" ] || fail "no trace written at $TMP/trace.safetensors"
# safetensors.numpy when installed, else the format by hand (8-byte LE header length, JSON, data).
python3 - "$TMP/trace.safetensors" 100 2 8 2 <<'PY' || fail "the trace is malformed (above)"
import json, struct, sys
path, n, layers, experts, k = sys.argv[1], *map(int, sys.argv[2:])
b = open(path, "rb").read()
hl = struct.unpack("<Q", b[:8])[0]
hdr = json.loads(b[8:8 + hl])
def load(name):
    t = hdr[name]
    lo, hi = t["data_offsets"]
    fmt = {"I32": "i", "F32": "f"}[t["dtype"]]
    return t["dtype"], t["shape"], struct.unpack("<%d%s" % ((hi - lo) // 4, fmt), b[8 + hl + lo:8 + hl + hi])
try:
    from safetensors.numpy import load_file
    arrays = load_file(path)
    via = "safetensors.numpy"
    assert sorted(arrays) == sorted(k_ for k_ in hdr if k_ != "__metadata__")
except ImportError:
    via = "python3 stdlib"
names = sorted(x for x in hdr if x != "__metadata__")
want = ["tokens"] + ["layers.%d.%s" % (l, s) for l in range(layers) for s in ("expert_ids", "gate_weights")]
def die(msg):
    print("trace: " + msg); sys.exit(1)
if names != sorted(want): die("tensors %s, expected %s" % (names, sorted(want)))
dt, shape, tok = load("tokens")
if (dt, shape) != ("I32", [n]): die("tokens is %s %s, expected I32 [%d]" % (dt, shape, n))
if not all(0 <= t < 256 for t in tok): die("a token id is outside the vocabulary")
for l in range(layers):
    dt, shape, ids = load("layers.%d.expert_ids" % l)
    if (dt, shape) != ("I32", [n, k]): die("layer %d expert_ids is %s %s" % (l, dt, shape))
    dt, shape, w = load("layers.%d.gate_weights" % l)
    if (dt, shape) != ("F32", [n, k]): die("layer %d gate_weights is %s %s" % (l, dt, shape))
    for r in range(n):
        row, g = ids[r * k:(r + 1) * k], w[r * k:(r + 1) * k]
        if not all(0 <= e < experts for e in row) or len(set(row)) != k: die("layer %d token %d: experts %s" % (l, r, row))
        if not all(0 <= x <= 1 for x in g) or abs(sum(g) - 1) > 1e-5: die("layer %d token %d: gates %s" % (l, r, g))
print("trace ok (%s): %d tokens, %d layers, top-%d of %d experts" % (via, n, layers, k, experts))
PY
pass "routing trace: tokens [100] I32, layers.{0,1}.expert_ids [100,2] I32 in 0..8 (distinct per token), gate_weights [100,2] F32 summing to 1"
