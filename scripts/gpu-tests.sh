#!/usr/bin/env bash
# Every GPU test (the `#[ignore]`d ones): `scripts/gpu-tests.sh pack` here builds the test
# binaries and the `pith` binary into .device/ (git-ignored); `bash scripts/gpu-tests.sh run`
# runs them on the GPU machine (device tool: carry [".device"]). Fails if any test fails.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
pack)
  mkdir -p .device
  cargo build --release -p pith --bin pith
  cp target/release/pith .device/pith
  exe() { cargo test --release "$@" --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("executable")][-1])'; }
  cp "$(exe -p pith --lib)" .device/lib-tests
  cp "$(exe -p pith-tests --test hf)" .device/hf-tests
  ls -la .device ;;
run)
  export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/lib/x86_64-linux-gnu
  .device/lib-tests --ignored --test-threads=1
  PITH_BIN=.device/pith .device/hf-tests --ignored ;;
*) echo "usage: scripts/gpu-tests.sh pack|run"; exit 2 ;;
esac
