"""The paged layout and its PyTorch reference (write + attention)."""

import pytest
import torch

from vllm_kvplug.quant.paged import PagedLayout, attention_reference, read_reference, \
    write_reference
from vllm_kvplug.quant.recipe import KVRecipe, QuantRecipe


def make_layout(kbits=4, vbits=4, group=32, block=32, heads=2, head_size=64, bs=16):
    recipe = KVRecipe(QuantRecipe(kbits, group, block), QuantRecipe(vbits, group, block))
    return PagedLayout(recipe, heads, head_size, bs)


def test_page_bytes_match_the_recipe():
    layout = make_layout(4, 4, 128, 64, heads=8, head_size=128, bs=16)
    assert layout.page_bytes == 16 * 8 * (68 + 68)  # 3.76x fewer bytes than bf16
    mixed = make_layout(8, 4, 64, 64, heads=8, head_size=128, bs=16)
    assert mixed.page_bytes == 16 * 8 * ((128 + 8) + (64 + 8))
    assert mixed.value_offset == 8 * 16 * 136


def test_views_do_not_overlap_and_cover_the_page():
    layout = make_layout(2, 4)
    cache = torch.zeros(3, layout.page_bytes, dtype=torch.uint8)
    touched = torch.zeros_like(cache)
    for which in ("key", "value"):
        codes, steps, minima = layout.views(cache, which)
        codes.fill_(1)
        steps.fill_(0)
        minima.fill_(0)
        for t in (codes, steps.view(torch.uint8), minima.view(torch.uint8)):
            pass
        touched += (cache == 1).to(torch.uint8)
        cache.zero_()
    # codes cover K and V code bytes exactly once
    per_token_codes = layout.head_size * (2 + 4) // 8 * layout.num_kv_heads
    assert int(touched.sum()) == 3 * layout.block_size * per_token_codes


def test_views_reject_wrong_cache():
    layout = make_layout()
    with pytest.raises(ValueError, match="uint8 cache"):
        layout.views(torch.zeros(2, layout.page_bytes + 2, dtype=torch.uint8), "key")


def test_write_then_read_round_trips_within_a_step_and_skips_padding():
    torch.manual_seed(0)
    layout = make_layout(4, 2)
    cache = torch.zeros(4, layout.page_bytes, dtype=torch.uint8)
    k, v = torch.randn(5, 2, 64), torch.randn(5, 2, 64)
    # tokens 0..3 of a sequence living in blocks [2, 0]; the last row is padding
    slots = torch.tensor([2 * 16 + 0, 2 * 16 + 1, 2 * 16 + 15, 0 * 16 + 0, -1])
    write_reference(cache, k, v, slots, layout)
    kr, vr = read_reference(cache, torch.tensor([2, 0]), 17, layout, rotated=False)
    for got, want, bits in ((kr, k, 4), (vr, v, 2)):
        rows = [0, 1, 15, 16]
        err = (got[rows] - want[:4]).abs().max()
        assert err < (want.abs().max() * 2.5 / ((1 << bits) - 1))
    untouched = [1, 3]
    assert int(cache[untouched].sum()) == 0


def test_attention_reference_matches_dense_attention_on_dequantized_kv():
    torch.manual_seed(1)
    layout = make_layout(8, 8, 32, 64, heads=2, head_size=64, bs=16)
    seq_lens, q_lens = [20, 7], [4, 1]
    block_table = torch.tensor([[3, 1], [0, 2]])
    cache = torch.zeros(4, layout.page_bytes, dtype=torch.uint8)
    ks, vs = [], []
    for i, n in enumerate(seq_lens):
        k, v = torch.randn(n, 2, 64), torch.randn(n, 2, 64)
        pos = torch.arange(n)
        slots = block_table[i, pos // 16] * 16 + pos % 16
        write_reference(cache, k, v, slots, layout)
        ks.append(k)
        vs.append(v)
    q = torch.randn(sum(q_lens), 4, 64)
    qsl = torch.tensor([0, 4, 5])
    out = attention_reference(q, cache, block_table, torch.tensor(seq_lens), qsl, layout,
                              scale=0.125)
    for i, n in enumerate(seq_lens):
        qi = q[qsl[i]:qsl[i + 1]]
        k, v = ks[i].repeat_interleave(2, 1), vs[i].repeat_interleave(2, 1)
        s = torch.einsum("qhd,shd->hqs", qi, k) * 0.125
        qpos = torch.arange(n - len(qi), n)
        s.masked_fill_(torch.arange(n)[None] > qpos[:, None], float("-inf"))
        want = torch.einsum("hqs,shd->qhd", s.softmax(-1), v)
        # INT8 K and V: close to unquantized attention
        torch.testing.assert_close(out[qsl[i]:qsl[i + 1]], want, atol=0.03, rtol=0.03)
