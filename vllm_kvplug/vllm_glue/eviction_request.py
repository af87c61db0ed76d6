"""Per-request opt-out of eviction: `"vllm_xargs": {"kvplug_eviction": "off"}`.

A request to an engine running an eviction profile may send `kvplug_eviction` in
`vllm_xargs` (vLLM copies it to `SamplingParams.extra_args`): `"off"` serves its prompt
without eviction (like the plain quantized profile: no compaction, its blocks are hashed
and may be prefix-cached like any request's), `"on"` (the default) evicts as the profile
says. Both sides decide from the request's own sampling params with `evicts`:

- the scheduler-side manager (`kv_manager.py`) reads `Request.sampling_params`;
- the worker (`eviction_rows.py`) reads the model runner's `CachedRequestState`
  (`self.requests[req_id].sampling_params`, set from the new request's data and kept
  until the request finishes, so a request preempted and resumed keeps its choice).

Validation, so that a bad value is an HTTP 400 and not a crash or a silent default: vLLM
0.26 calls `LogitsProcessor.validate_params(sampling_params)` of every custom logits
processor in `model_config.logits_processors` from `SamplingParams.verify`, in the
front-end's `InputProcessor` before the request reaches the engine; the `ValueError`
(here vLLM's `VLLMValidationError`, naming the parameter) becomes a 400 in the OpenAI
server and an exception from `LLM.generate`/`add_request` offline. `EvictionRequestOptions`
is that hook and nothing else (an argmax-invariant processor whose `apply` returns the
logits unchanged); `add_validator` appends it to `--logits-processors` when the
`--kv-compression` profile evicts, so users pass no extra flag. Without an eviction profile
the field is not read (nothing to opt out of) and not validated.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.sample.logits_processor import LogitsProcessor

FIELD = "kvplug_eviction"
PREFIX = "kvplug_evict"  # any other key with this prefix is a typo of FIELD: refused
VALUES = ("on", "off")
VALIDATOR = "vllm_kvplug.vllm_glue.eviction_request:EvictionRequestOptions"


def evicts(sampling_params: Any) -> bool:
    """Whether this request's prompt may be evicted (False iff it sent "off").

    Never raises (it runs in the engine core and the workers): values were checked by
    `check_extra_args` in the front end; scheduler and workers call this same function,
    so they agree on every request."""
    extra = getattr(sampling_params, "extra_args", None)
    return not (isinstance(extra, dict) and extra.get(FIELD) == "off")


def check_extra_args(extra_args: dict[str, Any] | None) -> None:
    """Raise vLLM's `VLLMValidationError` (a 400) for a bad value or a misspelled key."""
    if not extra_args:
        return
    from vllm.exceptions import VLLMValidationError

    for key, value in extra_args.items():
        if not isinstance(key, str) or not key.startswith(PREFIX):
            continue  # vLLM's own keys and other kvplug features' fields are not ours
        if key != FIELD:
            raise VLLMValidationError(
                f"vllm_xargs.{key}: unknown field; the per-request eviction switch is "
                f"vllm_xargs.{FIELD} (\"on\" or \"off\")", parameter=f"vllm_xargs.{key}",
                value=value)
        if not isinstance(value, str) or value not in VALUES:
            raise VLLMValidationError(
                f"vllm_xargs.{FIELD}: must be \"on\" or \"off\", got {value!r}",
                parameter=f"vllm_xargs.{FIELD}", value=value)


def add_validator(engine_args) -> None:
    """Append the validator to `EngineArgs.logits_processors` (idempotent, keeps the
    user's own processors)."""
    procs = list(engine_args.logits_processors or [])
    if VALIDATOR not in procs and EvictionRequestOptions not in procs:
        procs.append(VALIDATOR)
    engine_args.logits_processors = procs


class EvictionRequestOptions(LogitsProcessor):
    """Checks `vllm_xargs.kvplug_eviction` at request validation; a no-op otherwise."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        check_extra_args(getattr(sampling_params, "extra_args", None))

    def __init__(self, vllm_config, device, is_pin_memory) -> None:
        pass

    def apply(self, logits):
        return logits

    def is_argmax_invariant(self) -> bool:
        return True  # applied to random sampling only, and changes nothing

    def update_state(self, batch_update) -> None:
        pass
