"""Static per-(layer, KV head) K offsets: calibration, file format, loading and checks.

Attention is invariant to subtracting one constant vector c from every key of a head:
q·(k − c) = q·k − q·c is the same for all keys of a query, so softmax does not change.
Post-RoPE keys of many models carry a large common component per channel (k_proj biases
in the Qwen2 family, outlier channels elsewhere); token-wise INT4 spends its range on it.
The cache write therefore subtracts a calibrated offset from K before rotation and
quantization, and attention reads the cache unchanged (`write_reference(...,
key_offsets=...)`, `triton_kernels.write_kv(..., key_offset=...)`).

The offset of (layer, head) is the mean of that head's post-RoPE keys over a calibration
text, measured once with Hugging Face transformers (`measure_key_means`, or the CLI
`python -m vllm_kvplug.calibrate`).

File format (safetensors, `FORMAT` version `FORMAT_VERSION`):

    tensors   "layers.<i>.key_offset": float32 [num_kv_heads, head_size], one per
              decoder layer i = 0 .. num_layers - 1 (all KV heads of the model, before
              any tensor-parallel split)
    metadata  format, format_version, model, num_layers, num_kv_heads, head_size,
              tokens (keys averaged per head), windows, window_tokens, dtype,
              text (where the calibration text came from), text_sha256

Every check raises `KeyOffsetsError` naming the file and what does not match.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

FORMAT = "vllm-kvplug-key-offsets"
FORMAT_VERSION = "1"
TENSOR_NAME = "layers.{}.key_offset"
RECORDING_ATTENTION = "kvplug_record_keys"

# Used when no calibration text is given: a few paragraphs of ordinary English prose and
# some code, enough for a smoke test. Calibrate on text like the deployment's traffic
# (a few thousand tokens) for real use.
BUILTIN_TEXT = """\
The old harbour town wakes slowly. Fishing boats come in before dawn, their decks piled
with nets and crates, and the first cafes open their shutters as the gulls settle on the
sea wall. By eight o'clock the market square is full: farmers sell cheese, bread, apples
and honey; a man repairs bicycles under a striped awning; children run between the stalls
on their way to school. Visitors often ask why the streets are so narrow. The answer is
older than the town itself: the houses were built close together to shelter each other
from the winter storms that blow in from the north-west.

In the library on the hill, a small exhibition explains how the lighthouse was built in
1871. Stone was carried up the cliff by horse and cart, and the lens, made in Paris,
arrived by ship in forty wooden boxes. The keeper's logbooks record every storm, every
wreck and every rescue for more than a century, in a careful, slanting hand.

Question: what is the capital of France? Answer: Paris is the capital of France, and its
largest city. Question: how many days are there in a leap year? Answer: 366.

def moving_average(values, width):
    \"\"\"Return the averages of every run of `width` consecutive values.\"\"\"
    if width <= 0:
        raise ValueError("width must be positive")
    total = sum(values[:width])
    out = [total / width]
    for i in range(width, len(values)):
        total += values[i] - values[i - width]
        out.append(total / width)
    return out

