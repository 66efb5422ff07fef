#!/usr/bin/env bash
# The node checks of issue #17, on the GPU machine (device tool, kind nvidia-h200-x4 or -x8,
# carry [".device"] after `scripts/gpu-tests.sh pack`):
#   bash scripts/gpu-node.sh scaling   weak scaling of bench-1b's work per GPU, 1 → 2 → 4 → 8 GPUs (as
#                                      many as the machine has), data parallel and expert parallel
#                                      (ep = GPUs, `alltoall`), in one command with the 1-GPU number:
#                                      tokens/s per GPU, efficiency, rows per expert rank max/mean
#   bash scripts/gpu-node.sh node      configs/bench-node.toml (~10B) at ep=8, then ep=4 × dp=2, with
#                                      --profile: `nccl all_to_all` is the exposed all-to-all time
#   bash scripts/gpu-node.sh kill      a rank of an all-GPU run killed with -9: how long the others take
# Results go to $OUT (or /tmp/node).
set -uo pipefail
cd "$(dirname "$0")/.."
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/lib/x86_64-linux-gnu PITH_PLUGIN_PATH=
export NCCL_NVLS_ENABLE=0
P=$PWD/.device/pith O=${OUT:-/tmp/node}
G=$(nvidia-smi -L | wc -l)
mkdir -p "$O"
torchrun() { python3 -m torch.distributed.run "$@"; }
# bench-1b's 4 sequences per GPU on n GPUs (extra flags after n); the JSON line of rank 0 to $O/$name.json.
bench() {
  local name=$1 n=$2
  shift 2
  torchrun --nproc-per-node "$n" --no-python "$P" bench configs/bench-1b.toml --set "train.micro_batch=$((4 * n))" \
    --warmup 4 --steps 15 "$@" > "$O/$name.log" 2>&1
  grep -m1 '"tokens_per_s"' "$O/$name.log" > "$O/$name.json" || tail -5 "$O/$name.log"
}
case "${1:-}" in
scaling)
  "$P" bench configs/bench-1b.toml --warmup 4 --steps 15 2>&1 | grep -m1 '"tokens_per_s"' > "$O/g1.json"
  for n in 2 4 8; do
    [ "$n" -le "$G" ] || break
    bench "dp$n" "$n"
    bench "ep$n" "$n" --set 'comm.plugin="alltoall"' --set "parallel.ep=$n"
  done
  python3 - "$O" <<'EOF'
import glob, json, os, sys
o = sys.argv[1]
one = json.load(open(f"{o}/g1.json"))["tokens_per_s"]
print(f"{'run':<6} {'tokens/s per GPU':>17} {'efficiency':>10} {'peak GiB':>9} {'expert rows max/mean':>21}")
print(f"{'1 GPU':<6} {one:>17,.0f} {'100.0%':>10}")
for f in sorted(glob.glob(f"{o}/[de]p*.json"), key=lambda f: (os.path.basename(f)[:2], int(os.path.basename(f)[2:-5]))):
    j = json.load(open(f))
    imb = j.get("ep_load_max_over_mean", float("nan"))
    print(f"{os.path.basename(f)[:-5]:<6} {j['tokens_per_s']:>17,.0f} {100 * j['tokens_per_s'] / one:>9.1f}% "
          f"{j.get('peak_tensor_gib', float('nan')):>9.1f} {imb:>21.3f}")
EOF
  ;;
node)
  a2a=(--set 'comm.plugin="alltoall"')
  torchrun --nproc-per-node 8 --no-python "$P" bench configs/bench-node.toml --warmup 4 --steps 10 --profile \
    2>&1 | grep -v "bench: step" | head -40
  torchrun --nproc-per-node 8 --no-python "$P" bench configs/bench-node.toml "${a2a[@]}" --set parallel.ep=4 \
    --warmup 4 --steps 10 --profile 2>&1 | grep -v "bench: step" | head -40 ;;
kill)
  small=(--set 'train.device="cuda"' --set train.steps=100000 --set train.eval_every=0 --set 'comm.plugin="alltoall"')
  "$P" launch --gpus "$G" "${small[@]}" --set "parallel.ep=$G" --set "train.out=\"$O/kill\"" > "$O/kill.log" 2>&1 &
  sleep 30
  victim=$(pgrep -f "pith train" | sort -n | tail -1)
  t0=$(date +%s%N); kill -9 "$victim"; wait $!; rc=$?
  echo "killed rank pid $victim of $G; launch exited $rc after $(( ($(date +%s%N) - t0) / 1000000 )) ms"; tail -4 "$O/kill.log" ;;
*) echo "usage: scripts/gpu-node.sh scaling|node|kill"; exit 2 ;;
esac
