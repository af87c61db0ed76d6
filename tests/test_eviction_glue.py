"""vLLM glue of eviction: spec, block manager, startup checks, batch-row dispatch."""

import json
import os
from types import SimpleNamespace

import pytest
import torch

from vllm_kvplug.eviction import AdaKV
from vllm_kvplug.eviction.packed import packed_plan
from vllm_kvplug.profiles import ProfileError, load_profile
from vllm_kvplug.quant.paged import PagedLayout, attention_reference, write_reference
from vllm_kvplug.quant.recipe import KVRecipe
from vllm_kvplug.vllm_glue import install

EVICTION = {"policy": "adakv", "budget_fraction": 0.25, "budget_tokens": None,
            "min_tokens": 16, "window_tokens": 8, "sink_tokens": 4}


@pytest.fixture(autouse=True)
def no_engine_planner_left():
    """A manager registers its planner for the process (the engine core); reset it."""
    yield
    from vllm_kvplug.vllm_glue import kv_manager

    kv_manager._planner = None


def write_profile(tmp_path, text, name="p.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return load_profile(str(path))


def spec(**kw):
    install()
    from vllm_kvplug.vllm_glue.kv_spec import EvictingKVSpec

    fields = dict(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.uint8,
                  token_bytes=2 * 72, eviction=json.dumps(EVICTION), num_layers=4)
    fields.update(kw)
    return EvictingKVSpec(**fields)


def test_spec_carries_the_policy_and_registers_the_evicting_manager():
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    s = spec()
    assert s.policy() == AdaKV(budget_fraction=0.25, min_tokens=16, window_tokens=8)
    assert KVCacheSpecRegistry.get_manager_class(s).__name__ == "EvictingKVManager"
    assert type(s).merge([s, s]) == s
    with pytest.raises(ValueError, match="same eviction settings"):
        type(s).merge([s, spec(num_layers=5)])


def make_manager(num_blocks=64, caching=True):
    from vllm.v1.core.block_pool import BlockPool

    from vllm_kvplug.vllm_glue.kv_manager import EvictingKVManager

    pool = BlockPool(num_blocks, caching, 16)
    manager = EvictingKVManager(spec(), block_pool=pool, enable_caching=caching,
                                kv_cache_group_id=0, scheduler_block_size=16)
    return manager, pool


def allocate(manager, rid, tokens):
    n = manager.get_num_blocks_to_allocate(rid, tokens, [], 0, 0, tokens)
    return manager.allocate_new_blocks(rid, tokens, tokens)[:n]


def test_manager_returns_the_middle_blocks_once_the_prompt_is_processed():
    from vllm_kvplug.vllm_glue.kv_manager import COUNTERS

    manager, pool = make_manager()
    prompt = 300  # budget 75 -> 5 blocks kept, tail block 18: blocks 5..17 are freed
    plan = packed_plan(spec().policy(), prompt, 4, 16)
    assert (plan.num_keep_blocks, plan.tail_block) == (5, 18)
    allocate(manager, "r", prompt)
    free = pool.get_num_free_blocks()
    before = COUNTERS.blocks_returned
    manager.remove_skipped_blocks("r", prompt - 1, prompt)  # prompt not processed yet
    assert pool.get_num_free_blocks() == free
    manager.remove_skipped_blocks("r", prompt, prompt)
    assert pool.get_num_free_blocks() == free + 13
    assert COUNTERS.blocks_returned - before == 13
    blocks = manager.req_to_blocks["r"]
    assert all(b.is_null for b in blocks[5:18])
    assert not any(b.is_null for b in blocks[:5] + blocks[18:])
    manager.remove_skipped_blocks("r", prompt + 40, prompt)  # once
    assert pool.get_num_free_blocks() == free + 13
    # decode continues in the normal layout after the tail block
    allocate(manager, "r", 340)
    assert len(manager.req_to_blocks["r"]) == 22
    manager.free("r")
    assert pool.get_num_free_blocks() == 63  # everything back (block 0 is vLLM's null)


def test_manager_never_hashes_evicted_requests_and_keeps_short_ones_cached():
    install()
    from vllm import SamplingParams
    from vllm.v1.request import Request

    manager, pool = make_manager()

    def request(rid, n):
        return Request(rid, list(range(n)), SamplingParams(max_tokens=4), None,
                       block_hasher=None)

    long, short = request("long", 300), request("short", 20)
    assert manager.planner.plan(300) is not None and manager.planner.plan(20) is None
    # created after the manager: Request asks the plugin whether to skip the prefix cache
    assert long.skip_reading_prefix_cache and not short.skip_reading_prefix_cache
    for r in (long, short):
        allocate(manager, r.request_id, r.num_tokens)
    manager.cache_blocks(long, 300)
    assert "long" not in manager.num_cached_block
    assert all(b.block_hash is None for b in manager.req_to_blocks["long"])
    assert manager.get_num_common_prefix_blocks("long") == 0


def test_startup_refuses_unsupported_combinations(tmp_path, monkeypatch):
    from vllm_kvplug.vllm_glue.activation import check_eviction

    args = SimpleNamespace(speculative_config=None, pipeline_parallel_size=1)
    quantized = write_profile(tmp_path, "name: e\nquantization: {method: int4}\n"
                                        "eviction: {policy: snapkv, budget_fraction: 0.5}\n")
    check_eviction(args, quantized)  # CPU, quantized: served
    plain = write_profile(tmp_path, "name: e\neviction: {policy: adakv, budget_tokens: 512}\n",
                          "plain.yaml")
    with pytest.raises(ProfileError, match="eviction.policy='adakv'.*quantization.method"):
        check_eviction(args, plain)
    with pytest.raises(ProfileError, match="--speculative-config"):
        check_eviction(SimpleNamespace(speculative_config={"method": "ngram"},
                                       pipeline_parallel_size=1), quantized)
    with pytest.raises(ProfileError, match="--kv-transfer-config"):
        check_eviction(SimpleNamespace(speculative_config=None, pipeline_parallel_size=1,
                                       kv_transfer_config={"kv_connector": "X"}), quantized)
    with pytest.raises(ProfileError, match="--pipeline-parallel-size 2"):
        check_eviction(SimpleNamespace(speculative_config=None, pipeline_parallel_size=2),
                       quantized)
    from vllm.platforms import current_platform

    monkeypatch.setattr(type(current_platform), "is_cpu", lambda self: False)
    monkeypatch.setattr(type(current_platform), "is_cuda", lambda self: False)
    with pytest.raises(ProfileError, match="eviction.policy='snapkv'.*CPUs and NVIDIA GPUs"):
        check_eviction(args, quantized)
    # CUDA: served on vLLM's V1 model runner, selected for the engine core it spawns
    monkeypatch.setattr(type(current_platform), "is_cuda", lambda self: True)
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    check_eviction(args, quantized)
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(ProfileError, match="VLLM_USE_V2_MODEL_RUNNER=1"):
        check_eviction(args, quantized)
    check_eviction(args, load_profile("int4-hadamard"))  # no eviction: nothing to refuse


def test_builtin_adakv_profile_evicts_with_quantization():
    resolved = load_profile("int4-adakv")
    assert resolved.profile.eviction.policy == "adakv"
    assert resolved.profile.quantization.method == "int4"


def test_row_dispatch_serves_short_prompts_normally_and_evicts_long_ones():
    from vllm_kvplug.vllm_glue import eviction_rows
    from vllm_kvplug.vllm_glue.eviction_rows import BatchRows, attend

    policy = spec().policy()
    recipe = KVRecipe.from_section(load_profile("int4-hadamard").profile.quantization)
    layout = PagedLayout(recipe, 2, 64, 16)
    cache = torch.zeros(40, layout.page_bytes, dtype=torch.uint8)
    torch.manual_seed(0)
    lens = (20, 300)  # short: not evicted; long: evicted when its prompt completes
    tables = torch.zeros(2, 20, dtype=torch.long)
    tables[0, :2] = torch.tensor([1, 2])
    tables[1] = torch.arange(4, 24)
    for row, n in enumerate(lens):
        pos = torch.arange(n)
        write_reference(cache, torch.randn(n, 2, 64), torch.randn(n, 2, 64),
                        tables[row, pos // 16] * 16 + pos % 16, layout)
    query = torch.randn(sum(lens), 4, 64)
    qsl = torch.tensor([0, 20, 320])
    rows = BatchRows(("s", "l"), lens)
    eviction_rows.states().clear()
    whole = attention_reference(query, cache, tables, torch.tensor(lens), qsl, layout, 0.125)
    out = attend(policy, 4, 0, rows, query, cache, tables, torch.tensor(lens), qsl, layout,
                 0.125)
    torch.testing.assert_close(out, whole)  # prompt rows: full attention for both
    state = eviction_rows.states()["l"]
    assert state.compacted(0) and not state.compacted(1)
    assert "s" not in eviction_rows.states()
    with pytest.raises(RuntimeError, match="no eviction state at position 5"):
        attend(policy, 4, 0, BatchRows(("x",), (300,)), query[:1], cache, tables[1:],
               torch.tensor([6]), torch.tensor([0, 1]), layout, 0.125)
    eviction_rows.states().clear()


def test_eviction_counters_travel_in_scheduler_stats_and_leave_no_trace():
    from prometheus_client import CollectorRegistry
    from vllm.v1.metrics.stats import SchedulerStats

    from vllm_kvplug.metrics import KVPlugMetrics
    from vllm_kvplug.vllm_glue.eviction_metrics import KEY, take_payload

    stats = SchedulerStats(kv_connector_stats={KEY: {
        "requests": 2, "blocks_returned": 9, "tokens_evicted": 300.0,
        "kept_fractions": [0.25, 0.3]}})
    registry = CollectorRegistry()
    metrics = KVPlugMetrics(registry)
    metrics.record_eviction(**take_payload(stats))
    assert stats.kv_connector_stats is None  # vLLM's connector loggers see nothing
    get = registry.get_sample_value
    assert get("kvplug_eviction_blocks_returned_total") == 9
    assert get("kvplug_eviction_requests_total") == 2
    assert get("kvplug_eviction_tokens_evicted_total") == 300
    assert get("kvplug_eviction_kept_fraction_count") == 2
    assert get("kvplug_eviction_kept_fraction_bucket", {"le": "0.25"}) == 1
    other = SchedulerStats(kv_connector_stats={"nixl": {"x": 1}, KEY: {}})
    take_payload(other)
    assert other.kv_connector_stats == {"nixl": {"x": 1}}  # a real connector's data stays
    assert take_payload(SchedulerStats()) is None


def test_engine_config_refuses_eviction_without_quantization(tmp_path):
    install()
    from vllm.engine.arg_utils import EngineArgs

    path = tmp_path / "plain.yaml"
    path.write_text("name: plain\neviction: {policy: snapkv, budget_fraction: 0.5}\n")
    args = EngineArgs(model="unused", additional_config={"kv_compression": str(path)})
    with pytest.raises(ProfileError, match="eviction.policy='snapkv'.*quantization.method"):
        args.create_engine_config()


def test_opt_out_field_is_validated_by_vllms_logits_processor_hook():
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.sample.logits_processor import validate_logits_processors_parameters

    from vllm_kvplug.vllm_glue.eviction_request import VALIDATOR, add_validator, evicts

    def check(extra):  # what SamplingParams.verify runs in the front end
        validate_logits_processors_parameters([VALIDATOR], SamplingParams(extra_args=extra))

    for extra in (None, {}, {"kvplug_eviction": "on"}, {"kvplug_eviction": "off"},
                  {"kvplug_chunks": ["a"], "kv_transfer_params": {"x": 1}}):
        check(extra)
    for bad in ("no", "OFF", True, 0, ["off"]):
        with pytest.raises(VLLMValidationError, match=r"vllm_xargs.kvplug_eviction: must be "
                                                      r"\"on\" or \"off\"") as e:
            check({"kvplug_eviction": bad})
        assert e.value.parameter == "vllm_xargs.kvplug_eviction"
    with pytest.raises(VLLMValidationError, match="vllm_xargs.kvplug_evict: unknown field"):
        check({"kvplug_evict": "off"})
    assert evicts(SamplingParams()) and evicts(None)
    assert evicts(SamplingParams(extra_args={"kvplug_eviction": "on"}))
    assert not evicts(SamplingParams(extra_args={"kvplug_eviction": "off"}))
    # --kv-compression with an eviction profile adds it; the user's own processors stay
    args = SimpleNamespace(logits_processors=["my.mod:Proc"])
    add_validator(args)
    add_validator(args)
    assert args.logits_processors == ["my.mod:Proc", VALIDATOR]


def test_manager_serves_an_opted_out_request_like_the_quantized_profile():
    install()
    from vllm import SamplingParams
    from vllm.v1.request import Request

    from vllm_kvplug.vllm_glue.kv_manager import COUNTERS

    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash

    init_none_hash(sha256)
    manager, pool = make_manager()
    prompt = 300
    off = Request("off", list(range(prompt)), SamplingParams(
        max_tokens=4, extra_args={"kvplug_eviction": "off"}), None,
        block_hasher=get_request_block_hasher(16, sha256))
    on = Request("on", list(range(prompt)), SamplingParams(
        max_tokens=4, extra_args={"kvplug_eviction": "on"}), None, block_hasher=None)
    assert not off.skip_reading_prefix_cache and on.skip_reading_prefix_cache
    assert "off" in manager.planner.opted_out and "on" not in manager.planner.opted_out
    allocate(manager, "off", prompt)
    free, returned = pool.get_num_free_blocks(), COUNTERS.blocks_returned
    manager.remove_skipped_blocks("off", prompt + 8, prompt)
    assert pool.get_num_free_blocks() == free and COUNTERS.blocks_returned == returned
    assert not any(b.is_null for b in manager.req_to_blocks["off"])
    manager.cache_blocks(off, prompt)  # hashed like any request's blocks
    assert manager.num_cached_block["off"] == prompt // 16
    # preempted (all blocks freed) and resumed: the same Request, still opted out
    manager.free("off")
    allocate(manager, "off", prompt)
    manager.remove_skipped_blocks("off", prompt, prompt)
    assert not any(b.is_null for b in manager.req_to_blocks["off"])
    manager.free("off")
    del off  # the scheduler drops a finished request: its entry goes with it
    import gc

    gc.collect()
    assert "off" not in manager.planner.opted_out


def test_worker_rows_do_not_evict_an_opted_out_request():
    from vllm import SamplingParams

    from vllm_kvplug.vllm_glue import eviction_rows
    from vllm_kvplug.vllm_glue.eviction_rows import attend, batch_rows

    # the runner's view: input batch rows and its per-request states (kept through
    # preemption, dropped when the request finishes)
    runner = SimpleNamespace(
        input_batch=SimpleNamespace(req_ids=["on", "off", None], num_prompt_tokens=[300, 300, 0]),
        requests={"on": SimpleNamespace(sampling_params=SamplingParams()),
                  "off": SimpleNamespace(sampling_params=SamplingParams(
                      extra_args={"kvplug_eviction": "off"}))})
    rows = batch_rows(runner, 2)
    assert rows.req_ids == ("on", "off") and rows.prompt_lens == (300, 300)
    assert rows.opted_out == {"off"}

    policy = spec().policy()
    recipe = KVRecipe.from_section(load_profile("int4-hadamard").profile.quantization)
    layout = PagedLayout(recipe, 2, 64, 16)
    cache = torch.zeros(24, layout.page_bytes, dtype=torch.uint8)
    torch.manual_seed(0)
    n = 300
    table = torch.arange(2, 22)[None]
    pos = torch.arange(n + 1)
    write_reference(cache, torch.randn(n + 1, 2, 64), torch.randn(n + 1, 2, 64),
                    table[0, pos // 16] * 16 + pos % 16, layout)
    before = cache.clone()
    query = torch.randn(n, 4, 64)
    eviction_rows.states().clear()
    only_off = eviction_rows.BatchRows(("off",), (n,), frozenset({"off"}))
    out = attend(policy, 4, 0, only_off, query, cache, table, torch.tensor([n]),
                 torch.tensor([0, n]), layout, 0.125)
    torch.testing.assert_close(out, attention_reference(
        query, cache, table, torch.tensor([n]), torch.tensor([0, n]), layout, 0.125))
    assert "off" not in eviction_rows.states()
    assert torch.equal(cache, before)  # no compaction
    # its decode step (position 300) sees the full prompt, no eviction state needed
    q1 = torch.randn(1, 4, 64)
    out = attend(policy, 4, 0, only_off, q1, cache, table, torch.tensor([n + 1]),
                 torch.tensor([0, 1]), layout, 0.125)
    torch.testing.assert_close(out, attention_reference(
        q1, cache, table, torch.tensor([n + 1]), torch.tensor([0, 1]), layout, 0.125))
    # the same prompt opted in is compacted
    attend(policy, 4, 0, eviction_rows.BatchRows(("on",), (n,)), query, cache, table,
           torch.tensor([n]), torch.tensor([0, n]), layout, 0.125)
    assert eviction_rows.states()["on"].compacted(0) and not torch.equal(cache, before)
    eviction_rows.states().clear()


def test_steps_with_a_prompt_row_never_count_as_uniform_decode(monkeypatch):
    """A prompt's last chunk can be one token: such a step must not replay a full CUDA
    graph (no host code runs there, so the eviction would be skipped)."""
    import numpy as np
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_kvplug.vllm_glue import eviction_rows

    seen = []
    monkeypatch.setattr(GPUModelRunner, "_determine_batch_execution_and_padding",
                        lambda self, **kw: seen.append(kw.get("force_uniform_decode")))
    for name in ("_build_attention_metadata", "_update_states"):
        monkeypatch.setattr(GPUModelRunner, name, getattr(GPUModelRunner, name))
    monkeypatch.setattr(GPUModelRunner, "_kvplug_rows_patched", False, raising=False)
    eviction_rows.patch_model_runner()
    runner = object.__new__(GPUModelRunner)

    def step(computed, prompts, **kw):
        runner.input_batch = SimpleNamespace(num_computed_tokens_cpu=np.array(computed),
                                             num_prompt_tokens=np.array(prompts))
        GPUModelRunner._determine_batch_execution_and_padding(
            runner, num_tokens=len(computed), num_reqs=len(computed), **kw)

    step([900, 839], [900, 840])  # row 1's prompt ends with a one-token chunk
    step([901, 840], [900, 840])  # decode only
    step([0, 840], [900, 840], force_uniform_decode=True)  # capture: vLLM's choice wins
    assert seen == [False, None, True]
