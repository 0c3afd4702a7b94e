#!/usr/bin/env bash
# Everything a GPU machine has to run for gclip, in one go: the CUDA tests, then the GPU benchmarks.
#
#   bash benchmarks/gpu.sh wheels   # here, with PyPI: open_clip_torch, ftfy, wcwidth wheels into .whl/
#   bash benchmarks/gpu.sh          # there: installs .whl/ offline, runs tests/test_cuda.py and the benchmarks
#
# On a machine without network that has torch and CUDA (e.g. the device tool's machines: carry `.whl`), the
# results go to $OUT (default ./gpu-out): test_cuda.log, one JSON per benchmark, and RESULTS-gpu.md, whose
# sections are then appended to benchmarks/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [[ "${1:-}" == "wheels" ]]; then
    mkdir -p .whl
    exec "$PY" -m pip download --no-deps -d .whl "open_clip_torch>=3.0" ftfy wcwidth
fi

OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
if ! "$PY" -c "import open_clip" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --find-links .whl open_clip_torch ftfy wcwidth || exit 1
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
"$PY" -c "import torch, open_clip; print('torch', torch.__version__, 'open_clip', open_clip.__version__)" \
    | tee -a "$OUT/gpu.txt"

"$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -n 40 > "$OUT/test_cuda.log"
tail -n 3 "$OUT/test_cuda.log"

# The issue-7 figures: ViT-B/16 (random weights, same cost), fp16, the ClearCLIP protocol, VOC-sized images.
# DEVICE, COUNT, REFERENCE and EXTRA (more bench arguments) override the run, e.g. for a dry run on a CPU:
#   DEVICE=cpu COUNT=2 REFERENCE=1 EXTRA="--model gclip-tiny-test --model-config tests/configs" bash benchmarks/gpu.sh
read -r -a EXTRA_ARGS <<< "${EXTRA:-}"
COMMON=(--model ViT-B-16 --random-weights --device "${DEVICE:-cuda}" --precision fp16 --synthetic 500x375
        --count "${COUNT:-512}" --batch-images 32 --batch-size 32 --reference-count "${REFERENCE:-64}"
        --results "$OUT/RESULTS-gpu.md" "${EXTRA_ARGS[@]}")
bench() {
    local name=$1
    shift
    "$PY" -m gclip bench "${COMMON[@]}" "$@" --json "$OUT/$name.json" 2>&1 | grep -v "^appended" | tail -n 8
}
bench clearclip-fp16 --method clearclip
bench gclip-fp16 --method gclip
bench clearclip-fp16-compile --method clearclip --compile
bench clearclip-bf16 --method clearclip --precision bf16
echo "done: $(ls "$OUT")"
