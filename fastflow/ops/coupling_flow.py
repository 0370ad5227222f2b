"""Runs of coupling layers as one fused launch: consecutive coupling layers of one kind and size in a flow's
execution order, each optionally followed by a fixed permutation, go through `kernels.coupling.coupling_flow_triton`
in one Triton launch (the permutations become column maps of the kernel's stores) where the Triton backend fuses
the conditioners (`fastflow.ops.coupling.dispatch`, `fuses_conditioner`: TF32 products) and autograd does not
record. Under autograd there, runs train in two launches (`_FusedRun`: the fused run keeping each step's input,
then `kernels.coupling_backward`) where `trains_fused` says so (the interpreter; CUDA only when asked, with
FASTFLOW_FUSED_BACKWARD=1: on an H100 its earlier form was no faster than the layer steps). Otherwise on the Triton
backend (fp32 products on CUDA, training on CUDA, conditioners too wide for the fused backward), affine runs take one
`TritonAffineStep` per layer (its hidden layers in torch) and spline runs one `TritonSplineStep` per layer (its
conditioner in torch). Otherwise the run applies its transforms one by one, as the flow would. A coupling layer on
its own runs as a one-layer run (`fastflow.nn.coupling`).

A layer joins a run through its `fused_signature()`, `fused_layout()`, `fused_options()`, `parameter_slots` and
`_weights()` (`fastflow.nn.coupling`); a permutation through `column_map(inverse)` (`fastflow.flows.transforms`).
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from fastflow.backends import triton_device
from fastflow.ops.autograd import first_order
from fastflow.ops.coupling import (
    TritonAffineStep, TritonSplineStep, affine_step, conditioner_hidden, conditioner_ref, dispatch, spline_step,
)

__all__ = ["CouplingRun", "chain_transforms", "read_parameters", "trains_fused"]

Step = Callable[[torch.Tensor, "torch.Tensor | None"], "tuple[torch.Tensor, torch.Tensor]"]


def read_parameters(slots) -> list[torch.Tensor]:
    """The tensors named by `slots`, (module parameter dict, name) pairs, read on every call (a parameter assigned
    anew is the one read); a parameter that is no longer one (a parametrization such as weight_norm) raises."""
    try:
        return [parameters[name] for parameters, name in slots]
    except KeyError:
        raise RuntimeError("coupling layers read their conditioner's Linear weights and biases as plain parameters: "
                           "parametrizations (weight_norm, spectral_norm, ...) are not supported") from None


class CouplingRun:
    """Coupling layers, each with the permutation that follows it (or None), in execution order.

    Called as a transform, `(x (N, D), context (N, C) or None) -> (x (N, D), summed log|det J| (N,))`.
    """

    def __init__(self, steps: list[tuple[torch.nn.Module, torch.nn.Module | None]], inverse: bool):
        self.steps, self.inverse = steps, inverse
        self.couplings = [coupling for coupling, _ in steps]
        self._parameter_slots = [slot for coupling in self.couplings for slot in coupling.parameter_slots]
        first = self.couplings[0]
        self.backend, self.options = first.backend, first.fused_options()
        self._shapes = [w.shape for w in read_parameters(self._parameter_slots)]  # (`weights` checks them)
        offsets = torch.tensor([0] + [shape.numel() for shape in self._shapes]).cumsum(0)[:-1].view(len(steps), 6)
        layouts = torch.tensor([coupling.fused_layout() for coupling in self.couplings])
        self._steps = torch.cat([layouts, offsets], dim=1).to(torch.int32)  # the kernel's steps table (STEP_FIELDS)
        self._max_kept, self._max_changed = int(layouts[:, 1].max()), int(layouts[:, 3].max())
        self._n_hidden = first.conditioner[0].out_features
        self._layout = [torch.empty(shape, device="meta") for shape in self._shapes]  # for unpacking
        self._tables: dict[torch.device, tuple] = {}  # device -> (permutations' stamp, steps, column maps)
        self._gradient_positions: dict[tuple[torch.device, int], torch.Tensor] = {}  # (device, context dim) -> index

    def weights(self) -> list[torch.Tensor]:
        """Every layer's (w1, b1, w2, b2, w3, b3), read from the layers on each call (parameters may be replaced, by
        tensors of the same shapes: the run's tables were built for those)."""
        weights = read_parameters(self._parameter_slots)
        if [w.shape for w in weights] != self._shapes:
            raise ValueError("a coupling layer's conditioner weights changed shape after it was built (the fused runs "
                             "of layers take the shapes they were built with): build another layer of that width")
        return weights

    def __call__(self, x: torch.Tensor, context: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The run as a flow calls it: `on_triton` on a Triton device, x `(N, D)` and context checked first as the
        layers check them (`_rows`: the fused kernels would read any width), else the layers one by one (which
        check their inputs themselves)."""
        if triton_device(x.device):
            x, context = self.couplings[0]._rows(x, context)
            result = self.on_triton(x, context)
            if result is not None:
                return result
        return self._one_by_one(x, context)

    def on_triton(self, x: torch.Tensor, context: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The run on the Triton backend where dispatch takes it: one fused launch without autograd, two under
        autograd (`_trains_fused`), else one step per layer (`_layer_steps`); None where the layers dispatch one by one
        (another backend, or tensors Triton cannot take)."""
        if not (x.shape[0] and x.dim() == 2 and triton_device(x.device)):
            return None
        kernel_context = self.couplings[0]._context(context)
        weights = self.weights()
        how = dispatch(x, kernel_context, x, weights, self.backend, None, len(self.couplings), self.options.get("num_bins"))
        if how.fused:
            return self.fused(x, kernel_context, how.precision, weights)
        if how.fuses and self._trains_fused(kernel_context, x.device):
            return _FusedRun.apply(self, x, kernel_context, how.precision, *weights)
        if how.backend == "triton":
            return self._layer_steps(x, kernel_context, how.precision, how.recording)
        return None

    def _trains_fused(self, context: torch.Tensor | None, device: torch.device) -> bool:
        """Whether this run, under autograd where the Triton backend fuses its conditioners, trains through the fused
        kernels (`_FusedRun`): on a device where `trains_fused`, with conditioners the backward kernel takes
        (`kernels.coupling_backward.fits`: width <= 128, up to 128 inputs, 64 changed coordinates, 32 bins)."""
        from fastflow.kernels.coupling_backward import fits

        return fits(**self._sizes(context), num_bins=self.options.get("num_bins")) and trains_fused(device)

    def _one_by_one(self, x, context):
        total = None
        for coupling, permutation in self.steps:
            x, ladj = coupling.inverse(x, context) if self.inverse else coupling(x, context)
            total = ladj if total is None else total + ladj
            if permutation is not None:
                x, _ = permutation.inverse(x, context) if self.inverse else permutation(x, context)
        return x, total

    def _layer_steps(self, x, context, precision, recording: bool):
        """The layers on the Triton backend where the run does not fuse: each layer's conditioner in torch (affine:
        up to the last hidden pre-activation), the rest (map, log-determinant, permuted merge) as one
        `TritonAffineStep` or `TritonSplineStep` (where autograd records; else their kernels alone)."""
        ladj = None
        affine = "scale_bound" in self.options
        step = (TritonAffineStep.apply if affine else TritonSplineStep.apply) if recording else (
            affine_step if affine else spline_step)
        for (coupling, _), column_map in zip(self.steps, self._on(x.device)[1]):
            kept, changed = coupling._split(x)
            weights = coupling._weights()
            kept_0, _, changed_0, _ = coupling.fused_layout()
            if affine:
                x, ladj = step(conditioner_hidden(kept, context, weights, activate_last=False), weights[-2], weights[-1],
                               kept, changed, ladj, column_map, kept_0, changed_0, self.options["scale_bound"],
                               self.inverse, precision)
            else:
                x, ladj = step(conditioner_ref(kept, context, weights), kept, changed, ladj, column_map, kept_0, changed_0,
                               self.options["bound"], self.inverse)
        return x, ladj

    def fused(self, x: torch.Tensor, context: torch.Tensor | None, precision: str,
              weights: list[torch.Tensor] | None = None, **launch) -> tuple[torch.Tensor, torch.Tensor]:
        """The run as one launch of `kernels.coupling.coupling_flow_triton` (float32 on a Triton device, no autograd:
        the caller checks), its products in `precision`, with `launch` settings (block_m, block_hk, num_warps);
        `weights`: `self.weights()` when the caller has them."""
        weights = self.weights() if weights is None else weights
        return self.launch(x.contiguous(), context, pack(weights), precision, **launch)

    def launch(self, x: torch.Tensor, context: torch.Tensor | None, params: torch.Tensor, precision: str, **options):
        """`kernels.coupling.coupling_flow_triton` on x `(N, D)` (contiguous) with the packed weights (`pack`) and
        `options` (launch settings, keep_states)."""
        from fastflow.kernels.coupling import coupling_flow_triton

        steps, column_maps = self._on(x.device)
        return coupling_flow_triton(x, context, params, steps, column_maps, **self._sizes(context),
                                    inverse=self.inverse, precision=precision, **self.options, **options)

    def _sizes(self, context: torch.Tensor | None) -> dict:
        """The kernels' size arguments: the conditioners' width and the largest input and changed counts."""
        n_context = 0 if context is None else context.shape[1]
        return dict(n_hidden=self._n_hidden, max_inputs=self._max_kept + n_context, max_changed=self._max_changed)

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The steps table and the column maps `(S, D)` int32 (where step s stores its state's columns: the
        permutation after the layer, or none) on `device`; copied there again when a permutation's buffer changed
        (`load_state_dict` writes it in place: its version moves)."""
        maps = [None if p is None else p.column_map(self.inverse) for _, p in self.steps]
        stamp = tuple(None if m is None else (id(m), m._version) for m in maps)
        cached = self._tables.get(device)
        if cached is None or cached[0] != stamp:
            identity = torch.arange(self.couplings[0].dim)
            stacked = torch.stack([identity if m is None else m.cpu() for m in maps])
            self._tables[device] = (stamp, self._steps.to(device), stacked.to(device=device, dtype=torch.int32))
        return self._tables[device][1:]

    def gradient_positions(self, device: torch.device, context: torch.Tensor | None) -> torch.Tensor:
        """`kernels.coupling_backward.gradient_index` of this run with `context` on `device` (built once)."""
        from fastflow.kernels.coupling_backward import gradient_index

        key = (device, 0 if context is None else context.shape[1])
        if key not in self._gradient_positions:
            sizes = self._sizes(context)
            index = gradient_index(self._steps, sum(w.numel() for w in self._layout), n_context=key[1],
                                   n_hidden=sizes["n_hidden"], max_inputs=sizes["max_inputs"],
                                   max_changed=sizes["max_changed"], num_bins=self.options.get("num_bins"))
            self._gradient_positions[key] = index.to(device)
        return self._gradient_positions[key]


def trains_fused(device: torch.device) -> bool:
    """Whether runs on `device` train through the fused backward: under the interpreter (off CUDA), and on CUDA
    with FASTFLOW_FUSED_BACKWARD=1 (not yet timed there in its current form; the earlier one, on an H100, 65,536
    rows, TF32: the affine training step at 8-D took 5.3 ms fused against 5.6 ms through the layer steps, the spline
    one at 2-D 8.4 ms against 6.0 ms; bench/results/gpu_*_2026-11-26_NVIDIA-H100-80GB-HBM3*.json,
    `kernels.coupling_backward`)."""
    return device.type != "cuda" or os.environ.get("FASTFLOW_FUSED_BACKWARD") == "1"


def pack(weights: list[torch.Tensor]) -> torch.Tensor:
    """The weights flattened into one tensor (one C++ call), as the fused kernels take them; packed per call: the
    weights change in place."""
    with torch.no_grad():
        return torch._utils._flatten_dense_tensors(weights)


class _FusedRun(torch.autograd.Function):
    """A run of coupling layers for training, in two launches: the fused forward keeping each step's input state
    (`coupling_flow_triton(keep_states=True)`), and `kernels.coupling_backward.coupling_flow_backward_triton`, which
    recomputes the conditioners and returns the gradients of x, the context and every weight (the weights' summed
    by batched products over the rows).

    apply(run, x `(N, D)`, context `(N, C)` or None, precision, *run.weights()) -> (y `(N, D)`, log|det J| `(N,)`)."""

    @staticmethod
    def forward(ctx, run, x, context, precision: str, *weights):
        from fastflow.kernels import row_major

        x, context, params = x.detach().contiguous(), None if context is None else row_major(context.detach()), pack(weights)
        out, ladj, states = run.launch(x, context, params, precision, keep_states=True)
        ctx.save_for_backward(x, context, params, states)
        ctx.run, ctx.precision = run, precision
        return out, ladj

    @staticmethod
    @first_order
    def backward(ctx, grad_out, grad_ladj):
        from fastflow.kernels.activations import approximate_activations
        from fastflow.kernels.coupling_backward import coupling_flow_backward_triton

        x, context, params, states = ctx.saved_tensors
        run = ctx.run
        steps, column_maps = run._on(x.device)
        grad_x, grad_context, grad_params = coupling_flow_backward_triton(
            x, states, context, grad_out, grad_ladj, params, steps, column_maps, run.gradient_positions(x.device, context),
            **run._sizes(context), **run.options,
            inverse=run.inverse, context_grad=ctx.needs_input_grad[2], precision=ctx.precision,
            approximate=approximate_activations(ctx.precision, x.device))
        return (None, grad_x, grad_context, None, *torch._utils._unflatten_dense_tensors(grad_params, run._layout))


def chain_transforms(transforms: list[torch.nn.Module], inverse: bool) -> list[Step]:
    """The flow's transforms in execution order (`transforms` as given, data → latent; reversed when `inverse`)
    as steps `(x, context) -> (x, log|det J|)`: each run of coupling layers with equal `fused_signature()`, a
    fixed permutation allowed after each, as one `CouplingRun`; every other transform as itself."""
    order = list(reversed(transforms)) if inverse else list(transforms)
    chain: list[Step] = []
    run: list[tuple[torch.nn.Module, torch.nn.Module | None]] = []
    signature = None

    def close_run():
        if run:
            chain.append(CouplingRun(list(run), inverse))
            run.clear()

    for transform in order:
        fusable = getattr(transform, "fused_signature", None)
        key = fusable() if fusable is not None else None
        if key is not None:
            if key != signature:
                close_run()
            run.append((transform, None))
            signature = key
        elif run and hasattr(transform, "column_map") and run[-1][1] is None:
            run[-1] = (run[-1][0], transform)
        else:
            close_run()
            signature = None
            chain.append(transform.inverse if inverse else transform)
    close_run()
    return chain
