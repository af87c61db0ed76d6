"""Compression profiles: schema, loading and validation (no vLLM imports here)."""

from vllm_kvplug.profiles.capabilities import check_implemented
from vllm_kvplug.profiles.loader import (
    ProfileError,
    ResolvedProfile,
    builtin_profile_names,
    load_profile,
)
from vllm_kvplug.profiles.schema import Profile

__all__ = [
    "Profile",
    "ProfileError",
    "ResolvedProfile",
    "builtin_profile_names",
    "check_implemented",
    "load_profile",
]
