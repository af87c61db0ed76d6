"""Chunk KV reuse core: markup, keys, the two-tier store, RoPE re-positioning, selection."""

import math
import random

import pytest
import torch

from vllm_kvplug.chunk_reuse import (
    ChunkKV,
    ChunkMarkup,
    ChunkMarkupError,
    ChunkMarkupLimits,
    ChunkStore,
    ChunkStoreError,
    apply_rope,
    blend_attention_reference,
    chunk_key,
    chunk_start_mask,
    locate_chunks,
    make_layout_tag,
    merge_kv,
    parse_chunk_markup,
    reposition_keys,
    reposition_rotated_keys,
    rope_params_from_config,
    select_recompute_tokens,
    token_deviation,
)
from vllm_kvplug.quant.reference import block_hadamard

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct@main"
LAYOUT = make_layout_tag({"kv": "bf16", "layers": 30, "kv_heads": 3, "head_size": 64})


# ----------------------------------------------------------------------------- hashing

def test_chunk_key_is_pinned_and_stable():
    # Pinned digest: changing the canonical encoding silently would orphan stored chunks.
    key = chunk_key([1, 2, 3], "m", None, "kv=bf16")
    assert key == "bc8aa8e15de6e886f470098bab856547c2adf9409e573cdb659876f2a103e32e"
    assert key == chunk_key((1, 2, 3), "m", None, "kv=bf16")
    assert key == chunk_key(torch.tensor([1, 2, 3]), "m", None, "kv=bf16")
    assert key == chunk_key(iter([1, 2, 3]), "m", None, "kv=bf16")


def test_chunk_key_is_position_independent():
    doc = [101, 7, 7, 42, 9000]
    prompt_a = [1, 5, 6] + doc + [8]
    prompt_b = [1] + [3] * 50 + doc
    assert chunk_key(prompt_a[3:8], MODEL, "t", LAYOUT) == chunk_key(prompt_b[51:], MODEL, "t",
                                                                       LAYOUT)


def test_chunk_key_sensitivity():
    base = chunk_key([10, 20, 30], MODEL, "tenant-a", LAYOUT)
    variants = [
        chunk_key([10, 20, 31], MODEL, "tenant-a", LAYOUT),
        chunk_key([30, 20, 10], MODEL, "tenant-a", LAYOUT),
        chunk_key([10, 20], MODEL, "tenant-a", LAYOUT),
        chunk_key([10, 20, 30, 0], MODEL, "tenant-a", LAYOUT),
        chunk_key([10, 20, 30], MODEL + "-lora1", "tenant-a", LAYOUT),
        chunk_key([10, 20, 30], MODEL, "tenant-b", LAYOUT),
        chunk_key([10, 20, 30], MODEL, None, LAYOUT),
        chunk_key([10, 20, 30], MODEL, "", LAYOUT),
        chunk_key([10, 20, 30], MODEL, "tenant-a", LAYOUT.replace("bf16", "int4-hadamard")),
    ]
    assert len({base, *variants}) == len(variants) + 1
    # Length prefixes: moving bytes between fields changes the key.
    assert chunk_key([1], "ab", "c", "x") != chunk_key([1], "a", "bc", "x")


@pytest.mark.parametrize("bad", [[], [-1], [2**32], [1.5], [True]])
def test_chunk_key_rejects_bad_tokens(bad):
    with pytest.raises(ValueError):
        chunk_key(bad, MODEL, None, LAYOUT)


def test_chunk_key_rejects_bad_fields():
    with pytest.raises(ValueError, match="model_id"):
        chunk_key([1], "", None, LAYOUT)
    with pytest.raises(ValueError, match="layout_tag"):
        chunk_key([1], MODEL, None, "")
    with pytest.raises(ValueError, match="integer dtype"):
        chunk_key(torch.tensor([1.0]), MODEL, None, LAYOUT)
    assert make_layout_tag({"b": 2, "a": 1}) == "a=1;b=2"
    with pytest.raises(ValueError, match="contains"):
        make_layout_tag({"a": "x;y"})


# ----------------------------------------------------------------------------- store

def _kv(tokens: int, layers: int = 2, heads: int = 1, dim: int = 4, dtype=torch.float16,
        seed: int = 0) -> ChunkKV:
    g = torch.Generator().manual_seed(seed)
    ks = tuple(torch.randn(tokens, heads, dim, generator=g).to(dtype) for _ in range(layers))
    vs = tuple(torch.randn(tokens, heads, dim, generator=g).to(dtype) for _ in range(layers))
    return ChunkKV(ks, vs)


