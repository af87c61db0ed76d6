"""The `--kv-compression` flag and the profile hook on vLLM's `EngineArgs`.

vLLM builds its CLI parser after loading general plugins, so wrapping
`EngineArgs.add_cli_args` adds our flag to `vllm serve` and to
`python -m vllm.entrypoints.openai.api_server`. The flag value travels as
`additional_config["kv_compression"]`, which is also the offline form:
`LLM(model, additional_config={"kv_compression": "none"})`. `create_engine_config`
resolves and validates it once, in the process that builds the config, and replaces it
with the validated profile so engine-core and worker processes never re-read files.
"""

from __future__ import annotations

import argparse
import functools
import logging
from typing import Any

from vllm_kvplug.profiles import (
    ProfileError,
    ResolvedProfile,
    builtin_profile_names,
    check_implemented,
    load_profile,
)

logger = logging.getLogger("vllm.kvplug")

FLAG = "--kv-compression"
CONFIG_KEY = "kv_compression"


def patch_engine_args() -> None:
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs, "_kvplug_patched", False):
        return
    original_add_cli_args = EngineArgs.add_cli_args
    original_from_cli_args = EngineArgs.from_cli_args.__func__
    original_create_engine_config = EngineArgs.create_engine_config

    @functools.wraps(original_add_cli_args)
    def add_cli_args(parser, *args, **kwargs):
        parser = original_add_cli_args(parser, *args, **kwargs)
        add_flag(parser)
        return parser

    @functools.wraps(original_from_cli_args)
    def from_cli_args(cls, args: argparse.Namespace):
        engine_args = original_from_cli_args(cls, args)
        resolved = getattr(args, "kv_compression", None)
        if resolved is not None:
            engine_args.additional_config = with_profile(engine_args.additional_config, resolved)
        return engine_args

    @functools.wraps(original_create_engine_config)
    def create_engine_config(self, *args, **kwargs):
        resolved = resolve_from_additional_config(self.additional_config)
        if resolved is None:
            return original_create_engine_config(self, *args, **kwargs)
        check_implemented(resolved)
        self.additional_config = {**self.additional_config, CONFIG_KEY: resolved.to_config()}
        from vllm_kvplug.vllm_glue.activation import activate, check_eviction, \
            check_model, select_backend

        check_eviction(self, resolved)
        if resolved.profile.eviction.policy != "none":
            from vllm_kvplug.vllm_glue.eviction_request import add_validator

            add_validator(self)  # vllm_xargs.kvplug_eviction: bad values are a 400
        select_backend(self, resolved)
        vllm_config = original_create_engine_config(self, *args, **kwargs)
        check_model(vllm_config, resolved)

        activate(vllm_config, resolved)
        return vllm_config

    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.from_cli_args = classmethod(from_cli_args)
    EngineArgs.create_engine_config = create_engine_config
    EngineArgs._kvplug_patched = True


def add_flag(parser) -> None:
    if FLAG in getattr(parser, "_option_string_actions", {}):
        return
    group = parser.add_argument_group(
        "vllm-kvplug", "KV-cache compression (vllm-kvplug plugin)"
    )
    group.add_argument(
        FLAG,
        dest="kv_compression",
        type=_profile_argument,
        default=None,
        metavar="PROFILE",
        help=(
            "KV-cache compression profile: a built-in name "
            f"({', '.join(builtin_profile_names())}) or a path to a profile YAML file. "
            "Unset: the plugin does nothing."
        ),
    )


def _profile_argument(value: str) -> ResolvedProfile:
    """argparse `type=`: a bad profile becomes a usage error naming file and field."""
    try:
        resolved = load_profile(value)
        check_implemented(resolved)
    except ProfileError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return resolved


def with_profile(additional_config: dict[str, Any] | None, resolved: ResolvedProfile) -> dict:
    config = dict(additional_config or {})
    if CONFIG_KEY in config:
        raise ProfileError(
            f"the profile is given twice: {FLAG} and additional_config['{CONFIG_KEY}']; "
            "use one of them"
        )
    config[CONFIG_KEY] = resolved.to_config()
    return config


def resolve_from_additional_config(additional_config: Any) -> ResolvedProfile | None:
    """Accept a profile name/path, a resolved entry, or nothing."""
    if not isinstance(additional_config, dict) or CONFIG_KEY not in additional_config:
        return None
    value = additional_config[CONFIG_KEY]
    if isinstance(value, ResolvedProfile):
        return value
    if isinstance(value, str):
        return load_profile(value)
    if isinstance(value, dict):
        return ResolvedProfile.from_config(value)
    raise ProfileError(
        f"additional_config['{CONFIG_KEY}'] must be a profile name or YAML path, got "
        f"{type(value).__name__}"
    )
