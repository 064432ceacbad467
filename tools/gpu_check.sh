#!/usr/bin/env bash
# What a GPU issue needs checked on the GPU machine, in as few device calls as fit its 600 s limit.
# Run from the repository root on the device (carry .whl: msgspec, pyzmq, uvloop, psutil, prometheus-client):
#   tools/gpu_check.sh tests families     # pytest -m gpu, then `vitserve bench` of the newer families
#   tools/gpu_check.sh served overhead    # issue 14's served bench and what the engine adds to one request
#   tools/gpu_check.sh soak               # the 8-minute soak with faults (a device call of its own)
#   tools/gpu_check.sh scaling            # one GPU against all (or two workers on one)
#   tools/gpu_check.sh stalls             # bursts against vitserve serve: slow worker steps, gc pauses (burst_stalls.py)
# Logs and bench outputs go under $OUT (the device tool's folder that comes back); a summary is printed last.
set -u
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target .site .whl/*.whl 2>/dev/null
export PYTHONPATH=$PWD/.site:$PWD PYTHONUNBUFFERED=1
summary=()

step() {  # name, seconds allowed, command...
    local name=$1 limit=$2
    shift 2
    local began=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    summary+=("$(printf '%-28s rc=%-3s %4ds  %s' "$name" "$rc" $((SECONDS - began)) "$(tail -n 1 "$OUT/$name.log")")")
}

for what in "$@"; do
    case $what in
        tests) step gpu-tests 450 python3 -m pytest -p no:cacheprovider -q -m gpu tests ;;
        families)
            for model in qwen3.5-9b glm-4.6v kimi-k2.5; do
                step "bench-$model" 150 python3 -m vitserve.cli bench --model "random:$model" \
                    --workloads single-448,arena-mix,many-336,video-448 --methods hf-eager,vitserve-eager,vitserve-graphs \
                    --out "$OUT/bench-$model"
            done ;;
        served) step served 330 python3 -m vitserve.cli bench --served --concurrency 32 \
                    --workloads single-448,arena-mix,many-336,video-448 --out "$OUT/served" ;;
        overhead) step overhead 120 python3 -m vitserve.cli bench --overhead --image-side 448 --devices cuda:0 \
                    --out "$OUT/overhead" ;;
        soak) step soak 580 python3 -m vitserve.cli soak --devices cuda:0 --duration 480 ;;  # (a call of its own)
        scaling)  # every GPU of the machine; with only one, two workers on it (the multi-worker paths)
            devices=$(python3 -c "import torch; n = torch.cuda.device_count(); \
print(','.join(f'cuda:{i}' for i in range(n)) if n > 1 else 'cuda:0,cuda:0')")
            # the log's name without ':' or ',' (the device tool does not bring such names back)
            step "scaling-${devices//[:,]/-}" 300 python3 -m vitserve.cli bench --scaling --devices "$devices" \
                --workloads arena-mix,many-336 --out "$OUT/scaling" ;;
        stalls)  # the worker's slow steps and gc pauses go to the log with the bursts' lines
            step stalls 240 python3 tools/burst_stalls.py --model random:qwen3-vl-8b --device cuda:0 --bursts 30
            grep -E "took|gc of|gaps over 50 ms: \[" "$OUT/stalls.log" | tail -n 20 ;;
        *) echo "unknown step $what (tests, families, served, overhead, soak, scaling, stalls)"; exit 2 ;;
    esac
done
for line in "${summary[@]}"; do echo "$line"; done
for table in "$OUT"/*/*.txt; do
    if [ -f "$table" ]; then echo "== $table"; cat "$table"; fi
done
