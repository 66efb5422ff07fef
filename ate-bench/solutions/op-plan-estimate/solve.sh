#!/bin/sh
set -e
"$PITH" plan configs/quickstart.toml --set model.experts=16 --set router.top_k=4 \
  | awk '$1 == "all" { print "total: " $2; print "active: " $3 }' > ANSWER.md
