#!/bin/sh
. "$(dirname "$0")/../common.sh"
need_pith
"$PITH" --help 2>&1 | grep -q '^ *profile' || fail "not yet available: no \`pith profile\` verb and no CUDA backend (train.device = \"cpu\" only); needs a GPU"
command -v nvidia-smi >/dev/null 2>&1 || fail "needs GPU: \`pith profile\` exists but no NVIDIA GPU here"
fail "not yet available: \`pith profile\` exists but this skill's check is not written yet"
