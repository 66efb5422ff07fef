#!/bin/sh
# Reference solution: run in the working copy's root with $PITH set to the pith binary.
set -e
"$PITH" train configs/quickstart.toml --set train.steps=5
loss=$(grep '"step":5[,}]' runs/quickstart/metrics.jsonl | sed 's/.*"loss":\([^,}]*\).*/\1/')
echo "Training loss at step 5: $loss" > ANSWER.md
