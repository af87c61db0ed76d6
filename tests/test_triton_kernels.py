"""The Triton kernels (`vllm_kvplug.triton_kernels`) against the PyTorch reference.

Without a GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set before
the kernels are imported; if another test module imported them earlier without it, they
are reloaded) on small shapes. With a GPU the same tests compile and run the real kernels.
"""

import os

import torch

_SET_INTERPRET = not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ
if _SET_INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from vllm_kvplug.quant.paged import PagedLayout, attention_reference, write_reference  # noqa: E402,E501
from vllm_kvplug.quant.recipe import KVRecipe, QuantRecipe  # noqa: E402
from vllm_kvplug.quant.reference import unpack  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _load_kernels():
    """Import vllm_kvplug.triton_kernels; interpreted when there is no GPU."""
    import vllm_kvplug.triton_kernels as tk

    mods = [sys.modules[f"vllm_kvplug.triton_kernels.{m}"]
            for m in ("kv_write", "paged_attention")]
    if DEVICE == "cpu" and type(mods[0]._write_kv_kernel).__name__ != "InterpretedFunction":
        import triton
        triton.knobs.runtime.interpret = True  # imported before the flag: decorate again
        for mod in mods + [tk]:
            importlib.reload(mod)
    return tk


tk = _load_kernels()
if _SET_INTERPRET:  # keep the flag in-process (a knob), out of later tests' subprocesses
    import triton  # noqa: E402

    triton.knobs.runtime.interpret = True
    del os.environ["TRITON_INTERPRET"]


def layout_of(kbits, vbits, group, hb, heads, head_size, bs):
    return PagedLayout(KVRecipe(QuantRecipe(kbits, group, hb), QuantRecipe(vbits, group, hb)),
                       heads, head_size, bs)


def test_kernels_run_interpreted_without_gpu():
    kernel = sys.modules["vllm_kvplug.triton_kernels.paged_attention"]._attention_kernel
    name = type(kernel).__name__
    assert (name == "InterpretedFunction") == (DEVICE == "cpu")


def test_blockdiag_hadamard_is_orthonormal_and_block_diagonal():
    h = tk.blockdiag_hadamard(64, 16, DEVICE).cpu()
    assert h.dtype == torch.float32 and h.shape == (64, 64)
    torch.testing.assert_close(h @ h, torch.eye(64), atol=1e-6, rtol=0)
    assert h[:16, 16:].abs().sum() == 0
    assert tk.blockdiag_hadamard(64, 16, DEVICE) is tk.blockdiag_hadamard(64, 16, DEVICE)
    torch.testing.assert_close(tk.blockdiag_hadamard(32, None, DEVICE).cpu(), torch.eye(32))


# ---------------------------------------------------------------------------- write_kv

