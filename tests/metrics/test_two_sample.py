"""c2st and mmd: the sbibm definition, null and separated behaviour, invariances and bad input."""

import math

import numpy as np
import pytest
import torch
from sklearn.model_selection import KFold, cross_val_score
from sklearn.neural_network import MLPClassifier
from threadpoolctl import threadpool_limits

import fastflow.metrics.two_sample as two_sample
from fastflow.metrics import c2st, mmd


def _normal(n, dim, seed, shift=0.0):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)) + shift


def test_c2st_is_the_sbibm_computation():
    X, Y = _normal(300, 3, 0), _normal(300, 3, 1, shift=1.5)
    # sbibm.metrics.c2st, spelled out
    mean, std = torch.mean(X, dim=0), torch.std(X, dim=0)
    Xz, Yz = ((X - mean) / std).numpy(), ((Y - mean) / std).numpy()
    clf = MLPClassifier(activation="relu", hidden_layer_sizes=(30, 30), max_iter=10000, solver="adam", random_state=7)
    data = np.concatenate((Xz, Yz))
    target = np.concatenate((np.zeros(300), np.ones(300)))
    with threadpool_limits(limits=1):
        expected = cross_val_score(clf, data, target, cv=KFold(n_splits=4, shuffle=True, random_state=7)).mean()
    assert c2st(X, Y, seed=7, n_folds=4) == pytest.approx(float(expected), abs=1e-12)
    assert c2st(X, Y, seed=7, n_folds=4, n_jobs=1) == c2st(X, Y, seed=7, n_folds=4, n_jobs=2)
    assert c2st(X.numpy(), Y.numpy(), seed=7, n_folds=4) == c2st(X, Y, seed=7, n_folds=4)


def test_c2st_same_and_separated():
    X, Y = _normal(2000, 2, 2), _normal(2000, 2, 3)
    # accuracy of a classifier with no signal over 4000 points: sd ≈ 0.5/√4000 ≈ 0.008
    assert 0.45 < c2st(X, Y) < 0.55
    assert c2st(X, _normal(2000, 2, 4, shift=5.0)) > 0.99


def test_c2st_of_samples_of_different_sizes():
    """A classifier trained on unbalanced classes learns the larger one's share: plain accuracy tends to it (1000 vs
    200 of one distribution: 0.83) and even the balanced accuracy sank to 0.5 for samples that differ (2500 vs 500,
    0.6 sd apart: 0.50, 0.62 reachable); the larger sample is cut to the smaller's size."""
    X = _normal(1000, 2, 8)
    assert abs(c2st(X, _normal(200, 2, 9)) - 0.5) < 0.06
    assert c2st(X, _normal(200, 2, 10, shift=5.0)) > 0.99
    shifted = _normal(500, 2, 11) + torch.tensor([0.6, 0.0])
    for X_, Y_ in ((_normal(2500, 2, 12), shifted), (shifted, _normal(2500, 2, 12))):  # either order
        assert c2st(X_, Y_) > 0.56  # optimum Φ(0.3) = 0.618
    Y = _normal(300, 2, 13)
    assert c2st(X, Y, seed=3) == c2st(X, Y, seed=3)  # the subset is seeded


def test_c2st_of_a_small_sample_against_a_large_one():
    """10 against 500 draws of one distribution: near 0.5 (plain K-folds of the uncut samples left folds of one class,
    0.60 on average); with 10 draws a side each score is noisy (0.4-0.75), so the mean of 8 seeds is tested."""
    scores = [c2st(_normal(10, 2, seed), _normal(500, 2, seed + 100)) for seed in range(8)]
    assert abs(sum(scores) / len(scores) - 0.5) < 0.1, scores


def test_c2st_takes_half_precision_and_numpy_fold_counts():
    X, Y = _normal(300, 2, 11), _normal(300, 2, 12)
    assert abs(c2st(X.bfloat16(), Y.bfloat16(), n_folds=np.int64(3)) - 0.5) < 0.1


def test_c2st_affine_invariance_with_z_score():
    X, Y = _normal(500, 2, 5), _normal(500, 2, 6, shift=0.5)
    scale, shift = torch.tensor([100.0, 0.01]), torch.tensor([-3.0, 50.0])
    a, b = c2st(X, Y), c2st(X * scale + shift, Y * scale + shift)
    assert abs(a - b) < 0.02


