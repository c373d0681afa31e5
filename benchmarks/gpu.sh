#!/usr/bin/env bash
# Issue 16 item 6 in one command on a lent GPU (the device tool's `run`, 10 minutes a command, ~15 minutes of
# device time a session): SD 1.5 512 px LoRA (adapt / reference / bare, fp32 and bf16), the four DreamBooth
# presets (fp16, peak allocated GPU memory) and an SDXL 1024 px LoRA step. Not yet run on a GPU: no session
# has been lent one so far.
#
# The device machine's image has torch, transformers, accelerate, peft, safetensors and typer, but not diffusers
# or bitsandbytes, and the device tool carries at most 64 MiB of working tree, which the bundled base's weights
# (77 MB, not needed here: these benchmarks build the SD 1.5 / SDXL architectures with random weights) exceed.
# So, here, before the call:
#   bash benchmarks/gpu.sh --prepare     # wheels into .whl/ (git-ignored locally), base weights moved aside
# then the device tool's run with command "bash benchmarks/gpu.sh", carry [".whl"], timeout_s 600; then here:
#   bash benchmarks/gpu.sh --restore     # the base weights back
set -uo pipefail
cd "$(dirname "$0")/.."
ASIDE=/tmp/adapt-base-weights
WEIGHTS=$(git ls-files "adapt/base/*.safetensors")  # tracked, so listed while moved aside too

if [ "${1:-}" = "--prepare" ]; then
    grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 bitsandbytes==0.50.2 importlib_metadata || exit 1
    for f in $WEIGHTS; do mkdir -p "$ASIDE/$(dirname "$f")" && mv "$f" "$ASIDE/$f"; done
    echo "what travels: $(du -cb $(git ls-files) .whl/* 2>/dev/null | tail -1 | cut -f1) bytes (limit 67108864)"
    exit 0
fi
if [ "${1:-}" = "--restore" ]; then
    for f in $WEIGHTS; do mv "$ASIDE/$f" "$f"; done
    git status --short adapt/base
    exit 0
fi
if [ -n "${1:-}" ]; then
    echo "gpu.sh: unknown argument '$1'; use --prepare or --restore here, no argument on the GPU machine" >&2
    exit 2
fi

OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"
timeout 260 python3 benchmarks/compare.py --methods lora --resolutions 512 --precisions fp32,bf16 --steps 10 --warmup 3 \
    --repeats 1 --threads 8 2>&1 | tee "$OUT/compare.txt"
timeout 200 python3 benchmarks/dreambooth_memory.py --threads 8 2>&1 | tee "$OUT/presets.txt"
timeout 120 python3 benchmarks/sdxl_lora_step.py --resolution 1024 --steps 10 --threads 8 2>&1 | tee "$OUT/sdxl.txt"