@pytest.mark.parametrize("kbits,vbits,group,hb,head_size,bs,dtype", [
    (4, 4, 32, 32, 64, 16, torch.float32),
    (8, 4, 64, 64, 64, 32, torch.bfloat16),
    (2, 2, 32, None, 64, 16, torch.float16),
    (4, 2, 128, 16, 128, 16, torch.bfloat16),
])
def test_write_kv_matches_reference(kbits, vbits, group, hb, head_size, bs, dtype):
    torch.manual_seed(0)
    heads, num_blocks, t = 2, 5, 37
    layout = layout_of(kbits, vbits, group, hb, heads, head_size, bs)
    # key/value are strided views of a fused qkv tensor, like vLLM passes them
    qkv = (torch.randn(t, 4 * heads, head_size) * 2 + 0.3).to(dtype).to(DEVICE)
    key, value = qkv[:, 2 * heads:3 * heads], qkv[:, 3 * heads:]
    slots = torch.randperm((num_blocks - 1) * bs)[:t]  # block num_blocks-1 stays unused
    slots[[3, 17]] = -1  # padding
    init = torch.randint(0, 256, (num_blocks, layout.page_bytes), dtype=torch.uint8)
    init.view(torch.float16)[init.view(torch.float16).isnan()] = 0
    want = init.clone()
    write_reference(want, key.cpu(), value.cpu(), slots, layout)
    got = init.clone().to(DEVICE)
    tk.write_kv(got, key, value, slots.to(DEVICE), layout)
    got = got.cpu()

    assert torch.equal(got[-1], init[-1])  # an unused block is untouched
    for which, recipe in (("key", layout.recipe.key), ("value", layout.recipe.value)):
        (wc, ws, wm), (gc, gs, gm) = layout.views(want, which), layout.views(got, which)
        diff = unpack(gc, recipe.bits).int() - unpack(wc, recipe.bits).int()
        # ties of the rotation's summation order may move a code by one, rarely
        assert diff.abs().max() <= 1 and (diff != 0).float().mean() < 0.01, which
        if hb is None or dtype == torch.float32:
            assert torch.equal(gc, wc), which
        torch.testing.assert_close(gs.float(), ws.float(), rtol=2e-3, atol=1e-5)
        torch.testing.assert_close(gm.float(), wm.float(), rtol=2e-3, atol=1e-5)
    # slots that were not written (padding rows included) keep their old bytes
    written = torch.zeros(num_blocks * bs, dtype=torch.bool)
    written[slots[slots >= 0]] = True
    codes_init, codes_got = layout.views(init, "key")[0], layout.views(got, "key")[0]
    idle = ~written.view(num_blocks, bs)
    assert torch.equal(codes_got.permute(0, 2, 1, 3)[idle], codes_init.permute(0, 2, 1, 3)[idle])


@pytest.mark.parametrize("kbits,group,hb,dtype", [
    (4, 64, 64, torch.float32),
    (4, 32, 64, torch.bfloat16),
    (8, 64, None, torch.float16),
])
def test_write_kv_with_key_offset_matches_reference(kbits, group, hb, dtype):
    """A static K offset is subtracted before rotation, as write_reference does; V is not
    touched by it."""
    torch.manual_seed(1)
    heads, head_size, bs, t = 2, 64, 16, 29
    layout = layout_of(kbits, 4, group, hb, heads, head_size, bs)
    common = 8 * torch.randn(heads, head_size)  # a large per-(head, channel) component
    key = (common + torch.randn(t, heads, head_size)).to(dtype)
    value = torch.randn(t, heads, head_size).to(dtype)
    slots = torch.randperm(3 * bs)[:t]
    want = torch.zeros(3, layout.page_bytes, dtype=torch.uint8)
    write_reference(want, key, value, slots, layout, key_offset=common)
    plain = torch.zeros_like(want)
    write_reference(plain, key, value, slots, layout)
    got = torch.zeros_like(want).to(DEVICE)
    tk.write_kv(got, key.to(DEVICE), value.to(DEVICE), slots.to(DEVICE), layout,
                key_offset=common.to(DEVICE))
    got = got.cpu()
    (wc, ws, wm), (gc, gs, gm) = layout.views(want, "key"), layout.views(got, "key")
    diff = unpack(gc, kbits).int() - unpack(wc, kbits).int()
    assert diff.abs().max() <= 1 and (diff != 0).float().mean() < 0.01
    if hb is None or dtype == torch.float32:
        assert torch.equal(gc, wc)
    torch.testing.assert_close(gs.float(), ws.float(), rtol=2e-3, atol=1e-5)
    torch.testing.assert_close(gm.float(), wm.float(), rtol=2e-3, atol=1e-5)
    # the offset did change K's pages, and only K's
    assert not torch.equal(layout.views(plain, "key")[2], wm)
    for a, b in zip(layout.views(got, "value"), layout.views(plain, "value")):
        assert torch.equal(a, b)


def test_write_kv_refuses_a_wrong_key_offset():
    layout = layout_of(4, 4, 32, 32, 2, 64, 16)
    cache = torch.zeros(2, layout.page_bytes, dtype=torch.uint8, device=DEVICE)
    kv = torch.zeros(3, 2, 64, device=DEVICE)
    for bad in (torch.zeros(1, 64), torch.zeros(2, 64, dtype=torch.float16)):
        with pytest.raises(ValueError, match="key_offset must be"):
            tk.write_kv(cache, kv, kv, torch.arange(3, device=DEVICE), layout,
                        key_offset=bad.to(DEVICE))


