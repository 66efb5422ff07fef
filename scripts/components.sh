#!/usr/bin/env bash
# The measured rows of docs/components.md: the quickstart model trained on tinyshakespeare for
# the same steps, changing one component at a time; prints a markdown table (final val loss,
# load max/mean, tokens/s). Run where the component .so files lie next to `pith`:
#   here (CPU):      scripts/components.sh target/release/pith ../shared/data/tinyshakespeare.txt cpu
#   the GPU machine: bash scripts/components.sh .device/pith .device/tinyshakespeare.txt cuda
# (scripts/gpu-tests.sh pack copies the corpus into .device/ when ../shared has it.)
set -euo pipefail
P=${1:?pith binary} TEXT=${2:?corpus .txt} DEV=${3:-cuda} STEPS=${STEPS:-300}
O=${OUT:-/tmp/components}
rm -rf "$O" && mkdir -p "$O"
export PITH_PLUGIN_PATH= LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/lib/x86_64-linux-gnu}
"$P" data prepare "$TEXT" --out "$O/data" > /dev/null 2>&1
base=(--set "train.device=\"$DEV\"" --set "train.steps=$STEPS" --set "data.source=\"$O/data\""
  --set "train.eval_every=$STEPS" --set train.log_every=1000)
# name | what changes (one component) | --set arguments
variants=(
  "baseline|topk-softmax, swiglu, switch-aux + z-loss, adamw, local|"
  "top-any|router|--set router.plugin=\"top-any\""
  "sigmoid-bias|router|--set router.plugin=\"sigmoid-bias\""
  "group-topk|router|--set router.plugin=\"group-topk\" --set router.n_group=4 --set router.topk_group=2"
  "noisy-topk|router|--set router.plugin=\"noisy-topk\""
  "expert-choice|router|--set router.plugin=\"expert-choice\""
  "seq-aux|balance loss (replaces switch-aux)|--set balance_loss.0.plugin=\"seq-aux\""
  "global-batch-aux|balance loss (replaces switch-aux)|--set balance_loss.0.plugin=\"global-batch-aux\""
  "relu2|experts|--set experts.plugin=\"relu2\""
  "gelu|experts|--set experts.plugin=\"gelu\""
  "moepp|experts|--set experts.plugin=\"moepp\""
  "shared-swiglu|+ a shared expert|--set shared.plugin=\"shared-swiglu\" --set shared.ffn=128"
  "capacity|comm (capacity factor 1.0)|--set comm.plugin=\"capacity\" --set comm.capacity_factor=1.0"
  "lion|optimizer (lr 1e-3)|--set optimizer.plugin=\"lion\" --set train.lr=1e-3"
  "muon|optimizer (lr 2e-2)|--set optimizer.plugin=\"muon\" --set train.lr=2e-2"
)
echo "| component | what changes | val loss | load max/mean | tokens/s |"
echo "|---|---|---|---|---|"
for v in "${variants[@]}"; do
  IFS='|' read -r name what sets <<< "$v"
  # shellcheck disable=SC2086
  if eval "\"$P\" train \"\${base[@]}\" --set 'train.out=\"$O/$name\"' $sets" > "$O/$name.log" 2>&1; then
    python3 - "$O/$name/metrics.jsonl" "$name" "$what" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
last, tail = rows[-1], rows[len(rows) // 2:]
tps = sorted(r["tokens_per_s"] for r in tail)[len(tail) // 2]
print(f"| `{sys.argv[2]}` | {sys.argv[3]} | {last.get('val_loss', float('nan')):.4f} | {last['load_max_over_mean']:.2f} | {tps / 1e3:.0f}K |")
EOF
  else
    echo "| \`$name\` | $what | failed: $(grep -m 1 error "$O/$name.log" | cut -c1-120) | | |"
  fi
done
