#!/usr/bin/env bash
# The GPU checks of one lent session, in priority order, each under its own time limit; results go to $OUT
# (default ./gpu-out). Needs a CUDA machine whose python3 has torch; the other packages travel as wheels in
# .whl/ (see BENCHMARKS.md, "GPU runs"). Usage: bash benchmarks/gpu_check.sh [quick]
set -u
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
    rm -rf /tmp/site  # a warm machine keeps the last install, which --upgrade does not clear
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
log() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$OUT/steps.txt"; }
step() {  # step NAME SECONDS CMD...: run CMD under a limit, keep its output, record its status (SKIP="a b" skips)
    local name=$1 limit=$2; shift 2
    case " ${SKIP:-} " in *" $name "*) return ;; esac
    log "start $name (limit ${limit}s)"
    timeout -k 5 "$limit" "$@" >"$OUT/$name.txt" 2>&1
    local rc=$?
    grep -E '^\{' "$OUT/$name.txt" | sed "s/^/$name /" >>"$OUT/results.jsonl"
    tail -n 4 "$OUT/$name.txt"
    log "end $name rc=$rc"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
python3 -c "import sys, torch, diffusers, open_clip, webdataset, pydantic; print(sys.version.split()[0], torch.__version__,
torch.version.cuda, torch.cuda.get_device_name(0), diffusers.__version__, open_clip.__version__)" | tee -a "$OUT/gpu.txt"

step ldm_step 170 python3 benchmarks/train_ldm_throughput.py --gpu --batch-sizes 32 64 128 160 --steps 12
step pytest_gpu 180 python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu tests/pipeline/test_latents.py
[ "${1:-}" = quick ] && exit 0
step curate 120 python3 benchmarks/curate_throughput.py --model ViT-B-32 --device cuda --n 6144 --batch-size 256 \
    --workers 12 --image-size 256
step sample 150 python3 benchmarks/sample_throughput.py --gpu --images 192 --batch-size 64 --variants fp32 bf16 fp16
step clip 150 python3 benchmarks/train_clip_throughput.py --model ViT-B-32 --batch-size 256 --workers 12 \
    --steps 40 --samples 12000 --log-every 10
step encode 150 python3 benchmarks/encode_throughput.py --gpu --images 2048 --workers 12
step ldm_loop 150 python3 benchmarks/train_ldm_throughput.py --config small --device cuda --latent-side 32 \
    --text-shape 77 768 --batch-size 128 --workers 8 --samples 6000 --steps 40 --log-every 10 --threads 0
step ldm_loop_sd15 230 python3 benchmarks/train_ldm_throughput.py --config sd15 --device cuda --latent-side 32 \
    --text-shape 77 768 --batch-size 128 --workers 8 --samples 6000 --steps 50 --log-every 10 --threads 0
step ldm_eager 90 python3 benchmarks/train_ldm_throughput.py --gpu --batch-sizes 128 --steps 15
# compiling the SD-1.x U-Net had not finished after 180 s on an H200 (BENCHMARKS, third lease): give it 420
step ldm_compile 420 python3 benchmarks/train_ldm_throughput.py --gpu --batch-sizes 128 --steps 15 --compile
log done
