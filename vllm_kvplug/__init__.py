"""vllm-kvplug: KV-cache compression for vLLM, loaded through vLLM's plugin entry points.

`register()` is the `vllm.general_plugins` entry point; vLLM calls it once in every
process (API server, engine core, workers). Everything that touches vLLM internals lives
in `vllm_kvplug.vllm_glue`.
"""

__version__ = "0.1.0"

SUPPORTED_VLLM_VERSION = "0.26.0"


def register() -> None:
    """vLLM general-plugin entry point (idempotent)."""
    from vllm_kvplug.vllm_glue import install

    install()