The committee met on Tuesday to review the budget for the coming year. Most of the
discussion concerned the new community centre: its roof needs repair, the heating system
is thirty years old, and the hall is booked every evening. After a long debate the members
agreed to spend the reserve on the roof first and to ask the council for a grant for the
heating. The minutes were approved without changes, and the meeting closed at nine.
"""


class KeyOffsetsError(ValueError):
    """A K-offsets file is missing, malformed, or does not fit the served model."""


@dataclass(frozen=True)
class KeyOffsets:
    """Per-(layer, KV head) K offsets: `offsets` float32 [num_layers, num_kv_heads, D]."""

    offsets: torch.Tensor
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = "<memory>"

    @property
    def num_layers(self) -> int:
        return self.offsets.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.offsets.shape[1]

    @property
    def head_size(self) -> int:
        return self.offsets.shape[2]

    def check_model(self, num_layers: int, num_kv_heads: int, head_size: int) -> None:
        """Raise KeyOffsetsError unless the file was made for a model of this shape."""
        wrong = [f"{what}: file {have}, model {want}" for what, have, want in (
            ("layers", self.num_layers, num_layers),
            ("KV heads", self.num_kv_heads, num_kv_heads),
            ("head size", self.head_size, head_size)) if have != want]
        if wrong:
            model = self.metadata.get("model", "?")
            raise KeyOffsetsError(
                f"K offsets {self.source} (calibrated on {model}) do not fit the served "
                f"model ({'; '.join(wrong)}); calibrate them on this model with "
                "python -m vllm_kvplug.calibrate")

    def for_layer(self, layer: int, first_head: int = 0, num_heads: int | None = None
                  ) -> torch.Tensor:
        """The float32 [num_heads, D] offsets of `layer`, KV heads first_head.. (a copy)."""
        num_heads = self.num_kv_heads - first_head if num_heads is None else num_heads
        if not 0 <= layer < self.num_layers:
            raise KeyOffsetsError(f"K offsets {self.source} cover layers 0..."
                                  f"{self.num_layers - 1}; the model asks for layer {layer}")
        if first_head < 0 or first_head + num_heads > self.num_kv_heads:
            raise KeyOffsetsError(
                f"K offsets {self.source} have {self.num_kv_heads} KV heads; the model asks "
                f"for heads {first_head}..{first_head + num_heads - 1}")
        return self.offsets[layer, first_head:first_head + num_heads].clone()


def kv_head_range(total_kv_heads: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """(first head, count) of the KV heads a tensor-parallel rank holds, as vLLM splits
    them: contiguous slices when there are at least as many heads as ranks, otherwise
    one head replicated on tp_size / total_kv_heads consecutive ranks."""
    if total_kv_heads >= tp_size:
        if total_kv_heads % tp_size:
            raise KeyOffsetsError(f"{total_kv_heads} KV heads do not split over "
                                  f"{tp_size} tensor-parallel ranks")
        count = total_kv_heads // tp_size
        return tp_rank * count, count
    if tp_size % total_kv_heads:
        raise KeyOffsetsError(f"{tp_size} tensor-parallel ranks do not replicate "
                              f"{total_kv_heads} KV heads evenly")
    return tp_rank // (tp_size // total_kv_heads), 1


# ------------------------------------------------------------------------------ file

def save_key_offsets(path: str | Path, offsets: torch.Tensor,
                     metadata: dict[str, object]) -> Path:
    """Write `offsets` [num_layers, num_kv_heads, head_size] and metadata (see module)."""
    from safetensors.torch import save_file

    if offsets.dim() != 3:
        raise ValueError(f"offsets must be [layers, kv heads, head size], got "
                         f"{tuple(offsets.shape)}")
    layers, heads, head_size = offsets.shape
    meta = {str(k): str(v) for k, v in metadata.items()}
    meta.update(format=FORMAT, format_version=FORMAT_VERSION, num_layers=str(layers),
                num_kv_heads=str(heads), head_size=str(head_size))
    tensors = {TENSOR_NAME.format(i): offsets[i].float().contiguous().cpu()
               for i in range(layers)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)  # safetensors writes 0600; a server may run as another user
    return path


def load_key_offsets(path: str | Path) -> KeyOffsets:
    """Read and check a K-offsets file (cached per path and modification time)."""
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise KeyOffsetsError(f"K offsets file not found: {p} (quantization.key_offsets; "
                              "make one with python -m vllm_kvplug.calibrate)")
    return _load(str(p), p.stat().st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _load(path: str, mtime_ns: int) -> KeyOffsets:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            names = set(f.keys())
            if meta.get("format") != FORMAT:
                raise KeyOffsetsError(f"{path} is not a vllm-kvplug K-offsets file "
                                      f"(metadata format={meta.get('format')!r}, expected "
                                      f"{FORMAT!r})")
            if meta.get("format_version") != FORMAT_VERSION:
                raise KeyOffsetsError(f"K offsets {path}: format_version "
                                      f"{meta.get('format_version')!r}; this release reads "
                                      f"{FORMAT_VERSION!r}")
            try:
                layers, heads, head_size = (int(meta[k]) for k in
                                            ("num_layers", "num_kv_heads", "head_size"))
            except (KeyError, ValueError):
                raise KeyOffsetsError(f"K offsets {path}: metadata needs integer "
                                      "num_layers, num_kv_heads and head_size") from None
            expected = {TENSOR_NAME.format(i) for i in range(layers)}
            if names != expected:
                odd = sorted(names ^ expected)[:4]
                raise KeyOffsetsError(f"K offsets {path}: expected tensors layers.0 .. "
                                      f"layers.{layers - 1}.key_offset, found a mismatch "
                                      f"at {', '.join(odd)}")
            rows = [f.get_tensor(TENSOR_NAME.format(i)) for i in range(layers)]
    except SafetensorError as e:
        raise KeyOffsetsError(f"K offsets {path} is not a readable safetensors file: "
                              f"{e}") from None
    for i, row in enumerate(rows):
        if row.dtype != torch.float32 or tuple(row.shape) != (heads, head_size):
            raise KeyOffsetsError(f"K offsets {path}: layer {i} is {row.dtype} "
                                  f"{tuple(row.shape)}, expected float32 "
                                  f"({heads}, {head_size})")
        if not torch.isfinite(row).all():
            raise KeyOffsetsError(f"K offsets {path}: layer {i} has non-finite values")
    return KeyOffsets(torch.stack(rows), meta, path)


# ----------------------------------------------------------------------- calibration

class KeyMeans:
    """Running per-(layer, KV head) channel means of post-RoPE keys."""

    def __init__(self) -> None:
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}

    def add(self, layer: int, key: torch.Tensor) -> None:
        """key: [batch, kv heads, tokens, head size], as transformers passes it."""
        total = key.detach().float().sum(dim=(0, 2)).cpu()
        if layer in self.sums:
            self.sums[layer] += total
        else:
            self.sums[layer] = total
        self.counts[layer] = self.counts.get(layer, 0) + key.shape[0] * key.shape[2]

    def means(self) -> torch.Tensor:
        """[num_layers, kv heads, head size] float32 (every layer 0..L-1 must be seen)."""
        layers = sorted(self.sums)
        if layers != list(range(len(layers))) or not layers:
            raise RuntimeError(f"keys recorded for layers {layers}, expected 0..N-1")
        return torch.stack([self.sums[i] / self.counts[i] for i in layers])


_RECORDERS: list[KeyMeans] = []


def _recording_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers attention function: record the keys, then plain SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    for recorder in _RECORDERS:
        recorder.add(module.layer_idx, key)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_recording_attention() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(RECORDING_ATTENTION, _recording_attention)
    return RECORDING_ATTENTION


@torch.inference_mode()
def measure_key_means(model, windows: Iterable[Sequence[int]]) -> tuple[torch.Tensor, int]:
    """Run a transformers causal LM on each window of token ids (one at a time) and
    return the per-(layer, KV head) means of its post-RoPE keys, float32
    [num_layers, num_kv_heads, head_size], and the number of tokens per head averaged.

    The model's attention implementation is switched to a recording SDPA for the
    duration and restored afterwards.
    """
    register_recording_attention()
    previous = model.config._attn_implementation
    recorder = KeyMeans()
    device = next(model.parameters()).device
    model.set_attn_implementation(RECORDING_ATTENTION)
    _RECORDERS.append(recorder)
    tokens = 0
    try:
        for window in windows:
            model(torch.tensor([list(window)], device=device))
            tokens += len(window)
    finally:
        _RECORDERS.remove(recorder)
        model.set_attn_implementation(previous)
    if tokens == 0:
        raise ValueError("no calibration tokens")
    return recorder.means(), tokens


def token_windows(ids: Sequence[int], window_tokens: int, max_tokens: int,
                  prefix: Sequence[int] = ()) -> list[list[int]]:
    """Consecutive windows of at most `window_tokens` tokens (the tokenizer's own
    `prefix`, e.g. BOS, first), covering the first `max_tokens` tokens of `ids`."""
    body = window_tokens - len(prefix)
    if body < 1:
        raise ValueError(f"window of {window_tokens} tokens is too small")
    ids = list(ids[:max_tokens])
    return [list(prefix) + ids[i:i + body] for i in range(0, len(ids), body)]


def calibrate(model_dir: str | Path, text: str, text_source: str = "builtin",
              window_tokens: int = 1024, max_tokens: int = 8192, dtype: str = "float32",
              device: str = "cpu") -> KeyOffsets:
    """Load the Hugging Face model in `model_dir` and measure its K offsets on `text`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tokenizer(text, add_special_tokens=False).input_ids
    windows = token_windows(ids, window_tokens, max_tokens, tokenizer("").input_ids)
    if not windows:
        raise ValueError("the calibration text has no tokens")
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=getattr(torch, dtype),
        attn_implementation=register_recording_attention()).to(device).eval()
    means, tokens = measure_key_means(model, windows)
    config = model.config.get_text_config()
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if means.shape[:2] != (config.num_hidden_layers, heads):
        raise RuntimeError(f"recorded {tuple(means.shape)} keys; the config says "
                           f"{config.num_hidden_layers} layers x {heads} KV heads")
    metadata = {"model": str(model_dir), "tokens": tokens, "windows": len(windows),
                "window_tokens": window_tokens, "dtype": dtype, "text": text_source,
                "text_sha256": hashlib.sha256(text.encode()).hexdigest()}
    return KeyOffsets(means, {k: str(v) for k, v in metadata.items()}, "<calibrated>")
