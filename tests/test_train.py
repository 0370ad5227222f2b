"""The training loop: a loss that turns NaN or inf stops it clearly."""

import importlib
import math

import pytest
import torch

from fastflow.train import evaluate, fit


def _data():
    x = torch.randn(64, 2)
    return (x, x.sum(-1, keepdim=True))


def test_a_loss_that_is_nan_from_the_start_raises():
    model = torch.nn.Linear(2, 1)
    with pytest.raises(RuntimeError, match="training loss is nan at epoch 0"):
        fit(model, lambda m, x, y: (m(x) - y).square().mean() * math.nan, _data(), max_epochs=3, progress=False)


def test_a_validation_loss_that_is_not_finite_stops_clearly():
    """A NaN validation loss ran out the patience without a word (best_epoch -1, the last weights kept): it raises
    at the first epoch, and later stops with a warning, keeping the best weights."""
    model = torch.nn.Linear(2, 1)
    with pytest.raises(RuntimeError, match="validation loss is nan at epoch 0"):
        fit(model, lambda m, x, y: (m(x) - y).square().mean() * (math.nan if not m.training else 1.0), _data(),
            max_epochs=3, progress=False)
    evaluations = [0]

    def loss(m, x, y):
        value = (m(x) - y).square().mean()
        if not m.training:
            evaluations[0] += 1
            return value * math.inf if evaluations[0] > 4 else value
        return value

    with pytest.warns(RuntimeWarning, match="validation loss became inf at epoch 4: stopped, keeping the weights of epoch 3"):
        history = fit(model, loss, _data(), max_epochs=20, learning_rate=1e-2, validation_fraction=0.25, progress=False)
    assert history.stopped_early and history.best_epoch == 3 and history.epochs == 5


@pytest.mark.parametrize("validation_fraction", [0.1, 0.0])
def test_a_loss_that_turns_nan_keeps_the_best_weights(validation_fraction):
    """With a validation split the best weights; without one (FMPE's default) the last finite ones (it raised,
    losing every epoch, and left the model NaN)."""
    model = torch.nn.Linear(2, 1)
    calls = [0]

    def loss(m, x, y):
        calls[0] += 1
        value = (m(x) - y).square().mean()
        return value * math.nan if m.training and calls[0] > 20 else value

    with pytest.warns(RuntimeWarning, match="stopped, keeping the weights of epoch"):
        history = fit(model, loss, _data(), batch_size=16, max_epochs=50, validation_fraction=validation_fraction,
                      progress=False)
    assert history.stopped_early and all(torch.isfinite(p).all() for p in model.parameters())
    # without a split the weights the last finite epoch ended with were not scored (the NaN epoch's first step did)
    assert history.best_epoch >= 3 and history.epochs == history.best_epoch + (2 if validation_fraction else 3)


@pytest.mark.parametrize("batch_size", [8, 4])
def test_without_a_split_a_nan_epoch_keeps_weights_that_gave_a_finite_loss(batch_size):
    """log(w) trained down to w < 0: without a split the weights the last finite epoch ended with were kept, and they
    were the ones whose loss was NaN (w = -0.13)."""
    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(1.0))

    def loss(m, x):
        return (m.w * x).log().mean()

    model = Scale()
    with pytest.warns(RuntimeWarning, match="training loss became nan"):
        history = fit(model, loss, (torch.ones(8),), batch_size=batch_size, learning_rate=0.3, max_epochs=50,
                      validation_fraction=0.0, clip_grad_norm=None, progress=False)
    with torch.no_grad():
        assert model.w > 0 and math.isfinite(loss(model, torch.ones(8)))
    assert history.best_epoch < history.epochs - 1


def test_bad_settings_are_refused_before_training():
    """Fractional counts gave obscure TypeErrors; a NaN clip_grad_norm made every weight NaN after one step, and a
    negative one was reported as a learning-rate problem."""
    model = torch.nn.Linear(2, 1)
    loss = lambda m, x, y: (m(x) - y).square().mean()  # noqa: E731
    for options, message in ((dict(batch_size=2.5), "batch_size"), (dict(max_epochs=2.5), "max_epochs"),
                             (dict(patience=0), "patience"), (dict(clip_grad_norm=math.nan), "clip_grad_norm"),
                             (dict(clip_grad_norm=-1.0), "clip_grad_norm"), (dict(learning_rate=math.inf), "learning_rate"),
                             (dict(learning_rate=0.0), "learning_rate")):
        with pytest.raises(ValueError, match=message):
            fit(model, loss, _data(), progress=False, **options)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(ValueError, match=r"at most 2\*\*32 - 1"):  # (torch overflowed "unpacking long long")
        fit(model, loss, _data(), progress=False, seed=2**64)
    with pytest.raises(ValueError, match=r"at most 2\*\*32 - 1"):  # (torch keeps 32 bits: it was seed 0's fit)
        fit(model, loss, _data(), progress=False, seed=2**32)
    for data in (_data()[0], (), tuple(t.numpy() for t in _data())):  # a bare tensor, nothing, numpy arrays
        with pytest.raises(TypeError, match="data must be a non-empty tuple of tensors"):
            fit(model, loss, data, progress=False)


