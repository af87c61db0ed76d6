"""Real models available offline (for the demo, end-to-end tests and quality benchmarks)."""

from vllm_kvplug.models.smollm2 import ModelUnavailable, ensure_smollm2

__all__ = ["ModelUnavailable", "ensure_smollm2"]
