"""Profile schema, loading and the error messages a deployment sees."""

import textwrap

import pytest

from vllm_kvplug.profiles import (
    ProfileError,
    ResolvedProfile,
    builtin_profile_names,
    check_implemented,
    load_profile,
)


def write(tmp_path, text, name="p.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_builtin_none_is_passthrough():
    assert "none" in builtin_profile_names()
    resolved = load_profile("none")
    assert resolved.source == "builtin:none"
    assert resolved.profile.is_passthrough
    check_implemented(resolved)  # must not raise


def test_every_builtin_profile_loads():
    for name in builtin_profile_names():
        assert load_profile(name).profile.name == name


def test_file_profile_with_all_sections(tmp_path):
    path = write(tmp_path, """
        name: rag-int4
        description: example
        quantization: {method: int4, group_size: 64, rotation: hadamard, hadamard_block: 32}
        eviction: {policy: snapkv, budget_fraction: 0.25, budget_tokens: 2048}
        chunk_reuse: {enabled: true, recompute_ratio: 0.15}
        controller: {enabled: true, allowed_profiles: [none, rag-int4]}
    """)
    resolved = load_profile(str(path))
    p = resolved.profile
    assert resolved.source == str(path.resolve())
    assert (p.quantization.method, p.quantization.group_size) == ("int4", 64)
    assert p.eviction.budget_fraction == 0.25
    assert not p.is_passthrough
    assert p.enabled_settings() == {
        "quantization.method": "int4",
        "eviction.policy": "snapkv",
        "chunk_reuse.enabled": True,
        "controller.enabled": True,
    }


def test_round_trip_through_additional_config(tmp_path):
    resolved = load_profile("none")
    again = ResolvedProfile.from_config(resolved.to_config())
    assert again == resolved


def test_unknown_key_names_file_field_and_allowed_fields(tmp_path):
    path = write(tmp_path, """
        name: typo
        eviction: {policy: snapkv, budget_fracton: 0.2}
    """)
    with pytest.raises(ProfileError) as info:
        load_profile(str(path))
    msg = str(info.value)
    assert str(path.resolve()) in msg
    assert "eviction.budget_fracton: unknown field" in msg
    assert "budget_fraction" in msg and "window_tokens" in msg


def test_wrong_choice_lists_allowed_values(tmp_path):
    path = write(tmp_path, "name: bad\nquantization: {method: int3}\n")
    with pytest.raises(ProfileError) as info:
        load_profile(str(path))
    msg = str(info.value)
    assert "quantization.method" in msg and "'int3'" in msg
    assert "'none', 'int4', 'int2'" in msg


def test_wrong_type_is_rejected_not_coerced(tmp_path):
    path = write(tmp_path, "name: bad\nchunk_reuse: {enabled: 'yes'}\n")
    with pytest.raises(ProfileError, match=r"chunk_reuse\.enabled"):
        load_profile(str(path))


def test_impossible_value_shows_bounds(tmp_path):
    path = write(tmp_path, "name: bad\neviction: {policy: snapkv, budget_fraction: 1.5}\n")
    with pytest.raises(ProfileError) as info:
        load_profile(str(path))
    assert "eviction.budget_fraction" in str(info.value)
    assert "> 0.0 and <= 1.0" in str(info.value)


def test_integer_budget_fraction_accepted(tmp_path):
    path = write(tmp_path, "name: full\neviction: {policy: snapkv, budget_fraction: 1}\n")
    assert load_profile(str(path)).profile.eviction.budget_fraction == 1


def test_eviction_policy_without_budget(tmp_path):
    path = write(tmp_path, "name: bad\neviction: {policy: adakv}\n")
    with pytest.raises(ProfileError, match="needs a budget"):
        load_profile(str(path))


def test_missing_name_and_bad_name(tmp_path):
    with pytest.raises(ProfileError, match="name: Field required"):
        load_profile(str(write(tmp_path, "description: x\n")))
    with pytest.raises(ProfileError, match="name: .*matching"):
        load_profile(str(write(tmp_path, "name: Has Spaces\n")))


def test_not_a_mapping_and_bad_yaml(tmp_path):
    with pytest.raises(ProfileError, match="expected a mapping"):
        load_profile(str(write(tmp_path, "- a\n- b\n")))
    with pytest.raises(ProfileError, match="not valid YAML"):
        load_profile(str(write(tmp_path, "name: [unclosed\n")))


def test_unknown_name_lists_builtins():
    with pytest.raises(ProfileError, match=r"unknown kv-compression profile 'nope'.*none"):
        load_profile("nope")


def test_missing_file():
    with pytest.raises(ProfileError, match="file not found"):
        load_profile("/nonexistent/profile.yaml")


def test_controller_candidates_must_load(tmp_path):
    path = write(tmp_path, "name: ctl\ncontroller: {enabled: true, allowed_profiles: [none, ghost]}\n")
    with pytest.raises(ProfileError, match="allowed_profiles names 'ghost'"):
        load_profile(str(path))
    path = write(tmp_path, "name: ctl\ncontroller: {enabled: true}\n", "c2.yaml")
    with pytest.raises(ProfileError, match="non-empty allowed_profiles"):
        load_profile(str(path))


def test_valid_but_unimplemented_feature_is_refused(tmp_path):
    resolved = load_profile(str(write(
        tmp_path, "name: q\nquantization: {method: int4, recent_tokens: 128}\n")))
    with pytest.raises(ProfileError) as info:
        check_implemented(resolved)
    assert "quantization.recent_tokens=128" in str(info.value)
    assert "does not implement yet" in str(info.value)
    resolved = load_profile(str(write(tmp_path, "name: c\nchunk_reuse: {enabled: true}\n",
                                      "c.yaml")))
    with pytest.raises(ProfileError, match="chunk_reuse.enabled=True"):
        check_implemented(resolved)


def test_eviction_policies_pass_the_release_check(tmp_path):
    # served (CPU, with quantization); the other combinations are refused when the
    # engine config is built (tests/test_eviction_glue.py)
    for policy in ("snapkv", "adakv", "pyramidkv", "streamingllm"):
        resolved = load_profile(str(write(tmp_path, f"name: e\nquantization: {{method: int4}}"
                                                    f"\neviction: {{policy: {policy}, "
                                                    "budget_fraction: 0.25}\n", "e.yaml")))
        check_implemented(resolved)


def test_quantization_profiles_are_implemented():
    for name in ("int4-hadamard", "k8v4-hadamard", "int2-hadamard"):
        resolved = load_profile(name)
        check_implemented(resolved)
        assert resolved.profile.quantization.method != "none"
    assert load_profile("k8v4-hadamard").profile.quantization.key_bits == 8


def test_builtin_name_wins_over_same_named_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "none").write_text("name: [broken\n")
    assert load_profile("none").source == "builtin:none"
    write(tmp_path, "name: mine\n", "mine.yaml")
    assert load_profile("mine.yaml").source == str(tmp_path / "mine.yaml")
