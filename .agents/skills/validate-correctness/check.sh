#!/bin/sh
# PASS/FAIL: `pith plugins check` for every listed component + the model's and layers' gradient
# tests; where pith can open a GPU, also each component's CUDA path against its CPU path
# (`--device cuda`) and the GPU tests. Without a GPU the CUDA parity step is skipped, and said so.
. "$(dirname "$0")/../common.sh"
need_pith
"$PITH" plugins list "$@" > "$TMP/list" || fail "pith plugins list $*"
N=0
GPU=unknown # the first component's `--device cuda` run decides: yes, or no (pith refused for want of a GPU)
while read -r KIND NAME _; do
  [ "$KIND" = KIND ] && continue
  if [ "$GPU" != no ]; then
    OUT=$("$PITH" plugins check "$NAME" --kind "$KIND" --device cuda "$@" 2>&1)
    RC=$?
    if [ "$RC" -ne 0 ] && echo "$OUT" | grep -q -E 'no NVIDIA driver|no usable GPU'; then
      [ "$GPU" = yes ] && fail "$KIND $NAME: the GPU went away: $(echo "$OUT" | tail -n 1)"
      GPU=no
      WHY=$(echo "$OUT" | grep -m 1 -E 'no NVIDIA driver|no usable GPU' | sed 's/^error: //' | cut -c1-120)
    else
      GPU=yes
    fi
  fi
  if [ "$GPU" = no ]; then
    OUT=$("$PITH" plugins check "$NAME" --kind "$KIND" "$@" 2>&1)
    RC=$?
  fi
  [ "$RC" -eq 0 ] || fail "$KIND $NAME: $(echo "$OUT" | tail -n 1)"
  if [ "$GPU" = yes ]; then
    CU=$(echo "$OUT" | grep -c ' on cuda: ')
    [ "$CU" -gt 0 ] || fail "$KIND $NAME: --device cuda printed no CUDA parity line"
    echo "  $(echo "$OUT" | tail -n 1) (+ $CU CUDA-vs-CPU parity checks)"
  else
    echo "  $(echo "$OUT" | tail -n 1)"
  fi
  N=$((N + 1))
done < "$TMP/list"
[ "$N" -gt 0 ] || fail "no components listed"
command -v cargo > /dev/null 2>&1 || fail "cargo is not on PATH: the model:: and layers:: tests (step 3) need it; the $N component checks above passed"
why() { grep -E 'panicked|FAILED|error' "$1" | head -n 3 | grep . || tail -n 2 "$1"; }
(cd "$ROOT" && cargo test -q -p pith --lib -- model:: layers:: > "$TMP/tests" 2>&1) \
  || fail "cargo test -p pith --lib model:: layers:: failed: $(why "$TMP/tests")"
grep -q 'test result: ok' "$TMP/tests" || fail "the model tests did not run"
if [ "$GPU" = yes ]; then
  # Every host kernel, cuBLAS, every std component's CUDA path, one whole step and the quickstart
  # on CUDA against the CPU (release: the CPU reference runs 300 quickstart steps).
  (cd "$ROOT" && cargo test -q --release -p pith --lib -- gpu:: check_cuda:: train::tests::cuda_step_matches_cpu \
    train::tests::quickstart_on_cuda_tracks_cpu > "$TMP/gpu" 2>&1) \
    || fail "GPU tests failed: $(why "$TMP/gpu")"
  pass "$N components pass their gradient/determinism checks and CUDA parity (--device cuda); model::, layers:: and the GPU tests pass"
fi
echo "  CUDA parity: skipped (no GPU: $WHY)"
pass "$N components pass their gradient/determinism checks; model:: and layers:: tests pass (CUDA parity: skipped, no GPU)"
