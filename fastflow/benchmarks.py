"""The package's speed table: benchmark families registered by op, run for one device, reported as
ratios against a baseline measured in the same run (`fastflow bench`, and bench/ via pytest-benchmark)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import statistics
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Callable

import torch

__all__ = ["Case", "Result", "baseline_runs", "register", "cases", "device_name", "run", "synchronizer", "time_call",
           "with_bf16_autocast", "with_tf32", "without_grad"]


@dataclass
class Case:
    """One measurement point: named implementations of the same work, one of them the baseline."""

    family: str
    name: str
    baseline: str
    implementations: dict[str, Callable[[], object]] = field(repr=False)


def baseline_runs(case: Case) -> list[str]:
    """The case's baseline and its runs with TF32 products (`-tf32`, CUDA) and under a bfloat16 autocast (`-bf16`)
    where the case has them: ratios are against the fastest, so that no precision setting (nor the noise between
    them) flatters fastflow."""
    return [name for name in (case.baseline, f"{case.baseline}-tf32", f"{case.baseline}-bf16") if name in case.implementations]


@dataclass
class Result:
    family: str
    case: str
    implementation: str
    seconds: float
    ratio: float  # baseline seconds / these seconds (> 1: faster than the baseline)
    baseline: str  # the baseline run the ratio is against (`baseline_runs`: the faster one)


_FAMILIES: dict[str, Callable[[torch.device, bool], list[Case]]] = {}


def register(family: str):
    """Decorator: `builder(device, quick) -> list[Case]` joins the table under `family`."""

    def wrap(builder):
        _FAMILIES[family] = builder
        return builder

    return wrap


def family_names(families: list[str] | None) -> list[str]:
    """The families `families` names, each once in their order (a family named twice runs once); None: all, sorted."""
    unknown = set(families or []) - set(_FAMILIES)
    if unknown:
        raise ValueError(f"unknown benchmark families {sorted(unknown)}; known: {sorted(_FAMILIES)}")
    return list(dict.fromkeys(families)) if families else sorted(_FAMILIES)


def cases(device: str | torch.device, *, quick: bool = False, families: list[str] | None = None) -> list[Case]:
    """Every registered case for `device` (`quick`: small sizes, for smoke tests)."""
    device = torch.device(device)
    return [case for name in family_names(families) for case in _FAMILIES[name](device, quick)]


def synchronizer(device: torch.device) -> Callable[[], None]:
    """What waits for `device`'s queued work (kernel launches are asynchronous on CUDA; a no-op elsewhere)."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def time_call(fn: Callable[[], object], *, device: torch.device, repeats: int = 5, warmup: int = 1,
              budget: float | None = None) -> float:
    """Median wall time of `fn()` in seconds, synchronizing CUDA around each call; with a `budget` (seconds), the
    timed calls stop once they have taken that long (at least one call: slow cases take fewer repeats)."""
    synchronize = synchronizer(device)
    for _ in range(warmup):
        fn()
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
        if budget is not None and sum(times) >= budget:
            break
    return statistics.median(times)


def run(device: str | torch.device, *, quick: bool = False, repeats: int = 5, families: list[str] | None = None,
        on_case: Callable[[list[Result]], None] | None = None, budget: float | None = None) -> list[Result]:
    """Time every implementation of every case; ratios are against each case's baseline (the faster of its runs,
    `baseline_runs`). `on_case` gets
    each case's results as soon as they are measured (progress on long runs); `budget`: seconds of timed calls
    per implementation after which its repeats stop (`time_call`)."""
    device = torch.device(device)
    results = []
    for case in cases(device, quick=quick, families=families):
        seconds = {name: time_call(fn, device=device, repeats=repeats, budget=budget)
                   for name, fn in case.implementations.items()}
        baseline = min(baseline_runs(case), key=seconds.__getitem__)
        measured = [Result(case.family, case.name, name, s, seconds[baseline] / s, baseline) for name, s in seconds.items()]
        if on_case is not None:
            on_case(measured)
        results += measured
    return results


def table(results: list[Result]) -> str:
    """The ratio table as text."""
    lines = [f"{'family':<10} {'case':<40} {'implementation':<20} {'ms':>10} {'vs baseline':>12}"]
    for r in results:
        mark = " (baseline)" if r.implementation == r.baseline else ""
        lines.append(f"{r.family:<10} {r.case:<40} {r.implementation:<20} {1e3 * r.seconds:>10.2f} {r.ratio:>11.2f}x{mark}")
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    """The GPU's name on CUDA, else "cpu"."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _version(distribution: str) -> str | None:
    """The installed version of `distribution`, None where its module comes from a package of another name (some
    torch builds ship `triton` as pytorch-triton)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def to_json(results: list[Result], device: torch.device, settings: dict | None = None) -> dict:
    """Results with the facts needed to read them later: device, the packages' versions, threads, when, and the
    run's `settings` (quick, repeats, budget, ...)."""
    versions = {name: _version(name) if importlib.util.find_spec(name) else None
                for name in ("fastflow", "triton", "zuko", "torchdiffeq")}
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        **versions,
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(settings or {}),
        "results": [asdict(r) for r in results],
    }