def test_evaluate_refuses_bad_batch_sizes_and_empty_data():
    """A negative batch size summed nothing and returned 0.0; empty data divided by zero."""
    model = torch.nn.Linear(2, 1)
    loss = lambda m, x, y: (m(x) - y).square().mean()  # noqa: E731
    for batch_size in (-1, 0):
        with pytest.raises(ValueError, match="batch_size"):
            evaluate(model, loss, _data(), batch_size=batch_size)
    with pytest.raises(ValueError, match="at least one row"):
        evaluate(model, loss, tuple(t[:0] for t in _data()))


def test_fit_leaves_the_callers_random_stream_as_it_was():
    """fit seeded torch's global stream with its seed: draws after consecutive fits repeated whatever the caller
    had seeded before them."""
    model = torch.nn.Linear(2, 1)
    loss = lambda m, x, y: (m(x) - y).square().mean()  # noqa: E731
    data = _data()
    torch.manual_seed(123)
    expected = torch.randn(3)
    torch.manual_seed(123)
    fit(model, loss, data, max_epochs=2, progress=False)
    assert torch.equal(torch.randn(3), expected)


def test_a_random_validation_loss_uses_the_same_draws_at_every_call():
    """Flow matching's loss draws times and noise: validated with fresh draws, its epochs differed by the draws'
    noise, not by the model. `evaluate` draws the same numbers at every call and leaves the global stream alone."""
    model = torch.nn.Linear(2, 1)
    noisy = lambda m, x, y: (m(x) + torch.randn_like(y) - y).square().mean()  # noqa: E731
    data = _data()
    torch.manual_seed(3)
    state = torch.get_rng_state()
    first, second = (evaluate(model, noisy, data, batch_size=16) for _ in range(2))
    assert first == second and torch.equal(torch.get_rng_state(), state)
    assert evaluate(model, noisy, data, seed=1) != first  # another seed, other draws
    fresh = [evaluate(model, noisy, data, seed=None) for _ in range(2)]
    assert fresh[0] != fresh[1] and not torch.equal(torch.get_rng_state(), state)


class _ScriptedValidation:
    """A loss whose training value is a model's MSE and whose validation value follows `script` (one per epoch)."""

    def __init__(self, script):
        self.script, self.epoch = list(script), 0

    def __call__(self, m, x, y):
        if m.training:
            return (m(x) - y).square().mean()
        value = self.script[min(self.epoch, len(self.script) - 1)]
        self.epoch += 1
        return torch.tensor(value)


def _weights_by_epoch():
    """Records the model's weights after each epoch (read where `evaluate` calls the loss)."""
    kept = []

    def loss(m, x, y, scripted):
        if not m.training:
            kept.append(m.weight.detach().clone())
        return scripted(m, x, y)
    return kept, loss


@pytest.mark.parametrize("keep", ["best", "last"])
def test_keep_chooses_the_best_or_the_last_epoch(keep):
    model = torch.nn.Linear(2, 1)
    kept, loss = _weights_by_epoch()
    scripted = _ScriptedValidation([3.0, 1.0, 2.0, 2.5, 2.0])
    history = fit(model, lambda m, x, y: loss(m, x, y, scripted), _data(), batch_size=512, max_epochs=5,
                  learning_rate=1e-2, validation_fraction=0.25, keep=keep, progress=False)
    epoch = 1 if keep == "best" else 4
    assert history.best_epoch == epoch and not history.stopped_early
    assert torch.equal(model.weight, kept[epoch]) and not torch.equal(kept[1], kept[4])


