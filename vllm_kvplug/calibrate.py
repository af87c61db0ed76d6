"""`python -m vllm_kvplug.calibrate` (also `kvplug-calibrate`): measure static K offsets.

    python -m vllm_kvplug.calibrate MODEL_DIR --out key-offsets.safetensors \\
        [--text-file FILE ...] [--window-tokens 1024] [--max-tokens 8192] \\
        [--dtype float32|bfloat16|float16] [--device cpu|cuda]

Runs the Hugging Face model in MODEL_DIR (transformers) on the calibration text — the
given files concatenated, or a short built-in text when none is given — in consecutive
windows, records the post-RoPE keys of every layer and KV head, and writes their channel
means to a safetensors file (format: `vllm_kvplug.quant.key_offsets`). Point a profile's
`quantization.key_offsets` at the file. Use text like the deployment's traffic, and not
the text a quality benchmark evaluates on.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvplug-calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="Hugging Face model folder (the one vLLM serves)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--text-file", nargs="+", default=None,
                   help="calibration text files, concatenated (default: a short "
                        "built-in text)")
    p.add_argument("--window-tokens", type=int, default=1024,
                   help="tokens per forward pass (positions 0..N-1)")
    p.add_argument("--max-tokens", type=int, default=8192,
                   help="use at most this many tokens of the text")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="cpu")
    ns = p.parse_args(argv)
    if not Path(ns.model).is_dir():
        p.error(f"model folder not found: {ns.model}")
    if ns.window_tokens < 2 or ns.max_tokens < 1:
        p.error("--window-tokens must be >= 2 and --max-tokens >= 1")

    from vllm_kvplug.quant.key_offsets import BUILTIN_TEXT, calibrate, save_key_offsets

    if ns.text_file:
        missing = [f for f in ns.text_file if not Path(f).is_file()]
        if missing:
            p.error(f"text file not found: {', '.join(missing)}")
        text = "\n\n".join(Path(f).read_text(errors="replace") for f in ns.text_file)
        source = " ".join(ns.text_file)
    else:
        text, source = BUILTIN_TEXT, "builtin"
    t0 = time.perf_counter()
    offsets = calibrate(ns.model, text, source, ns.window_tokens, ns.max_tokens, ns.dtype,
                        ns.device)
    out = save_key_offsets(ns.out, offsets.offsets, offsets.metadata)
    norms = offsets.offsets.norm(dim=-1)
    print(f"{out}: {offsets.num_layers} layers x {offsets.num_kv_heads} KV heads x "
          f"{offsets.head_size}, {offsets.metadata['tokens']} tokens in "
          f"{offsets.metadata['windows']} windows, {time.perf_counter() - t0:.1f} s; "
          f"offset norm per head: mean {norms.mean():.2f}, max {norms.max():.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