# -- coupling flows -----------------------------------------------------------------------------


@register("coupling")
def _coupling_cases(device: torch.device, quick: bool) -> list[Case]:
    """Coupling flows, 5 layers, width 128: log_prob, sample, log_prob forward+backward of one large batch, and
    log_prob forward+backward on 64 minibatches of `TRAINING_BATCH` rows in turn (training's steps). Spline flows
    (8 bins) on the backends implementing the spline against zuko's coupling spline flow (`zuko-coupling-nsf`:
    zuko's RealNVP with NSF's rational-quadratic transform, the same architecture and parameters as fastflow's
    spline flows), and zuko's NSF for reference (`zuko-nsf`: a masked autoregressive spline with passes=2, whose
    conditioners take every coordinate and whose every coordinate gets a spline, with more parameters, and whose
    inverse runs two passes: more work); affine flows against zuko's RealNVP; all with SiLU as fastflow's
    conditioners and with zuko's default ReLU (`-relu`). Triton runs only on CUDA here (the CPU interpreter is for
    tests). On CUDA each flow but the ReLU ones runs with fp32 products and once more with TF32 (`-tf32`); ratios
    are against the faster of the baseline's two runs (`baseline_runs`)."""
    from fastflow.backends import backends
    from fastflow.flows import FlowConfig
    from fastflow.nn import CouplingFlow

    batch, dims, training_steps = (2048, (2,), 4) if quick else (65_536, (2, 8, 32), 64)
    status = backends()
    backends_on_device = ("triton", "reference") if device.type == "cuda" else ("native", "reference")  # native: CPU
    has_zuko = importlib.util.find_spec("zuko") is not None
    result = []
    for transform in ("spline", "affine"):
        config = FlowConfig(transform=transform, num_layers=5, hidden=128, num_bins=8)
        runnable = [b for b in backends_on_device if device.type in status[b].devices]
        for dim in dims:
            flows = {f"fastflow-{b}": CouplingFlow(dim, config=config, backend=b).to(device) for b in runnable}
            baseline = "fastflow-reference"
            if has_zuko:  # the baseline has fastflow's architecture (SiLU); zuko's default (ReLU) for reference
                kind, baseline = ("coupling-spline", "zuko-coupling-nsf") if transform == "spline" else ("affine", "zuko-realnvp")
                flows[baseline] = _ZukoAdapter(_zuko_flow(kind, dim, torch.nn.SiLU).to(device))
                flows[f"{baseline}-relu"] = _ZukoAdapter(_zuko_flow(kind, dim, torch.nn.ReLU).to(device))
                if transform == "spline":
                    flows["zuko-nsf"] = _ZukoAdapter(_zuko_flow("spline", dim, torch.nn.SiLU).to(device))
            x = torch.randn(batch, dim, device=device)
            minibatches = x[: TRAINING_BATCH * training_steps].split(TRAINING_BATCH)
            for work, run in (("log_prob", lambda f, x=x: without_grad(lambda: f.log_prob(x))),
                              ("sample", lambda f: without_grad(lambda: f.sample(batch))),
                              ("log_prob+backward", lambda f, x=x: lambda: f.log_prob(x).mean().backward()),
                              (f"log_prob+backward {training_steps} batches", lambda f, m=minibatches: lambda: _backward_each(f, m))):
                implementations = {name: run(flow) for name, flow in flows.items()}
                if device.type == "cuda":  # once more with TF32 products (the baseline too: a like-for-like ratio)
                    implementations.update({f"{name}-tf32": with_tf32(run(flows[name])) for name in flows if not name.endswith("-relu")})
                rows = f"n={TRAINING_BATCH}" if work.endswith("batches") else f"n={batch}"
                result.append(Case("coupling", f"{transform} d={dim} {rows} {work}", baseline, implementations))
    return result


TRAINING_BATCH = 256  # rows per training step in the coupling family's minibatch case (fastflow's default batch)


def _backward_each(flow, minibatches: tuple[torch.Tensor, ...]) -> None:
    """log_prob + backward on each minibatch in turn: the training steps of an epoch, less the optimizer's."""
    for x in minibatches:
        flow.log_prob(x).mean().backward()