def test_overfitting_stops_and_keeps_the_best_weights():
    """A validation loss risen past its best by more than overfit_tolerance of the improvement on the first epoch's
    stops training and restores the best epoch's weights, even with keep="last"; smaller rises do not, nor any
    rise before the loss improves on the first epoch's."""
    model = torch.nn.Linear(2, 1)
    kept, loss = _weights_by_epoch()
    # improvements 1.0 then 2.0 on the first epoch's 3.0: thresholds 0.2 and 0.4 above the best
    scripted = _ScriptedValidation([3.0, 2.0, 2.15, 1.0, 1.3, 1.45, 0.5])
    history = fit(model, lambda m, x, y: loss(m, x, y, scripted), _data(), batch_size=512, max_epochs=7,
                  learning_rate=1e-2, validation_fraction=0.25, keep="last", overfit_tolerance=0.2, overfit_patience=1,
                  progress=False)
    assert history.overfit and history.stopped_early and history.epochs == 6 and history.best_epoch == 3
    assert torch.equal(model.weight, kept[3])
    scripted = _ScriptedValidation([1.0, 2.0, 4.0, 8.0])
    history = fit(model, scripted, _data(), batch_size=512, max_epochs=4, validation_fraction=0.25, keep="last",
                  overfit_tolerance=0.2, overfit_patience=1, progress=False)
    assert not history.overfit and history.epochs == 4 and history.best_epoch == 3


def test_an_overfitting_rise_must_last_overfit_patience_epochs():
    """A noisy loss's one-epoch jumps (flow matching on a narrow posterior jumped 2.5x at epoch 22 of a run that went
    on improving 10-fold) do not stop training; a rise held for `overfit_patience` epochs does, keeping the best
    weights. Thresholds: 0.2 above the best of 2.0, 0.4 above 1.0."""
    model = torch.nn.Linear(2, 1)
    kept, loss = _weights_by_epoch()
    scripted = _ScriptedValidation([3.0, 2.0, 2.5, 2.1, 2.6, 2.7, 1.0, 1.5, 1.5, 1.2, 1.5, 1.5, 1.5, 0.9])
    history = fit(model, lambda m, x, y: loss(m, x, y, scripted), _data(), batch_size=512, max_epochs=14,
                  learning_rate=1e-2, validation_fraction=0.25, keep="last", overfit_tolerance=0.2, overfit_patience=3,
                  progress=False)
    # epochs 2, 4, 5 rise past 2.2 but not three in a row; 7, 8 and 10-12 past 1.4: stopped at 12 with epoch 6's weights
    assert history.overfit and history.epochs == 13 and history.best_epoch == 6
    assert torch.equal(model.weight, kept[6])


def test_bad_keep_and_overfit_tolerance_are_refused():
    model = torch.nn.Linear(2, 1)
    loss = lambda m, x, y: (m(x) - y).square().mean()  # noqa: E731
    for options, message in ((dict(keep="middle"), "keep"), (dict(overfit_tolerance=-0.1), "overfit_tolerance"),
                             (dict(overfit_tolerance=math.nan), "overfit_tolerance"),
                             (dict(overfit_patience=0), "overfit_patience")):
        with pytest.raises(ValueError, match=message):
            fit(model, loss, _data(), progress=False, **options)


@pytest.mark.parametrize("mixed_precision, hardware, expected", [
    ("bf16", False, True), ("off", True, False), ("auto", True, True), ("auto", False, False)])
def test_mixed_precision_runs_the_loss_under_bf16_autocast(monkeypatch, mixed_precision, hardware, expected):
    """bf16 products in the loss, training and validation ("auto": where the CPU multiplies bf16 in hardware), with
    float32 weights and optimizer; the model still learns."""
    monkeypatch.setattr(importlib.import_module("fastflow.backends"), "cpu_has_bf16_products", lambda: hardware)
    model = torch.nn.Linear(2, 1)
    autocast_seen = set()

    def loss(m, x, y):
        autocast_seen.add((m.training, torch.is_autocast_enabled("cpu")))
        return (m(x) - y).square().mean()

    history = fit(model, loss, _data(), batch_size=16, learning_rate=0.05, max_epochs=30, validation_fraction=0.25,
                  mixed_precision=mixed_precision, progress=False)
    assert autocast_seen == {(True, expected), (False, expected)}
    assert model.weight.dtype == torch.float32 and history.validation_loss[-1] < 0.1 * history.validation_loss[0]
    with pytest.raises(ValueError, match="mixed_precision must be"):
        fit(model, loss, _data(), mixed_precision=True, progress=False)


@pytest.mark.parametrize("mixed_precision", ["off", "bf16"])
def test_an_autocast_around_fit_does_not_freeze_the_weights(mixed_precision):
    """Under a caller's autocast the loss saw the weights cast at the first step for the whole fit (autocast keeps
    its cast copies until its outermost context exits): the loss never moved. The caller's autocast is off inside fit,
    and mixed_precision casts anew at every step."""
    model = torch.nn.Linear(2, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        history = fit(model, lambda m, x, y: (m(x) - y).square().mean(), _data(), batch_size=16, learning_rate=0.05,
                      max_epochs=30, validation_fraction=0.25, mixed_precision=mixed_precision, progress=False)
    assert history.validation_loss[-1] < 0.1 * history.validation_loss[0]
