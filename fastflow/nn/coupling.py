"""Coupling layers (Dinh et al. 2017; Durkan et al. 2019): half the coordinates, plus an optional
context, parametrize an elementwise bijection of the other half through an MLP conditioner."""

from __future__ import annotations

import torch
import torch.nn as nn

from fastflow._checks import nonnegative_int, positive_finite, positive_int, real_tensor
from fastflow.backends import autocast_off, check_backend_name, device_key, triton_device
from fastflow.flows.transforms import Transform
from fastflow.ops.coupling import affine_coupling, spline_coupling
from fastflow.ops.coupling_flow import CouplingRun, read_parameters
from fastflow.ops.spline import SPLINE_CONSTANTS, check_num_bins, spline_param_count

__all__ = ["MLP", "AffineCoupling", "SplineCoupling"]


class MLP(nn.Sequential):
    """Fully connected network `in_features → hidden × depth → out_features` with SiLU activations.

    The last layer starts at zero so that a coupling layer starts as the identity.
    """

    def __init__(self, in_features: int, out_features: int, *, hidden: int = 64, depth: int = 2):
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        last = nn.Linear(width, out_features)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        super().__init__(*layers, last)
        self._sealed = True

    # The coupling ops compute SiLU MLPs of this shape from the Linear layers' parameters (read on every call), so a
    # layer swapped in afterwards would be ignored: adding, replacing or removing layers raises instead.
    def _refuse_new_layers(self):
        if self.__dict__.get("_sealed"):
            raise TypeError("a coupling conditioner's layers are fixed at construction (the coupling ops compute a SiLU "
                            "MLP of its shape from its Linear layers); assign new parameters to those layers "
                            "(layer.weight = nn.Parameter(...)) or build another coupling layer")

    def add_module(self, name, module):
        self._refuse_new_layers()
        super().add_module(name, module)

    def __setattr__(self, name, value):
        if isinstance(value, nn.Module):
            self._refuse_new_layers()
        super().__setattr__(name, value)

    def __delattr__(self, name):
        if name in self._modules:
            self._refuse_new_layers()
        super().__delattr__(name)

    def insert(self, index, module):
        self._refuse_new_layers()
        return super().insert(index, module)