def _zuko_flow(transform: str, dim: int, activation: type[torch.nn.Module]):
    """zuko's flow with fastflow's benchmark architecture (5 layers, 2 hidden layers of 128): "spline" zuko's NSF
    (autoregressive, passes=2), "coupling-spline" zuko's coupling flow with NSF's transform, "affine" its RealNVP."""
    import zuko

    if transform == "spline":
        return zuko.flows.NSF(dim, 0, transforms=5, hidden_features=(128, 128), bins=8, passes=2, activation=activation)
    if transform == "coupling-spline":  # zuko.flows.NSF's univariate transform and shapes, on coupling masks
        spline = partial(zuko.transforms.MonotonicRQSTransform, slope=1e-3)
        return zuko.flows.RealNVP(dim, 0, transforms=5, hidden_features=(128, 128), activation=activation,
                                  univariate=spline, shapes=[(8,), (8,), (7,)])
    return zuko.flows.RealNVP(dim, 0, transforms=5, hidden_features=(128, 128), activation=activation)


class _ZukoAdapter:
    """zuko's lazy flow behind the `log_prob(x)` / `sample(n)` calls the cases make."""

    def __init__(self, flow):
        self.flow = flow

    def log_prob(self, x):
        return self.flow().log_prob(x)

    def sample(self, n):
        return self.flow().sample((n,))


def with_tf32(fn: Callable[[], object]) -> Callable[[], object]:
    """`fn` run with torch's TF32 flag set: cuBLAS and the Triton kernels' default products use TF32."""

    def call():
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            return fn()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous

    return call


