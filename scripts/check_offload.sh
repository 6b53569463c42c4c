#!/usr/bin/env bash
# The offload path run for real without a GPU: llama.cpp built for Vulkan, the shipped student with
# --gpu-layers all on Mesa's lavapipe (a Vulkan device that runs on the CPU), against the CPU build
# on the same sessions: the same partitions for >= 9 of 10, and the device llama.cpp reports is Vulkan.
#   scripts/check_offload.sh [SESSIONS.jsonl] [N]        (default: the built-in sample, 10 sessions)
# Needs (Debian/Ubuntu): apt-get install libvulkan-dev spirv-headers glslc mesa-vulkan-drivers vulkan-tools
# (where the Vulkan headers are older than llama.cpp needs, as on Debian 12, scripts/vulkan_headers.sh
# fetches newer ones for the build).
# The Vulkan build goes into its own venv, build/venv-vulkan (`make setup GPU=vulkan` would replace
# .venv's CPU build), with the wheel cached as scripts/setup.sh caches it: the first run compiles
# llama.cpp's shaders and takes long on 2 cores (see README.md, "GPU"); later runs take a minute.
set -euo pipefail
cd "$(dirname "$0")/.."

SESSIONS=${1:-bundlekd_edge/sample/sessions.jsonl}
N=${2:-10}
VK_VENV=build/venv-vulkan
OUT=${CHECK_OUT:-build/check-offload}
t0=$SECONDS

[ -x .venv/bin/bkd-edge ] || { echo "check_offload: run make setup first (the CPU side)" >&2; exit 1; }
if [ ! -x "$VK_VENV/bin/bkd-edge" ] || [ "$(cat "$VK_VENV/.gpu" 2>/dev/null)" != vulkan ]; then
    t=$SECONDS
    if [ -z "${VULKAN_INCLUDE:-}" ] && ! grep -q VK_EXT_layer_settings /usr/include/vulkan/vulkan_core.h 2>/dev/null; then
        bash scripts/vulkan_headers.sh  # the system's Vulkan headers are too old for llama.cpp (Debian 12)
        export VULKAN_INCLUDE=build/vulkan-headers/include
    fi
    VENV=$VK_VENV GPU=vulkan EXTRAS=dev bash scripts/setup.sh
    echo "set up $VK_VENV (llama.cpp for Vulkan) in $((SECONDS - t)) s"
fi
command -v vulkaninfo >/dev/null && vulkaninfo --summary 2>/dev/null | grep -E "deviceName|driverName" | sed 's/^/vulkan: /' || true

rm -rf "$OUT" && mkdir -p "$OUT"
run() {  # VENV NAME [options]: the shipped student on the sessions, one run
    local venv=$1 name=$2 t=$SECONDS
    shift 2
    "$venv/bin/bkd-edge" generate --model default --sessions "$SESSIONS" --limit "$N" --quiet \
        --out "$OUT/$name.jsonl" --summary "$OUT/$name.json" "$@"
    echo "$name: $((SECONDS - t)) s"
}
run .venv cpu
# llama.cpp passes over Vulkan devices of the CPU type (lavapipe is one) unless they are named
GGML_VK_VISIBLE_DEVICES=${GGML_VK_VISIBLE_DEVICES:-0} run "$VK_VENV" vulkan --gpu-layers all

.venv/bin/python - "$OUT" "$N" <<'EOF'
import json, sys
from pathlib import Path

out, n = Path(sys.argv[1]), int(sys.argv[2])
runs = {name: json.loads((out / f"{name}.json").read_text()) for name in ("cpu", "vulkan")}
bundles = {name: {json.loads(line)["session_id"]: json.loads(line)["bundles"] for line in
                  (out / f"{name}.jsonl").read_text().splitlines()} for name in runs}  # fmt: skip
def partition(bs):  # the item sets, without the intents (decoded text, which offloaded numerics may word differently)
    return sorted(sorted(b["items"]) for b in bs or [])
cpu, vk = bundles["cpu"], bundles["vulkan"]
same = sum(partition(cpu[sid]) == partition(vk.get(sid)) for sid in cpu)
same_intents = sum(cpu[sid] == vk.get(sid) for sid in cpu)
for name, r in runs.items():
    print(f"{name:7s} device {r['run']['device']!r}, gpu_layers {r['run']['gpu_layers']}, "
          f"p50 {r['latency_p50_s']:.2f} s, peak RSS {r['peak_rss'] / 2**20:.0f} MiB")
print(f"same partitions: {same}/{len(cpu)} (and the same intents too: {same_intents}/{len(cpu)})")
ok = same >= 0.9 * len(cpu) and "Vulkan" in runs["vulkan"]["run"]["device"]
print("check_offload:", "PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
EOF
echo "check_offload: $((SECONDS - t0)) s in all"
