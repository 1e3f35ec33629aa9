"""Growth operators: interpolation copy/mean, FPI, positions, fresh module objects."""
import pytest
import torch

from steplm.passes.growth import effective_state, grow, insertion_gaps
from steplm.passes.lora import apply_lora
from steplm.model.llama import ModelConfig, build_model


def tiny(n_layers=4):
    return build_model(ModelConfig(vocab_size=50, d_model=16, n_layers=n_layers, n_heads=2, max_seq_len=16), seed=0)


def randomise_norms(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)


@pytest.mark.parametrize("position,expected", [
    ("upper", [2, 3]), ("lower", [0, 1]), ("intermediate", [1, 2]),
])
def test_positions(position, expected):
    assert insertion_gaps(5, 2, position) == expected  # 5 layers -> gaps 0..3


def test_position_details():
    assert insertion_gaps(5, 1, "upper") == [3]  # between old layers 3 and 4 (the top two)
    assert insertion_gaps(5, 1, "lower") == [0]
    assert insertion_gaps(6, 1, "intermediate") == [2]  # gaps 0..4, middle is 2
    assert insertion_gaps(3, 5, "upper") == [0, 0, 1, 1, 1]  # more layers than gaps: reuse from the top
    r1, r2 = insertion_gaps(10, 4, "random", seed=1), insertion_gaps(10, 4, "random", seed=1)
    assert r1 == r2 and len(set(r1)) == 4
    assert any(insertion_gaps(10, 4, "random", seed=s) != r1 for s in range(2, 6))  # the seed matters


def test_interpolation_mean_every_parameter():
    m = tiny()
    randomise_norms(m)
    old = [effective_state(b) for b in m.model.layers]
    is_new = grow(m, 2, init="mean", position="upper")
    assert is_new == [False, False, True, False, True, False]
    layers = m.model.layers
    # upper gaps for 4 layers, 2 new: gaps 1 and 2 -> new layers after old 1 and after old 2
    new_after = {2: (1, 2), 4: (2, 3)}
    for idx, (a, b) in new_after.items():
        st = layers[idx].state_dict()
        for k in st:
            assert torch.allclose(st[k], (old[a][k] + old[b][k]) / 2), k
    assert m.config.n_layers == 6
    assert len({id(x) for x in layers}) == 6


def test_interpolation_copy_and_fresh_objects():
    m = tiny(3)
    old_ids = [id(b) for b in m.model.layers]
    old0 = effective_state(m.model.layers[0])
    grow(m, 1, init="copy", position="lower")
    new = m.model.layers[1]
    assert id(new) not in old_ids
    assert all(torch.equal(new.state_dict()[k], old0[k]) for k in old0)
    assert new.mlp.up_proj.weight.data_ptr() != m.model.layers[0].mlp.up_proj.weight.data_ptr()


@pytest.mark.parametrize("n_old,n_new", [(4, 2), (5, 1), (3, 5), (6, 3)])
def test_top_is_one_block_above_the_old_layers_made_as_upper_makes_them(n_old, n_new):
    # the literal reading of "added collectively at the top": every new layer above the last old one,
    # new layer j of the block from upper's j-th source gap (g, g+1), upper's layers in stack order
    m = tiny(n_old)
    randomise_norms(m)
    old = [effective_state(b) for b in m.model.layers]
    old_ids = [id(b) for b in m.model.layers]
    assert insertion_gaps(n_old, n_new, "top") == [n_old - 1] * n_new
    is_new = grow(m, n_new, init="mean", position="top")
    assert is_new == [False] * n_old + [True] * n_new
    assert [id(b) for b in m.model.layers[:n_old]] == old_ids  # the old stack keeps its order
    sources = insertion_gaps(n_old, n_new, "upper")
    for j, g in enumerate(sources):
        st = m.model.layers[n_old + j].state_dict()
        for k in st:
            assert torch.allclose(st[k], (old[g][k] + old[min(g + 1, n_old - 1)][k]) / 2), (j, k)
    assert len({id(x) for x in m.model.layers}) == n_old + n_new


def test_top_and_upper_make_the_same_layers_in_other_places():
    a, b = tiny(5), tiny(5)
    grow(a, 2, position="upper")
    grow(b, 2, position="top")
    new_a = [blk for blk, new in zip(a.model.layers, [False, False, False, True, False, True, False]) if new]
    new_b = list(b.model.layers)[5:]
    for x, y in zip(new_a, new_b):
        assert all(torch.equal(x.state_dict()[k], y.state_dict()[k]) for k in x.state_dict())
    x = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        assert (a.eval()(x) - b.eval()(x)).abs().max() > 1e-4  # the placement changes the function


@pytest.mark.parametrize("init", ["mean", "copy"])
@pytest.mark.parametrize("position", ["upper", "top", "intermediate", "lower", "random"])
def test_fpi_preserves_function(init, position):
    m = tiny().eval()
    randomise_norms(m)
    x = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        before = m(x)
        grow(m, 3, init=init, position=position, fpi=True)
        after = m(x)
    assert torch.allclose(before, after, atol=1e-6)


def test_without_fpi_function_changes():
    m = tiny().eval()
    x = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        before = m(x)
        grow(m, 2, init="mean")
        assert (m(x) - before).abs().max() > 1e-4


def test_mean_of_frozen_neighbours_uses_merged_weights():
    m = tiny(2)
    gen = torch.Generator().manual_seed(0)
    for b in m.model.layers:
        apply_lora(b, 4, 8.0, gen)
        with torch.no_grad():
            b.self_attn.q_proj.lora_B.normal_()
    merged = [b.self_attn.q_proj.merged_weight() for b in m.model.layers]
    grow(m, 1, init="mean")
    new = m.model.layers[1]
    assert new.self_attn.q_proj.weight.dtype == torch.float32
    assert torch.allclose(new.self_attn.q_proj.weight, (merged[0] + merged[1]) / 2)
