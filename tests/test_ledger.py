"""fastft.ledger: launches, temporaries, conversions, bytes and saved tensors, on CPU and meta tensors."""

import pytest
import torch

from fastft.ledger import Ledger, active_ledger, record_kernel


def test_counts_launches_conversions_temporaries_and_bytes():
    x = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(16, 32)
    with Ledger(min_numel=64 * 32) as led:
        with led.section("forward"):
            y = (x.to(torch.bfloat16) @ w.bfloat16().t()).float()  # 2 casts in, mm, 1 cast out
        with led.section("backward"):
            y.backward(torch.ones_like(y))
    assert led.ops("forward") == ["_to_copy", "_to_copy", "mm", "_to_copy"]
    big = led.conversions_at_least(64 * 32)
    assert [(c.src.dtype, c.dst.dtype, c.section) for c in big] == [
        (torch.float32, torch.bfloat16, "forward"),
        (torch.bfloat16, torch.float32, "backward"),
    ]
    assert big[0].src.shape == (64, 32)
    # the views (t, the transposed weight) are not launches; mm's bytes: x_bf16, w^T bf16 in, y bf16 out
    mm = [entry for entry in led.launches if entry.name == "mm" and entry.section == "forward"][0]
    assert mm.nbytes == (64 * 32 + 32 * 16 + 64 * 16) * 2
    assert led.bytes_moved() == sum(entry.nbytes for entry in led.launches)
    # full-size temporaries: the bf16 copy of x forward, the bf16 and fp32 grads of x backward
    assert [(t.dtype, s) for _, t, s in led.temporaries_of((64, 32))] == [
        (torch.bfloat16, "forward"),
        (torch.bfloat16, "backward"),
        (torch.float32, "backward"),
    ]
    assert "convert float32[64, 32] -> bfloat16" in led.table()


def test_in_place_ops_are_launches_but_not_temporaries():
    y = torch.zeros(128, 64)
    a, b = torch.randn(128, 8), torch.randn(8, 64)
    with Ledger(min_numel=128 * 64) as led:
        y.addmm_(a, b)
        z = y + 1
    assert led.ops() == ["addmm_", "add"]
    assert [t.shape for _, t, _ in led.temporaries] == [(128, 64)]  # z only
    assert z.shape == y.shape


def test_saved_tensors_keep_their_storage():
    x = torch.randn(32, 16)
    w1 = torch.randn(8, 16, requires_grad=True)
    w2 = torch.randn(8, 16, requires_grad=True)
    with Ledger(min_numel=0) as led:
        y = x @ w1.t() + x.view(32, 16) @ w2.t()  # x saved by both GEMMs, one storage
    entries = led.saved_of((32, 16))
    assert len(entries) == 2 and entries[0].storage == entries[1].storage
    assert led.saved_bytes() == 32 * 16 * 4
    assert y.shape == (32, 8)


def test_meta_tensors_at_bench_shapes_cost_nothing():
    x = torch.empty(8192, 4096, device="meta", dtype=torch.bfloat16, requires_grad=True)
    w = torch.empty(14336, 4096, device="meta", dtype=torch.bfloat16)
    with Ledger(min_numel=8192 * 4096) as led:
        with led.section("forward"):
            y = torch.nn.functional.linear(x, w)
        with led.section("backward"):
            y.backward(torch.empty_like(y))
    assert led.ops("forward") == ["mm"] and led.ops("backward") == ["mm"]
    gemm = (8192 * 4096 + 4096 * 14336 + 8192 * 14336) * 2
    assert led.bytes_moved("forward") == gemm and led.bytes_moved("backward") == gemm
    assert led.summary()["saved_bytes"] == 4096 * 14336 * 2  # the weight (x needs no grad of w)


def test_record_kernel_is_one_launch_and_hides_its_internals():
    x = torch.randn(40, 30)
    out = torch.empty(40, 30)
    assert active_ledger() is None
    with record_kernel("k", (x,), (out,)) as launch:  # no ledger: just launch
        assert launch
    with Ledger(min_numel=0) as led:
        assert active_ledger() is led
        with record_kernel("scale2", (x,), (out,)) as launch:
            assert launch
            torch.mul(x, 2, out=out)  # stands for the kernel's work: not counted
    assert active_ledger() is None
    assert led.ops() == ["fastft::scale2"]
    assert led.bytes_moved() == 2 * 40 * 30 * 4
    assert led.summary()["kernels"] == 1
    with Ledger() as led, record_kernel("k", (torch.empty(3, device="meta"),)) as launch:
        assert not launch  # meta: the launcher skips the launch


def test_triton_lora_kernels_count_as_one_launch_each():
    from fastft.kernels.lora import lora_dA, lora_dx_add_, lora_xa

    x, a = torch.randn(37, 24), torch.randn(4, 24)
    with Ledger(min_numel=0) as led:
        t = lora_xa(x, a, 5, 0.25)
        lora_dx_add_(torch.zeros_like(x), t, a, 5, 0.25)
        lora_dA(t, x, 5, 0.25)
    kernels = [entry.name for entry in led.launches if entry.kernel]
    assert kernels == ["lora_xa", "lora_dx_add_", "lora_dA"]
    assert not [c for c in led.conversions]  # the kernels' interpreter internals are not seen


def test_bad_threshold():
    with pytest.raises(ValueError, match="min_numel"):
        Ledger(min_numel=-1)
