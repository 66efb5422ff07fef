#!/bin/sh
set -e
"$PITH" train configs/quickstart.toml --set router.top_k=1 --set train.steps=30 --set 'train.out="runs/top1"'
v=$(tail -n 1 runs/top1/metrics.jsonl | sed 's/.*"load_max_over_mean":\([^,}]*\).*/\1/')
echo "Final load_max_over_mean with top_k = 1: $v" > ANSWER.md
