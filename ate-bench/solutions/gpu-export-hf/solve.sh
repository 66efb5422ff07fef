#!/bin/sh
# Reference solution: run in the working copy's root with $PITH set to the pith binary (on a GPU machine).
set -e
"$PITH" train configs/quickstart.toml --set train.device=\"cuda\" --set train.steps=50 --set 'train.out="runs/gpu-src"'
"$PITH" export hf runs/gpu-src export/hf
"$PITH" import hf export/hf --out runs/reimported
loss() { "$PITH" eval-logits "$1" --tokens 1,2,3,4,5,6,7,8 | sed 's/.*"loss":\([^,}]*\).*/\1/'; }
same=no
[ "$("$PITH" eval-logits export/hf --tokens 1,2,3,4,5,6,7,8)" = "$("$PITH" eval-logits runs/gpu-src --tokens 1,2,3,4,5,6,7,8)" ] && same=yes
echo "loss: $(loss export/hf)" > ANSWER.md
echo "logits identical to the checkpoint's: $same (re-import in runs/reimported)" >> ANSWER.md
