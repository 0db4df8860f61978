"""Each merge method on small hand-made tensors, against values worked out by hand in the test."""

from __future__ import annotations

import math

import pytest
import torch

from evomerge.merge.methods import kernels, sparsify
from evomerge.merge.methods.dare import dare
from evomerge.merge.methods.fisher import fisher
from evomerge.merge.methods.linear import linear
from evomerge.merge.methods.regmean import regmean, shrink_gram
from evomerge.merge.methods.slerp import slerp
from evomerge.merge.methods.task_arithmetic import task_arithmetic
from evomerge.merge.methods.ties import ties

T = torch.tensor


def test_linear_weighted_average_and_sum():
    first, second = T([1.0, 2.0]), T([3.0, 6.0])
    # (1*1 + 3*3) / 4 = 2.5 ; (1*2 + 3*6) / 4 = 5
    assert torch.equal(linear([first, second], [1.0, 3.0]), T([2.5, 5.0]))
    assert torch.equal(linear([first, second], [1.0, 3.0], normalize=False), T([10.0, 20.0]))


def test_task_arithmetic_scales_summed_task_vectors():
    base = T([1.0, 1.0, 1.0])
    first = T([2.0, 0.0, 1.0])  # task vector [1, -1, 0]
    second = T([1.0, 3.0, 3.0])  # task vector [0, 2, 2]
    # 0.5*[1,-1,0] + 1*[0,2,2] = [0.5, 1.5, 2]; lambda 2 -> [1, 3, 4]; + base
    result = task_arithmetic(base, [first, second], [0.5, 1.0], scale=2.0)
    assert torch.equal(result, T([2.0, 4.0, 5.0]))
    normalized = task_arithmetic(base, [first, second], [0.5, 1.0], normalize=True)
    torch.testing.assert_close(normalized, base + T([0.5, 1.5, 2.0]) / 1.5)


# Task vectors for the TIES / DARE-TIES examples, 4 entries each (density 0.5 keeps 2).
BASE = T([1.0, 1.0, 1.0, 1.0])
DELTAS = [T([4.0, -1.0, 0.5, -2.0]), T([-3.0, -2.0, 3.0, 0.1]), T([1.0, 5.0, -1.0, -4.0])]
WEIGHTS = [1.0, 0.5, 1.0]


def test_ties_trims_elects_and_takes_disjoint_mean():
    # Trimmed: A [4,0,0,-2]  B [-3,0,3,0]  C [0,5,0,-4]
    # Weighted: A [4,0,0,-2]  B [-1.5,0,1.5,0]  C [0,5,0,-4]; sums [2.5, 5, 1.5, -6] -> signs + + + -
    # Agreeing entries: [A 4 | C 5 | B 1.5 | A -2, C -4]; their weights [1 | 1 | 0.5 | 2]
    tensors = [BASE + delta for delta in DELTAS]
    merged = ties(BASE, tensors, WEIGHTS, [0.5] * 3)
    assert torch.equal(merged, BASE + T([4.0, 5.0, 3.0, -3.0]))
    summed = ties(BASE, tensors, WEIGHTS, [0.5] * 3, normalize=False, scale=0.5)
    assert torch.equal(summed, BASE + 0.5 * T([4.0, 5.0, 1.5, -6.0]))


def test_ties_with_full_density_keeps_every_entry():
    tensors = [BASE + delta for delta in DELTAS]
    # no trim; weighted sums [2.5, 1.5, 1.5, -6.05] -> + + + -
    # entry 0: A 4, C 1 (w 2) -> 2.5; entry 1: C 5 (w 1) -> 5; entry 2: A .5, B 1.5 (w 1.5) -> 4/3;
    # entry 3: A -2, C -4 (w 2) -> -3
    merged = ties(BASE, tensors, WEIGHTS, [1.0] * 3)
    torch.testing.assert_close(merged, BASE + T([2.5, 5.0, 4.0 / 3.0, -3.0]))


def test_ties_accepts_precomputed_tables():
    tensors = [BASE + delta for delta in DELTAS]
    tables = [sparsify.magnitude_table(BASE, tensor) for tensor in tensors]
    assert torch.equal(
        ties(BASE, tensors, WEIGHTS, [0.5] * 3, tables=tables),
        ties(BASE, tensors, WEIGHTS, [0.5] * 3),
    )


