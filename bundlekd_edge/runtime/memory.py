"""Process memory as Linux reports it: peak and current RSS, split into file-backed and anonymous.

A memory-mapped GGUF shows up as file-backed RSS (the OS can drop and re-read it); the KV cache
and compute buffers are anonymous. Both matter on a laptop, so we report them apart.
"""

from __future__ import annotations

import resource
import sys

_KEYS = {"VmHWM": "peak_rss", "VmRSS": "rss", "RssAnon": "rss_anon", "RssFile": "rss_file"}


def memory_snapshot() -> dict[str, int]:
    """Bytes: peak_rss, rss, rss_anon, rss_file (where the OS reports them)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in _KEYS:
                    out[_KEYS[key]] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    if "peak_rss" not in out:  # not Linux: getrusage reports KiB on Linux, bytes on macOS
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["peak_rss"] = peak if sys.platform == "darwin" else peak * 1024
    return out
