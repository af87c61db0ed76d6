"""The CUDA path of eviction (`vllm_glue.eviction_cuda`) serves a sequence of steps exactly
like the CPU path (`eviction_rows.attend`): chunked prefill, eviction when the prompt
completes, decode over the head-packed layout, a recompute chunk past the prompt, a short
prompt and an opted-out request in the same batches. The kernels run in Triton's
interpreter without a GPU (set up by tests/test_triton_kernels.py)."""

from types import SimpleNamespace

import torch

from tests.test_triton_kernels import DEVICE, layout_of, tk  # noqa: F401 (interpreter)
from vllm_kvplug.eviction import AdaKV
from vllm_kvplug.quant.paged import write_reference
from vllm_kvplug.vllm_glue import eviction_cuda, eviction_rows
from vllm_kvplug.vllm_glue.eviction_rows import BatchRows, attend

POLICY = AdaKV(budget_fraction=0.25, min_tokens=4, window_tokens=8, sink_tokens=4)
LAYERS = 2  # the CUDA path defers a prompt's eviction to the last layer
PROMPTS = {"a": 150, "b": 20, "c": 150, "d": 120}  # b: too short to evict, d: opts out
BLOCKS = {"a": [3, 9, 1, 12, 6, 15, 0, 10, 18, 4, 21], "b": [7, 13, 2, 19],
          "c": [5, 20, 11, 16, 8, 14, 17, 22, 23, 24, 25], "d": [26, 27, 28, 29, 30, 31, 32, 33]}
# steps: {request: (first position, tokens)}; c prefills prompt and 10 generated tokens
# in one chunk (a recompute after preemption)
STEPS = [{"a": (0, 100), "b": (0, 20), "d": (0, 120)},
         {"a": (100, 50), "b": (20, 1), "c": (0, 160), "d": (120, 1)},
         {"a": (150, 1), "b": (21, 1), "c": (160, 1), "d": (121, 1)},
         {"a": (151, 1), "c": (161, 1), "d": (122, 1)}]


def _step_batch(step, layout, gen):
    ids = list(step)
    width = max(len(b) for b in BLOCKS.values())
    table = torch.zeros(len(ids), width, dtype=torch.int32)
    lens, qsl, slots = [], [0], []
    for i, rid in enumerate(ids):
        table[i, :len(BLOCKS[rid])] = torch.tensor(BLOCKS[rid])
        start, n = step[rid]
        pos = torch.arange(start, start + n)
        slots.append(table[i, pos // layout.block_size].long() * layout.block_size
                     + pos % layout.block_size)
        lens.append(start + n)
        qsl.append(qsl[-1] + n)
    slots = torch.cat(slots)
    shape = (LAYERS, len(slots), layout.num_kv_heads, layout.head_size)
    k = torch.randn(shape, generator=gen)
    v = torch.randn(shape, generator=gen)
    q = torch.randn(LAYERS, len(slots), 4, layout.head_size, generator=gen)
    rows = BatchRows(tuple(ids), tuple(PROMPTS[r] for r in ids), frozenset({"d"}))
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    qsl = torch.tensor(qsl, dtype=torch.int32)
    meta = SimpleNamespace(block_table=table.to(DEVICE), seq_lens=seq_lens.to(DEVICE),
                           query_start_loc=qsl.to(DEVICE),
                           max_query_len=max(step[r][1] for r in ids), max_seq_len=max(lens),
                           workspace=None)
    return ([(x.to(DEVICE), y.to(DEVICE), z.to(DEVICE)) for x, y, z in zip(k, v, q)],
            slots.to(DEVICE), rows, meta, (qsl, seq_lens))


def _serve(layout, cuda_path):
    """Run STEPS through LAYERS layers (each its own cache) on one path."""
    eviction_rows.states().clear()
    gen = torch.Generator().manual_seed(0)
    caches = [torch.zeros(34, layout.page_bytes, dtype=torch.uint8, device=DEVICE)
              for _ in range(LAYERS)]
    tables = eviction_cuda.EvictionTables(LAYERS, 8, layout.num_kv_heads, DEVICE)
    outs = []
    scale = layout.head_size ** -0.5
    for step in STEPS:
        per_layer, slots, rows, m, (qsl_cpu, lens_cpu) = _step_batch(step, layout, gen)
        if cuda_path:  # the builder, once per step
            plan = eviction_cuda.plan_step(rows, POLICY, LAYERS, layout.block_size,
                                           qsl_cpu, lens_cpu, tables)
        for layer, ((k, v, q), cache) in enumerate(zip(per_layer, caches)):
            write_reference(cache, k, v, slots, layout)
            if cuda_path:
                out = torch.zeros_like(q)
                eviction_cuda.forward(plan, layer, q, cache, m, layout, scale, out)
            else:
                out = attend(POLICY, LAYERS, layer, rows, q, cache, m.block_table,
                             m.seq_lens, m.query_start_loc, layout, scale)
            outs.append(out.cpu())
    states = dict(eviction_rows.states())
    assert eviction_rows.evicted_requests() >= 2  # a and c, counted for the rank report
    eviction_rows.states().clear()
    return outs, [c.cpu() for c in caches], states


def test_cuda_path_serves_steps_like_the_cpu_path():
    layout = layout_of(4, 4, 32, 32, 2, 64, 16)
    want, want_cache, want_states = _serve(layout, cuda_path=False)
    got, got_cache, got_states = _serve(layout, cuda_path=True)
    assert set(got_states) == set(want_states) == {"a", "c"}  # b short, d opted out
    for rid in ("a", "c"):
        assert got_states[rid].compacted_all()
        assert torch.equal(got_states[rid].offsets_table(), want_states[rid].offsets_table())
    for g, w in zip(got_cache, want_cache):
        assert torch.equal(g, w)  # the same entries compacted, exactly
    for i, (g, w) in enumerate(zip(got, want)):
        err = (g - w).abs().max().item()
        assert err < 1e-2, f"step {i // LAYERS} layer {i % LAYERS}: max abs error {err}"


def test_tables_hold_evicted_rows_only_and_clear_rows_no_longer_used():
    layout = layout_of(4, 4, 32, 32, 2, 64, 16)
    _, _, states = _serve(layout, cuda_path=True)
    tables = eviction_cuda.EvictionTables(LAYERS, 4, layout.num_kv_heads, DEVICE)
    tables.fill([(2, states["a"])])
    offsets, tail = tables.layer(1)
    assert offsets[2].tolist() == states["a"].offsets_table()[1].tolist()
    assert int(tail[2]) == states["a"].plan.tail_start
    assert offsets[:2].abs().sum() == 0 and int(tail[:2].abs().sum()) == 0
    tables.fill([(0, states["c"])])  # the next step: row 2 left the batch
    offsets, tail = tables.layer(1)
    assert offsets[2].abs().sum() == 0 and int(tail[2]) == 0
    assert int(tail[0]) == states["c"].plan.tail_start