def kept_by(base, tensor, trim):
    magnitude = (tensor.float() - base.float()).abs().reshape(-1)
    position = torch.arange(magnitude.numel())
    return (magnitude > trim.threshold) | ((magnitude == trim.threshold) & (position < trim.cut))


def stable_top_k(base, tensor, density):
    """The trim's definition: a stable descending sort's first k, i.e. the lowest flat indices among ties."""
    magnitude = (tensor.float() - base.float()).abs().reshape(-1)
    keep = torch.zeros(magnitude.numel(), dtype=torch.bool)
    keep[magnitude.argsort(descending=True, stable=True)[: sparsify.keep_count(magnitude.numel(), density)]] = True
    return keep


def tied_pair(numel, dtype, seed, delta_std=1e-4):
    """Weights of std 0.02 and a fine-tune's deltas of std 1e-4, both rounded to ``dtype``: in bf16 the deltas
    are a few ulps, so a fifth or more of the entries share the k-th magnitude at common densities."""
    generator = torch.Generator().manual_seed(seed)
    base = (torch.randn(numel, generator=generator) * 0.02).to(dtype)
    return base, (base.float() + torch.randn(numel, generator=generator) * delta_std).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_trim_keeps_exactly_k_with_the_lowest_indices_among_ties(dtype, monkeypatch):
    # several chunks and sketch runs per tensor below; sketch rows for a few tied magnitudes, not for others
    monkeypatch.setattr(sparsify, "BITS_CHUNK", 1 << 18)
    monkeypatch.setattr(sparsify, "_SKETCH_CHUNK", 4 * sparsify.TIE_CHUNK)
    monkeypatch.setattr(sparsify, "_SKETCH_MIN_TIES", 16)
    monkeypatch.setattr(sparsify, "_SKETCH_ROWS", 8)
    for numel in (1, 7, 1000, 3 * sparsify.TIE_CHUNK + 11, 1_200_000):
        base, tensor = tied_pair(numel, dtype, seed=numel)
        nonzero = (tensor.float() - base.float()).reshape(-1) != 0  # zeros add nothing, whichever are kept
        table = sparsify.magnitude_table(base, tensor)
        for density in (0.013, 0.2, 0.5, 0.9, 1.0):
            trim = sparsify.trim(base, tensor, density)
            assert sparsify.trim(base, tensor, density, table) == trim
            kept = kept_by(base, tensor, trim)
            assert torch.equal(kept & nonzero, stable_top_k(base, tensor, density) & nonzero), (numel, density)
            if trim.threshold > 0:
                assert int(kept.sum()) == sparsify.keep_count(numel, density)
    assert sparsify.keep_count(10, 0.01) == 1


def test_bf16_task_vectors_tie_a_lot():
    """The case the exact trim is for: keeping |delta| >= the k-th magnitude keeps 37% at density 0.2, 58% at 0.5."""
    base, tensor = tied_pair(1_000_000, torch.bfloat16, seed=5)
    magnitude = (tensor.float() - base.float()).abs()
    for density, over in ((0.2, 1.7), (0.5, 1.1)):
        trim = sparsify.trim(base, tensor, density)
        at_least = int((magnitude >= trim.threshold).sum())
        assert at_least > over * sparsify.keep_count(magnitude.numel(), density)
        assert int(kept_by(base, tensor, trim).sum()) == sparsify.keep_count(magnitude.numel(), density)


def test_magnitude_tables_are_small():
    base, tensor = tied_pair(1_200_000, torch.bfloat16, seed=1)
    exact = sparsify.magnitude_table(base, tensor)
    assert exact.shift == 0 and exact.nbytes < 0.05 * base.numel()  # vs 2 bytes a parameter for the tensor
    base, tensor = tied_pair(1_200_000, torch.float32, seed=1)
    coarse = sparsify.magnitude_table(base, tensor)
    assert coarse.shift == 16 and coarse.nbytes <= 8 * 2**15


KEYS = [sparsify.dare_key(3, "t", index) for index in range(3)]