class _Coupling(Transform):
    """Shared split/merge and conditioner: coordinates `[:split]` pass through, `[split:]` are transformed
    (or the reverse when `flip`); subclasses define `_transform(x, context, inverse)`."""

    params_per_coordinate: int
    # set once, at construction: the parameter slots, the fused runs of layers and their kernels' options derive from
    # them (a conditioner or bound assigned afterwards was ignored, or ignored on some backends only)
    _FIXED = frozenset({"conditioner", "dim", "context_dim", "flip", "identity_count", "transformed_count",
                        "params_per_coordinate", "scale_bound", "num_bins", "bound"})

    def __setattr__(self, name, value):
        if name in self._FIXED and (name in self.__dict__ or name in self.__dict__.get("_modules", {})):
            raise AttributeError(f"{type(self).__name__}.{name} is fixed at construction: build another layer (new "
                                 "weights go in with load_state_dict, or as parameters of the conditioner's Linear layers)")
        super().__setattr__(name, value)

    def __init__(self, dim: int, context_dim: int, *, flip: bool, hidden: int, depth: int):
        super().__init__()
        dim, context_dim = positive_int(dim, "dim"), nonnegative_int(context_dim, "context_dim")
        hidden, depth = positive_int(hidden, "hidden"), nonnegative_int(depth, "depth")
        if dim == 1 and flip:
            raise ValueError("a flipped coupling layer of dim 1 would transform no coordinate (flip=False transforms it, "
                             "conditioned on the context alone)")
        self.dim, self.context_dim, self.flip = dim, context_dim, flip
        identity_count = dim // 2 if not flip else dim - dim // 2
        self.identity_count = identity_count
        self.transformed_count = dim - identity_count
        self.conditioner = MLP(
            identity_count + context_dim, self.transformed_count * self.params_per_coordinate, hidden=hidden, depth=depth
        )
        self.parameter_slots = tuple((layer._parameters, name) for layer in self.conditioner  # read on every call
                                     if isinstance(layer, nn.Linear) for name in ("weight", "bias"))
        self._runs: dict[tuple[bool, str | None], CouplingRun] = {}  # (inverse, backend) -> this layer as a run

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(kept, changed) column views of x; one split (its backward is one cat, not a zero-filled copy per half)."""
        if self.flip:
            changed, kept = x.split_with_sizes([self.transformed_count, self.identity_count], dim=1)
        else:
            kept, changed = x.split_with_sizes([self.identity_count, self.transformed_count], dim=1)
        return kept, changed

    def _merge(self, kept: torch.Tensor, changed: torch.Tensor) -> torch.Tensor:
        return torch.cat([changed, kept] if self.flip else [kept, changed], dim=1)

    def _context(self, context: torch.Tensor | None) -> torch.Tensor | None:
        if not self.context_dim:
            return None
        if context is None:
            raise ValueError(f"{type(self).__name__}: this layer needs a context of dim {self.context_dim}")
        return real_tensor(context, f"{type(self).__name__}: context")  # (a cast to x's dtype dropped imaginary parts)

    def _weights(self) -> tuple[torch.Tensor, ...]:
        """The conditioner's (weight, bias) pairs in order, as the coupling ops take them (read from the layers'
        parameter dicts, `parameter_slots`: a replaced parameter is read too)."""
        return tuple(read_parameters(self.parameter_slots))

    def _transform(self, x, context, inverse):
        raise NotImplementedError

    # -- fused runs of layers (`fastflow.ops.coupling_flow`) -----------------------------------------------
    def fused_options(self) -> dict:
        """This layer's transform options as `kernels.coupling.coupling_flow_triton` takes them."""
        raise NotImplementedError

    def fused_signature(self) -> tuple | None:
        """What must be equal across the layers of one fused run (None: this layer cannot join one: the
        kernel takes conditioners with two hidden layers)."""
        if len(self.conditioner) != 5:
            return None
        return (type(self).__name__, self.dim, self.context_dim, self.conditioner[0].out_features, self.backend,
                *sorted(self.fused_options().items()))

    def fused_layout(self) -> tuple[int, int, int, int]:
        """(first kept column, kept count, first changed column, changed count) of the layer's input."""
        if self.flip:
            return self.transformed_count, self.identity_count, 0, self.transformed_count
        return 0, self.identity_count, self.identity_count, self.transformed_count

    def forward(self, x, context=None):
        return self._run_or_op(x, context, inverse=False)

    def inverse(self, z, context=None):
        return self._run_or_op(z, context, inverse=True)

    def _run_or_op(self, x, context, inverse):
        """x `(*, dim)` (and context `(*, context_dim)`, the same batch shape) → (y `(*, dim)`, log|det J| `(*,)`).
        On the Triton backend the layer runs as a one-layer `CouplingRun` (fused kernels, with its merge), as in a
        `Flow`; otherwise through the coupling op (`_transform`). It runs in its parameters' dtype: an autocast is
        off inside (its bfloat16 conditioner outputs reached the native and Triton ops, which take float32/64)."""
        batch_shape = x.shape[:-1]
        x, context = self._rows(x, context)
        result = None
        with autocast_off(x.device.type):
            if self.backend not in ("reference", "native") and triton_device(x.device) and self.fused_signature() is not None:
                key = (inverse, self.backend)
                if key not in self._runs:
                    self._runs[key] = CouplingRun([(self, None)], inverse)
                result = self._runs[key].on_triton(x, context)
            y, ladj = self._transform(x, context, inverse) if result is None else result
        return (y, ladj) if len(batch_shape) == 1 else (y.reshape(*batch_shape, self.dim), ladj.reshape(batch_shape))

    def _rows(self, x: torch.Tensor, context: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x `(*, dim)` and context `(*, context_dim)` as `(N, dim)` and `(N, context_dim)` rows, the context cast to
        x's dtype (None when the layer takes none), after checking shapes, dtypes and devices against the layer's
        (views and casts only where needed: every call of a layer pays this, ~3 µs)."""
        name = type(self).__name__
        weight = read_parameters(self.parameter_slots[:1])[0]
        if x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"{name}: x must be (*, {self.dim}), got {tuple(x.shape)}")
        if x.dtype != weight.dtype:
            raise ValueError(f"{name}: x is {x.dtype} but the layer's parameters are {weight.dtype} "
                             "(convert one with .to())")
        device = device_key(weight)
        if device_key(x) != device:
            raise ValueError(f"{name}: x is on {x.device} but the layer's parameters on {weight.device}")
        rows_2d = x.dim() == 2
        rows = x if rows_2d else x.reshape(-1, self.dim)
        if not self.context_dim:
            return rows, None  # (a flow passes its context to every transform: unconditioned layers ignore it)
        context = self._context(context)
        if context.dim() != x.dim() or context.shape[-1] != self.context_dim or (
                context.shape[0] != x.shape[0] if rows_2d else context.shape[:-1] != x.shape[:-1]):
            raise ValueError(f"{name}: context must be (*, {self.context_dim}) with x's batch shape "
                             f"{tuple(x.shape[:-1])}, got {tuple(context.shape)}")
        if device_key(context) != device:
            raise ValueError(f"{name}: context is on {context.device} but the layer's parameters on {weight.device}")
        if not rows_2d:
            context = context.reshape(-1, self.context_dim)
        return rows, context if context.dtype == x.dtype else context.to(x.dtype)


class AffineCoupling(_Coupling):
    """RealNVP affine coupling z = x · exp(s) + t with a soft-clamped log-scale s ∈ (-scale_bound, scale_bound).

    `layer(x (*, dim), context (*, context_dim))` → `(z (*, dim), log|det J| (*,))`, `layer.inverse(z, context)`
    likewise; the context is cast to x's dtype, which must be the layer's (bad shapes, dtypes, devices: ValueError).

    Arguments:
        dim: data dimension; context_dim: conditioning dimension (0 for none).
        flip: transform the first half instead of the second.
        hidden, depth: conditioner MLP width and number of hidden layers.
        scale_bound: bound of the log-scale.
        backend: None/"auto", "reference", "triton" (CUDA, or TRITON_INTERPRET=1; the layer runs as a one-layer
            `fastflow.ops.coupling_flow.CouplingRun`: when its products may be TF32,
            `torch.backends.cuda.matmul.allow_tf32`, one fused kernel without autograd, and under autograd a fused
            backward kernel too where `fastflow.ops.coupling_flow.trains_fused` (width <= 128); else the
            conditioner in torch and the rest in one Triton kernel each way) or
            "native" (CPU: the native spline, and blocks of rows without autograd). "auto" takes
            Triton for float32 on CUDA.
    """

    params_per_coordinate = 2

    def __init__(self, dim, context_dim=0, *, flip=False, hidden=64, depth=2, scale_bound: float = 3.0, backend: str | None = None):
        super().__init__(dim, context_dim, flip=flip, hidden=hidden, depth=depth)
        self.scale_bound, self.backend = positive_finite(scale_bound, "scale_bound"), check_backend_name(backend)

    def _transform(self, x: torch.Tensor, context: torch.Tensor | None, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        kept, changed = self._split(x)
        changed, ladj = affine_coupling(
            kept, self._context(context), changed, self._weights(), scale_bound=self.scale_bound, inverse=inverse, backend=self.backend
        )
        return self._merge(kept, changed), ladj

    def fused_options(self) -> dict:
        return {"scale_bound": float(self.scale_bound)}


class SplineCoupling(_Coupling):
    """Neural spline coupling: a rational-quadratic spline with `num_bins` bins on [-bound, bound],
    identity tails outside. Called as `AffineCoupling`.

    Arguments:
        dim, context_dim, flip, hidden, depth: as in `AffineCoupling`.
        num_bins: K, bins per spline; bound: B, half-width of the spline interval.
        backend: None/"auto"; "triton" (as in `AffineCoupling`), "native" (C++ spline on CPU) or "reference";
            "auto" on CUDA as in `AffineCoupling`.
    """

    def __init__(self, dim, context_dim=0, *, flip=False, hidden=64, depth=2, num_bins: int = 8, bound: float = 4.0,
                 backend: str | None = None):
        num_bins, bound = check_num_bins(num_bins), positive_finite(bound, "bound")
        self.params_per_coordinate = spline_param_count(num_bins)
        super().__init__(dim, context_dim, flip=flip, hidden=hidden, depth=depth)
        self.num_bins, self.bound, self.backend = num_bins, bound, check_backend_name(backend)

    def _transform(self, x: torch.Tensor, context: torch.Tensor | None, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        kept, changed = self._split(x)
        changed, ladj = spline_coupling(
            kept, self._context(context), changed, self._weights(),
            num_bins=self.num_bins, bound=self.bound, inverse=inverse, backend=self.backend,
        )
        return self._merge(kept, changed), ladj

    def fused_options(self) -> dict:
        return {"num_bins": self.num_bins, "bound": float(self.bound), "constants": SPLINE_CONSTANTS}
