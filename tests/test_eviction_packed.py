"""The head-packed layout of an evicted prompt: plan, compaction, attention (pure PyTorch)."""

import math

import pytest
import torch

from vllm_kvplug.eviction import AdaKV, PyramidKV, SnapKV, StreamingLLM, kv_pages, score_snapkv
from vllm_kvplug.eviction.packed import (
    attention_packed,
    compact,
    packed_offsets,
    packed_plan,
    plan_layer,
    read_packed,
    read_prompt_keys,
)
from vllm_kvplug.quant.paged import PagedLayout, read_reference, write_reference
from vllm_kvplug.quant.recipe import KVRecipe, QuantRecipe
from vllm_kvplug.quant.reference import block_hadamard

LAYERS = 6


def make_layout(heads=3, bs=16, head_size=64):
    recipe = KVRecipe(QuantRecipe(8, 32, 32), QuantRecipe(4, 32, 32))
    return PagedLayout(recipe, heads, head_size, bs)


def policies():
    common = dict(budget_fraction=0.3, min_tokens=8, window_tokens=8, sink_tokens=4)
    return [SnapKV(**common), AdaKV(**common), PyramidKV(**common), StreamingLLM(**common)]


@pytest.mark.parametrize("policy", policies(), ids=lambda p: p.name)
@pytest.mark.parametrize("prompt_len", [40, 97, 160, 301])
def test_plan_matches_the_packed_page_count_of_the_policy(policy, prompt_len):
    torch.manual_seed(prompt_len)
    scores = [torch.rand(3, prompt_len) for _ in range(LAYERS)]
    budgets, _ = policy.plan(prompt_len, LAYERS, 3, scores)
    need = int(kv_pages(budgets, 16, "packed"))
    plan = packed_plan(policy, prompt_len, LAYERS, 16)
    if need >= prompt_len // 16:
        assert plan is None  # nothing to free: not evicted
    else:
        assert plan.num_keep_blocks == need
        assert plan.blocks_freed == prompt_len // 16 - need > 0
        assert plan.tail_start == prompt_len // 16 * 16


@pytest.mark.parametrize("policy", policies(), ids=lambda p: p.name)
def test_plan_layer_equals_the_policy_plan(policy):
    torch.manual_seed(1)
    scores = [torch.rand(3, 120) for _ in range(LAYERS)]
    budgets, kept = policy.plan(120, LAYERS, 3, scores)
    for layer in range(LAYERS):
        b, k = plan_layer(policy, layer, LAYERS, 120, scores[layer])
        assert torch.equal(b, budgets[layer])
        assert all(torch.equal(x, y) for x, y in zip(k, kept[layer]))