def test_chunkkv_size_and_validation():
    kv = _kv(5, layers=3, heads=2, dim=8)
    assert (kv.num_tokens, kv.num_layers) == (5, 3)
    assert kv.nbytes == 2 * 3 * 5 * 2 * 8 * 2
    page = torch.zeros(5, 36, dtype=torch.uint8)  # e.g. packed INT4 codes + scales
    packed = ChunkKV((page,), (page.clone(),))
    assert packed.nbytes == 2 * 5 * 36
    with pytest.raises(ChunkStoreError, match="per layer"):
        ChunkKV((torch.zeros(2, 1),), ())
    with pytest.raises(ChunkStoreError, match="tokens"):
        ChunkKV((torch.zeros(2, 1),), (torch.zeros(3, 1),))


def test_salt_isolation():
    store = ChunkStore(10_000, 10_000)
    tokens = [5, 6, 7, 8]
    store.put(chunk_key(tokens, MODEL, "tenant-a", LAYOUT), _kv(4))
    assert store.get(chunk_key(tokens, MODEL, "tenant-a", LAYOUT)) is not None
    assert store.get(chunk_key(tokens, MODEL, "tenant-b", LAYOUT)) is None
    assert store.get(chunk_key(tokens, MODEL, None, LAYOUT)) is None
    s = store.stats()
    assert (s.hits, s.misses) == (1, 2)


def test_put_get_roundtrip_and_idempotent_put():
    store = ChunkStore(1000, 1000)
    kv = _kv(3)
    assert store.put("k", kv) == "device"
    got = store.get("k")
    assert got is not None and all(torch.equal(a, b) for a, b in zip(got.keys, kv.keys))
    assert store.put("k", _kv(3, seed=1)) == "device"  # same key: kept, not replaced
    assert store.stats().puts == 1 and len(store) == 1
    assert store.remove("k") and not store.remove("k") and "k" not in store
    assert store.stats().bytes == {"device": 0, "host": 0}


def test_oversize_is_refused_and_host_only_when_larger_than_device():
    one = _kv(4).nbytes  # 64 bytes
    store = ChunkStore(one, 2 * one)
    with pytest.raises(ChunkStoreError, match="exceeds both tier budgets"):
        store.put("huge", _kv(12))
    assert store.stats().refused == 1 and len(store) == 0
    assert store.put("big", _kv(8)) == "host"  # 128 B: fits the host only
    assert store.get("big") is not None and store.tier_of("big") == "host"  # never promoted


def test_demotion_then_promotion_on_hit():
    one = _kv(4).nbytes
    store = ChunkStore(2 * one, 2 * one)
    store.put("a", _kv(4))
    store.put("b", _kv(4))
    store.put("c", _kv(4))  # device full: the LRU of equal utility (a) moves to host
    assert (store.tier_of("a"), store.tier_of("b"), store.tier_of("c")) == ("host", "device",
                                                                            "device")
    assert store.get("a") is not None  # hit on host: promoted, b (LRU) demoted
    assert (store.tier_of("a"), store.tier_of("b")) == ("device", "host")
    assert store.get("b", promote=False) is not None and store.tier_of("b") == "host"
    s = store.stats()
    assert (s.demotions, s.promotions, s.evictions) == (2, 1, 0)
    assert s.entries == {"device": 2, "host": 1}


def test_utility_orders_eviction():
    one = _kv(4).nbytes
    store = ChunkStore(0, 3 * one)  # host tier only: eviction drops entries
    for name in "abc":
        store.put(name, _kv(4))
    store.get("a")
    store.get("a")
    store.get("b")
    assert store.utility("a") > store.utility("b") > store.utility("c")
    store.put("d", _kv(4))  # c: fewest hits goes first, although a is older
    assert "c" not in store and {"a", "b", "d"} <= {k for k in "abcd" if k in store}
    store.put("e", _kv(4))  # d (0 hits) goes before b (1 hit)
    assert "d" not in store and "b" in store
    # Recompute cost per byte: an expensive chunk outlives a cheap one of equal hits.
    store2 = ChunkStore(0, 2 * one)
    store2.put("cheap", _kv(4), recompute_cost=1.0)
    store2.put("costly", _kv(4), recompute_cost=100.0)
    store2.put("new", _kv(4), recompute_cost=50.0)
    assert "cheap" not in store2 and "costly" in store2 and "new" in store2
    assert store2.stats().evictions == 1


