"""vLLM glue of the quantized KV cache: backend selection, model checks, spec, CPU path."""

from types import SimpleNamespace

import pytest
import torch

from vllm_kvplug.profiles import ProfileError, load_profile
from vllm_kvplug.quant.paged import PagedLayout, attention_reference
from vllm_kvplug.quant.recipe import KVRecipe
from vllm_kvplug.vllm_glue import install
from vllm_kvplug.vllm_glue.activation import check_model, select_backend

INT4 = load_profile("int4-hadamard")
NONE = load_profile("none")


def engine_args(**kw):
    base = dict(kv_cache_dtype="auto", attention_backend=None,
                attention_config=SimpleNamespace(backend=None))
    base.update(kw)
    return SimpleNamespace(**base)


def test_quantizing_profile_selects_the_custom_backend():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    args = engine_args()
    select_backend(args, INT4)
    assert args.attention_backend == AttentionBackendEnum.CUSTOM
    untouched = engine_args()
    select_backend(untouched, NONE)
    assert untouched.attention_backend is None


@pytest.mark.parametrize("kw,match", [
    (dict(kv_cache_dtype="fp8"), "--kv-cache-dtype fp8"),
    (dict(attention_backend="FLASH_ATTN"), "--attention-backend FLASH_ATTN"),
])
def test_incompatible_vllm_options_are_named(kw, match):
    with pytest.raises(ProfileError, match=match):
        select_backend(engine_args(**kw), INT4)


def vllm_config(head_size=128, mla=False, window=None, block_size=16):
    model = SimpleNamespace(model="m", use_mla=mla, get_sliding_window=lambda: window,
                            get_head_size=lambda: head_size)
    return SimpleNamespace(model_config=model,
                           cache_config=SimpleNamespace(block_size=block_size))


@pytest.mark.parametrize("cfg,match", [
    (vllm_config(mla=True), "multi-head latent attention"),
    (vllm_config(window=4096), "sliding-window"),
    (vllm_config(head_size=80), "head size 80"),
    (vllm_config(head_size=64, block_size=8), "--block-size 8"),
])
def test_unsupported_models_are_refused_with_the_alternative(cfg, match):
    with pytest.raises(ProfileError, match=match) as info:
        check_model(cfg, INT4)
    assert "quantization.method is 'none'" in str(info.value) or "block-size" in match
    check_model(cfg, NONE)  # passthrough never refuses


def test_supported_model_passes():
    check_model(vllm_config(head_size=128), INT4)
    check_model(vllm_config(head_size=64, block_size=128), INT4)


def test_spec_page_is_the_layout_page():
    install()
    from vllm_kvplug.vllm_glue.kv_spec import QuantizedKVSpec

    recipe = KVRecipe.from_section(INT4.profile.quantization)
    layout = PagedLayout(recipe, 8, 128, 16)
    spec = QuantizedKVSpec(block_size=16, num_kv_heads=8, head_size=128, dtype=torch.uint8,
                           token_bytes=layout.page_bytes // 16)
    assert spec.page_size_bytes == layout.page_bytes == 16 * 8 * 2 * (64 + 8)
    bf16_page = 16 * 8 * 2 * 128 * 2
    assert bf16_page / spec.page_size_bytes == pytest.approx(3.56, abs=0.01)
    merged = QuantizedKVSpec.merge([spec, spec])
    assert merged.page_size_bytes == spec.page_size_bytes
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    assert KVCacheSpecRegistry.get_manager_class(spec).__name__ == "FullAttentionManager"


def test_cpu_platform_honours_only_custom():
    install()
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    selector = SimpleNamespace(use_mla=False, use_sparse=False)
    assert CpuPlatform.get_attn_backend_cls(AttentionBackendEnum.CUSTOM, selector) \
        == "vllm_kvplug.vllm_glue.attention_backend.QuantizedKVBackend"
    assert CpuPlatform.get_attn_backend_cls(None, selector) \
        == AttentionBackendEnum.CPU_ATTN.get_path()


def test_cpu_impl_writes_and_attends_through_the_reference():
    """The backend's CPU path on a chunked prefill followed by a decode step."""
    install()
    from vllm.config import VllmConfig, set_current_vllm_config

    from vllm_kvplug.vllm_glue.attention_backend import QuantizedKVImpl, QuantizedKVMetadata

    config = VllmConfig()
    config.additional_config = {"kv_compression": load_profile("k8v4-hadamard").to_config()}
    with set_current_vllm_config(config):
        impl = QuantizedKVImpl(4, 64, 0.125, 2, None, None, "auto")
    layout = PagedLayout(impl.recipe, 2, 64, 16)
    cache = torch.zeros(3, layout.page_bytes, dtype=torch.uint8)
    torch.manual_seed(0)
    q, k, v = torch.randn(20, 4, 64), torch.randn(20, 2, 64), torch.randn(20, 2, 64)
    block_table = torch.tensor([[2, 0]])

    def step(lo, hi):
        slots = block_table[0, torch.arange(lo, hi) // 16] * 16 + torch.arange(lo, hi) % 16
        impl.do_kv_cache_update(None, k[lo:hi], v[lo:hi], cache, slots)
        meta = QuantizedKVMetadata(hi - lo, hi - lo, hi, torch.tensor([0, hi - lo]),
                                   torch.tensor([hi]), block_table, slots, None)
        out = torch.empty(hi - lo + 3, 4, 64)  # padded rows, as vLLM passes them
        impl.forward(None, q[lo:hi], k[lo:hi], v[lo:hi], cache, meta, out)
        return out[:hi - lo]

    chunks = torch.cat([step(0, 12), step(12, 19), step(19, 20)])
    whole = attention_reference(q, cache, block_table, torch.tensor([20]),
                                torch.tensor([0, 20]), layout, 0.125)
    torch.testing.assert_close(chunks, whole)
    # against unquantized attention: INT8 K / INT4 V stays close
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = torch.einsum("qhd,shd->hqs", q, kk) * 0.125
    s.masked_fill_(torch.ones(20, 20, dtype=torch.bool).triu(1), float("-inf"))
    dense = torch.einsum("hqs,shd->qhd", s.softmax(-1), vv)
    assert (chunks - dense).abs().mean() < 0.15 * dense.abs().mean()  # INT4 V: ~9 %
