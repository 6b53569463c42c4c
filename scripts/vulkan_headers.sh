#!/usr/bin/env bash
# Newer Vulkan headers for `make setup GPU=vulkan` where the system's are too old for llama.cpp
# (Debian 12 ships 1.3.239; llama.cpp's Vulkan backend needs VK_EXT_layer_settings, 1.3.272+).
# Fetches Debian 13's libvulkan-dev (headers 1.4.309), checks it against a pinned sha256, and unpacks
# only its headers into build/vulkan-headers/include. Nothing is installed system-wide: the Vulkan
# loader stays the system's (the headers only describe the API; a 1.3 loader runs what llama.cpp calls).
#   scripts/vulkan_headers.sh && make setup GPU=vulkan VULKAN_INCLUDE=build/vulkan-headers/include
set -euo pipefail
cd "$(dirname "$0")/.."

DEB=libvulkan-dev_1.4.309.0-1_amd64.deb
URL=https://deb.debian.org/debian/pool/main/v/vulkan-loader/$DEB
SHA256=8d329d465e16168afff58b1bd0dd6db46aac2cc3f56054a481b25a04e90b345a
DEST=build/vulkan-headers

if grep -q VK_EXT_layer_settings "$DEST/include/vulkan/vulkan_core.h" 2>/dev/null; then
    echo "$DEST/include: already there"
    exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
curl -fsSL --retry 3 -o "$tmp/$DEB" "$URL"
echo "$SHA256  $tmp/$DEB" | sha256sum -c --quiet - \
    || { echo "vulkan_headers: $DEB does not match its pinned sha256; not unpacked" >&2; exit 1; }
dpkg-deb -x "$tmp/$DEB" "$tmp/root"
mkdir -p "$DEST"
rm -rf "$DEST/include"
cp -r "$tmp/root/usr/include" "$DEST/include"
echo "$DEST/include: Vulkan headers 1.4.$(sed -n 's/^#define VK_HEADER_VERSION \([0-9]*\)$/\1/p' \
    "$DEST/include/vulkan/vulkan_core.h") (from Debian's $DEB, sha256 checked)"
