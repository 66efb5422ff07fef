#!/bin/sh
# Reference solution: run in the working copy's root with $PITH set to the pith binary.
set -e
mkdir -p runs
"$PITH" train configs/quickstart.toml --set train.steps=1 --set 'train.out="runs/trace"' \
  --trace-routing runs/routing.safetensors --trace-tokens 256
# Python's standard library is enough: 8-byte little-endian header length, JSON header, raw data.
python3 - runs/routing.safetensors > ANSWER.md <<'PY'
import json, struct, sys
b = open(sys.argv[1], "rb").read()
n = struct.unpack("<Q", b[:8])[0]
t = json.loads(b[8:8 + n])["layers.0.expert_ids"]
lo, hi = t["data_offsets"]
ids = struct.unpack("<%di" % ((hi - lo) // 4), b[8 + n + lo:8 + n + hi])
count = {}
for e in ids:
    count[e] = count.get(e, 0) + 1
best = max(sorted(count), key=lambda e: count[e])
print("expert: %d" % best)
print("count: %d" % count[best])
PY