def dare_reference(base, deltas, weights, density, keys, *, consensus, normalize):
    """DARE written out entry by entry: keep where draw < density, survivors / density, then TIES or a sum."""
    kept = [[float(d) / density if float(u) < density else 0.0 for d, u in zip(delta, sparsify.dare_draws(len(delta), key))]
            for delta, key in zip(deltas, keys)]
    merged = []
    for entry in range(len(base)):
        values = [weight * kept[model][entry] for model, weight in enumerate(weights)]
        if not consensus:
            merged.append(sum(values) / (sum(weights) if normalize else 1.0))
            continue
        positive = sum(values) >= 0
        agreeing = [(value, weights[model]) for model, value in enumerate(values) if value != 0 and (value > 0) == positive]
        total = sum(value for value, _ in agreeing)
        weight = sum(weight for _, weight in agreeing)
        merged.append(total / weight if normalize and weight else total)
    return base + T(merged)


def test_dare_at_full_density_is_task_arithmetic():
    tensors = [BASE + delta for delta in DELTAS]
    # nothing dropped, survivors scaled by 1/1: A + 0.5 B + C = [3.5, 3, 1, -5.95]
    merged = dare(BASE, tensors, WEIGHTS, [1.0] * 3, KEYS, consensus=False)
    torch.testing.assert_close(merged, BASE + T([3.5, 3.0, 1.0, -5.95]))


@pytest.mark.parametrize("consensus", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_dare_drops_by_draw_and_rescales_by_inverse_density(consensus, normalize):
    generator = torch.Generator().manual_seed(2)
    base = torch.randn(64, generator=generator)
    deltas = [torch.randn(64, generator=generator) for _ in range(3)]
    merged = dare(base, [base + delta for delta in deltas], WEIGHTS, [0.4] * 3, KEYS, consensus=consensus,
                  normalize=normalize)
    expected = dare_reference(base, [base + delta - base for delta in deltas], WEIGHTS, 0.4, KEYS,
                              consensus=consensus, normalize=normalize)
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-6)


def test_dare_l1_rescale_restores_each_task_vectors_l1_norm():
    delta = torch.linspace(-2.0, 3.0, 50)
    base = torch.zeros(50)
    keep = sparsify.dare_draws(50, KEYS[0]) < 0.5
    assert 0 < int(keep.sum()) < 50
    merged = dare(base, [delta], [1.0], [0.5], KEYS[:1], consensus=False, rescale="l1")
    factor = float(delta.abs().sum()) / float(delta[keep].abs().sum())
    torch.testing.assert_close(merged, torch.where(keep, delta * factor, 0.0))


def test_dare_draws_are_seeded_per_tensor_and_model():
    name = "model.layers.0.mlp.up_proj.weight"
    draws = sparsify.dare_draws(200_000, sparsify.dare_key(7, name, 1))
    assert torch.equal(draws, sparsify.dare_draws(200_000, sparsify.dare_key(7, name, 1)))
    others = [sparsify.dare_key(7, name, 0), sparsify.dare_key(8, name, 1), sparsify.dare_key(7, name.replace("0", "1"), 1)]
    for key in others:
        other = sparsify.dare_draws(200_000, key)
        assert abs(float(torch.corrcoef(torch.stack([draws, other]))[0, 1])) < 0.01
    assert float(draws.min()) >= 0.0 and float(draws.max()) < 1.0
    counts = torch.histc(draws, bins=10, min=0.0, max=1.0) / draws.numel()
    assert torch.allclose(counts, torch.full((10,), 0.1), atol=0.005)  # uniform
    assert abs(float(torch.corrcoef(torch.stack([draws[:-1], draws[1:]]))[0, 1])) < 0.01  # neighbours independent
    for density in (0.1, 0.5, 0.9):
        assert abs(float((draws < density).float().mean()) - density) < 0.005


def test_slerp_follows_the_great_circle():
    first, second = T([2.0, 0.0]), T([0.0, 2.0])  # orthogonal, angle pi/2
    half = slerp(0.5, first, second)
    torch.testing.assert_close(half, T([2 * math.sqrt(0.5), 2 * math.sqrt(0.5)]))
    third = slerp(1 / 3, first, second)
    torch.testing.assert_close(third, T([2 * math.cos(math.pi / 6), 2 * math.sin(math.pi / 6)]))
    assert torch.equal(slerp(0.0, first, second), first)


def test_slerp_of_parallel_tensors_is_linear():
    torch.testing.assert_close(slerp(0.25, T([1.0, 1.0]), T([3.0, 3.0])), T([1.5, 1.5]))