def test_c2st_bad_input():
    X = _normal(50, 2, 0)
    with pytest.raises(ValueError, match="differ in dimension"):
        c2st(X, _normal(50, 3, 1))
    Y = X.clone()
    Y[3, 1] = math.nan
    with pytest.raises(ValueError, match="Y contains NaN"):
        c2st(X, Y)
    with pytest.raises(ValueError, match=r"shape \(n, dim\)"):
        c2st(X[:, 0], X[:, 0])
    with pytest.raises(ValueError, match=r"dim >= 1"):
        c2st(X[:, :0], X[:, :0])
    with pytest.raises(ValueError, match="n_folds"):
        c2st(X, X, n_folds=1)
    with pytest.raises(ValueError, match="at least n_folds = 5 samples"):
        c2st(X, X[:4])
    with pytest.raises(TypeError, match="must be real"):
        c2st(X.to(torch.complex64), X)
    constant = X.clone()
    constant[:, 0] = 1.0
    with pytest.raises(ValueError, match="constant coordinate"):
        c2st(constant, X)


def _mmd_naive(X, Y, h):
    k = lambda A, B: torch.exp(-torch.cdist(A, B) ** 2 / (2 * h**2))  # noqa: E731
    n, m = len(X), len(Y)
    kxx, kyy = k(X, X), k(Y, Y)
    return float(
        (kxx.sum() - kxx.trace()) / (n * (n - 1)) + (kyy.sum() - kyy.trace()) / (m * (m - 1)) - 2 * k(X, Y).mean()
    )


def test_mmd_matches_naive_formula_across_chunks(monkeypatch):
    X, Y = _normal(300, 3, 0).double(), _normal(200, 3, 1, shift=0.4).double()
    expected = _mmd_naive(X, Y, 1.3)
    assert mmd(X, Y, bandwidth=1.3) == pytest.approx(expected, rel=1e-10)
    monkeypatch.setattr(two_sample, "CHUNK", 7)
    assert mmd(X, Y, bandwidth=1.3) == pytest.approx(expected, rel=1e-10)
    assert mmd(X, Y, bandwidth=np.float64(1.3)) == pytest.approx(expected, rel=1e-10)  # numpy numbers count
    Z = torch.cat((X, Y))
    assert mmd(X, Y) == pytest.approx(_mmd_naive(X, Y, float(torch.pdist(Z).median())), rel=1e-10)


def test_mmd_null_and_alternative():
    n = 2000
    X, Y = _normal(n, 2, 7), _normal(n, 2, 8)
    # under the null the unbiased MMD² is centred at 0 with sd O(1/n)
    assert abs(mmd(X, Y)) < 5 / n
    assert mmd(X, _normal(n, 2, 9, shift=0.5)) > 20 / n
    assert mmd(X, _normal(n, 2, 9, shift=1.0)) > mmd(X, _normal(n, 2, 9, shift=0.5))


def test_mmd_invariances():
    X, Y = _normal(400, 3, 10).double(), _normal(300, 3, 11, shift=0.3).double()
    value = mmd(X, Y)
    assert mmd(Y, X) == pytest.approx(value, rel=1e-10)
    rotation, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    shift = torch.tensor([5.0, -2.0, 1.0], dtype=torch.float64)
    assert mmd(X @ rotation + shift, Y @ rotation + shift) == pytest.approx(value, rel=1e-8)
    # the median heuristic makes it scale-invariant
    assert mmd(10 * X, 10 * Y) == pytest.approx(value, rel=1e-8)
    assert mmd(X.numpy(), Y.float()) == pytest.approx(value, rel=1e-5)


def test_mmd_of_samples_far_from_the_origin():
    """cdist's |a|² + |b|² − 2a·b lost the distances of 0.01-wide samples at 1e7 (MMD 0.005 instead of 0.21)."""
    X, Y = 0.01 * _normal(1000, 2, 14).double(), 0.01 * _normal(1000, 2, 15, shift=1.0).double()
    near = mmd(X, Y)
    assert near > 0.1
    assert mmd(X + 1e7, Y + 1e7) == pytest.approx(near, rel=1e-3)


def test_mmd_bad_input():
    X = _normal(20, 2, 0)
    with pytest.raises(ValueError, match=r"dim >= 1"):
        mmd(X[:, :0], X[:, :0], bandwidth=1.0)
    with pytest.raises(ValueError, match="differ in dimension"):
        mmd(X, _normal(20, 1, 0))
    with pytest.raises(ValueError, match="X contains NaN"):
        mmd(torch.full((5, 2), math.inf), X)
    with pytest.raises(ValueError, match="at least 2 samples"):
        mmd(X[:1], X)
    for bandwidth in (0.0, -1.0, math.nan, "1"):
        with pytest.raises(ValueError, match="bandwidth"):
            mmd(X, X, bandwidth=bandwidth)
    with pytest.raises(ValueError, match="median pairwise distance is 0"):
        mmd(torch.zeros(5, 2), torch.zeros(5, 2))
