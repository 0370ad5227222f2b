"""`fit`: the one training loop — Adam on minibatches, validation split, early stopping, gradient clipping."""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from fastflow._checks import check_seed, positive_finite, positive_int
from fastflow.backends import autocast_off, autograd_recording, bf16_products

__all__ = ["History", "fit", "seeded_stream", "training_rows"]


@dataclass
class History:
    """What `fit` did: per-epoch mean losses, the epoch whose weights were kept, whether it stopped early (and
    whether for overfitting, see `fit`'s overfit_tolerance), and the wall time."""

    train_loss: list[float] = field(default_factory=list)
    validation_loss: list[float] = field(default_factory=list)
    best_epoch: int = -1
    stopped_early: bool = False
    overfit: bool = False
    seconds: float = 0.0

    @property
    def epochs(self) -> int:
        return len(self.train_loss)


def training_rows(count: int, validation_fraction: float, seed: int) -> torch.Tensor:
    """The indices `(count - V,)` of the rows `fit(..., validation_fraction=, seed=)` trains on (the others, V, score
    the epochs): statistics fitted before training (an estimator's z-scoring) take these rows alone."""
    return _split(count, validation_fraction, torch.Generator().manual_seed(check_seed(seed)))[0]


def _split(count: int, validation_fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and validation indices of `count` rows, drawn by `generator` (fit's, seeded, which goes on to draw
    the minibatches)."""
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    order = torch.randperm(count, generator=generator)
    validation_count = int(round(validation_fraction * count)) if validation_fraction > 0 else 0
    if validation_fraction > 0 and validation_count == 0:
        validation_count = 1
    if count - validation_count < 1:
        raise ValueError(f"{count} examples leave nothing to train on")
    return order[validation_count:], order[:validation_count]


@autograd_recording()  # (under a caller's no_grad: "element 0 of tensors does not require grad")
def fit(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    data: tuple[torch.Tensor, ...],
    *,
    batch_size: int = 256,
    learning_rate: float = 1e-3,
    max_epochs: int = 200,
    validation_fraction: float = 0.1,
    patience: int = 20,
    clip_grad_norm: float | None = 5.0,
    lr_schedule: str = "constant",
    keep: str = "best",
    overfit_tolerance: float | None = None,
    overfit_patience: int = 10,
    mixed_precision: str = "off",
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> History:
    """Train `model` by minimizing `loss_fn(model, *batch)` (a mean over the batch).

    Arguments:
        data: tensors sharing their first dimension `(N, ...)`, sliced together into minibatches.
        lr_schedule: "constant" or "cosine" (annealed to zero over `max_epochs`).
        patience: stop after this many epochs without a better validation loss; the weights `keep` names are
            kept (the best, by default). With `validation_fraction=0` every epoch trains and the last weights are kept.
            A loss that turns NaN/inf stops training with a warning and restores the best (or, without a split, the
            last) weights seen to give a finite loss (without a split: the weights an epoch started from, scored by
            its first step; the weights an epoch ends with are unscored until the next one).
        keep: with a validation split, the weights kept when training ends: "best" (the best validation epoch's)
            or "last" (the last epoch's: for losses whose validation estimate cannot rank nearby epochs, as flow
            matching's, where the last epochs of a cosine schedule are better than the best-scored one).
        overfit_tolerance: with a validation split, stop once the validation loss has stayed above its best by more
            than this fraction of the improvement the best made on the first epoch's for `overfit_patience`
            consecutive epochs, keeping the best epoch's weights whatever `keep` says (the model is memorizing its
            training pairs; a scale-free test, which a loss's irreducible part does not dilute). For models trained
            from scratch, whose first epoch leaves much to improve; it never fires before the loss improves on the
            first epoch's. None: never.
        overfit_patience: how many consecutive epochs the rise must last (memorizing raises the loss for good; a
            noisy loss jumps for an epoch: flow matching on a narrow posterior, whose single-epoch jump at epoch 22 of
            an 800-epoch run that went on improving 10-fold stopped it with 6x too wide a posterior).
        mixed_precision: "bf16": compute the loss (training and validation) under `torch.autocast` with bfloat16
            products (weights, gradients and the optimizer stay float32); "auto": so on a CPU that multiplies
            bfloat16 in hardware (`fastflow.backends.cpu_has_bf16_products`), else as "off" (float32).
        seed: draws the validation split and the minibatch order, and seeds torch's global random stream for the
            loss's own draws during training (the caller's stream is restored afterwards).
        device: where to train (default: the model's device); data is moved there once.
        progress: show a tqdm bar.

    Returns:
        the `History`.
    """
    if not isinstance(data, (tuple, list)) or not data or not all(isinstance(t, torch.Tensor) for t in data):
        raise TypeError(f"data must be a non-empty tuple of tensors sharing their first dimension, got {type(data).__name__}")
    count = data[0].shape[0]
    if any(t.shape[0] != count for t in data):
        raise ValueError(f"data tensors disagree in their first dimension: {[tuple(t.shape) for t in data]}")
    batch_size, max_epochs, patience = (positive_int(value, name) for name, value in (
        ("batch_size", batch_size), ("max_epochs", max_epochs), ("patience", patience)))
    learning_rate = positive_finite(learning_rate, "learning_rate")  # (inf blamed the data for its NaN loss)
    if clip_grad_norm is not None:  # (NaN made every weight NaN)
        positive_finite(clip_grad_norm, "clip_grad_norm")
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
    if keep not in ("best", "last"):
        raise ValueError(f"keep must be 'best' or 'last', got {keep!r}")
    if overfit_tolerance is not None:
        positive_finite(overfit_tolerance, "overfit_tolerance")
    overfit_patience = positive_int(overfit_patience, "overfit_patience")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    bf16 = bf16_products(mixed_precision, device)
    model.to(device)
    data = tuple(t.to(device) for t in data)
    seed = check_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train_index, validation_index = _split(count, validation_fraction, generator)
    train_data = tuple(t[train_index] for t in data)
    validation_data = tuple(t[validation_index] for t in data)
    train_count = train_index.numel()
    steps_per_epoch = math.ceil(train_count / batch_size)

    parameters = list(model.parameters())  # (walking the modules at every step cost ~0.1 ms)
    optimizer = torch.optim.Adam(parameters, lr=learning_rate, fused=True)
    scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_epochs * steps_per_epoch)
        if lr_schedule == "cosine"
        else None
    )
    history = History()
    best_loss, best_state, stale, risen = math.inf, None, 0, 0
    unscored = None  # without a split: the weights the last epoch ended with, scored by the next epoch's first step
    restore_best = keep == "best" and validation_index.numel() > 0  # (without a split: the last weights)
    start = time.perf_counter()
    bar = tqdm(range(max_epochs), disable=not progress, desc="training", unit="epoch", leave=False)
    # a caller's autocast is off here (the loss alone takes bf16 products, with mixed_precision): around fit it
    # reached the optimizer and kept its cast copies of the weights for the whole fit (an autocast caches them until
    # its outermost context exits), so every step ran the first step's weights and nothing was learned
    # the global random stream (a loss's draws: flow matching's times and noise) is seeded with `seed` inside, and
    # the caller's is left as it was (reseeding it made the draws after consecutive fits repeat)
    with autocast_off(device.type), seeded_stream(device, seed):
        for epoch in bar:
            model.train()
            order = torch.randperm(train_count, generator=generator).to(device)
            running = torch.zeros((), device=device)
            for step in range(steps_per_epoch):
                index = order[step * batch_size : (step + 1) * batch_size]
                with _autocast(device, bf16):
                    loss = loss_fn(model, *(t[index] for t in train_data))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if clip_grad_norm is not None:
                    nn.utils.clip_grad_norm_(parameters, clip_grad_norm)
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                running += loss.detach() * index.numel()
                if step == 0:
                    first_loss = loss.detach()
            history.train_loss.append(float(running) / train_count)
            if unscored is not None and (math.isfinite(history.train_loss[-1]) or math.isfinite(float(first_loss))):
                best_state, unscored, history.best_epoch = unscored, best_state, epoch - 1
            if not math.isfinite(history.train_loss[-1]):
                _stop_at_nonfinite("training", history.train_loss[-1], epoch, history, best_state,
                                   "lower the learning rate (or clip gradients), or check the data")
                restore_best = True
                break

            if validation_index.numel() == 0:  # (a NaN epoch restored the unscored weights that gave it its NaN)
                unscored = _snapshot(model, unscored)
                continue
            validation_loss = evaluate(model, loss_fn, validation_data, batch_size=max(batch_size, 4096), seed=seed,
                                       bf16=bf16)
            history.validation_loss.append(validation_loss)
            bar.set_postfix(train=f"{history.train_loss[-1]:.3f}", val=f"{validation_loss:.3f}")
            if not math.isfinite(validation_loss):  # (it ran out the patience without a word, keeping the last weights)
                _stop_at_nonfinite("validation", validation_loss, epoch, history, best_state,
                                   "check the data for rows the model gives no finite loss (NaN or inf)")
                restore_best = True
                break
            if validation_loss < best_loss:
                best_loss, stale, risen, history.best_epoch = validation_loss, 0, 0, epoch
                best_state = _snapshot(model, best_state)
                continue
            risen = risen + 1 if overfit_tolerance is not None and best_loss < history.validation_loss[0] and (
                validation_loss - best_loss > overfit_tolerance * (history.validation_loss[0] - best_loss)) else 0
            if risen >= overfit_patience:
                history.stopped_early = history.overfit = restore_best = True
                break
            stale += 1
            if stale >= patience:
                history.stopped_early = True
                break
    bar.close()
    if restore_best and best_state is not None:
        model.load_state_dict(best_state)
    elif not restore_best:
        history.best_epoch = history.epochs - 1
    model.eval()
    history.seconds = time.perf_counter() - start
    return history


def _stop_at_nonfinite(kind: str, loss: float, epoch: int, history: History, kept: dict | None, advice: str) -> None:
    """A NaN/inf `kind` loss at `epoch`: raise where no weights are kept yet, else warn that training stops with the
    kept weights (those of `history.best_epoch`)."""
    if kept is None:
        raise RuntimeError(f"the {kind} loss is {loss} at epoch {epoch}: {advice}")
    warnings.warn(f"the {kind} loss became {loss} at epoch {epoch}: stopped, keeping the weights of epoch "
                  f"{history.best_epoch}", RuntimeWarning, stacklevel=3)
    history.stopped_early = True


@contextlib.contextmanager
def seeded_stream(device: torch.device, seed: int | None):
    """torch's global random stream (and `device`'s, on CUDA) seeded with `seed` inside the context, the caller's
    restored after it; `seed=None`: the caller's stream, untouched."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """bfloat16 products (`torch.autocast` on `device`'s type) where `enabled`, casting the weights anew at each call
    (a nested autocast's cached copies outlive it: they would freeze the weights it sees)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled, cache_enabled=False)


@torch.no_grad()
def _snapshot(model: nn.Module, kept: dict | None) -> dict:
    """The model's state copied into `kept`, the previous snapshot (allocated once, at the first call)."""
    if kept is None:
        return copy.deepcopy(model.state_dict())
    for saved, value in zip(kept.values(), model.state_dict().values()):
        saved.copy_(value)
    return kept


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn: Callable[..., torch.Tensor], data: tuple[torch.Tensor, ...], *, batch_size: int = 4096,
             seed: int | None = 0, bf16: bool = False) -> float:
    """Mean of `loss_fn` over `data` in chunks, without gradients.

    A loss that draws random numbers (flow matching's times and noise) draws them from a generator seeded with
    `seed`, the same at every call (common random numbers: validation losses of successive epochs then differ by
    the model alone, not by new draws); the global random stream is left as it was. `seed=None`: fresh draws.
    `bf16`: under `torch.autocast` with bfloat16 products (`fit`'s mixed_precision)."""
    batch_size = positive_int(batch_size, "batch_size")  # (a negative one summed nothing and returned 0.0)
    count = data[0].shape[0]
    if count == 0:
        raise ValueError("evaluate needs at least one row of data")
    model.eval()
    device = data[0].device
    total = torch.zeros((), device=device)
    with seeded_stream(device, seed):
        for start in range(0, count, batch_size):
            chunk = tuple(t[start : start + batch_size] for t in data)
            with _autocast(device, bf16):
                total += loss_fn(model, *chunk).float() * chunk[0].shape[0]
    return float(total) / count