def with_bf16_autocast(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """`fn` run under a bfloat16 autocast on `device` (torch's own mixed precision: the baseline of bfloat16 rows)."""
    def call():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return fn()

    return call


def without_grad(fn: Callable[[], object]) -> Callable[[], object]:
    """`fn` run under `torch.no_grad()`."""
    def call():
        with torch.no_grad():
            return fn()

    return call


# -- sampling ODE -------------------------------------------------------------------------------


@register("ode")
def _ode_cases(device: torch.device, quick: bool) -> list[Case]:
    """CNF sampling ODE on a VelocityMLP (3 hidden layers of 64 or 256, SiLU), RK4 and Euler with 100 steps:
    on CPU the reference with bfloat16 hidden layers (`fastflow-bf16`, `VelocityMLP.sampling_field`), on CUDA
    the fused Triton integrator (CUDA only; TF32 products, and bfloat16 hidden products, `fastflow-triton-bf16`: fp32
    products ran 2.3-3.4x slower than the reference on an H200, and 3xTF32 ones 0.25-1.6x torchdiffeq's speed on an
    H100 while taking a quarter of the family's device time, so neither is timed here) and the reference `odeint`
    against torchdiffeq's fixed-grid solver when installed (else the reference is the baseline), once more under a
    bfloat16 autocast (`-bf16`) and on CUDA with TF32 cuBLAS products (`-tf32`; ratios are against the fastest of the
    baseline's runs, `baseline_runs`). 10^6 samples on CUDA, 10^4 on CPU, 256 for `quick`."""
    from fastflow.backends import backends
    from fastflow.fm import VelocityMLP, odeint
    from fastflow.fm.fused import mlp_odeint

    samples = 256 if quick else (1_000_000 if device.type == "cuda" else 10_000)
    shapes = [(64, 2)] if quick else [(width, dim) for width in (64, 256) for dim in (2, 10)]
    steps = 100
    fused = device.type == "cuda" and device.type in backends()["triton"].devices
    has_torchdiffeq = importlib.util.find_spec("torchdiffeq") is not None
    grid = torch.linspace(0.0, 1.0, steps + 1)
    result = []
    for width, dim in shapes:
        generator = torch.Generator().manual_seed(0)
        net = VelocityMLP(dim, hidden=(width,) * 3).to(device).requires_grad_(False)
        x = torch.randn(samples, dim, generator=generator).to(device)
        for method in ("rk4", "euler"):
            implementations = {"fastflow-reference": without_grad(
                lambda net=net, x=x, method=method: mlp_odeint(net, x, grid, method, backend="reference").x)}
            if device.type == "cpu":  # hidden layers in bfloat16, as OdeConfig(mixed_precision="bf16") samples
                implementations["fastflow-bf16"] = lambda net=net, x=x, method=method: odeint(
                    net.sampling_field(bf16=True), x, grid, method=method).x
            if fused:
                implementations["fastflow-triton-tf32"] = without_grad(
                    lambda net=net, x=x, method=method: mlp_odeint(net, x, grid, method, backend="triton", precision="tf32").x)
                implementations["fastflow-triton-bf16"] = without_grad(
                    lambda net=net, x=x, method=method: mlp_odeint(net, x, grid, method, backend="triton", bf16=True).x)
            baseline = "fastflow-reference"
            if has_torchdiffeq:
                baseline = "torchdiffeq"
                implementations[baseline] = without_grad(lambda net=net, x=x, method=method: _torchdiffeq(net, x, method, steps))
            implementations[f"{baseline}-bf16"] = with_bf16_autocast(implementations[baseline], device)
            if device.type == "cuda":  # the cuBLAS paths once more with TF32 products
                implementations.update({f"{name}-tf32": with_tf32(implementations[name])
                                        for name in ("fastflow-reference", "torchdiffeq") if name in implementations})
            result.append(Case("ode", f"mlp 3x{width} d={dim} n={samples} {method}-{steps}", baseline, implementations))
    return result


def _torchdiffeq(net, x: torch.Tensor, method: str, steps: int) -> torch.Tensor:
    from torchdiffeq import odeint as torchdiffeq_odeint

    span = torch.tensor([0.0, 1.0], device=x.device)
    return torchdiffeq_odeint(net, x, span, method=method, options={"step_size": 1.0 / steps})[-1]


# -- divergence ---------------------------------------------------------------------------------


@register("divergence")
def _divergence_cases(device: torch.device, quick: bool) -> list[Case]:
    """The exact divergence of a VelocityMLP (3 hidden layers of 128, SiLU) at d = 2 and 10, the augmented ODE's
    work per evaluation in a CNF's log_prob: fastflow's forward-mode products (`fastflow.fm.mlp_divergence`)
    against autograd's loop of one vector-Jacobian product per dimension over chunks of points (the baseline: the
    fastest eager autograd variant found on CPU; chunks of 1,024 points there, the whole batch on CUDA), the same loop
    unchunked (`fastflow.fm.exact_divergence`) and torch.func's vmap(jacrev) over the same chunks. 2^14 points on
    CPU, 2^16 on CUDA, 256 for `quick`."""
    from fastflow.fm import VelocityMLP, exact_divergence, mlp_divergence

    n = 256 if quick else (65_536 if device.type == "cuda" else 16_384)
    rows = n if device.type == "cuda" else DIVERGENCE_CHUNK_ROWS
    result = []
    for dim in ((2,) if quick else (2, 10)):
        generator = torch.Generator().manual_seed(0)
        net = VelocityMLP(dim, hidden=(128,) * 3).to(device).requires_grad_(False)
        x = torch.randn(n, dim, generator=generator).to(device)
        t = torch.full((n,), 0.5, device=device)
        loop = partial(lambda net, t, x: exact_divergence(net, t, x)[1], net)
        implementations = {
            "autograd-chunked": without_grad(lambda loop=loop, x=x, t=t: in_chunks(loop, (t, x), rows)),
            "autograd": without_grad(lambda loop=loop, x=x, t=t: loop(t, x)),
            "torch.func": without_grad(lambda net=net, x=x, t=t: in_chunks(partial(jacobian_trace, net), (t, x), rows)),
            "fastflow": without_grad(lambda net=net, x=x, t=t: mlp_divergence(net, t, x)[1]),
        }
        result.append(Case("divergence", f"mlp 3x128 d={dim} n={n} exact", "autograd-chunked", implementations))
    return result


DIVERGENCE_CHUNK_ROWS = 1024  # points per chunk of the autograd baselines on CPU: their working set stays in cache
# (the loop over dimensions at 65,536 points, d = 10: 0.94 s in chunks of 1,024 against 2.1 s in one piece)


def in_chunks(trace: Callable, tensors: tuple[torch.Tensor, ...], rows: int) -> torch.Tensor:
    """`trace(*tensors)` `(n,)` computed over chunks of `rows` points (every tensor sliced along its first dimension
    n) and concatenated."""
    n = tensors[0].shape[0]
    return torch.cat([trace(*(a[i:i + rows] for a in tensors)) for i in range(0, n, rows)])


def jacobian_trace(net, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """tr(∂v/∂x) `(n,)` by torch.func: vmap over points of jacrev of v(t_i, x_i) (a baseline)."""
    def one_point(t_i, x_i):
        return net(t_i, x_i.unsqueeze(0)).squeeze(0)

    with torch.enable_grad():  # (a VelocityMLP takes its no-autograd native path otherwise)
        jacobians = torch.func.vmap(torch.func.jacrev(one_point, argnums=1))(t, x)
    return jacobians.diagonal(dim1=-2, dim2=-1).sum(-1)
