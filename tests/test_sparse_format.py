"""Packed codes (bit-mask + 14-bit values) and per-block factor files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cospadi.stages.factors import DictionaryFactors, LowRankFactors
from cospadi.stages.sizing import dictionary_bytes, dictionary_shape
from cospadi.storage import modeling_template
from cospadi.storage.factor_files import (
    FactorFileError,
    read_block_factors,
    read_block_file,
    write_block_factors,
)
from cospadi.storage.sparse_format import (
    code_to_float,
    codes_dense,
    pack_codes,
    quantize_values,
    round_to_code,
    unpack_codes,
)


def random_codes(k: int, d2: int, s: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    support = torch.rand(k, d2, generator=g).argsort(dim=0)[:s].sort(dim=0).values
    return support, torch.randn(s, d2, generator=g)


# Odd sizes on purpose: k d2 not a multiple of 8, s d2 not a multiple of 4 (tail padding).
@pytest.mark.parametrize("k,d2,s", [(7, 5, 3), (16, 8, 8), (9, 13, 1), (30, 11, 15), (5, 1, 5)])
def test_round_trip_and_sizes(k: int, d2: int, s: int) -> None:
    support, values = random_codes(k, d2, s)
    packed = pack_codes(support, values, k)
    assert packed["mask"].dtype == packed["values14"].dtype == torch.uint8
    d1 = 4
    assert d1 * k * 2 + packed["mask"].numel() + packed["values14"].numel() \
        == dictionary_bytes(d1, d2, k, s)
    got_support, got_values = unpack_codes(packed["mask"], packed["values14"], k, d2, s)
    assert torch.equal(got_support, support)
    assert torch.equal(got_values, quantize_values(values))
    dense = DictionaryFactors(torch.eye(k), support, quantize_values(values)).codes_dense()
    assert torch.equal(codes_dense(packed["mask"], packed["values14"], k, d2), dense)
    # The standalone modeling file decodes with its own copy of the code: must agree.
    decoded_t = modeling_template.decode_codes(packed["mask"], packed["values14"], k, d2, s,
                                               torch.float32)
    assert torch.equal(decoded_t.T, dense)


def test_mask_bit_order_is_column_major_lsb_first() -> None:
    k, d2, s = 6, 5, 2
    support, values = random_codes(k, d2, s, seed=3)
    bits = np.zeros((d2, k), dtype=bool)  # row j = output column j
    bits[np.arange(d2)[None, :].repeat(s, 0), support.numpy()] = True
    expected = np.packbits(bits.reshape(-1), bitorder="little")
    assert np.array_equal(pack_codes(support, values, k)["mask"].numpy(), expected)


def test_values_bit_stream_layout() -> None:
    # 1.0 -> bf16 0x3F80 -> code 0x0FE0; -2.0 -> 0xC000 -> 0x3000: stream little-endian.
    support = torch.tensor([[0, 0]])
    packed = pack_codes(support, torch.tensor([[1.0, -2.0]]), 1)["values14"]
    word = 0x0FE0 | (0x3000 << 14)
    assert packed.tolist() == [(word >> (8 * i)) & 0xFF for i in range(4)]


def test_fourteen_bit_rounding_is_nearest_even() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(20000, generator=g) * 10, torch.randn(2000, generator=g) * 1e-40,
                   torch.tensor([0.0, -0.0, 1e-45, 3.0e38])])
    bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    low = code_to_float(bits >> 18).double()
    high = code_to_float((bits >> 18) + 1).double()
    err_low, err_high = (x.double() - low).abs(), (x.double() - high).abs()
    even_low = ((bits >> 18) & 1) == 0
    expected = torch.where(err_low < err_high, low,
                           torch.where(err_high < err_low, high,
                                       torch.where(even_low, low, high)))
    assert torch.equal(quantize_values(x).double(), expected)
    # Exact ties (half-way in the 2 dropped bf16 bits) go to the even code, both ways.
    one_ulp = 2.0 ** -5  # 14-bit spacing at 1.0
    ties = torch.tensor([1 + one_ulp / 2, 1 + 3 * one_ulp / 2, -(1 + one_ulp / 2)])
    assert quantize_values(ties).tolist() == [1.0, 1 + 2 * one_ulp, -1.0]
    # Rounding, not truncation: just below a code rounds up.
    assert quantize_values(torch.tensor([1 + one_ulp * 0.9])).item() == 1 + one_ulp


def test_rejects_bad_input() -> None:
    support, values = random_codes(8, 4, 3)
    with pytest.raises(ValueError, match="finite"):
        pack_codes(support, torch.full_like(values, float("nan")), 8)
    with pytest.raises(ValueError, match="bf16"):
        round_to_code(torch.tensor([3.4e38]))
    with pytest.raises(ValueError, match="ascending"):
        pack_codes(support.flip(0), values, 8)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        pack_codes(support + 8, values, 8)
    packed = pack_codes(support, values, 8)
    with pytest.raises(ValueError, match="exactly s=2"):
        unpack_codes(packed["mask"], packed["values14"], 8, 4, 2)
    with pytest.raises(ValueError, match="values14 holds"):
        unpack_codes(packed["mask"], packed["values14"][:-1], 8, 4, 3)


def block_factors() -> dict[str, DictionaryFactors | LowRankFactors]:
    g = torch.Generator().manual_seed(0)
    shape = dictionary_shape(12, 20, 0.3, 2.0)
    shared = torch.randn(12, shape.k, generator=g)
    out: dict[str, DictionaryFactors | LowRankFactors] = {}
    for name in ("q_proj", "k_proj"):  # a group solve: one dictionary, sliced codes
        support, values = random_codes(shape.k, 20, shape.s, seed=len(name) + ord(name[0]))
        out[f"model.layers.0.self_attn.{name}"] = DictionaryFactors(shared, support, values)
    support, values = random_codes(shape.k, 20, shape.s, seed=9)
    out["model.layers.0.self_attn.o_proj"] = DictionaryFactors(
        torch.randn(12, shape.k, generator=g), support, values)
    out["model.layers.0.mlp.down_proj"] = LowRankFactors(torch.randn(12, 3, generator=g),
                                                         torch.randn(3, 20, generator=g))
    return out


def test_factor_file_round_trip(tmp_path) -> None:
    factors = block_factors()
    bias = torch.randn(20)
    path = tmp_path / "block_0.safetensors"
    write_block_factors(path, factors, {"layer": 0, "method": "test"},
                        biases={"model.layers.0.self_attn.o_proj": bias})
    block = read_block_file(path)
    assert block.metadata == {"layer": 0, "method": "test"}
    assert torch.equal(block.biases["model.layers.0.self_attn.o_proj"], bias)
    assert set(block.factors) == set(factors)
    for name, want in factors.items():
        got = block.factors[name]
        assert type(got) is type(want)
        if isinstance(want, DictionaryFactors):
            assert torch.equal(got.dictionary, want.dictionary.bfloat16().float())
            assert torch.equal(got.support, want.support)
            assert torch.equal(got.values, quantize_values(want.values))
        else:
            assert torch.equal(got.left, want.left.bfloat16().float())
            assert torch.equal(got.right, want.right.bfloat16().float())
    q, k = (block.factors[f"model.layers.0.self_attn.{n}"] for n in ("q_proj", "k_proj"))
    assert q.dictionary is k.dictionary  # stored once, handed back shared
    # Stored size: shared dictionary once + per-module codes, exactly as sizing counts.
    shape = dictionary_shape(12, 20, 0.3, 2.0)
    tensor_bytes = 3 * dictionary_bytes(12, 20, shape.k, shape.s) - 12 * shape.k * 2 \
        + 2 * 3 * (12 + 20) + 20 * 4
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    assert path.stat().st_size == header + tensor_bytes
    assert read_block_factors(path).keys() == factors.keys()


def test_factor_file_bytes_are_deterministic(tmp_path) -> None:
    write_block_factors(tmp_path / "a.safetensors", block_factors(), {"b": 1, "a": [1, 2]})
    write_block_factors(tmp_path / "b.safetensors", block_factors(), {"a": [1, 2], "b": 1})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_factor_file_errors_name_the_file(tmp_path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FactorFileError, match="nope.safetensors"):
        read_block_factors(missing)
    path = tmp_path / "block.safetensors"
    write_block_factors(path, block_factors(), {})
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(FactorFileError, match="cut.safetensors"):
        read_block_factors(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(FactorFileError, match="junk.safetensors"):
        read_block_factors(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="biases given"):
        write_block_factors(path, block_factors(), {}, biases={"x": torch.zeros(1)})


def test_compressed_linear_forward() -> None:
    g = torch.Generator().manual_seed(5)
    k, d1, d2, s = 10, 6, 9, 4
    support, values = random_codes(k, d2, s, seed=2)
    dictionary = torch.randn(d1, k, generator=g)
    bias = torch.randn(d2, generator=g)
    layer = modeling_template.CospadiDictionaryLinear(d1, d2, k, s, bias=True,
                                                      owns_dictionary=True)
    packed = pack_codes(support, values, k)
    with torch.no_grad():
        layer.dictionary.copy_(dictionary.T)  # the model stores D^T
        layer.bias.copy_(bias)
        layer.mask.copy_(packed["mask"])
        layer.values14.copy_(packed["values14"])
    x = torch.randn(3, d1, generator=g)
    weight = DictionaryFactors(dictionary, support, quantize_values(values)).dense()
    torch.testing.assert_close(layer(x), x @ weight + bias, atol=1e-5, rtol=1e-5)
    # Codes loaded in place (what from_pretrained may do) are used at once: nothing cached.
    other = pack_codes(support, -values, k)
    with torch.no_grad():
        layer.values14.copy_(other["values14"])
    torch.testing.assert_close(layer(x), x @ -weight + bias, atol=1e-5, rtol=1e-5)