def test_lru_tie_break():
    one = _kv(4).nbytes
    store = ChunkStore(0, 2 * one)
    store.put("old", _kv(4))
    store.put("young", _kv(4))
    store.put("old", _kv(4))  # re-put touches "old": now "young" is the LRU
    store.put("new", _kv(4))
    assert "young" not in store and "old" in store


def test_budgets_never_exceeded_under_random_operations():
    rng = random.Random(1234)
    sizes = [1, 2, 3, 5, 8]
    budgets = (4 * _kv(1).nbytes + 7, 11 * _kv(1).nbytes + 3)
    store = ChunkStore(*budgets)
    keys = [f"chunk{i}" for i in range(40)]
    kvs = {k: _kv(rng.choice(sizes), layers=rng.choice([1, 2])) for k in keys}
    for _ in range(1500):
        key = rng.choice(keys)
        if rng.random() < 0.5:
            try:
                store.put(key, kvs[key])
            except ChunkStoreError:
                assert kvs[key].nbytes > max(budgets)
        else:
            store.get(key, promote=rng.random() < 0.8)
        s = store.stats()
        assert s.bytes["device"] <= budgets[0] and s.bytes["host"] <= budgets[1]
        stored = [k for k in keys if k in store]
        for tier in ("device", "host"):
            in_tier = [k for k in stored if store.tier_of(k) == tier]
            assert s.bytes[tier] == sum(kvs[k].nbytes for k in in_tier)
            assert s.entries[tier] == len(in_tier)
    s = store.stats()
    assert s.evictions > 0 and s.demotions > 0 and s.promotions > 0 and s.hits > 0


def test_store_rejects_bad_arguments():
    with pytest.raises(ValueError, match="device_budget_bytes"):
        ChunkStore(-1, 0)
    store = ChunkStore(100, 100)
    with pytest.raises(ValueError, match="recompute_cost"):
        store.put("k", _kv(1), recompute_cost=0)
    with pytest.raises(TypeError):
        store.put("k", [torch.zeros(1)])


# ----------------------------------------------------------------------------- markup

def test_parse_markup_forms():
    assert parse_chunk_markup(None) is None
    assert parse_chunk_markup({}) is None
    assert parse_chunk_markup({"kvplug_profile": "x", "other": 1}) is None
    m = parse_chunk_markup({"kvplug_chunks": ["doc one", "doc two"]})
    assert m == ChunkMarkup(texts=("doc one", "doc two"))
    assert m.num_chunks == 2 and m.recompute_ratio_or(0.15) == 0.15
    m = parse_chunk_markup({"kvplug_chunk_spans": [3, 10, 10, 12],
                            "kvplug_chunk_recompute_ratio": 0.3})
    assert m.spans == ((3, 10), (10, 12)) and m.recompute_ratio_or(0.15) == 0.3
    assert parse_chunk_markup({"kvplug_chunks": "single"}).texts == ("single",)
    assert parse_chunk_markup({"kvplug_chunks": ["a"], "kvplug_chunk_recompute_ratio": 0}
                              ).recompute_ratio == 0.0


