#!/bin/sh
set -e
"$PITH" train configs/quickstart.toml --set train.steps=20 --set train.checkpoint_every=10 --set 'train.out="runs/full"'
"$PITH" train configs/quickstart.toml --set train.steps=20 --set 'train.out="runs/resumed"' \
  --resume runs/full/checkpoints/step_00000010
if [ "$(grep -o '"loss":[^,}]*' runs/full/metrics.jsonl | tail -n 10)" = "$(grep -o '"loss":[^,}]*' runs/resumed/metrics.jsonl)" ]; then
  echo "The losses of steps 11-20 are identical (bit for bit) in both runs." > ANSWER.md
else
  echo "The losses of steps 11-20 differ between the runs." > ANSWER.md
fi
