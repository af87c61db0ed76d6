"""Which profile settings this release can actually apply to a running engine.

The schema already describes every feature of the roadmap, so deployment files stay
stable as features land. A setting that validates but is not implemented yet must stop
startup with a clear message instead of serving uncompressed while claiming otherwise.
Each feature adds its values here when it lands.
"""

from __future__ import annotations

from vllm_kvplug.profiles.loader import ProfileError, ResolvedProfile

# dotted setting -> values this release implements
IMPLEMENTED: dict[str, set[object]] = {
    "quantization.method": {"none", "int4", "int2"},
    # mixed precision for sink / recent tokens: specified, not implemented yet
    "quantization.sink_tokens": {0},
    "quantization.recent_tokens": {0},
    # served on the CPU path of the quantized backend (vllm_glue/activation.py refuses
    # the other combinations at startup)
    "eviction.policy": {"none", "streamingllm", "snapkv", "pyramidkv", "adakv"},
    "chunk_reuse.enabled": {False},
    "controller.enabled": {False},
}


def check_implemented(resolved: ResolvedProfile) -> None:
    missing = [
        f"{key}={value!r} (this release supports: "
        f"{', '.join(repr(v) for v in sorted(IMPLEMENTED[key], key=repr))})"
        for key, value in resolved.profile.enabled_settings().items()
        if value not in IMPLEMENTED[key]
    ]
    if missing:
        raise ProfileError(
            f"kv-compression profile {resolved.source} is valid but asks for features this "
            "release of vllm-kvplug does not implement yet: " + "; ".join(missing)
        )
