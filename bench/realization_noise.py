"""How much of a perplexity difference between INT4 configurations is rounding noise.

Runs the CPU backend's computation outside vLLM — the Hugging Face model whose attention
writes each layer's K/V with `write_reference` (optionally with the K offsets of
`--key-offsets`) and attends with `attention_reference` — on exactly the perplexity
windows `bench/quality.py` scores (same corpus, count and width), once as is and then
with the input embeddings multiplied by (1 + 1e-6·N(0, 1)) under different seeds. The
unquantized model barely moves under such a perturbation; with INT4 K/V it changes which
values round up or down, so the spread of the replicates is the noise floor of a single
perplexity number of that configuration.

    python bench/realization_noise.py --corpus-file kjv.txt \\
        --key-offsets bench/ablation_profiles/smollm2-key-offsets.safetensors \\
        --groups 64 32 --replicates 3
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus as corpora  # noqa: E402
from quality import PromptBuilder  # noqa: E402

from vllm_kvplug.quant.key_offsets import load_key_offsets  # noqa: E402
from vllm_kvplug.quant.paged import PagedLayout, attention_reference, write_reference  # noqa: E402,E501
from vllm_kvplug.quant.recipe import KVRecipe, QuantRecipe  # noqa: E402

ATTENTION_NAME = "kvplug_paged_reference"
_STATE: dict = {}


def paged_reference_attention(module, query, key, value, attention_mask, scaling=None,
                              **kwargs):
    """transformers attention function: one sequence through the paged reference."""
    layout: PagedLayout = _STATE["layout"]
    offsets = _STATE["offsets"]
    t = key.shape[2]
    blocks = -(-t // layout.block_size)
    cache = torch.zeros(blocks, layout.page_bytes, dtype=torch.uint8)
    write_reference(cache, key[0].transpose(0, 1), value[0].transpose(0, 1), torch.arange(t),
                    layout, None if offsets is None else offsets[module.layer_idx])
    out = attention_reference(query[0].transpose(0, 1), cache, torch.arange(blocks)[None],
                              torch.tensor([t]), torch.tensor([0, t]), layout, scaling)
    return out[None], None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    p.add_argument("--corpus-file", required=True)
    p.add_argument("--key-offsets", default=None, help="also run each group with offsets")
    p.add_argument("--groups", type=int, nargs="+", default=[64])
    p.add_argument("--hadamard-block", type=int, default=64)
    p.add_argument("--replicates", type=int, default=3, help="1 unperturbed + N-1 seeds")
    p.add_argument("--ppl-windows", type=int, default=8)
    p.add_argument("--ppl-window-tokens", type=int, default=1024)
    p.add_argument("--out", default="bench/results/realization_noise.json")
    ns = p.parse_args(argv)

    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

    if ns.model is None:
        from vllm_kvplug.models import ensure_smollm2

        ns.model = str(ensure_smollm2())
    tokenizer = AutoTokenizer.from_pretrained(ns.model)
    windows = PromptBuilder(tokenizer, corpora.read_corpus(ns.corpus_file),
                            argparse.Namespace()).ppl_windows(ns.ppl_windows,
                                                              ns.ppl_window_tokens)
    AttentionInterface.register(ATTENTION_NAME, paged_reference_attention)
    model = AutoModelForCausalLM.from_pretrained(
        ns.model, dtype=torch.float32, attn_implementation=ATTENTION_NAME).eval()
    config = model.config
    head_size = getattr(config, "head_dim", None) or \
        config.hidden_size // config.num_attention_heads
    offsets = None
    if ns.key_offsets:
        loaded = load_key_offsets(ns.key_offsets)
        loaded.check_model(config.num_hidden_layers, config.num_key_value_heads, head_size)
        offsets = loaded.offsets
    embed = model.get_input_embeddings()
    results = []
    for group in ns.groups:
        recipe = QuantRecipe(4, group, ns.hadamard_block)
        _STATE["layout"] = PagedLayout(KVRecipe(recipe, recipe), config.num_key_value_heads,
                                       head_size, 128)
        for with_offsets in ([False, True] if offsets is not None else [False]):
            _STATE["offsets"] = offsets if with_offsets else None
            for rep in range(ns.replicates):
                g = torch.Generator().manual_seed(rep)
                nll, n, t0 = 0.0, 0, time.perf_counter()
                for w in windows:
                    ids = torch.tensor([w])
                    with torch.inference_mode():
                        e = embed(ids)
                        if rep:
                            e = e * (1 + 1e-6 * torch.randn(e.shape, generator=g))
                        logp = torch.log_softmax(model(inputs_embeds=e).logits[0, :-1], -1)
                    nll -= logp.gather(1, ids[0, 1:, None]).sum().item()
                    n += len(w) - 1
                result = {"recipe": f"int4/g{group}/h{ns.hadamard_block}",
                          "key_offsets": with_offsets, "replicate": rep,
                          "ppl": round(math.exp(nll / n), 4),
                          "seconds": round(time.perf_counter() - t0, 1)}
                results.append(result)
                print(json.dumps(result), flush=True)
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": ns.model, "corpus_file": ns.corpus_file,
                               "key_offsets": ns.key_offsets, "windows": ns.ppl_windows,
                               "window_tokens": ns.ppl_window_tokens, "perturbation": 1e-6,
                               "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
