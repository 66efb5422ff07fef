#!/usr/bin/env bash
# Every GPU test (the `#[ignore]`d ones): `scripts/gpu-tests.sh pack` here builds the test
# binaries, `pith` and the plugins/* libraries into .device/ (git-ignored); `bash
# scripts/gpu-tests.sh run` runs them on the GPU machine (device tool: carry [".device"]): the
# library's GPU tests, the transformers parity, each plugin component's CUDA check and the
# plugins' ignored tests.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
pack)
  rm -rf .device && mkdir -p .device
  cargo build --release --workspace
  cp target/release/pith .device/pith
  for so in target/release/lib*.so; do cp "$so" .device/; done # loaded from pith's own directory
  exe() { cargo test --release "$@" --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("executable")][-1])'; }
  cp "$(exe -p pith --lib)" .device/lib-tests
  cp "$(exe -p pith-tests --test hf)" .device/hf-tests
  cp "$(exe -p pith-tests --test generate)" .device/generate-tests
  for t in tests/tests/plugin_*.rs; do
    n=$(basename "$t" .rs)
    cp "$(exe -p pith-tests --test "$n")" ".device/$n-tests"
  done
  # The corpus for scripts/components.sh (../shared does not travel to the GPU machine).
  [ -f ../shared/data/tinyshakespeare.txt ] && cp ../shared/data/tinyshakespeare.txt .device/
  # The device tool carries at most 64 MiB: drop the debug line tables.
  if command -v strip >/dev/null; then strip .device/pith .device/*-tests .device/lib*.so; fi
  ls -la .device ;;
run)
  # Every suite runs even when one fails; the exit status says whether any did.
  set +e
  export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/lib/x86_64-linux-gnu PITH_PLUGIN_PATH=
  fail=0
  .device/lib-tests --ignored --test-threads=1 || fail=1
  PITH_BIN=.device/pith .device/hf-tests --ignored || fail=1
  PITH_BIN=.device/pith .device/generate-tests --ignored --nocapture || fail=1
  # Every component a plugin library next to pith provides (a library may hold several).
  for n in $(.device/pith plugins list | awk '$3 ~ /\.so$/ { print $2 }'); do
    .device/pith plugins check "$n" --device cuda --experts 8 | tail -1; [ "${PIPESTATUS[0]}" = 0 ] || fail=1
  done
  for t in .device/plugin_*-tests; do PITH_BIN=.device/pith "$t" --ignored --test-threads=1 || fail=1; done
  exit $fail ;;
*) echo "usage: scripts/gpu-tests.sh pack|run"; exit 2 ;;
esac
