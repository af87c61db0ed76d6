"""Static per-(layer, KV head) K offsets: the write subtracts them, attention is unchanged,
files are checked, profiles validate the option, the backend binds them per layer."""

import os
from types import SimpleNamespace

import pytest
import torch

from vllm_kvplug.profiles import ProfileError, load_profile
from vllm_kvplug.quant.key_offsets import (
    KeyMeans,
    KeyOffsets,
    KeyOffsetsError,
    kv_head_range,
    load_key_offsets,
    measure_key_means,
    save_key_offsets,
    token_windows,
)
from vllm_kvplug.quant.paged import PagedLayout, attention_reference, write_reference
from vllm_kvplug.quant.recipe import KVRecipe, QuantRecipe


def dense_attention(q, k, v, scale, dtype=torch.float32):
    """Causal GQA attention of q [T, Hq, D] over k, v [T, H, D] in `dtype`, no cache."""
    group = q.shape[1] // k.shape[1]
    q, k, v = (x.to(dtype) for x in (q, k, v))
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = torch.einsum("qhd,shd->hqs", q, k) * scale
    s.masked_fill_(torch.ones(len(q), len(k), dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hqs,shd->qhd", s.softmax(-1), v)


def biased_keys(t, heads, d, seed=0, bias=12.0):
    """Keys with a large common per-(head, channel) component, like post-RoPE K of models
    with k_proj biases, plus the true per-head mean of that component."""
    g = torch.Generator().manual_seed(seed)
    common = bias * torch.randn(heads, d, generator=g)
    k = common + torch.randn(t, heads, d, generator=g)
    return k, common


def quantized_attention(q, k, v, layout, key_offset=None):
    """Write k/v through the reference (optionally with a K offset), attend the pages."""
    t = len(q)
    blocks = -(-t // layout.block_size)
    cache = torch.zeros(blocks, layout.page_bytes, dtype=torch.uint8)
    write_reference(cache, k, v, torch.arange(t), layout, key_offset=key_offset)
    return attention_reference(q, cache, torch.arange(blocks)[None], torch.tensor([t]),
                               torch.tensor([0, t]), layout, layout.head_size ** -0.5)


INT4 = PagedLayout(KVRecipe(QuantRecipe(4, 64, 64), QuantRecipe(4, 64, 64)), 2, 64, 16)


def test_offset_brings_int4_attention_close_to_unquantized():
    torch.manual_seed(1)
    t, hq = 48, 4
    k, common = biased_keys(t, 2, 64)
    q, v = torch.randn(t, hq, 64), torch.randn(t, 2, 64)
    exact = dense_attention(q, k, v, 64 ** -0.5)
    plain = quantized_attention(q, k, v, INT4)
    shifted = quantized_attention(q, k, v, INT4, key_offset=common)
    err_plain = (plain - exact).abs().mean()
    err_shifted = (shifted - exact).abs().mean()
    # the common component eats the INT4 range (error ~70 % of the output); without it,
    # mostly INT4 V's rounding remains (~11 %)
    assert err_shifted < 0.3 * err_plain, (err_shifted, err_plain)
    assert err_shifted < 0.15 * exact.abs().mean()


def test_attention_is_invariant_to_one_offset_per_head():
    """Premise of the feature: subtracting one vector per KV head from every key does not
    change attention (no quantization), while a per-token shift does."""
    torch.manual_seed(2)
    k, common = biased_keys(20, 2, 64)
    q, v = torch.randn(20, 6, 64), torch.randn(20, 2, 64)
    k, common = k.double(), common.double()
    f64 = torch.float64
    out = dense_attention(q, k, v, 0.125, f64)
    torch.testing.assert_close(dense_attention(q, k - common, v, 0.125, f64), out,
                               rtol=0, atol=1e-9)
    per_token = k - torch.linspace(0, 1, 20, dtype=f64)[:, None, None] * common
    assert (dense_attention(q, per_token, v, 0.125, f64) - out).abs().max() > 1e-2


def test_reference_write_subtracts_the_offset_in_key_dtype():
    k, common = biased_keys(16, 2, 64)
    k = k.bfloat16()
    v = torch.randn(16, 2, 64).bfloat16()
    got = torch.zeros(1, INT4.page_bytes, dtype=torch.uint8)
    want = torch.zeros_like(got)
    write_reference(got, k, v, torch.arange(16), INT4, key_offset=common)
    write_reference(want, (k.float() - common).bfloat16(), v, torch.arange(16), INT4)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="key_offset must be"):
        write_reference(got, k, v, torch.arange(16), INT4, key_offset=common[:1])


# ---------------------------------------------------------------------------- the file

def offsets_file(tmp_path, layers=3, heads=2, d=64, name="ko.safetensors", **meta):
    data = torch.randn(layers, heads, d)
    return save_key_offsets(tmp_path / name, data, {"model": "tiny", **meta}), data


def test_file_round_trip_and_metadata(tmp_path):
    path, data = offsets_file(tmp_path, tokens=100)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # readable by a server's user
    loaded = load_key_offsets(path)
    assert torch.equal(loaded.offsets, data)
    assert (loaded.num_layers, loaded.num_kv_heads, loaded.head_size) == (3, 2, 64)
    assert loaded.metadata["tokens"] == "100" and loaded.metadata["model"] == "tiny"
    assert loaded.metadata["format"] == "vllm-kvplug-key-offsets"
    loaded.check_model(3, 2, 64)
    torch.testing.assert_close(loaded.for_layer(2, 1, 1), data[2, 1:2])


@pytest.mark.parametrize("shape,match", [
    ((4, 2, 64), "layers: file 3, model 4"),
    ((3, 1, 64), "KV heads: file 2, model 1"),
    ((3, 2, 128), "head size: file 64, model 128"),
])
def test_shape_mismatch_names_file_and_mismatch(tmp_path, shape, match):
    path, _ = offsets_file(tmp_path)
    with pytest.raises(KeyOffsetsError, match=match) as info:
        load_key_offsets(path).check_model(*shape)
    assert str(path) in str(info.value)


def test_bad_files_are_refused(tmp_path):
    with pytest.raises(KeyOffsetsError, match="not found"):
        load_key_offsets(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(KeyOffsetsError, match="not a readable safetensors"):
        load_key_offsets(junk)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"layers.0.key_offset": torch.zeros(2, 64)}, str(other))
    with pytest.raises(KeyOffsetsError, match="not a vllm-kvplug K-offsets file"):
        load_key_offsets(other)
    path, _ = offsets_file(tmp_path, name="half.safetensors")
    meta = dict(load_key_offsets(path).metadata)
    save_file({"layers.0.key_offset": torch.zeros(2, 64).half(),
               "layers.1.key_offset": torch.zeros(2, 64),
               "layers.2.key_offset": torch.zeros(2, 64)}, str(tmp_path / "h.safetensors"),
              metadata=meta)
    with pytest.raises(KeyOffsetsError, match="layer 0 is torch.float16"):
        load_key_offsets(tmp_path / "h.safetensors")
    save_file({"layers.0.key_offset": torch.zeros(2, 64)}, str(tmp_path / "short.safetensors"),
              metadata=meta)
    with pytest.raises(KeyOffsetsError, match="layers.1.key_offset"):
        load_key_offsets(tmp_path / "short.safetensors")


def test_layer_and_head_ranges_are_checked():
    offsets = KeyOffsets(torch.zeros(2, 4, 64), source="f")
    with pytest.raises(KeyOffsetsError, match="layers 0...1; the model asks for layer 2"):
        offsets.for_layer(2)
    with pytest.raises(KeyOffsetsError, match="heads 3..4"):
        offsets.for_layer(0, 3, 2)


@pytest.mark.parametrize("total,tp,rank,expected", [
    (8, 1, 0, (0, 8)), (8, 2, 1, (4, 4)), (8, 4, 3, (6, 2)),
    (2, 4, 0, (0, 1)), (2, 4, 1, (0, 1)), (2, 4, 2, (1, 1)), (2, 4, 3, (1, 1)),
])
def test_kv_heads_of_a_tensor_parallel_rank(total, tp, rank, expected):
    assert kv_head_range(total, tp, rank) == expected


def test_kv_heads_that_do_not_split_are_refused():
    with pytest.raises(KeyOffsetsError):
        kv_head_range(6, 4, 0)


# ---------------------------------------------------------------------- calibration

def test_key_means_weigh_every_token_once():
    means = KeyMeans()
    means.add(0, torch.ones(1, 2, 3, 4))
    means.add(0, torch.full((1, 2, 1, 4), 5.0))
    means.add(1, torch.zeros(2, 2, 2, 4))
    out = means.means()
    assert out.shape == (2, 2, 4)
    torch.testing.assert_close(out[0], torch.full((2, 4), 2.0))  # (3*1 + 5) / 4
    assert means.counts == {0: 4, 1: 4}


def test_token_windows():
    assert token_windows(list(range(10)), 4, 9, prefix=[99]) == \
        [[99, 0, 1, 2], [99, 3, 4, 5], [99, 6, 7, 8]]
    assert token_windows(list(range(5)), 8, 100) == [[0, 1, 2, 3, 4]]


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def test_measured_means_are_the_post_rope_keys_of_each_head():
    """Compared with keys rebuilt from each attention module's inputs (k_proj + RoPE)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = tiny_llama()
    windows = [list(range(1, 13)), list(range(20, 27))]
    rebuilt: dict[int, list[torch.Tensor]] = {0: [], 1: []}

    def grab(module, args, kwargs):
        h = kwargs["hidden_states"]
        cos, sin = kwargs["position_embeddings"]
        k = module.k_proj(h).view(*h.shape[:-1], -1, module.head_dim).transpose(1, 2)
        q = torch.zeros_like(k)
        rebuilt[module.layer_idx].append(apply_rotary_pos_emb(q, k, cos, sin)[1])

    hooks = [layer.self_attn.register_forward_pre_hook(grab, with_kwargs=True)
             for layer in model.model.layers]
    with torch.inference_mode():
        logits = [model(torch.tensor([w])).logits for w in windows]
    means, tokens = measure_key_means(model, windows)
    for h in hooks:
        h.remove()
    assert tokens == 19 and means.shape == (2, 2, 16)
    for layer in (0, 1):
        keys = torch.cat(rebuilt[layer][:2], dim=2)  # [1, H, 19, D]
        torch.testing.assert_close(means[layer], keys.mean(dim=(0, 2)), atol=1e-5, rtol=0)
    # the model is left as it was, and recording did not change what it computes
    assert model.config._attn_implementation == "sdpa"
    with torch.inference_mode():
        torch.testing.assert_close(model(torch.tensor([windows[0]])).logits, logits[0])


# ----------------------------------------------------------------------------- profile

def profile_yaml(tmp_path, key_offsets, method="int4", name="p.yaml"):
    path = tmp_path / name
    path.write_text(f"name: koff\nquantization:\n  method: {method}\n  group_size: 64\n"
                    f"  key_offsets: {key_offsets}\n")
    return path


def test_profile_resolves_the_file_relative_to_itself(tmp_path):
    offsets_file(tmp_path)
    resolved = load_profile(str(profile_yaml(tmp_path, "ko.safetensors")))
    assert resolved.profile.quantization.key_offsets == str(tmp_path / "ko.safetensors")
    # carried to the engine processes as an absolute path, validated again there
    from vllm_kvplug.profiles import ResolvedProfile

    again = ResolvedProfile.from_config(resolved.to_config())
    assert again.profile.quantization.key_offsets == str(tmp_path / "ko.safetensors")


def test_profile_with_a_missing_file_names_the_option(tmp_path):
    with pytest.raises(ProfileError) as info:
        load_profile(str(profile_yaml(tmp_path, "nowhere.safetensors")))
    text = str(info.value)
    assert "quantization.key_offsets" in text and "K offsets file not found" in text
    assert "nowhere.safetensors" in text and "vllm_kvplug.calibrate" in text


def test_profile_key_offsets_need_quantization(tmp_path):
    offsets_file(tmp_path)
    with pytest.raises(ProfileError, match="key_offsets is set but method is 'none'"):
        load_profile(str(profile_yaml(tmp_path, "ko.safetensors", method="none")))


def model_config(layers=3, heads=2, head_size=64):
    cfg = SimpleNamespace(model="tiny", use_mla=False, get_sliding_window=lambda: None,
                          get_head_size=lambda: head_size,
                          get_total_num_hidden_layers=lambda: layers,
                          get_total_num_kv_heads=lambda: heads)
    return SimpleNamespace(model_config=cfg, cache_config=SimpleNamespace(block_size=16))


def test_startup_check_refuses_a_file_made_for_another_model(tmp_path):
    from vllm_kvplug.vllm_glue.activation import check_model

    path, _ = offsets_file(tmp_path)
    resolved = load_profile(str(profile_yaml(tmp_path, "ko.safetensors")))
    check_model(model_config(), resolved)
    with pytest.raises(ProfileError) as info:
        check_model(model_config(layers=30, heads=3), resolved)
    text = str(info.value)
    assert "quantization.key_offsets" in text and str(path) in text
    assert "layers: file 3, model 30" in text and "KV heads: file 2, model 3" in text


# ----------------------------------------------------------------------------- backend

def impl_and_config(tmp_path, heads=2):
    from vllm.config import VllmConfig, set_current_vllm_config

    from vllm_kvplug.vllm_glue import install
    from vllm_kvplug.vllm_glue.attention_backend import QuantizedKVImpl

    install()
    _, data = offsets_file(tmp_path)
    resolved = load_profile(str(profile_yaml(tmp_path, "ko.safetensors")))
    config = VllmConfig()
    config.additional_config = {"kv_compression": resolved.to_config()}
    with set_current_vllm_config(config):
        impl = QuantizedKVImpl(4, 64, 0.125, heads, None, None, "auto")
    fake = model_config()
    fake.additional_config = config.additional_config
    fake.compilation_config = SimpleNamespace(static_forward_context={
        "model.layers.1.self_attn.attn": SimpleNamespace(impl=impl),
        "model.layers.2.mlp": SimpleNamespace()})
    return impl, fake, data


@pytest.fixture
def one_rank(monkeypatch):
    import vllm.distributed

    monkeypatch.setattr(vllm.distributed, "get_tensor_model_parallel_world_size", lambda: 1)
    monkeypatch.setattr(vllm.distributed, "get_tensor_model_parallel_rank", lambda: 0)


def test_backend_binds_each_layer_its_offset_and_writes_with_it(tmp_path, one_rank):
    from vllm_kvplug.vllm_glue.attention_backend import QuantizedKVMetadata, bind_key_offsets

    impl, config, data = impl_and_config(tmp_path)
    k = torch.randn(20, 2, 64)
    with pytest.raises(RuntimeError, match="were not bound"):  # never silently skipped
        impl.do_kv_cache_update(None, k, k, torch.zeros(1, INT4.page_bytes,
                                                        dtype=torch.uint8), torch.arange(1))
    bind_key_offsets(["model.layers.1.self_attn.attn"], config, torch.device("cpu"))
    assert torch.equal(impl.key_offset, data[1]) and impl.key_offset.is_contiguous()

    # the CPU path writes K - offset; attention (query unchanged) reads it as is
    layout = PagedLayout(impl.recipe, 2, 64, 16)
    q, v = torch.randn(20, 4, 64), torch.randn(20, 2, 64)
    cache = torch.zeros(2, layout.page_bytes, dtype=torch.uint8)
    slots = torch.arange(20)
    impl.do_kv_cache_update(None, k, v, cache, slots)
    want = torch.zeros_like(cache)
    write_reference(want, k, v, slots, layout, key_offset=data[1])
    assert torch.equal(cache, want)
    meta = QuantizedKVMetadata(20, 20, 20, torch.tensor([0, 20]), torch.tensor([20]),
                               torch.tensor([[0, 1]]), slots, None)
    out = torch.empty(20, 4, 64)
    impl.forward(None, q, k, v, cache, meta, out)
    torch.testing.assert_close(out, attention_reference(q, want, torch.tensor([[0, 1]]),
                                                        torch.tensor([20]),
                                                        torch.tensor([0, 20]), layout, 0.125))


def test_backend_refuses_offsets_for_other_heads(tmp_path, one_rank):
    from vllm_kvplug.vllm_glue.attention_backend import bind_key_offsets

    impl, config, _ = impl_and_config(tmp_path, heads=1)
    with pytest.raises(KeyOffsetsError, match="holds 1 KV heads"):
        bind_key_offsets(["model.layers.1.self_attn.attn"], config, torch.device("cpu"))
    config.model_config.get_total_num_hidden_layers = lambda: 5
    with pytest.raises(KeyOffsetsError, match="layers: file 3, model 5"):
        bind_key_offsets(["model.layers.1.self_attn.attn"], config, torch.device("cpu"))