def test_fisher_weights_each_entry_by_its_importance():
    tensors = [T([1.0, 2.0]), T([3.0, 4.0])]
    fishers = [T([1.0, 0.0]), T([3.0, 1.0])]
    # entry 0: (1*1 + 3*3) / (1 + 3) = 2.5 ; entry 1: F floored at 1e-6 -> (1e-6*2 + 4) / (1 + 1e-6)
    merged = fisher(tensors, fishers, [1.0, 1.0], floor=1e-6)
    torch.testing.assert_close(merged, T([2.5, (2e-6 + 4.0) / (1.0 + 1e-6)]))
    # weights scale the importances: entry 0 (2*1*1 + 3*3) / (2 + 3)
    torch.testing.assert_close(fisher(tensors, fishers, [2.0, 1.0])[0], T(11.0 / 5.0))


def test_regmean_with_diagonal_grams():
    weights = [T([[1.0, 2.0]]), T([[5.0, 6.0]])]  # one output, two inputs
    grams = [torch.diag(T([3.0, 1.0])), torch.diag(T([1.0, 1.0]))]
    # (W1 G1 + W2 G2)(G1 + G2)^-1 = ([3, 2] + [5, 6]) diag(1/4, 1/2) = [2, 4]
    torch.testing.assert_close(regmean(weights, grams, [1.0, 1.0], alpha=0.5), T([[2.0, 4.0]]))


def test_regmean_shrinks_off_diagonal_terms():
    gram = T([[2.0, 1.0], [1.0, 2.0]])
    assert torch.equal(shrink_gram(gram, 0.5), T([[2.0, 0.5], [0.5, 2.0]]))


def test_regmean_minimises_the_summed_output_error():
    generator = torch.Generator().manual_seed(1)
    inputs = [torch.randn(40, 5, generator=generator) for _ in range(2)]
    layers = [torch.randn(3, 5, generator=generator) for _ in range(2)]
    grams = [x.T @ x for x in inputs]
    merged = regmean(layers, grams, [1.0, 1.0], alpha=1.0)
    # independent least squares: stack both models' inputs and their layers' outputs
    stacked_inputs = torch.cat(inputs)
    stacked_outputs = torch.cat([x @ w.T for x, w in zip(inputs, layers)])
    expected = torch.linalg.lstsq(stacked_inputs.double(), stacked_outputs.double()).solution.T
    torch.testing.assert_close(merged, expected.float(), rtol=1e-4, atol=1e-5)


def test_results_come_back_in_the_checkpoint_dtype():
    base = T([1.0, 2.0]).to(torch.bfloat16)
    merged = task_arithmetic(base, [base + 1], [0.5])
    assert merged.dtype == torch.bfloat16
    assert torch.equal(merged, T([1.5, 2.5]).to(torch.bfloat16))


@pytest.mark.slow
def test_compiled_kernels_match_eager(monkeypatch):
    """Big tensors run through torch.compile; the fused kernels must give the eager results exactly."""
    size = 4 * kernels.COMPILE_MIN_NUMEL + 7
    generator = torch.Generator().manual_seed(3)
    base = (torch.randn(size, generator=generator) * 0.02).to(torch.bfloat16)
    tensors = [(base.float() + torch.randn(size, generator=generator) * 0.002).to(torch.bfloat16) for _ in range(3)]
    fishers = [torch.rand(size, generator=generator) for _ in range(3)]
    keys = [sparsify.dare_key(0, "w", index) for index in range(3)]
    weights, densities = [0.5, 0.3, 0.2], [0.3, 0.5, 0.7]
    cases = {
        "linear": lambda: linear(tensors, weights),
        "task_arithmetic": lambda: task_arithmetic(base, tensors, weights, scale=0.7, normalize=True),
        "ties": lambda: ties(base, tensors, weights, densities),
        "dare_ties": lambda: dare(base, tensors, weights, densities, keys, consensus=True, rescale="l1"),
        "dare_linear": lambda: dare(base, tensors, weights, densities, keys, consensus=False),
        "slerp": lambda: slerp(0.3, tensors[0], tensors[1]),
        "fisher": lambda: fisher(tensors, fishers, weights),
        "trim": lambda: torch.tensor([sparsify.trim(base, tensors[0], 0.3).threshold,
                                      sparsify.trim(base, tensors[0], 0.3).cut]),
    }
    compiled = {name: run() for name, run in cases.items()}
    monkeypatch.setattr(kernels, "_compile_enabled", False)
    for name, run in cases.items():
        assert torch.equal(compiled[name], run()), name