def test_write_kv_detects_a_wrong_layout():
    layout = layout_of(4, 4, 32, 32, 2, 64, 16)
    with pytest.raises(ValueError, match="uint8 cache"):
        tk.write_kv(torch.zeros(2, layout.page_bytes + 2, dtype=torch.uint8, device=DEVICE),
                    torch.zeros(1, 2, 64), torch.zeros(1, 2, 64), torch.zeros(1), layout)


# ---------------------------------------------------------------------- paged_attention

def make_batch(layout, seq_lens, q_lens, num_q_heads, dtype=torch.float32, pad_rows=2,
               seed=0):
    """A cache filled by write_reference (random block placement), queries and metadata."""
    g = torch.Generator().manual_seed(seed)
    bs, heads, d = layout.block_size, layout.num_kv_heads, layout.head_size
    blocks_per_seq = [max(1, -(-n // bs)) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 2
    order = torch.randperm(num_blocks, generator=g)
    block_table = torch.zeros(len(seq_lens), max(blocks_per_seq) + 1, dtype=torch.int32)
    cache = torch.zeros(num_blocks, layout.page_bytes, dtype=torch.uint8)
    used = 0
    for i, n in enumerate(seq_lens):
        block_table[i, :blocks_per_seq[i]] = order[used:used + blocks_per_seq[i]]
        used += blocks_per_seq[i]
        pos = torch.arange(n)
        slots = block_table[i, pos // bs].long() * bs + pos % bs
        k = torch.randn(n, heads, d, generator=g) + torch.randn(1, heads, d, generator=g)
        v = torch.randn(n, heads, d, generator=g)
        write_reference(cache, k, v, slots, layout)
    qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(q_lens).cumsum(0)
    t = int(qsl[-1]) + pad_rows
    qkv = torch.randn(t, num_q_heads + 2 * heads, d, generator=g).to(dtype)
    query = qkv[:, :num_q_heads]  # non-contiguous rows, like vLLM's slice of qkv
    return dict(query=query, cache=cache, block_table=block_table,
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32), query_start_loc=qsl)


def run_kernel(batch, layout, **kw):
    dev = {k: v.to(DEVICE) for k, v in batch.items()}
    out = torch.full(batch["query"].shape, 7.0, dtype=batch["query"].dtype, device=DEVICE)
    q_lens = (batch["query_start_loc"][1:] - batch["query_start_loc"][:-1]).tolist()
    res = tk.paged_attention(dev["query"], dev["cache"], dev["block_table"], dev["seq_lens"],
                             dev["query_start_loc"], layout, layout.head_size ** -0.5, out,
                             max_query_len=max(q_lens),
                             max_seq_len=int(batch["seq_lens"].max()), **kw)
    assert res is out
    return out.cpu()


def reference(batch, layout):
    return attention_reference(batch["query"], batch["cache"], batch["block_table"],
                               batch["seq_lens"], batch["query_start_loc"], layout,
                               layout.head_size ** -0.5)


def check(batch, layout, out, tol=1e-2):
    n = int(batch["query_start_loc"][-1])
    ref = reference(batch, layout)
    err = (out[:n].float() - ref[:n].float()).abs().max().item()
    assert err < tol, f"max abs error {err}"
    assert (out[n:] == 7.0).all()  # padding rows untouched
    return ref


CASES = {
    # name: (kbits, vbits, group, hb, kv heads, q heads, D, block, seq_lens, q_lens, splits)
    "decode_k4v4_gqa4_bs16": (4, 4, 32, 32, 2, 8, 64, 16, [37, 5, 70], [1, 1, 1], None),
    "decode_split_k8v4_gqa1_bs32": (8, 4, 64, 64, 2, 2, 64, 32, [90, 33, 7], [1, 1, 1], 3),
    "chunked_prefill_k2v2_d128": (2, 2, 32, 64, 1, 4, 128, 16, [45], [20], None),
    "mixed_k4v4_norot_bs32": (4, 4, 32, None, 2, 2, 64, 32, [40, 9, 0, 66], [1, 9, 0, 17],
                              None),
    "mixed_k8v4_g128_gqa4": (8, 4, 128, 128, 1, 4, 128, 16, [30, 18], [1, 18], None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_paged_attention_matches_reference(name):
    kb, vb, g, hb, h, hq, d, bs, seq_lens, q_lens, splits = CASES[name]
    layout = layout_of(kb, vb, g, hb, h, d, bs)
    batch = make_batch(layout, seq_lens, q_lens, hq)
    check(batch, layout, run_kernel(batch, layout, num_splits=splits), tol=1e-2)


@pytest.mark.parametrize("variant", [
    {"after_dot": False},                       # steps on the elements (prefill's loop)
    {"after_dot": True},                        # steps after the dot (decode's loop)
    {"after_dot": True, "rotate_q_in_kernel": True, "qrot_f16": False},
    {"block_m": 128, "tile_n": 64, "warps": 8},   # prefill launch shapes of the sweep
])
@pytest.mark.parametrize("name", ["decode_split_k8v4_gqa1_bs32", "chunked_prefill_k2v2_d128",
                                  "mixed_k8v4_g128_gqa4"])
def test_inner_loop_variants_match_reference(name, variant, monkeypatch):
    """Every inner-loop variant the launcher can pick (steps applied after the dot or on the
    elements, Q rotated in the prologue or before the launch, launch shapes) computes the
    same attention."""
    monkeypatch.setattr(sys.modules["vllm_kvplug.triton_kernels.paged_attention"], "_TUNING",
                        dict(variant))
    kb, vb, g, hb, h, hq, d, bs, seq_lens, q_lens, splits = CASES[name]
    layout = layout_of(kb, vb, g, hb, h, d, bs)
    batch = make_batch(layout, seq_lens, q_lens, hq)
    check(batch, layout, run_kernel(batch, layout, num_splits=splits), tol=1e-2)


def test_split_k_with_a_reused_workspace_and_bf16():
    layout = layout_of(4, 4, 32, 32, 2, 64, 16)
    ws = tk.AttentionWorkspace(12, 8, 64, DEVICE)  # 3 tokens x 4 splits
    for seed, seq_lens in ((1, [50, 3]), (2, [17, 64, 33])):
        batch = make_batch(layout, seq_lens, [1] * len(seq_lens), 8, torch.bfloat16,
                           seed=seed)
        check(batch, layout, run_kernel(batch, layout, workspace=ws, num_splits=4), tol=3e-2)


def test_split_heuristic_uses_host_integers_only():
    # the split counts of the H100 runs (132 SMs, 4 decode programs each, 8 KV heads)
    assert tk.choose_num_splits(8, 8, 1, 8192, "cpu") == 8       # one full wave, not 9
    assert tk.choose_num_splits(1, 8, 1, 32768, "cpu") == 64      # 512 programs <= 528
    assert tk.choose_num_splits(32, 8, 1, 4096, "cpu") == 2
    # the previous model (3 programs an SM) still reproduces the earlier sweep's choices
    assert tk.choose_num_splits(8, 8, 1, 8192, "cpu", programs_per_sm=3) == 6
    assert tk.choose_num_splits(1, 8, 1, 32768, "cpu", programs_per_sm=3) == 49
    assert tk.choose_num_splits(8, 8, 7, 8192, "cpu") == 1       # not pure decode
    assert tk.choose_num_splits(256, 8, 1, 8192, "cpu") == 1     # many full waves
    assert tk.choose_num_splits(8, 8, 1, 200, "cpu") == 1        # segments < 128 tokens
    assert tk.choose_num_splits(1, 8, 1, 32768, "cpu", max_splits=4) == 4  # scratch cap


def test_workspace_capacity_caps_the_split_count():
    ws = tk.AttentionWorkspace(40, 8, 64, DEVICE)
    assert ws.max_splits(8) == 5 and ws.max_splits(41) == 0
    assert ws.fits(8, 8, 64, 5) and not ws.fits(8, 8, 64, 6) and not ws.fits(8, 4, 64, 2)


def test_corrupted_cache_changes_the_output():
    """The kernel reads the bytes the reference reads: corruption shows, other pages don't."""
    layout = layout_of(4, 4, 32, 32, 2, 64, 16)
    batch = make_batch(layout, [40, 20], [3, 1], 4)
    clean = check(batch, layout, run_kernel(batch, layout))
    spare = [b for b in range(batch["cache"].shape[0])
             if b not in batch["block_table"][0, :3].tolist()
             and b not in batch["block_table"][1, :2].tolist()]
    batch["cache"][spare] ^= 0x5A  # pages no sequence owns: no effect
    torch.testing.assert_close(run_kernel(batch, layout)[:4], clean[:4], atol=1e-2, rtol=0)
    page = int(batch["block_table"][0, 1])
    codes, steps, minima = layout.views(batch["cache"], "key")
    codes[page, 1, 3] ^= 0xFF  # K of token 19 of sequence 0, KV head 1
    _, vsteps, _ = layout.views(batch["cache"], "value")
    vsteps[page, 0, 5] *= 4  # V scales of token 21, KV head 0
    out = run_kernel(batch, layout)
    corrupted = check(batch, layout, out)  # still equals the reference on the same bytes
    assert (corrupted[:3] - clean[:3]).abs().max() > 0.05


def test_kernel_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, TRITON_INTERPRET="1" if DEVICE == "cpu" else "0",
               PYTHONPATH=os.pathsep.join([str(REPO)] + sys.path))
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "kernel_bench.py"), "--smoke",
                           "--out", str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["correctness"] and all(c["ok"] for c in result["correctness"])
    assert result["decode"] and result["write"]
    assert "| profile" in proc.stdout


# ------------------------------------------------------------- fast code unpacking (PTX)

def _emulate_unpack_asm(asm: str, word: int) -> list[float]:
    """Run `_unpack_asm`'s PTX on one 32-bit input word: mov / prmt / lop3 / fma.f16x2
    (the only instructions it uses), returning the four fp16 outputs ($0 low, $0 high,
    $1 low, $1 high)."""
    import re

    import numpy as np
    regs = {"$2": word}

    def val(x):
        return regs[x] if x in regs else int(x, 0)

    def halves(x):
        return np.array([x & 0xFFFF, x >> 16], dtype=np.uint16).view(np.float16)

    for line in asm.replace("{", "").replace("}", "").split(";"):
        op, _, args = line.strip().partition(" ")
        if not op or op.startswith(".reg"):
            continue
        a = [x.strip() for x in args.split(",")]
        if op == "mov.b32":
            regs[a[0]] = val(a[1])
        elif op == "prmt.b32":
            src = val(a[1]).to_bytes(4, "little") + val(a[2]).to_bytes(4, "little")
            sel = val(a[3])
            regs[a[0]] = int.from_bytes(bytes(src[(sel >> 4 * i) & 7] for i in range(4)),
                                        "little")
        elif op == "lop3.b32":
            assert a[4] == "0xEA"  # (a & b) | c
            regs[a[0]] = (val(a[1]) & val(a[2])) | val(a[3])
        elif op == "fma.rn.f16x2":
            x, s, z = (halves(val(r)).astype(np.float32) for r in a[1:4])
            out = (x * s + z).astype(np.float16).view(np.uint16)
            regs[a[0]] = int(out[0]) | int(out[1]) << 16
        else:
            raise AssertionError(f"unexpected instruction {op}")
        assert re.fullmatch(r"[\w$]+", a[0])
    return [float(h) for r in ("$0", "$1") for h in
            np.array([regs[r] & 0xFFFF, regs[r] >> 16], dtype=np.uint16).view(np.float16)]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_unpack_asm_gives_exact_codes(bits):
    """The GPU's inline-PTX unpacking (the interpreter runs the shift-and-mask path) turns
    byte k of a packed word into output k, with the code of the requested bit slice."""
    pa = sys.modules["vllm_kvplug.triton_kernels.paged_attention"]
    g = torch.Generator().manual_seed(0)
    words = torch.randint(0, 2 ** 32, (64,), generator=g, dtype=torch.int64).tolist()
    words += [0, 0xFFFFFFFF, 0x01234567, 0x89ABCDEF]
    for slice_ in range(8 // bits):
        asm = pa._unpack_asm(bits, slice_)
        for word in words:
            want = [(word >> (8 * k + bits * slice_)) & ((1 << bits) - 1) for k in range(4)]
            assert _emulate_unpack_asm(asm, word) == want, (bits, slice_, hex(word))


# ------------------------------------------------- paged_attention over evicted requests

def _evict_into_batch(batch, layout, seq, prompt_len, policy, seed):
    """Evict sequence `seq`'s prompt (random scores) into the head-packed layout like the
    worker does, scribble over the blocks it frees (another request may reuse them), and
    return (offsets [H + 1], plan)."""
    from vllm_kvplug.eviction.packed import compact, packed_plan, plan_layer

    g = torch.Generator().manual_seed(seed)
    plan = packed_plan(policy, prompt_len, 1, layout.block_size)
    assert plan is not None and plan.blocks_freed > 0
    # heads with sharper or flatter score profiles, so Ada-KV's budgets differ by head
    sharpness = 1.0 + 6.0 * torch.arange(layout.num_kv_heads, dtype=torch.float32)[:, None]
    scores = torch.rand(layout.num_kv_heads, prompt_len, generator=g) ** sharpness
    _, kept = plan_layer(policy, 0, 1, prompt_len, scores)
    block_ids = batch["block_table"][seq]
    offsets = compact(batch["cache"], layout, block_ids, kept, plan)
    freed = block_ids[plan.num_keep_blocks:plan.tail_block].long()
    batch["cache"][freed] = torch.randint(0, 256, (len(freed), layout.page_bytes),
                                          generator=g, dtype=torch.uint8)
    return offsets, plan


EVICTED_CASES = {
    # name: (kbits, vbits, group, hb, kv heads, q heads, D, block, seq_lens, q_lens,
    #        {seq: prompt_len} evicted, splits)
    "decode_adakv_k4v4_gqa4": (4, 4, 32, 32, 2, 8, 64, 16, [150, 37, 211], [1, 1, 1],
                               {0: 140, 2: 200}, None),
    "decode_split_k2v2_gqa2": (2, 2, 32, 64, 4, 8, 64, 16, [260, 90], [1, 1],
                               {0: 250}, 3),
    "recompute_rows_past_the_prompt_k4v4": (4, 4, 32, 32, 2, 4, 64, 32, [181, 64, 140],
                                            [13, 1, 4], {0: 168, 2: 130}, None),
}


@pytest.mark.parametrize("name", list(EVICTED_CASES))
def test_paged_attention_over_evicted_requests_matches_attention_packed(name):
    """Rows of evicted requests (decode, split-K, a recompute chunk past the prompt) see
    their head-packed prompt plus the tail exactly like `attention_packed`; other rows of
    the same launch keep normal paged attention; freed blocks are never read."""
    from vllm_kvplug.eviction import AdaKV
    from vllm_kvplug.eviction.packed import attention_packed

    kb, vb, g, hb, h, hq, d, bs, seq_lens, q_lens, evicted, splits = EVICTED_CASES[name]
    layout = layout_of(kb, vb, g, hb, h, d, bs)
    batch = make_batch(layout, seq_lens, q_lens, hq, pad_rows=0)
    policy = AdaKV(budget_fraction=0.25, min_tokens=4, window_tokens=8, sink_tokens=4)
    ev_offsets = torch.zeros(len(seq_lens) + 2, h + 1, dtype=torch.int32)  # spare rows
    ev_tail = torch.zeros(len(seq_lens) + 2, dtype=torch.int32)
    plans = {}
    for seq, prompt_len in evicted.items():
        offsets, plan = _evict_into_batch(batch, layout, seq, prompt_len, policy, seq)
        assert len(set(offsets.diff().tolist())) > 1  # uneven per-head budgets
        ev_offsets[seq], ev_tail[seq] = offsets.int(), plan.tail_start
        plans[seq] = (offsets, plan)
    want = reference(batch, layout)  # normal rows; evicted rows replaced below
    qsl = batch["query_start_loc"].tolist()
    for seq, (offsets, plan) in plans.items():
        start, end = qsl[seq], qsl[seq + 1]
        positions = torch.arange(seq_lens[seq] - (end - start), seq_lens[seq])
        assert int(positions[0]) >= plan.prompt_len  # rows after the prompt
        want[start:end] = attention_packed(
            batch["query"][start:end], positions, batch["cache"], layout,
            batch["block_table"][seq], offsets, plan, seq_lens[seq], layout.head_size ** -0.5)
    got = run_kernel(batch, layout, num_splits=splits,
                     eviction=(ev_offsets.to(DEVICE), ev_tail.to(DEVICE)))
    err = (got.float() - want.float()).abs().max().item()
    assert err < 1e-2, f"max abs error {err}"
    # the same launch without the tables reads the scribbled freed blocks: it differs
    plain = run_kernel(batch, layout, num_splits=splits)
    seq0 = next(iter(plans))
    rows = slice(qsl[seq0], qsl[seq0 + 1])
    assert not torch.allclose(plain[rows].float(), want[rows].float(), atol=0.05)


def test_eviction_tables_of_the_wrong_shape_are_refused():
    layout = layout_of(4, 4, 32, 32, 2, 64, 16)
    batch = make_batch(layout, [40, 20], [1, 1], 4)
    bad = (torch.zeros(2, 2, dtype=torch.int32, device=DEVICE),  # needs H + 1 = 3 columns
           torch.zeros(2, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="eviction tables"):
        run_kernel(batch, layout, eviction=bad)


# ------------------------------------------------ eviction kernels (keys, compaction)

def _eviction_kernels():
    import vllm_kvplug.triton_kernels.eviction as ek

    if DEVICE == "cpu" and type(ek._read_keys_kernel).__name__ != "InterpretedFunction":
        ek = importlib.reload(ek)  # imported before the interpreter flag: decorate again
    return ek


@pytest.mark.parametrize("kbits, vbits, group, hb, d, bs, tokens", [
    (4, 4, 32, 32, 64, 16, 45), (2, 2, 32, 64, 128, 16, 33), (8, 4, 128, 128, 128, 32, 70)])
def test_read_keys_kernel_equals_read_prompt_keys(kbits, vbits, group, hb, d, bs, tokens):
    from vllm_kvplug.eviction.packed import read_prompt_keys

    layout = layout_of(kbits, vbits, group, hb, 3, d, bs)
    batch = make_batch(layout, [tokens], [1], 3)
    block_ids = batch["block_table"][0]
    want = read_prompt_keys(batch["cache"], layout, block_ids, tokens)
    got = _eviction_kernels().read_keys(batch["cache"].to(DEVICE), layout,
                                        block_ids.to(DEVICE), tokens)
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)


@pytest.mark.parametrize("kbits, vbits, group, hb, d, bs", [
    (4, 4, 32, 32, 64, 16), (2, 2, 32, 64, 128, 32), (8, 4, 128, 128, 128, 16)])
def test_compaction_kernel_equals_the_reference_copy(kbits, vbits, group, hb, d, bs):
    """Every byte of every page equals the PyTorch compaction's, including entries whose
    packed slot is another kept entry's source (head 0 keeps its first blocks whole)."""
    from vllm_kvplug.eviction.packed import copy_entries_reference

    heads, width = 3, 6 * bs
    layout = layout_of(kbits, vbits, group, hb, heads, d, bs)
    batch = make_batch(layout, [width + 5], [1], heads)
    g = torch.Generator().manual_seed(5)
    keep = torch.rand(heads, width, generator=g) < 0.3
    keep[0, :2 * bs] = True  # overlapping sources and destinations
    flat = torch.sort((~keep).flatten().to(torch.uint8), stable=True).indices[:int(keep.sum())]
    block_ids = batch["block_table"][0]
    want = batch["cache"].clone()
    copy_entries_reference(want, layout, block_ids, flat, width)
    got = batch["cache"].clone().to(DEVICE)
    _eviction_kernels().compact_entries(got, layout, block_ids.to(DEVICE), flat.to(DEVICE),
                                        width)
    assert torch.equal(got.cpu(), want)
    assert not torch.equal(want, batch["cache"])  # it moved something
