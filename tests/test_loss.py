"""Fused, chunked linear + cross-entropy against torch's unfused reference."""
import pytest
import torch
import torch.nn.functional as F

from steplm.model.loss import chunk_rows, linear_cross_entropy


def reference(h, w, y):
    return F.cross_entropy((h @ w.t()).float(), y, ignore_index=-100)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("chunk_bytes,ignore", [(10**9, False), (4 * 97 * 8, False), (4 * 97 * 3, True)])
def test_loss_and_gradients_match_unfused_fp32(chunk_bytes, ignore, compiled):
    """Eager subtracts the one-hot in place, torch.compile forms it as a comparison: both against
    torch's unfused cross-entropy, with 1, 5 (8 rows each, the last 6) and 19 (2 rows) chunks of 38 rows."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 19, 16, generator=g, dtype=torch.float64).float().requires_grad_()
    w = (0.3 * torch.randn(97, 16, generator=g)).requires_grad_()
    y = torch.randint(0, 97, (2, 19), generator=g)
    if ignore:
        y[0, :5] = -100
        y[1, -3:] = -100
    fn = torch.compile(linear_cross_entropy, fullgraph=True) if compiled else linear_cross_entropy
    loss = fn(h, w, y, torch.float32, chunk_bytes)
    (2.5 * loss).backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = reference(h2.view(-1, 16), w2, y.view(-1))
    (2.5 * ref).backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-7)
    # a wrong target must change the loss (the test can fail)
    y_bad = y.clone()
    y_bad[0, -1] = (y_bad[0, -1] + 1) % 97
    assert fn(h, w, y_bad, torch.float32, chunk_bytes).item() != pytest.approx(ref.item(), rel=1e-6)


@pytest.mark.parametrize("n,vocab,chunk_bytes,max_rows", [
    (2048, 50257, 128 * 2**20, 1024), (4096, 8192, 128 * 2**20, 1024), (4096, 8192, 128 * 2**20, 600),
    (100, 8192, 128 * 2**20, 1024), (38, 97, 4 * 97 * 7, 1024), (5, 10**6, 1000, 1024), (1, 97, 10**9, 1)])
def test_chunk_rows_is_the_largest_power_of_two_within_both_bounds(n, vocab, chunk_bytes, max_rows):
    """Brute force over the powers of two: the tallest chunk whose fp32 logits fit the byte bound
    and the row bound, no taller than the batch, and never below one row."""
    fits = [p for p in (2**k for k in range(20)) if p <= max_rows and 4 * p * vocab <= chunk_bytes]
    assert chunk_rows(n, vocab, chunk_bytes, max_rows) == min(n, max(fits, default=1))


def test_bf16_matches_autocast_reference_within_bf16_rounding():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(64, 32, generator=g).requires_grad_()
    w = (0.2 * torch.randn(300, 32, generator=g)).requires_grad_()
    y = torch.randint(0, 300, (64,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, y, chunk_bytes=4 * 300 * 16)
    loss.backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = reference(h2, w2, y)  # fp32
    ref.backward()
    # bf16 has 8 significant bits: relative error of a matmul output about 2^-8
    assert loss.item() == pytest.approx(ref.item(), rel=2**-7)
    torch.testing.assert_close(w.grad, w2.grad, rtol=0.05, atol=2e-4)
    torch.testing.assert_close(h.grad, h2.grad, rtol=0.05, atol=2e-4)
