"""The few-row linear path gives what ``F.linear`` gives, and decoding through it generates the same tokens."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import tarkit_plugins.lm.skinny_linear as skinny
from tarkit_plugins.lm.generation import generate_image_codes
from tarkit_plugins.lm.skinny_linear import SkinnyLinear, skinny_linear, use_skinny_linears

from .test_generation import VOCAB, BareLM, left_pad, random_prompts, tiny_lm


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 9, 16, 17])
@pytest.mark.parametrize("with_bias", [False, True])
def test_skinny_linear_equals_f_linear(rows, with_bias):
    torch.manual_seed(rows)
    weight, x = torch.randn(300, 64), torch.randn(rows, 1, 64)  # decoding's [rows, 1 position, width]
    bias = torch.randn(300) if with_bias else None
    out = skinny_linear(x, weight, bias)
    assert out.shape == (rows, 1, 300)
    torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_one_to_sixteen_rows_take_the_weight_as_left_operand_and_one_row_goes_in_twice(monkeypatch):
    calls = []
    monkeypatch.setattr(skinny.torch, "mm", lambda a, b: calls.append((a.shape, b.shape)) or torch.matmul(a, b))
    weight = torch.randn(30, 8)
    for rows in (1, 2, 4, 17):
        out = skinny_linear(torch.randn(rows, 8), weight)
        assert out.shape == (rows, 30) and out.is_contiguous()
    assert calls == [((30, 8), (8, 2)), ((30, 8), (8, 2)), ((30, 8), (8, 4))]  # not 17 rows


def test_bf16_keeps_f_linear(monkeypatch):
    monkeypatch.setattr(skinny.torch, "mm", lambda a, b: pytest.fail("bf16 went through torch.mm"))
    skinny_linear(torch.randn(2, 8, dtype=torch.bfloat16), torch.randn(30, 8, dtype=torch.bfloat16))


def test_use_skinny_linears_changes_classes_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(3, 8)
    before, state = model(x), {k: v.clone() for k, v in model.state_dict().items()}
    assert use_skinny_linears(model) is model
    assert [type(m) for m in model] == [SkinnyLinear, nn.ReLU, SkinnyLinear]
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    torch.testing.assert_close(model(x), before)
    use_skinny_linears(model)  # idempotent
    assert type(model[0]) is SkinnyLinear


def codes(batch: int, cfg: float, temperature: float) -> torch.Tensor:
    ids, mask = left_pad(random_prompts([5, 3][:batch], seed=4))
    uncond_ids, uncond_mask = left_pad(random_prompts([2], seed=5))
    return generate_image_codes(
        BareLM(tiny_lm(seed=3)), VOCAB, ids, mask, num_tokens=6, scale_index=0, cfg_scale=cfg,
        uncond_input_ids=uncond_ids, uncond_attention_mask=uncond_mask, temperature=temperature,
        top_k=None, top_p=None, generator=torch.Generator().manual_seed(0),
    )


@pytest.mark.parametrize(("batch", "cfg"), [(1, 1.0), (1, 3.0), (2, 3.0)])
def test_decoding_through_skinny_linears_generates_what_f_linear_does(monkeypatch, batch, cfg):
    """1, 2 and 4 rows per step (guidance doubles the batch): every shape the skinny path takes."""
    fast = codes(batch, cfg, 0.0), codes(batch, cfg, 1.0)
    monkeypatch.setattr(skinny, "SKINNY_ROWS", range(0))  # every call through F.linear
    plain = codes(batch, cfg, 0.0), codes(batch, cfg, 1.0)
    assert all(torch.equal(f, p) for f, p in zip(fast, plain, strict=True))
