#!/usr/bin/env bash
# The two-GPU checks of docs/distributed.md, on the GPU machine (device tool, kind
# nvidia-h200-x2, carry [".device"] after `scripts/gpu-tests.sh pack`):
#   bash scripts/gpu-dist.sh parity   50 steps of the quickstart on CUDA: 1 GPU, then dp=2
#   bash scripts/gpu-dist.sh bench    bench-1b on 1 GPU, then dp=2 under torchrun (same work per GPU)
#   bash scripts/gpu-dist.sh faults   a rank killed with -9: how long the other takes to exit, under
#                                     `pith launch` and as two bare ranks (srun-style: no launcher ends it)
#   bash scripts/gpu-dist.sh nodes    two one-GPU "nodes" (torchrun --nnodes 2), NCCL over its network transport
#   bash scripts/gpu-dist.sh ep       expert parallel: 50 steps of the quickstart (comm alltoall) on 1 GPU and
#                                     at ep=2, its per-rank checkpoint resumed on 1 GPU and exported,
#                                     then bench-1b at ep=2 beside 1 GPU (same work per GPU)
#   bash scripts/gpu-dist.sh zero     [parallel] shard_optimizer: quickstart parity at dp=2, bench-1b at dp=2 (peak memory)
# Results go to $OUT (or /tmp/dist).
set -uo pipefail
cd "$(dirname "$0")/.."
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/lib/x86_64-linux-gnu PITH_PLUGIN_PATH=
export NCCL_NVLS_ENABLE=0
P=$PWD/.device/pith O=${OUT:-/tmp/dist}
mkdir -p "$O"
small=(--set 'train.device="cuda"' --set train.steps=50 --set train.log_every=10 --set train.eval_every=0)
torchrun() { python3 -m torch.distributed.run "$@"; }
# The loss curves of two runs under $O, every 5th step, and their largest difference.
compare() {
  python3 - "$O" "$1" "$2" <<'EOF'
import json, sys
o, x, y = sys.argv[1:]
a, b = ([json.loads(l) for l in open(f"{o}/{d}/metrics.jsonl")] for d in (x, y))
d = [abs(p["loss"] - q["loss"]) for p, q in zip(a, b)]
print(f"step loss_{x} loss_{y}"); [print(p["step"], f'{p["loss"]:.5f}', f'{q["loss"]:.5f}') for p, q in zip(a, b) if p["step"] % 5 == 0]
print(f"max |loss_{x} - loss_{y}| over {len(d)} steps: {max(d):.2e}; at the last step: {d[-1]:.2e}")
EOF
}
case "${1:-}" in
parity)
  $P train "${small[@]}" --set "train.out=\"$O/g1\"" 2>&1 | tail -3
  $P launch --gpus 2 "${small[@]}" --set "train.out=\"$O/g2\"" 2>&1 | tail -3
  compare g1 g2 ;;
bench)
  $P bench configs/bench-1b.toml --warmup 4 --steps 15 2>&1 | tail -3
  torchrun --nproc-per-node 2 --no-python $P bench configs/bench-1b.toml --set train.micro_batch=8 --warmup 4 --steps 15 2>&1 | grep -v "bench: step" | tail -8 ;;
faults)
  $P launch --gpus 2 "${small[@]}" --set train.steps=100000 --set "train.out=\"$O/kill\"" > "$O/kill.log" 2>&1 &
  sleep 25
  victim=$(pgrep -f "pith train" | sort -n | tail -1)
  t0=$(date +%s%N); kill -9 "$victim"; wait $!; rc=$?
  echo "killed rank pid $victim; launch exited $rc after $(( ($(date +%s%N) - t0) / 1000000 )) ms"; tail -4 "$O/kill.log"
  # srun-style: two bare ranks, nothing above them; rank 0 must see rank 1 go (peers.rs).
  port=$((29500 + RANDOM % 1000))
  for r in 0 1; do
    RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
      $P train "${small[@]}" --set train.steps=100000 --set "train.out=\"$O/bare\"" > "$O/bare$r.log" 2>&1 &
    pids[$r]=$!
  done
  sleep 25
  t0=$(date +%s%N); kill -9 "${pids[1]}"; wait "${pids[0]}"; rc=$?
  echo "bare rank 1 killed; rank 0 exited $rc after $(( ($(date +%s%N) - t0) / 1000000 )) ms"; tail -2 "$O/bare0.log" ;;
nodes)
  export NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1
  port=$((29500 + RANDOM % 1000))
  for n in 0 1; do
    CUDA_VISIBLE_DEVICES=$n torchrun --nnodes 2 --node-rank $n --nproc-per-node 1 --master-addr 127.0.0.1 \
      --master-port $port --no-python $P train "${small[@]}" --set "train.out=\"$O/nodes\"" > "$O/node$n.log" 2>&1 &
  done
  wait
  tail -3 "$O/node0.log"
  python3 -c "import json; a=[json.loads(l) for l in open('$O/g1/metrics.jsonl')]; b=[json.loads(l) for l in open('$O/nodes/metrics.jsonl')]; print('max |loss_1gpu - loss_2nodes|:', max(abs(x['loss']-y['loss']) for x,y in zip(a,b)))" ;;
ep)
  a2a=(--set 'comm.plugin="alltoall"')
  $P train "${small[@]}" "${a2a[@]}" --set "train.out=\"$O/e1\"" 2>&1 | tail -2
  $P launch --gpus 2 "${small[@]}" "${a2a[@]}" --set parallel.ep=2 --set "train.out=\"$O/e2\"" 2>&1 | tail -2
  compare e1 e2
  $P train "${small[@]}" "${a2a[@]}" --set parallel.ep=1 --set train.steps=55 --set "train.out=\"$O/e2to1\"" --resume "$O/e2" 2>&1 | tail -1
  ls "$O/e2/checkpoints/step_00000050"; $P export hf "$O/e2" "$O/e2-hf" 2>&1 | tail -1
  $P bench configs/bench-1b.toml --warmup 4 --steps 15 2>&1 | tail -2
  torchrun --nproc-per-node 2 --no-python $P bench configs/bench-1b.toml "${a2a[@]}" --set parallel.ep=2 \
    --set train.micro_batch=8 --warmup 4 --steps 15 2>&1 | grep -v "bench: step" | tail -8 ;;
zero)
  z=(--set parallel.shard_optimizer=true)
  $P train "${small[@]}" --set "train.out=\"$O/z1\"" 2>&1 | tail -1
  $P launch --gpus 2 "${small[@]}" "${z[@]}" --set "train.out=\"$O/z2\"" 2>&1 | tail -1
  compare z1 z2
  torchrun --nproc-per-node 2 --no-python $P bench configs/bench-1b.toml "${z[@]}" --set train.micro_batch=8 \
    --warmup 4 --steps 15 2>&1 | grep -v "bench: step" | tail -4 ;;
*) echo "usage: scripts/gpu-dist.sh parity|bench|faults|nodes|ep|zero"; exit 2 ;;
esac
