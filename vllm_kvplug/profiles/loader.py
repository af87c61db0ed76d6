"""Finding, reading and validating compression profiles.

A profile reference is either the name of a built-in profile (a YAML file shipped in
`configs/`) or a path to a YAML file of the deployment's own. Every failure raises
`ProfileError` with the file, the field and what is allowed, so a bad deployment stops at
startup instead of serving with the wrong KV-cache treatment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from vllm_kvplug.profiles.schema import Profile

BUILTIN_PACKAGE = "vllm_kvplug.configs"


class ProfileError(ValueError):
    """A compression profile could not be found, parsed or validated."""


@dataclass(frozen=True)
class ResolvedProfile:
    """A validated profile plus where it came from (for logs, metrics and errors)."""

    profile: Profile
    source: str  # "builtin:<name>" or an absolute file path

    def to_config(self) -> dict[str, Any]:
        """Plain-data form carried to every vLLM process in `additional_config`."""
        return {"source": self.source, "profile": self.profile.model_dump(mode="json")}

    @classmethod
    def from_config(cls, data: dict[str, Any]) -> ResolvedProfile:
        try:
            source = data["source"]
            body = data["profile"]
        except (KeyError, TypeError) as e:
            raise ProfileError(
                "malformed kv_compression entry in additional_config: expected "
                "{'source': ..., 'profile': {...}}"
            ) from e
        return cls(profile=validate_profile(body, source), source=source)


def builtin_profile_names() -> list[str]:
    root = resources.files(BUILTIN_PACKAGE)
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def load_profile(ref: str) -> ResolvedProfile:
    """Resolve a profile name or YAML path into a validated profile."""
    if not isinstance(ref, str) or not ref.strip():
        raise ProfileError(
            f"empty kv-compression profile; use a built-in name ({_names_text()}) "
            "or a path to a YAML file"
        )
    ref = ref.strip()
    # Built-in names win; anything with a path separator or a YAML suffix is a file.
    looks_like_path = os.sep in ref or ref.endswith((".yaml", ".yml"))
    if not looks_like_path:
        if ref not in builtin_profile_names():
            raise ProfileError(
                f"unknown kv-compression profile '{ref}'; built-in profiles: "
                f"{_names_text()}; or give a path to a YAML file"
            )
        text = resources.files(BUILTIN_PACKAGE).joinpath(f"{ref}.yaml").read_text()
        source = f"builtin:{ref}"
    else:
        path = Path(ref).expanduser().resolve()
        if not path.is_file():
            raise ProfileError(f"kv-compression profile file not found: {path}")
        text = path.read_text()
        source = str(path)
    base_dir = None if source.startswith("builtin:") else Path(source).parent
    resolved = ResolvedProfile(profile=parse_profile_text(text, source, base_dir),
                               source=source)
    _check_controller_candidates(resolved)
    return resolved


def parse_profile_text(text: str, source: str, base_dir: Path | None = None) -> Profile:
    """Parse and validate a profile; relative file paths in it (quantization.key_offsets)
    are taken relative to `base_dir` (the profile file's folder) when given."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ProfileError(f"invalid kv-compression profile {source}: not valid YAML: {e}") from e
    if base_dir is not None:
        _resolve_relative_paths(data, base_dir)
    return validate_profile(data, source)


def _resolve_relative_paths(data: Any, base_dir: Path) -> None:
    section = data.get("quantization") if isinstance(data, dict) else None
    path = section.get("key_offsets") if isinstance(section, dict) else None
    if isinstance(path, str) and path and not Path(path).expanduser().is_absolute():
        section["key_offsets"] = str((base_dir / path).resolve())


def validate_profile(data: Any, source: str) -> Profile:
    if not isinstance(data, dict):
        raise ProfileError(
            f"invalid kv-compression profile {source}: expected a mapping with at least "
            f"'name', got {type(data).__name__}"
        )
    try:
        return Profile.model_validate(data)
    except ValidationError as e:
        lines = [_describe_error(err) for err in e.errors()]
        raise ProfileError(
            f"invalid kv-compression profile {source}:\n  " + "\n  ".join(lines)
        ) from None


def _check_controller_candidates(resolved: ResolvedProfile) -> None:
    """Every profile the controller may pick must itself load (no self-recursion)."""
    for name in resolved.profile.controller.allowed_profiles:
        if name == resolved.profile.name:
            continue
        try:
            load_profile(name)
        except ProfileError as e:
            raise ProfileError(
                f"invalid kv-compression profile {resolved.source}: "
                f"controller.allowed_profiles names '{name}', which does not load: {e}"
            ) from None


def _names_text() -> str:
    return ", ".join(builtin_profile_names())


def _describe_error(err: dict[str, Any]) -> str:
    loc = tuple(err["loc"])
    field = ".".join(str(p) for p in loc) or "<profile>"
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = ", ".join(_fields_at(loc[:-1]))
        return f"{field}: unknown field; allowed fields here: {allowed}"
    got = err.get("input")
    allowed = _allowed_values(loc)
    msg = f"{field}: {err['msg']}"
    if kind != "missing":
        msg += f" (got {got!r})"
    if allowed:
        msg += f"; allowed values: {allowed}"
    return msg


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = Profile
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _fields_at(loc: tuple) -> list[str]:
    model = _model_at(loc)
    return list(model.model_fields) if model else []


def _allowed_values(loc: tuple) -> str:
    """The Literal choices or numeric bounds of the field at `loc`, as text."""
    model = _model_at(loc[:-1])
    if model is None or str(loc[-1]) not in model.model_fields:
        return ""
    field = model.model_fields[str(loc[-1])]
    choices = [a for a in get_args(field.annotation) if not isinstance(a, type)]
    if choices:
        return ", ".join(repr(c) for c in choices)
    bounds = []
    for meta in field.metadata:
        for attr, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            if getattr(meta, attr, None) is not None:
                bounds.append(f"{sym} {getattr(meta, attr)}")
        if getattr(meta, "pattern", None):
            bounds.append(f"matching {meta.pattern}")
    return " and ".join(bounds)
