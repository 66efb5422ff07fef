#!/bin/sh
. "$(dirname "$0")/../common.sh"
need_pith
grep -rq 'trace_routing' "$ROOT/host/src" 2>/dev/null \
  || fail "not yet available: the host writes no per-token routing trace (only load_per_layer in metrics.jsonl); needs e.g. [train] trace_routing_every"
fail "not yet available: a routing-trace option exists in the host but this skill's check is not written yet"
