"""The flag and the profile hook on vLLM's EngineArgs, without starting an engine."""

import argparse

import pytest

import vllm_kvplug
from vllm_kvplug.profiles import ProfileError, load_profile
from vllm_kvplug.vllm_glue import engine_args as glue


@pytest.fixture(scope="module")
def parser():
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    vllm_kvplug.register()
    return AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())


def test_register_is_idempotent():
    from vllm.engine.arg_utils import EngineArgs

    vllm_kvplug.register()
    wrapped = EngineArgs.create_engine_config
    vllm_kvplug.register()
    glue.patch_engine_args()
    assert EngineArgs.create_engine_config is wrapped


def test_plugin_is_found_through_vllm_entry_point():
    from vllm.plugins import DEFAULT_PLUGINS_GROUP, load_plugins_by_group

    plugins = load_plugins_by_group(DEFAULT_PLUGINS_GROUP)
    assert plugins["kvplug"] is vllm_kvplug.register


def test_flag_resolves_profile_into_additional_config(parser):
    from vllm.engine.arg_utils import AsyncEngineArgs

    args = parser.parse_args(["--model", "m", "--kv-compression", "none"])
    engine_args = AsyncEngineArgs.from_cli_args(args)
    entry = engine_args.additional_config["kv_compression"]
    assert entry["source"] == "builtin:none"
    assert entry["profile"]["name"] == "none"


def test_without_flag_nothing_changes(parser):
    from vllm.engine.arg_utils import AsyncEngineArgs

    args = parser.parse_args(["--model", "m"])
    assert args.kv_compression is None
    assert "kv_compression" not in AsyncEngineArgs.from_cli_args(args).additional_config
    assert glue.resolve_from_additional_config({}) is None


def test_bad_profile_is_a_usage_error(parser, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nquantization: {method: int3}\n")
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--model", "m", "--kv-compression", str(bad)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --kv-compression" in err
    assert str(bad) in err and "quantization.method" in err


def test_profile_given_twice_is_refused():
    with pytest.raises(ProfileError, match="given twice"):
        glue.with_profile({"kv_compression": "none"}, load_profile("none"))


def test_additional_config_forms():
    by_name = glue.resolve_from_additional_config({"kv_compression": "none"})
    by_entry = glue.resolve_from_additional_config({"kv_compression": by_name.to_config()})
    assert by_name == by_entry
    with pytest.raises(ProfileError, match="must be a profile name"):
        glue.resolve_from_additional_config({"kv_compression": 3})
    with pytest.raises(ProfileError, match="malformed"):
        glue.resolve_from_additional_config({"kv_compression": {"name": "none"}})


def test_version_guard(monkeypatch):
    import vllm

    from vllm_kvplug import vllm_glue

    monkeypatch.setattr(vllm, "__version__", "0.27.0")
    with pytest.raises(RuntimeError, match="supports vLLM 0.26.0 only; found vLLM 0.27.0"):
        vllm_glue._check_vllm_version()
    monkeypatch.setattr(vllm, "__version__", "0.26.0+cpu")
    vllm_glue._check_vllm_version()


def test_argparse_type_function_directly():
    with pytest.raises(argparse.ArgumentTypeError, match="unknown kv-compression profile"):
        glue._profile_argument("nope")
