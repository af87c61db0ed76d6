"""Per-head eviction policies (vllm_kvplug.eviction) and the ablation's attention function."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_kvplug.eviction import (
    AdaKV,
    PyramidKV,
    SnapKV,
    StreamingLLM,
    full_kv_pages,
    keep_mask,
    kv_pages,
    policy_from_section,
    score_snapkv,
)
from vllm_kvplug.profiles.schema import EvictionSection

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import eviction_ablation as ablation  # noqa: E402

POLICY_CLASSES = [StreamingLLM, SnapKV, PyramidKV, AdaKV]
L, H, S = 6, 3, 200


def random_scores(seed=0, layers=L, heads=H, prompt_len=S):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(heads, prompt_len, generator=g) for _ in range(layers)]


def make(cls, **kw):
    kw = {"budget_fraction": 0.25, "min_tokens": 16, "window_tokens": 8,
          "sink_tokens": 4} | kw
    return cls(**kw)


# -- budgets and mandatory tokens ------------------------------------------------------

@pytest.mark.parametrize("fraction, tokens, min_tokens, prompt, expected", [
    (0.25, None, 16, 200, 50),
    (0.25, 30, 16, 200, 30),        # the smaller of the two wins
    (None, 500, 16, 200, 200),      # never more than the prompt
    (0.01, None, 16, 200, 16),      # floor min_tokens
    (0.01, None, 0, 200, 12),       # floor: sinks (4) + window (8)
    (0.5, None, 64, 10, 10),        # short prompt: everything
])
def test_head_budget(fraction, tokens, min_tokens, prompt, expected):
    p = SnapKV(budget_fraction=fraction, budget_tokens=tokens, min_tokens=min_tokens,
               window_tokens=8, sink_tokens=4)
    assert p.head_budget(prompt) == expected


@pytest.mark.parametrize("cls", POLICY_CLASSES)
@pytest.mark.parametrize("fraction", [0.07, 0.25, 0.6, 1.0])
def test_sinks_and_window_always_kept_and_budgets_exact(cls, fraction):
    policy = make(cls, budget_fraction=fraction, min_tokens=0)
    # Scores that make the sinks and the window the *least* important tokens.
    scores = random_scores(1)
    for s in scores:
        s[:, :4] = -1.0
        s[:, -8:] = -1.0
    budgets, kept = policy.plan(S, L, H, scores)
    assert budgets.shape == (L, H) and budgets.dtype == torch.long
    mandatory = set(range(4)) | set(range(S - 8, S))
    for layer in range(L):
        assert len(kept[layer]) == H
        for head, positions in enumerate(kept[layer]):
            assert len(positions) == budgets[layer, head]            # exact budget
            assert positions.tolist() == sorted(set(positions.tolist()))  # sorted, unique
            assert mandatory <= set(positions.tolist())
            assert 0 <= int(positions.min()) and int(positions.max()) < S
    # Every policy keeps the same total as the uniform budget (Ada-KV and PyramidKV only
    # move tokens between heads / layers).
    assert int(budgets.sum()) == L * H * policy.head_budget(S)


def test_streamingllm_keeps_sinks_and_most_recent():
    p = make(StreamingLLM, budget_tokens=20, budget_fraction=None)
    budgets, kept = p.plan(S, L, H)  # no scores needed
    assert kept[0][0].tolist() == [0, 1, 2, 3] + list(range(S - 16, S))
    assert all(torch.equal(k, kept[0][0]) for layer in kept for k in layer)
    assert p.select(0, torch.zeros(H, S), budgets[0])[1].tolist() == kept[0][1].tolist()


def test_snapkv_keeps_top_scores_uniform_budget():
    p = make(SnapKV, budget_tokens=20, budget_fraction=None)
    scores = random_scores(2)
    budgets, kept = p.plan(S, L, H, scores)
    assert (budgets == 20).all()
    for head in range(H):
        s = scores[0][head].clone()
        s[:4] = s[-8:] = float("inf")
        expected = sorted(torch.topk(s, 20).indices.tolist())
        assert kept[0][head].tolist() == expected


def test_snapkv_keeps_planted_high_attention_token():
    torch.manual_seed(0)
    hq, h, w, d, s = 6, 2, 8, 32, 120
    keys = torch.randn(h, s, d) * 0.3
    queries = torch.randn(hq, w, d) * 0.3
    needle = 40
    # Key 40 of KV head 1 aligned with the window queries of its group (query heads 3-5).
    direction = torch.randn(d)
    keys[1, needle] = direction * 3
    queries[3:] += direction * 0.5
    scores = score_snapkv(queries, keys, pool_kernel=5)
    p = SnapKV(budget_tokens=16, min_tokens=0, window_tokens=w, sink_tokens=2)
    kept = p.select(0, scores, torch.tensor([16, 16]))
    assert needle in kept[1].tolist()
    # Pooling keeps its neighbours too (SnapKV's clustering)
    assert {needle - 1, needle + 1} <= set(kept[1].tolist())
    assert int(score_snapkv(queries, keys, pool_kernel=1)[1].argmax()) == needle


def test_score_snapkv_matches_explicit_attention():
    torch.manual_seed(1)
    hq, h, w, d, s = 4, 2, 5, 16, 30
    q, k = torch.randn(hq, w, d), torch.randn(h, s, d)
    scores = score_snapkv(q, k, pool_kernel=1)
    expected = torch.zeros(h, s)
    for j in range(hq):
        for i in range(w):
            pos = s - w + i  # causal: window query i sees keys 0..pos
            logits = k[j // (hq // h), :pos + 1] @ q[j, i] / math.sqrt(d)
            expected[j // (hq // h), :pos + 1] += torch.softmax(logits, 0)
    torch.testing.assert_close(scores, expected)
    # each window query head distributes one unit of attention
    torch.testing.assert_close(scores.sum(), torch.tensor(float(hq * w)))
    pooled = score_snapkv(q, k, pool_kernel=3, pooling="max")
    assert pooled.shape == (h, s) and bool((pooled >= scores - 1e-6).all())


def test_adakv_gives_more_tokens_to_concentrated_heads():
    # Head 0 puts all its attention on a few tokens, head 1 spreads it evenly: head 1's
    # many medium scores beat head 0's near-zero tail, so head 1 gets the larger budget.
    s0 = torch.full((S,), 1e-4)
    s0[50:60] = 10.0
    s1 = torch.full((S,), 0.5)
    scores = [torch.stack([s0, s1, torch.rand(S) * 0.1])]
    p = make(AdaKV, budget_tokens=40, budget_fraction=None, min_tokens=16)
    budgets, kept = p.plan(S, 1, 3, scores)
    assert int(budgets.sum()) == 3 * 40
    assert budgets[0, 1] > 40 > budgets[0, 0] >= 16  # floor min_tokens
    assert budgets.min() >= 16
    assert set(range(50, 60)) <= set(kept[0][0].tolist())


def test_adakv_selection_is_the_flattened_top_k():
    # No floor beyond the 12 mandatory tokens: the non-mandatory tokens kept by all heads
    # together are the top H * (B - 12) of the layer's flattened scores.
    scores = random_scores(7, layers=1)
    p = make(AdaKV, budget_tokens=40, budget_fraction=None, min_tokens=0)
    budgets, kept = p.plan(S, 1, H, scores)
    middle = scores[0][:, 4:-8]  # the non-mandatory positions 4 .. S-9
    top = torch.topk(middle.flatten(), H * (40 - 12)).indices
    expected = {(int(i) // (S - 12), int(i) % (S - 12) + 4) for i in top}
    selected = {(h, int(i)) for h in range(H) for i in kept[0][h] if 4 <= int(i) < S - 8}
    assert selected == expected
    assert budgets[0].tolist() != [40] * H  # random scores do not split evenly


def test_adakv_floor_is_respected():
    scores = [torch.stack([torch.full((S,), 1e-6), torch.rand(S) + 1, torch.rand(S) + 1])]
    p = make(AdaKV, budget_tokens=60, budget_fraction=None, min_tokens=25)
    budgets, _ = p.plan(S, 1, 3, scores)
    assert budgets.tolist()[0][0] == 25 and int(budgets.sum()) == 180


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 0.9])
def test_pyramidkv_budgets_decrease_with_layer_and_sum_to_uniform(fraction):
    layers = 30
    p = make(PyramidKV, budget_fraction=fraction, min_tokens=0)
    budgets = p.budgets(S, layers, H, random_scores(3, layers=layers))
    per_layer = budgets[:, 0]
    assert (budgets == per_layer[:, None]).all()        # same for every head of a layer
    assert (per_layer[1:] <= per_layer[:-1]).all()      # non-increasing with depth
    assert per_layer[0] > per_layer[-1]
    assert int(budgets.sum()) == layers * H * p.head_budget(S)
    assert per_layer.max() <= S and per_layer.min() >= 12  # mandatory: 4 sinks + 8 window


def test_pyramidkv_schedule_shape():
    p = PyramidKV(budget_tokens=112, min_tokens=0, window_tokens=8, sink_tokens=4)
    per_layer = p.layer_budgets(1000, 5)
    # 100 free tokens (112 - 12 mandatory) per layer on average: the last layer gets
    # 100 / 20 = 5, the first 2 * 100 - 5 = 195; linear: 195, 147.5, 100, 52.5, 5; the
    # half token goes to the earlier layer.
    free = 100
    assert per_layer.tolist() == [12 + 195, 12 + 148, 12 + 100, 12 + 52, 12 + 5]
    assert int(per_layer.sum()) == 5 * (12 + free)
    # a cap at the prompt length moves the excess to the other layers
    capped = p.layer_budgets(150, 5)
    assert capped.tolist()[0] == 150 and int(capped.sum()) == 5 * 112
    assert (capped[1:] <= capped[:-1]).all()
    # no free budget (budget = the mandatory tokens): uniform
    assert PyramidKV(budget_tokens=12, min_tokens=0, window_tokens=8,
                     sink_tokens=4).layer_budgets(1000, 5).tolist() == [12] * 5


def test_policy_from_section():
    assert policy_from_section(EvictionSection()) is None
    for name, cls in [("snapkv", SnapKV), ("pyramidkv", PyramidKV), ("adakv", AdaKV),
                      ("streamingllm", StreamingLLM)]:
        section = EvictionSection(policy=name, budget_fraction=0.2, budget_tokens=512,
                                  min_tokens=8, window_tokens=16, sink_tokens=2)
        p = policy_from_section(section)
        assert type(p) is cls and p.name == name
        assert (p.budget_fraction, p.budget_tokens, p.min_tokens, p.window_tokens,
                p.sink_tokens) == (0.2, 512, 8, 16, 2)


def test_keep_mask():
    mask = keep_mask([torch.tensor([0, 3]), torch.tensor([1])], 5)
    assert mask.tolist() == [[True, False, False, True, False],
                             [False, True, False, False, False]]


# -- errors ----------------------------------------------------------------------------

def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="budget"):
        SnapKV()
    with pytest.raises(ValueError, match="budget_fraction"):
        SnapKV(budget_fraction=1.5)
    with pytest.raises(ValueError, match="budget_tokens"):
        SnapKV(budget_tokens=0)
    with pytest.raises(ValueError, match="beta"):
        PyramidKV(budget_fraction=0.5, beta=0.5)
    p = make(SnapKV)
    with pytest.raises(ValueError, match="prompt length"):
        p.head_budget(0)
    with pytest.raises(ValueError, match="needs scores"):
        p.budgets(S, L, H)
    with pytest.raises(ValueError, match="needs scores"):
        make(AdaKV).budgets(S, L, H, None)
    with pytest.raises(ValueError, match="scores for 2 layers"):
        p.budgets(S, L, H, random_scores(layers=2))
    with pytest.raises(ValueError, match="scores shape"):
        p.budgets(S, L, H, random_scores(prompt_len=S - 1))
    scores = random_scores()[0]
    with pytest.raises(ValueError, match="outside"):  # below the 12 mandatory tokens
        p.select(0, scores, torch.tensor([11, 20, 20]))
    with pytest.raises(ValueError, match="outside"):
        p.select(0, scores, torch.tensor([20, 20, S + 1]))
    with pytest.raises(ValueError, match="budgets shape"):
        p.select(0, scores, torch.tensor([20, 20]))
    bad = scores.clone()
    bad[0, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        p.select(0, bad, torch.tensor([20, 20, 20]))
    with pytest.raises(ValueError, match="group"):
        score_snapkv(torch.randn(5, 4, 8), torch.randn(2, 10, 8))
    with pytest.raises(ValueError, match="window"):
        score_snapkv(torch.randn(4, 12, 8), torch.randn(2, 10, 8))
    with pytest.raises(ValueError, match="odd"):
        score_snapkv(torch.randn(4, 4, 8), torch.randn(2, 10, 8), pool_kernel=4)
    with pytest.raises(ValueError, match="head size"):
        score_snapkv(torch.randn(4, 4, 8), torch.randn(2, 10, 16))


# -- page counting ---------------------------------------------------------------------

def test_kv_pages_layouts():
    kept = torch.tensor([[40, 8, 8],     # layer 0: 56 tokens
                         [16, 16, 16]])  # layer 1: 48 tokens
    assert kv_pages(kept, 16, "padded") == 3      # ceil(40 / 16)
    assert kv_pages(kept, 16, "packed") == 2      # max(ceil(56 / 48), ceil(48 / 48))
    assert kv_pages(kept, 16, "ideal") == 1.5     # mean(2, 1)
    assert full_kv_pages(100, 16) == 7
    uniform = torch.full((4, 3), 33)
    assert kv_pages(uniform, 16, "padded") == kv_pages(uniform, 16, "packed") == 3
    with pytest.raises(ValueError, match="layout"):
        kv_pages(kept, 16, "diagonal")
    with pytest.raises(ValueError, match="block_size"):
        kv_pages(kept, 0)
    with pytest.raises(ValueError, match=">= 0"):
        kv_pages(-kept, 16)


def test_packed_never_needs_more_pages_than_padded():
    g = torch.Generator().manual_seed(4)
    for _ in range(50):
        kept = torch.randint(0, 300, (5, 4), generator=g)
        assert kv_pages(kept, 16, "ideal") <= kv_pages(kept, 16, "packed") \
            <= kv_pages(kept, 16, "padded")


# -- the ablation's attention function -------------------------------------------------

class _FakeAttention:
    def __init__(self, layer_idx):
        self.layer_idx = layer_idx


def _evicting_attention(k_prompt, v_prompt, keep, query, k_new, v_new):
    """`evicting_attention` of layer 0 with this prompt K/V and keep mask (state reset)."""
    ablation.STATE.prompt_kv = {0: (k_prompt, v_prompt)}
    ablation.STATE.keep, ablation.STATE.new_kv = [keep], {}
    try:
        out, _ = ablation.evicting_attention(_FakeAttention(0), query, k_new, v_new, None,
                                             scaling=query.shape[-1] ** -0.5)
    finally:
        ablation.STATE.keep, ablation.STATE.new_kv, ablation.STATE.prompt_kv = None, {}, {}
    return out


def test_attention_sees_exactly_the_kept_tokens_per_head():
    """`_attend_kept` (shared prompt K/V, per-row per-head masks) == explicit masked
    attention over [prompt, new tokens] with the reference `visibility_mask`."""
    torch.manual_seed(5)
    rows, hq, hkv, d, s, q_len = 3, 6, 2, 8, 10, 3
    k_prompt, v_prompt = torch.randn(1, hkv, s, d), torch.randn(1, hkv, s, d)
    keep = torch.rand(rows, hkv, s) > 0.5
    keep[..., 0] = True
    query = torch.randn(rows, hq, q_len, d)
    k_new, v_new = torch.randn(rows, hkv, q_len, d), torch.randn(rows, hkv, q_len, d)
    out = _evicting_attention(k_prompt, v_prompt, keep, query, k_new, v_new)
    k_all = torch.cat([k_prompt.expand(rows, -1, -1, -1), k_new], 2)
    v_all = torch.cat([v_prompt.expand(rows, -1, -1, -1), v_new], 2)
    mask = ablation.visibility_mask(keep, q_len, s + q_len, hq // hkv)
    assert mask.shape == (rows, hq, q_len, s + q_len)
    assert mask[1, 4, 0, :s].tolist() == keep[1, 1].tolist()   # query head 4 -> KV head 1
    assert mask[0, 0, 0, s:].tolist() == [True, False, False]  # causal among new tokens
    k_rep = k_all.repeat_interleave(hq // hkv, 1)
    v_rep = v_all.repeat_interleave(hq // hkv, 1)
    logits = (query @ k_rep.transpose(-1, -2)) * d ** -0.5
    expected = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1) @ v_rep
    torch.testing.assert_close(out, expected.transpose(1, 2))
    # an evicted token has exactly no influence: change its value, same output
    v_prompt2 = v_prompt.clone()
    dropped = (~keep[2, 0]).nonzero()[0, 0]
    v_prompt2[0, 0, dropped] += 100.0
    out2 = _evicting_attention(k_prompt, v_prompt2, keep, query, k_new, v_new)
    assert torch.equal(out2[2, :, :3], out[2, :, :3])  # row 2, query heads 0-2 (KV head 0)


def _tiny_model():
    from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM

    AttentionInterface.register(ablation.ATTENTION_NAME, ablation.evicting_attention)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128)
    config._attn_implementation = ablation.ATTENTION_NAME
    torch.manual_seed(6)
    return LlamaForCausalLM(config).eval()


def test_evicted_generation_equals_a_physically_compacted_cache():
    """Masking the evicted tokens (same set for every head) gives the logits of a model
    whose cache physically holds only the kept tokens, at their original positions."""
    from transformers import DynamicCache

    model = _tiny_model()
    prompt = torch.randint(0, 97, (20,)).tolist()
    cont = torch.randint(0, 97, (6,)).tolist()
    kept = torch.tensor([0, 1, 5, 6, 7, 12, 15, 17, 18, 19])
    logits, captured = ablation.prefill(model, prompt, window=4)
    assert set(captured) == {0, 1} and captured[0].shape == (4, 4, 8)
    prompt_kv = dict(ablation.STATE.prompt_kv)
    mask = torch.zeros(1, 2, 20, dtype=torch.bool)
    mask[..., kept] = True
    full = torch.ones(1, 2, 20, dtype=torch.bool)
    keep = [torch.cat([full, mask]) for _ in range(2)]  # row 0 full cache, row 1 evicted
    nll = ablation.continuation_nll(model, 20, keep, cont)

    with torch.inference_mode():
        plain = model(torch.tensor([prompt + cont]), use_cache=False).logits[0].float()
        cache = DynamicCache()
        for layer, (k, v) in prompt_kv.items():
            cache.update(k[:, :, kept], v[:, :, kept], layer)
        model.set_attn_implementation("eager")  # transformers' own attention
        try:
            compact = model(torch.tensor([cont[:-1]]), past_key_values=cache,
                            position_ids=torch.arange(20, 25)[None]).logits[0].float()
        finally:
            model.set_attn_implementation(ablation.ATTENTION_NAME)

    def summed_nll(lg):
        return float(-torch.log_softmax(lg, -1).gather(1, torch.tensor(cont[1:])[:, None]).sum())

    assert nll[0] == pytest.approx(summed_nll(plain[20:-1]), abs=1e-4)
    assert nll[1] == pytest.approx(summed_nll(compact), abs=1e-4)
    assert abs(nll[0] - nll[1]) > 1e-3  # eviction did change something
    torch.testing.assert_close(logits, plain[19], rtol=1e-5, atol=1e-5)
    # generation: the full-cache row decodes like plain greedy decoding
    tokens = ablation.generate(model, 20, logits, [torch.cat([full, mask])] * 2, 4)
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(4):
            ids.append(int(model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    assert tokens[0] == ids[20:]


# -- the ablation end to end -----------------------------------------------------------

@pytest.mark.e2e
def test_ablation_smoke(tmp_path):
    from vllm_kvplug.models import ensure_smollm2

    ensure_smollm2()
    proc = subprocess.run([sys.executable, "bench/eviction_ablation.py", "--smoke",
                           "--threads", "1", "--out-dir", str(tmp_path), "--tag", "ev"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "ev.json").read_text())
    labels = [c["label"] for c in report["configs"]]
    assert labels[0] == "full" and len(labels) == 1 + 4 * 3
    assert report["consistency_check"]["abs_diff"] < 1e-2
    for label in labels:
        r = report["results"][label]
        assert set(r) >= {"section", "kept", "passkey", "perplexity"}
        assert len(r["passkey"]["trials"]) == 1 and r["passkey"]["trials"][0]["length"] == 256
        assert math.isfinite(r["perplexity"]["ppl"]) and r["perplexity"]["tokens"] == 32
        kept = r["kept"]
        assert 0 < kept["kept_fraction"] <= 1
        assert kept["pages_ideal"] <= kept["pages_packed"] <= kept["pages_padded"] <= 1
    assert report["results"]["full"]["kept"]["kept_fraction"] == 1.0
    assert report["results"]["full"]["perplexity"]["ppl_ratio"] == 1.0
    assert report["results"]["snapkv@0.5"]["kept"]["kept_fraction"] == pytest.approx(0.5)
    assert "| snapkv@0.5 |" in (tmp_path / "ev.md").read_text()


@pytest.mark.parametrize("name", ["streamingllm", "snapkv", "pyramidkv", "adakv"])
@pytest.mark.parametrize("prompt_len", [37, 300])
def test_keep_masks_of_several_layers_equal_the_per_layer_selection(name, prompt_len):
    """The serving path selects all layers at once (`keep_masks`); it must keep exactly
    the tokens of `plan_layer` (the policy's `budgets` then `select`) in every layer."""
    from vllm_kvplug.eviction import POLICIES
    from vllm_kvplug.eviction.packed import plan_layer

    policy = POLICIES[name](budget_fraction=0.3, min_tokens=6, window_tokens=8,
                            sink_tokens=4)
    num_layers, heads = 6, 4
    torch.manual_seed(prompt_len)
    sharp = 1.0 + 5.0 * torch.arange(heads, dtype=torch.float32)[:, None]
    scores = torch.rand(num_layers, heads, prompt_len) ** sharp  # uneven Ada-KV budgets
    scores[:, :, 10] = scores[:, :, 11]  # a tie: the earlier position wins
    layers = [1, 2, 5]  # any subset, in any group
    masks = policy.keep_masks(prompt_len, num_layers, layers, heads,
                              scores[layers] if policy.uses_scores else None)
    assert masks.shape == (len(layers), heads, prompt_len) and masks.dtype == torch.bool
    uneven = False
    for i, layer in enumerate(layers):
        budgets, kept = plan_layer(policy, layer, num_layers, prompt_len, scores[layer])
        uneven |= len(set(budgets.tolist())) > 1
        for h in range(heads):
            assert masks[i, h].nonzero().flatten().tolist() == kept[h].tolist()
    if name == "adakv" and prompt_len == 300:
        assert uneven
