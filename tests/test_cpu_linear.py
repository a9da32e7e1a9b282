"""The CPU linear path gives what ``F.linear`` gives, forward and backward, and decoding and training through it
give what the plain path gives."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import tarkit.cpu_linear as cpu
from tarkit.cpu_linear import CPULinear, cpu_linear, use_cpu_linears
from tarkit_plugins.lm.generation import generate_image_codes

from .plugins.lm.test_generation import VOCAB, BareLM, left_pad, random_prompts, tiny_lm

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")


@pytest.fixture(autouse=True)
def onednn_at_every_size(monkeypatch):
    """These tests' layers are tiny: without this, the size thresholds would send them all to ``F.linear``."""
    monkeypatch.setattr(cpu, "ONEDNN_MIN_MACS", 0)
    monkeypatch.setattr(cpu, "MM_MIN_WEIGHT", 0)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 9, 16, 17, 300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_cpu_linear_equals_f_linear(rows, with_bias):
    torch.manual_seed(rows)
    weight, x = torch.randn(300, 64), torch.randn(rows, 1, 64)  # decoding's [rows, 1 position, width]
    bias = torch.randn(300) if with_bias else None
    out = cpu_linear(x, weight, bias)
    assert out.shape == (rows, 1, 300) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_gradients_equal_f_linears(rows):
    torch.manual_seed(rows)
    leaves = torch.randn(rows, 5, 64), torch.randn(300, 64), torch.randn(300)
    fast = [t.clone().requires_grad_() for t in leaves]
    plain = [t.clone().requires_grad_() for t in leaves]
    upstream = torch.randn(rows, 5, 300)
    (cpu_linear(*fast) * upstream).sum().backward()
    (F.linear(*plain) * upstream).sum().backward()
    for f, p in zip(fast, plain, strict=True):
        torch.testing.assert_close(f.grad, p.grad, rtol=1e-5, atol=1e-4)


@needs_onednn
def test_each_shape_takes_its_kernel(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu.torch, "mm", lambda a, b: calls.append(("mm", b.shape[1])) or torch.matmul(a, b))
    real_onednn = cpu.onednn_linear
    monkeypatch.setattr(cpu, "onednn_linear", lambda x, w, b=None: calls.append(("onednn", x.shape[0])) or
                        real_onednn(x, w, b))
    monkeypatch.setattr(cpu, "ONEDNN_MIN_MACS", 30 * 8 * 5)
    weight = torch.randn(30, 8)
    for rows in (1, 2, 4, 5, 17):  # one row goes in twice
        cpu_linear(torch.randn(rows, 8), weight)
    cpu_linear(torch.randn(5, 8, requires_grad=True), weight)  # a gradient: oneDNN
    cpu_linear(torch.randn(3, 8, requires_grad=True), weight)  # a gradient on 1-4 rows: not mm; small: F.linear
    cpu_linear(torch.randn(4, 6), torch.randn(30, 6))  # mm
    cpu_linear(torch.randn(6, 6), torch.randn(30, 6))  # 6 x 30 x 6 multiply-adds, under the threshold: F.linear
    monkeypatch.setattr(cpu, "MM_MIN_WEIGHT", 30 * 8 + 1)
    cpu_linear(torch.randn(2, 8), weight)  # 1-4 rows through a weight under MM_MIN_WEIGHT: F.linear
    assert calls == [("mm", 2), ("mm", 2), ("mm", 4), ("onednn", 5), ("onednn", 17), ("onednn", 5), ("mm", 4)]


@pytest.mark.parametrize("case", ["bf16", "autocast", "transposed weight", "onednn off"])
def test_f_linear_where_the_fast_kernels_do_not_apply(monkeypatch, case):
    monkeypatch.setattr(cpu.torch, "mm", lambda a, b: pytest.fail(f"{case} went through torch.mm"))
    monkeypatch.setattr(cpu, "onednn_linear", lambda *a: pytest.fail(f"{case} went through oneDNN"))
    x, weight = torch.randn(3, 8), torch.randn(30, 8)
    if case == "bf16":
        cpu_linear(x.bfloat16(), weight.bfloat16())
    elif case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert cpu_linear(x, weight).dtype == torch.bfloat16
    elif case == "transposed weight":
        cpu_linear(x, torch.randn(8, 30).t())
    else:
        with torch.backends.mkldnn.flags(enabled=False):
            cpu_linear(x, weight)


def test_use_cpu_linears_changes_classes_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(3, 8)
    before, state = model(x), {k: v.clone() for k, v in model.state_dict().items()}
    assert use_cpu_linears(model) is model
    assert [type(m) for m in model] == [CPULinear, nn.ReLU, CPULinear]
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    torch.testing.assert_close(model(x), before)
    use_cpu_linears(model)  # idempotent
    assert type(model[0]) is CPULinear


def train_a_few_steps(fast: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 8))
    if fast:
        use_cpu_linears(model)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.randn(5, 32, 16), torch.randint(0, 8, (5, 32))
    for x, y in zip(*data, strict=True):
        optimiser.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimiser.step()
    return [p.detach() for p in model.parameters()]


def test_training_through_cpu_linears_follows_the_plain_path():
    for fast, plain in zip(train_a_few_steps(True), train_a_few_steps(False), strict=True):
        torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)


def codes(batch: int, cfg: float, temperature: float) -> torch.Tensor:
    ids, mask = left_pad(random_prompts([5, 3][:batch], seed=4))
    uncond_ids, uncond_mask = left_pad(random_prompts([2], seed=5))
    return generate_image_codes(
        BareLM(tiny_lm(seed=3)), VOCAB, ids, mask, num_tokens=6, scale_index=0, cfg_scale=cfg,
        uncond_input_ids=uncond_ids, uncond_attention_mask=uncond_mask, temperature=temperature,
        top_k=None, top_p=None, generator=torch.Generator().manual_seed(0),
    )


@pytest.mark.parametrize(("batch", "cfg"), [(1, 1.0), (1, 3.0), (2, 3.0)])
def test_decoding_through_cpu_linears_generates_what_f_linear_does(monkeypatch, batch, cfg):
    """1, 2 and 4 rows per step (guidance doubles the batch), prefill rows through oneDNN."""
    fast = codes(batch, cfg, 0.0), codes(batch, cfg, 1.0)
    monkeypatch.setattr(cpu, "_fast_path_applies", lambda x, weight: False)  # every call through F.linear
    plain = codes(batch, cfg, 0.0), codes(batch, cfg, 1.0)
    assert all(torch.equal(f, p) for f, p in zip(fast, plain, strict=True))
