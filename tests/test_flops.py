"""FLOPs accounting and budget splitting, checked against hand-derived numbers."""
import pytest

from steplm.plan.flops import flops_per_token, nominal_lengths, split_budget


def test_conventions():
    assert flops_per_token(10, 0) == 60
    assert flops_per_token(10, 5) == 70  # paper: frozen 2N
    assert flops_per_token(10, 5, "corrected") == 80  # frozen layers that pass gradients: 4N
    assert flops_per_token(0, 0, "corrected", n_layers=2, d_model=3, seq_len=4, vocab_size=5) == 6 * 15 + 12 * 24
    with pytest.raises(ValueError):
        flops_per_token(1, 1, "other")


def test_split_budget_matches_total():
    costs = [3.0, 5.0, 8.0]
    steps = split_budget(8.0 * 100, costs, 0.75)
    assert abs(sum(s * c for s, c in zip(steps, costs)) - 800) <= 8  # within one step of the last stage
    assert steps[0] == steps[1]
    S = steps[-1]
    assert abs(steps[0] - 0.75 * S) <= 1  # early stages are cut at 75 % of the common nominal length
    assert nominal_lengths(steps, 0.75)[:2] == [round(steps[0] / 0.75)] * 2