@pytest.mark.parametrize("xargs, match", [
    ({"kvplug_chunks": 5}, r"vllm_xargs\.kvplug_chunks: must be a list of document strings"),
    ({"kvplug_chunks": []}, r"vllm_xargs\.kvplug_chunks: must list at least one chunk"),
    ({"kvplug_chunks": ["ok", 3]}, r"vllm_xargs\.kvplug_chunks\[1\]: must be a string"),
    ({"kvplug_chunks": ["ok", "  "]}, r"vllm_xargs\.kvplug_chunks\[1\]: must be a non-empty"),
    ({"kvplug_chunks": ["x"] * 65}, r"kvplug_chunks: at most 64 chunks per request, got 65"),
    ({"kvplug_chunks": ["y" * 262_145]}, r"kvplug_chunks\[0\]: at most 262144 characters"),
    ({"kvplug_chunks": ["a"], "kvplug_chunk_spans": [0, 1]}, "not both"),
    ({"kvplug_chunk": ["a"]}, r"vllm_xargs\.kvplug_chunk: unknown field; chunk markup fields "
                              r"are kvplug_chunks, kvplug_chunk_spans"),
    ({"kvplug_chunk_spans": [0, 4, 9]}, "even number of integers"),
    ({"kvplug_chunk_spans": [0, "4"]}, r"kvplug_chunk_spans\[1\]: must be a non-negative integer"),
    ({"kvplug_chunk_spans": [0, -4]}, r"kvplug_chunk_spans\[1\]: must be a non-negative integer"),
    ({"kvplug_chunk_spans": [0, True]}, r"kvplug_chunk_spans\[1\]"),
    ({"kvplug_chunk_spans": [5, 5]}, r"kvplug_chunk_spans\[0:2\]: chunk \[5, 5\) must hold"),
    ({"kvplug_chunk_spans": [0, 8, 4, 12]}, r"kvplug_chunk_spans\[2:4\]: spans must be sorted"),
    ({"kvplug_chunk_spans": [0, 40000]}, "at most 32768 tokens"),
    ({"kvplug_chunk_spans": 7}, "must be a flat list of token offsets"),
    ({"kvplug_chunks": ["a"], "kvplug_chunk_recompute_ratio": 1.5},
     r"kvplug_chunk_recompute_ratio: must be between 0 and 1, got 1\.5"),
    ({"kvplug_chunks": ["a"], "kvplug_chunk_recompute_ratio": "0.2"},
     r"kvplug_chunk_recompute_ratio: must be a number between 0 and 1, got str"),
    ({"kvplug_chunks": ["a"], "kvplug_chunk_recompute_ratio": float("nan")}, "between 0 and 1"),
    ({"kvplug_chunk_recompute_ratio": 0.2}, "needs chunks"),
])
def test_markup_errors_name_the_field(xargs, match):
    with pytest.raises(ChunkMarkupError, match=match):
        parse_chunk_markup(xargs)
    assert issubclass(ChunkMarkupError, ValueError)


def test_markup_limits_are_configurable():
    limits = ChunkMarkupLimits(max_chunks=2)
    with pytest.raises(ChunkMarkupError, match="at most 2 chunks"):
        parse_chunk_markup({"kvplug_chunks": ["a", "b", "c"]}, limits)


