"""The PyTorch reference of the quantized KV format."""

import pytest
import torch

from vllm_kvplug.profiles.schema import QuantizationSection
from vllm_kvplug.quant import QuantRecipe, block_hadamard, dequantize, quantize
from vllm_kvplug.quant.reference import hadamard_matrix, pack, unpack

INT4 = QuantRecipe(bits=4, group_size=32, hadamard_block=32)
INT2 = QuantRecipe(bits=2, group_size=32, hadamard_block=64)


@pytest.mark.parametrize("n", [1, 2, 16, 128])
def test_hadamard_is_orthonormal_and_symmetric(n):
    h = hadamard_matrix(n, torch.float64)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64))
    torch.testing.assert_close(h, h.T)


def test_hadamard_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        hadamard_matrix(48)


def test_block_hadamard_is_its_own_inverse_and_keeps_dot_products():
    torch.manual_seed(0)
    q, k = torch.randn(5, 128), torch.randn(7, 128)
    for block in (16, 64, 128):
        torch.testing.assert_close(block_hadamard(block_hadamard(k, block), block), k,
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(block_hadamard(q, block) @ block_hadamard(k, block).T,
                                   q @ k.T, atol=1e-4, rtol=1e-4)
    assert block_hadamard(k, None) is k


def test_block_hadamard_acts_per_block():
    x = torch.zeros(1, 64)
    x[0, 40] = 1.0  # lives in the second block of 32
    y = block_hadamard(x, 32)
    assert torch.all(y[0, :32] == 0)
    torch.testing.assert_close(y[0, 32:].abs(), torch.full((32,), 32 ** -0.5))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_round_trip(bits):
    codes = torch.randint(0, 1 << bits, (3, 4, 64), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (3, 4, 64 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack(packed, bits), codes)


def test_packing_is_planar():
    # INT4: element j in the low nibble, element j + d/2 in the high nibble of byte j
    assert pack(torch.tensor([[1, 2]], dtype=torch.uint8), 4).item() == 0x21
    assert pack(torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8), 4).tolist() == [[0x31, 0x42]]
    # INT2: element j + i*d/4 in bits 2i..2i+1
    assert pack(torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8), 2).item() == 0b00111001
    assert pack(torch.tensor([[1, 0, 2, 0, 3, 0, 0, 1]], dtype=torch.uint8), 2
                ).tolist() == [[0b00111001, 0b01000000]]
    assert torch.equal(pack(torch.tensor([[7, 200]], dtype=torch.uint8), 8),
                       torch.tensor([[7, 200]], dtype=torch.uint8))


@pytest.mark.parametrize("recipe", [INT4, INT2, QuantRecipe(4, 128, None)])
def test_error_within_half_a_step_in_rotated_space(recipe):
    torch.manual_seed(1)
    x = torch.randn(4, 8, 128) * 3
    packed, scale, minimum = quantize(x, recipe)
    assert packed.shape == (4, 8, 128 * recipe.bits // 8)
    assert scale.shape == minimum.shape == (4, 8, 128 // recipe.group_size)
    assert scale.dtype == minimum.dtype == torch.float16
    xr = block_hadamard(x, recipe.hadamard_block)
    err = (dequantize(packed, scale, minimum, recipe, rotated=True) - xr).abs()
    step = scale.float().repeat_interleave(recipe.group_size, -1)
    # half a step, plus what fp16 rounding of the stored minimum can add
    assert torch.all(err <= step / 2 + 2e-3 * xr.abs().amax(-1, keepdim=True) + 1e-6)


def test_constant_groups_are_exact():
    x = torch.full((2, 64), 0.75)
    out = dequantize(*quantize(x, QuantRecipe(2, 32, None)), QuantRecipe(2, 32, None))
    torch.testing.assert_close(out, x)


def test_rotation_spreads_an_outlier_channel():
    torch.manual_seed(2)
    x = torch.randn(256, 128)
    x[:, 7] *= 40  # one outlier channel, as in real K caches
    plain, rotated = QuantRecipe(4, 128, None), QuantRecipe(4, 128, 128)
    mse = lambda r: (dequantize(*quantize(x, r), r) - x).pow(2).mean()  # noqa: E731
    assert mse(rotated) < 0.5 * mse(plain)


def test_attention_in_rotated_space_matches_dequantized_attention():
    torch.manual_seed(3)
    q, k, v = torch.randn(4, 64), torch.randn(10, 64), torch.randn(10, 64)
    r = INT4
    k_rot = dequantize(*quantize(k, r), r, rotated=True)
    v_rot = dequantize(*quantize(v, r), r, rotated=True)
    p = torch.softmax(block_hadamard(q, r.hadamard_block) @ k_rot.T, -1)
    out = block_hadamard(p @ v_rot, r.hadamard_block)
    k_deq, v_deq = dequantize(*quantize(k, r), r), dequantize(*quantize(v, r), r)
    torch.testing.assert_close(out, torch.softmax(q @ k_deq.T, -1) @ v_deq,
                               atol=1e-4, rtol=1e-4)


def test_recipe_bytes_and_profile_mapping():
    assert QuantRecipe(4, 128, 64).bytes_per_vector(128) == 64 + 4
    assert QuantRecipe(2, 128, 64).bytes_per_vector(128) == 32 + 4
    assert QuantRecipe(2, 32, 64).bytes_per_vector(64) == 16 + 8
    recipe = QuantRecipe.from_section(QuantizationSection(method="int2", group_size=64,
                                                          rotation="none"))
    assert recipe == QuantRecipe(bits=2, group_size=64, hadamard_block=None)
    with pytest.raises(ValueError, match="no recipe"):
        QuantRecipe.from_section(QuantizationSection())


def test_head_size_errors_name_the_option():
    with pytest.raises(ValueError, match="quantization.group_size 128"):
        QuantRecipe(4, 128, 64).check_head_size(64)
    with pytest.raises(ValueError, match="quantization.hadamard_block 128"):
        QuantRecipe(4, 32, 128).check_head_size(96)
    with pytest.raises(ValueError, match="bits must be one of"):
        QuantRecipe(3, 32, None)