def _filled_cache(layout, block_ids, seq_len, num_blocks=24, seed=0):
    torch.manual_seed(seed)
    cache = torch.zeros(num_blocks, layout.page_bytes, dtype=torch.uint8)
    k = torch.randn(seq_len, layout.num_kv_heads, layout.head_size)
    v = torch.randn(seq_len, layout.num_kv_heads, layout.head_size)
    pos = torch.arange(seq_len)
    slots = block_ids[pos // layout.block_size] * layout.block_size + pos % layout.block_size
    write_reference(cache, k, v, slots, layout)
    return cache


def _dense(query, positions, k, v, visible, scale, layout):
    """Dense attention over dequantized K/V [S, H, D] with visible [H, Q, S]."""
    group = query.shape[1] // layout.num_kv_heads
    q = block_hadamard(query.float(), layout.recipe.hadamard_block)
    kk = k.repeat_interleave(group, dim=1)
    vv = v.repeat_interleave(group, dim=1)
    s = torch.einsum("qhd,shd->hqs", q, kk) * scale
    s.masked_fill_(~visible.repeat_interleave(group, dim=0), float("-inf"))
    o = torch.einsum("hqs,shd->qhd", torch.softmax(s, -1), vv)
    return block_hadamard(o, layout.recipe.hadamard_block)


@pytest.mark.parametrize("policy", [AdaKV(budget_fraction=0.25, min_tokens=4, window_tokens=8,
                                          sink_tokens=4),
                                    SnapKV(budget_tokens=30, min_tokens=4, window_tokens=8)],
                         ids=lambda p: p.name)
@pytest.mark.parametrize("bs", [16, 32])
def test_compacted_attention_equals_dense_attention_over_the_kept_tokens(policy, bs):
    layout = make_layout(bs=bs)
    prompt, seq_len = 170, 190  # 20 decode tokens after the prompt
    block_ids = torch.tensor([7, 3, 12, 0, 9, 21, 5, 14, 2, 17, 11, 1, 19])  # scattered
    cache = _filled_cache(layout, block_ids, seq_len)
    k, v = read_reference(cache, block_ids, seq_len, layout)  # before compaction
    keys = read_prompt_keys(cache, layout, block_ids, prompt)
    assert torch.equal(keys, k[:prompt].permute(1, 0, 2))
    q_window = torch.randn(9, 8, 64)
    scores = score_snapkv(block_hadamard(q_window, 32), keys)
    plan = packed_plan(policy, prompt, 1, bs)
    assert plan is not None and plan.blocks_freed > 0
    budgets, kept = plan_layer(policy, 0, 1, prompt, scores)
    if policy.name == "adakv":
        assert len(set(budgets.tolist())) > 1  # uneven per-head budgets
    offsets = compact(cache, layout, block_ids, kept, plan)
    assert torch.equal(offsets, packed_offsets(kept, plan.tail_start))
    assert int(offsets[-1]) <= plan.num_keep_blocks * bs * 3
    # packed entries read back bit-exactly
    packed = read_packed(cache, layout, block_ids, offsets)
    for h in range(3):
        pos = kept[h][kept[h] < plan.tail_start]
        assert torch.equal(packed[h][0], k[pos, h]) and torch.equal(packed[h][1], v[pos, h])
    # the tail is untouched
    k2, _ = read_reference(cache, block_ids, seq_len, layout)
    assert torch.equal(k2[plan.tail_start:], k[plan.tail_start:])
    # decode rows at positions >= prompt - 1 (the crossing chunk and decode steps)
    positions = torch.tensor([prompt - 1, prompt, prompt + 7, seq_len - 1])
    query = torch.randn(len(positions), 9, 64)
    got = attention_packed(query, positions, cache, layout, block_ids, offsets, plan,
                           seq_len, 0.125)
    visible = torch.zeros(3, len(positions), seq_len, dtype=torch.bool)
    for h in range(3):
        visible[h][:, kept[h][kept[h] < plan.tail_start]] = True
    ar = torch.arange(seq_len)
    visible |= ((ar >= plan.tail_start)[None, :] & (ar[None, :] <= positions[:, None]))[None]
    want = _dense(query, positions, k, v, visible, 0.125, layout)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and it differs from full attention (eviction really removed tokens)
    full = _dense(query, positions, k, v, ar[None, None, :] <= positions[None, :, None]
                  .expand(3, -1, -1), 0.125, layout)
    assert (got - full).abs().max() > 1e-3


def test_compaction_into_overlapping_blocks_reads_sources_first():
    # head 0 keeps everything of the first blocks: destinations equal or precede sources
    layout = make_layout(heads=2, bs=16)
    block_ids = torch.tensor([4, 5, 6, 7, 8, 9])
    cache = _filled_cache(layout, block_ids, 96)
    k, v = read_reference(cache, block_ids, 96, layout)
    kept = [torch.arange(0, 40), torch.arange(20, 60)]
    plan = packed_plan(SnapKV(budget_tokens=40, min_tokens=0, window_tokens=4), 96, 1, 16)
    assert plan.num_keep_blocks == 3
    offsets = compact(cache, layout, block_ids, kept, plan)
    packed = read_packed(cache, layout, block_ids, offsets)
    assert torch.equal(packed[0][0], k[:40, 0]) and torch.equal(packed[1][1], v[20:60, 1])


def test_compaction_refuses_more_entries_than_the_plan_holds():
    layout = make_layout(heads=2)
    block_ids = torch.arange(6)
    cache = _filled_cache(layout, block_ids, 96)
    plan = packed_plan(SnapKV(budget_tokens=16, min_tokens=0, window_tokens=4), 96, 1, 16)
    with pytest.raises(ValueError, match="do not fit"):
        compact(cache, layout, block_ids, [torch.arange(60), torch.arange(60)], plan)


def test_short_prompts_and_big_budgets_are_not_evicted():
    policy = SnapKV(budget_fraction=0.5, min_tokens=64, window_tokens=32)
    assert packed_plan(policy, 70, 30, 16) is None  # budget 64 -> 4 blocks of 4
    assert packed_plan(policy, 100, 30, 16).blocks_freed == 2  # 4 blocks of 6
    assert packed_plan(policy, 100, 30, 128) is None  # no full block
    plan = packed_plan(policy, 1000, 30, 128)
    assert (plan.num_keep_blocks, plan.tail_block) == (math.ceil(500 / 128), 7)


# -- EvictedRequest: the worker-side sequence of steps -----------------------------------

from vllm_kvplug.eviction.serving import EvictedRequest  # noqa: E402


def _run_steps(policy, steps, query, cache, layout, block_ids, prompt, layers=2):
    """Feed rows [start, end) of `query` [S, Hq, D] per step, for each layer."""
    plan = packed_plan(policy, prompt, layers, layout.block_size)
    state = EvictedRequest(policy, plan, layers)
    outs = []
    for start, end in steps:
        outs.append(torch.stack([state.attend(layer, query[start:end], start, cache[layer],
                                              layout, block_ids, 0.125)
                                 for layer in range(layers)]))
    return torch.cat(outs, dim=1), state


@pytest.mark.parametrize("policy", policies(), ids=lambda p: p.name)
def test_chunked_prefill_decode_and_recompute_past_the_prompt_agree(policy):
    layout = make_layout()
    prompt, total = 150, 165
    block_ids = torch.tensor([7, 3, 12, 0, 9, 21, 5, 14, 2, 17, 11])
    caches = [_filled_cache(layout, block_ids, total, seed=s) for s in (1, 2)]
    torch.manual_seed(3)
    query = torch.randn(total, 9, 64)
    # original: chunked prefill (a chunk ends inside the observation window), then decode
    decode = [(p, p + 1) for p in range(prompt, total)]
    first, state = _run_steps(policy, [(0, 60), (60, 145), (145, prompt)] + decode,
                              query, [c.clone() for c in caches], layout, block_ids, prompt)
    # one chunk up to the prompt, then decode
    second, _ = _run_steps(policy, [(0, prompt)] + decode, query,
                           [c.clone() for c in caches], layout, block_ids, prompt)
    # a recompute after preemption: one chunk spanning prompt and generated tokens
    third, _ = _run_steps(policy, [(0, total)], query, [c.clone() for c in caches], layout,
                          block_ids, prompt)
    torch.testing.assert_close(first, second, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first, third, rtol=1e-5, atol=1e-5)
    assert state.kept_fraction(3) is not None and state.kept_fraction(3) < 0.6
    # rows before the prompt's end are plain full attention
    from vllm_kvplug.quant.paged import attention_reference
    full = attention_reference(query[:prompt], caches[0], block_ids[None],
                               torch.tensor([prompt]), torch.tensor([0, prompt]), layout,
                               0.125)
    torch.testing.assert_close(first[0, :prompt], full, rtol=1e-5, atol=1e-5)


def test_a_missing_window_chunk_is_an_error_not_a_silent_guess():
    policy = SnapKV(budget_fraction=0.3, min_tokens=8, window_tokens=8)
    layout = make_layout()
    block_ids = torch.arange(12)
    cache = _filled_cache(layout, block_ids, 150)
    plan = packed_plan(policy, 150, 1, 16)
    state = EvictedRequest(policy, plan, 1)
    query = torch.randn(150, 9, 64)
    with pytest.raises(RuntimeError, match="observation-window"):
        state.attend(0, query[146:150], 146, cache, layout, block_ids, 0.125)