class WordTokenizer:
    """Toy tokenizer: one id per whitespace-separated word."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, text: str) -> list[int]:
        return [self.vocab.setdefault(w, len(self.vocab) + 1) for w in text.split()]


def test_locate_text_chunks():
    tok = WordTokenizer()
    docs = ["alpha beta gamma", "delta epsilon", "alpha beta gamma"]
    prompt = tok("system says hi") + tok(docs[1]) + tok(docs[0]) + tok("and") + \
        tok(docs[2]) + tok("question ?")
    # Documents listed in prompt order; a repeated document is found at its second place.
    loc = locate_chunks(ChunkMarkup(texts=(docs[1], docs[0], docs[2])), prompt, tok)
    assert [(s.index, s.start, s.end) for s in loc.spans] == [(0, 3, 5), (1, 5, 8), (2, 9, 12)]
    assert loc.missing == ()
    assert [prompt[s.start:s.end] for s in loc.spans] == [tok(docs[1]), tok(docs[0]), tok(docs[2])]


def test_locate_reports_missing_and_out_of_order_chunks():
    tok = WordTokenizer()
    prompt = tok("one two three four five six")
    markup = ChunkMarkup(texts=("four five", "two three", "seven eight"))
    with pytest.raises(ChunkMarkupError) as err:
        locate_chunks(markup, prompt, tok)
    msg = str(err.value)
    assert "2 of 3 chunk(s) not located" in msg
    assert "vllm_xargs.kvplug_chunks[1]: found at token 1, which overlaps or precedes" in msg
    assert "vllm_xargs.kvplug_chunks[2]: the chunk's tokens, tokenized alone" in msg
    loc = locate_chunks(markup, prompt, tok, strict=False)
    assert [(s.index, s.start, s.end) for s in loc.spans] == [(0, 3, 5)]
    assert [i for i, _ in loc.missing] == [1, 2]


def test_locate_aligns_on_token_boundaries():
    # Token ids whose 8-byte encodings share bytes across a token boundary must not match.
    prompt = [256, 1, 2]
    loc = locate_chunks(ChunkMarkup(texts=("x",)), prompt, lambda _: [1, 2], strict=False)
    assert [(s.start, s.end) for s in loc.spans] == [(1, 3)]
    loc = locate_chunks(ChunkMarkup(texts=("x",)), [1 << 8, 0], lambda _: [1], strict=False)
    assert loc.spans == () and len(loc.missing) == 1


def test_locate_spans_and_token_limits():
    loc = locate_chunks(ChunkMarkup(spans=((0, 2), (4, 9))), list(range(6)), strict=False)
    assert [(s.start, s.end) for s in loc.spans] == [(0, 2)]
    with pytest.raises(ChunkMarkupError,
                       match=r"kvplug_chunk_spans\[2:4\]: span \[4, 9\) ends past the prompt"):
        locate_chunks(ChunkMarkup(spans=((0, 2), (4, 9))), list(range(6)))
    limits = ChunkMarkupLimits(max_chunk_tokens=2)
    with pytest.raises(ChunkMarkupError, match="tokenizes to 3 tokens, more than 2"):
        locate_chunks(ChunkMarkup(texts=("a b c",)), [1, 2, 3], WordTokenizer(), limits=limits)
    with pytest.raises(TypeError, match="encode"):
        locate_chunks(ChunkMarkup(texts=("a",)), [1])


# ----------------------------------------------------------------------------- RoPE

def rope_reference(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, base: float,
                   neox: bool) -> torch.Tensor:
    """Independent spec: complex multiplication by e^{i p θ_j}, θ_j = base^(-2j/rotary_dim)."""
    x = x.double()
    half = rotary_dim // 2
    theta = base ** (-2.0 * torch.arange(half, dtype=torch.float64) / rotary_dim)
    phase = torch.polar(torch.ones(len(positions), half, dtype=torch.float64),
                        positions.double()[:, None] * theta[None])
    phase = phase.reshape(len(positions), *([1] * (x.dim() - 2)), half)
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if neox:
        z = torch.complex(rot[..., :half], rot[..., half:]) * phase
        out = torch.cat((z.real, z.imag), dim=-1)
    else:
        z = torch.complex(rot[..., 0::2], rot[..., 1::2]) * phase
        out = torch.stack((z.real, z.imag), dim=-1).flatten(-2)
    return torch.cat((out, rest), dim=-1)


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("head_size, rotary_dim", [(64, 64), (64, 32), (80, 20)])
def test_reposition_matches_recomputing_rope(neox, head_size, rotary_dim):
    torch.manual_seed(0)
    n, heads, base = 24, 3, 10000.0
    k_pre = torch.randn(n, heads, head_size, dtype=torch.float64)
    old = torch.arange(n) + 5            # chunk computed at positions 5..28
    new = torch.arange(n) + 1000         # reused at positions 1000..1023
    stored = rope_reference(k_pre, old, rotary_dim, base, neox)
    # apply_rope itself is the spec's rotation
    torch.testing.assert_close(apply_rope(k_pre, old, rotary_dim, base, neox), stored)
    moved = reposition_keys(stored, old, new, rotary_dim, base, neox)
    torch.testing.assert_close(moved, rope_reference(k_pre, new, rotary_dim, base, neox),
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(moved[..., rotary_dim:], k_pre[..., rotary_dim:], rtol=0, atol=0)
    # float32 at long-context positions, non-contiguous per-token positions, 2-D keys
    new_far = torch.randperm(100_000)[:n] + 20_000
    moved32 = reposition_keys(stored.float(), old, new_far, rotary_dim, base, neox)
    assert moved32.dtype == torch.float32
    torch.testing.assert_close(moved32.double(), rope_reference(k_pre, new_far, rotary_dim, base,
                                                                neox), rtol=0, atol=2e-5)
    flat = reposition_keys(stored[:, 0], old, new, rotary_dim, base, neox)
    torch.testing.assert_close(flat, moved[:, 0])
    # bf16 keys stay bf16 and close
    moved_bf16 = reposition_keys(stored.bfloat16(), old, new, rotary_dim, base, neox)
    assert moved_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(moved_bf16.double(), moved, rtol=0.02, atol=0.05)


def test_reposition_roundtrip_and_scalar_positions():
    torch.manual_seed(1)
    k = torch.randn(6, 2, 32, dtype=torch.float64)
    there = reposition_keys(k, 0, 777, 32, 500000.0, True)
    torch.testing.assert_close(reposition_keys(there, 777, 0, 32, 500000.0, True), k)
    same = reposition_keys(k, torch.arange(6), torch.arange(6), 32, 10000.0, False)
    torch.testing.assert_close(same, k, rtol=0, atol=0)


def test_reposition_in_hadamard_space():
    torch.manual_seed(2)
    k_pre = torch.randn(8, 2, 64, dtype=torch.float64)
    old, new = torch.arange(8), torch.arange(8) + 300
    stored = block_hadamard(rope_reference(k_pre, old, 64, 10000.0, True), 32)
    moved = reposition_rotated_keys(stored, old, new, 64, 10000.0, True, hadamard_block=32)
    expected = block_hadamard(rope_reference(k_pre, new, 64, 10000.0, True), 32)
    torch.testing.assert_close(moved, expected, rtol=0, atol=1e-5)
    # R(Δ) does not commute with the Hadamard blocks: rotating in place would be wrong.
    wrong = reposition_keys(stored, old, new, 64, 10000.0, True)
    assert (wrong - expected).abs().max() > 0.1


def test_unsupported_rope_is_refused_by_name():
    k = torch.randn(2, 1, 8)
    for rope_type in ("llama3", "yarn", "linear", "dynamic", "mrope"):
        with pytest.raises(NotImplementedError, match=f"rope_type '{rope_type}'"):
            reposition_keys(k, 0, 1, 8, 10000.0, True, rope_type=rope_type)
    with pytest.raises(NotImplementedError, match="llama3"):
        rope_params_from_config({"rope_type": "llama3", "factor": 8.0}, 128)
    p = rope_params_from_config({"rope_theta": 100000.0, "partial_rotary_factor": 0.5}, 64)
    assert (p.rotary_dim, p.base, p.is_neox_style) == (32, 100000.0, True)
    assert rope_params_from_config(None, 64, is_neox_style=False).rotary_dim == 64
    with pytest.raises(ValueError, match="rotary_dim"):
        reposition_keys(k, 0, 1, 10, 10000.0, True)
    with pytest.raises(ValueError, match="positions"):
        reposition_keys(k, torch.arange(3), 1, 8, 10000.0, True)
    with pytest.raises(TypeError, match="integers"):
        reposition_keys(k, torch.zeros(2), 1, 8, 10000.0, True)


# ----------------------------------------------------------------------------- selection

def _with_deviation(dev: list[float], heads: int = 2, dim: int = 4):
    """Reused/fresh keys whose per-token deviation is exactly `dev`."""
    fresh = torch.randn(len(dev), heads, dim, generator=torch.Generator().manual_seed(0))
    direction = torch.zeros(heads, dim)
    direction[1, 2] = 1.0
    reused = fresh + torch.tensor(dev)[:, None, None] * direction
    return reused, fresh


def test_selection_follows_deviation_order():
    dev = [0.1, 5.0, 0.3, 9.0, 0.0, 2.0, 7.0, 0.2, 0.4, 1.0]
    reused, fresh = _with_deviation(dev)
    torch.testing.assert_close(token_deviation(reused, fresh), torch.tensor(dev), atol=1e-5,
                               rtol=1e-5)
    assert select_recompute_tokens(reused, fresh, 0.3).tolist() == [1, 3, 6]
    assert select_recompute_tokens(reused, fresh, 0.25).tolist() == [1, 3, 6]  # ceil(2.5)
    assert select_recompute_tokens(reused, fresh, 0.1).tolist() == [3]
    assert select_recompute_tokens(reused, fresh, 0.0).tolist() == []
    assert select_recompute_tokens(reused, fresh, 1.0).tolist() == list(range(10))
    sel = select_recompute_tokens(reused, fresh, 0.5)
    assert sel.dtype == torch.int64 and sel.tolist() == [1, 3, 5, 6, 9]


def test_selection_ratio_count_is_ceil_without_float_noise():
    for n in (1, 7, 20, 100, 333):
        reused, fresh = _with_deviation([float(i % 13) for i in range(n)])
        for ratio in (0.01, 0.07, 0.14, 0.15, 0.5, 0.7, 0.99):
            assert len(select_recompute_tokens(reused, fresh, ratio)) == math.ceil(
                round(ratio * n, 9))
    reused, fresh = _with_deviation([1.0] * 100)
    assert len(select_recompute_tokens(reused, fresh, 0.07)) == 7  # 0.07*100 = 7.000000000000001
    with pytest.raises(ValueError, match="ratio"):
        select_recompute_tokens(reused, fresh, 1.2)


def test_selection_always_includes_protected_tokens():
    dev = [0.1, 5.0, 0.3, 9.0, 0.0, 2.0, 7.0, 0.2, 0.4, 1.0]
    reused, fresh = _with_deviation(dev)
    protected = chunk_start_mask([(0, 4), (4, 10)], 10)
    assert protected.nonzero().squeeze(1).tolist() == [0, 4]
    # budget 3: both chunk starts + the most deviating token
    assert select_recompute_tokens(reused, fresh, 0.3, protected).tolist() == [0, 3, 4]
    # budget 1 < 2 protected: exactly the protected ones
    assert select_recompute_tokens(reused, fresh, 0.1, protected).tolist() == [0, 4]
    assert select_recompute_tokens(reused, fresh, 0.0, protected).tolist() == [0, 4]
    assert select_recompute_tokens(reused, fresh, 1.0, protected).tolist() == list(range(10))
    assert chunk_start_mask([(2, 5)], 6, first_tokens=2).tolist() == [False, False, True, True,
                                                                       False, False]
    with pytest.raises(ValueError, match="protected_mask"):
        select_recompute_tokens(reused, fresh, 0.3, torch.ones(10))
    with pytest.raises(ValueError, match="outside"):
        chunk_start_mask([(3, 11)], 10)


def test_deviation_over_several_layers_and_ties():
    a0, f0 = _with_deviation([3.0, 0.0, 0.0, 1.0])
    a1, f1 = _with_deviation([0.0, 4.0, 0.0, 1.0])
    dev = token_deviation([a0, a1], [f0, f1])
    torch.testing.assert_close(dev, torch.tensor([3.0, 4.0, 0.0, math.sqrt(2)]), atol=1e-5,
                               rtol=1e-5)
    assert select_recompute_tokens([a0, a1], [f0, f1], 0.5).tolist() == [0, 1]
    tie_r, tie_f = _with_deviation([1.0, 1.0, 1.0, 1.0])
    assert select_recompute_tokens(tie_r, tie_f, 0.5).tolist() == [0, 1]  # lower index on ties
    with pytest.raises(ValueError, match="same"):
        token_deviation([a0], [f0, f1])


def _causal_attention(q, k, v):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("shd,thd->hst", q, k) / q.shape[-1] ** 0.5
    mask = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).tril()
    return torch.einsum("hst,thd->shd", scores.masked_fill(~mask, float("-inf")).softmax(-1), v)


def test_blended_layer_reference():
    torch.manual_seed(3)
    n, hq, hkv, d = 12, 4, 2, 16
    q = torch.randn(n, hq, d)
    k_fresh, v_fresh = torch.randn(n, hkv, d), torch.randn(n, hkv, d)
    k_reused = k_fresh + 0.5 * torch.randn(n, hkv, d)
    v_reused = v_fresh + 0.5 * torch.randn(n, hkv, d)
    full = _causal_attention(q, k_fresh, v_fresh)
    # Recomputing every token is a full prefill.
    everything = torch.arange(n)
    out, k, v = blend_attention_reference(q, k_reused, v_reused, k_fresh, v_fresh, everything)
    torch.testing.assert_close(out, full)
    torch.testing.assert_close(k, k_fresh)
    torch.testing.assert_close(v, v_fresh)
    # A subset: rows replaced exactly, others reused; queries see the merged cache causally.
    idx = select_recompute_tokens(k_reused, k_fresh, 0.25)
    out, k, v = blend_attention_reference(q[idx], k_reused, v_reused, k_fresh[idx], v_fresh[idx],
                                          idx)
    keep = torch.ones(n, dtype=torch.bool)
    keep[idx] = False
    assert torch.equal(k[idx], k_fresh[idx]) and torch.equal(k[keep], k_reused[keep])
    assert torch.equal(v[idx], v_fresh[idx]) and torch.equal(v[keep], v_reused[keep])
    torch.testing.assert_close(out, _causal_attention(q, k, v)[idx])
    # Unchanged inputs: merge_kv does not touch the reused tensors.
    k2, _ = merge_kv(k_reused, v_reused, k_fresh[:1], v_fresh[:1], torch.tensor([0]))
    assert not torch.equal(k2, k_reused) and not torch.equal(k_reused[0], k_fresh[0])
    with pytest.raises(ValueError, match="indices"):
        merge_kv(k_reused, v_reused, k_fresh[:2], v_fresh[:2], torch.tensor([0]))
