"""Corner plots of posterior samples and flow paths of continuous flows (matplotlib)."""

from __future__ import annotations

import numbers
from pathlib import Path

import torch

from fastflow._checks import positive_int

__all__ = ["corner", "image_path", "trajectories"]


def _pyplot():
    """matplotlib's pyplot on the Agg backend (image files, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def image_path(path: str | Path) -> Path:
    """The file `corner` writes for `path`: a PNG where it has no suffix (as matplotlib names it); a ValueError for a
    suffix matplotlib cannot write, before any plotting."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    if not path.suffix:
        return path.with_name(path.name + ".png")
    formats = FigureCanvasAgg.get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        raise ValueError(f"{path}: matplotlib writes no {path.suffix} images; use one of {', '.join(sorted(formats))}")
    return path


def corner(samples: dict[str, torch.Tensor], path: str | Path, *, labels: list[str] | None = None, bins: int = 60) -> Path:
    """Write a corner plot of several `(n, D)` sample sets (name → samples) to `image_path(path)` (a PNG unless its
    suffix names another format), and return that path.

    Diagonal: marginal histograms; below it: 2-D density contours of every pair.
    """
    plt = _pyplot()
    path = image_path(path)
    if not samples:
        raise ValueError("corner needs at least one sample set")
    sets = {name: torch.as_tensor(s).detach().cpu().double() for name, s in samples.items()}
    for name, s in sets.items():
        if s.dim() != 2 or s.shape[0] == 0:
            raise ValueError(f"corner takes (n, D) sample sets, got {tuple(s.shape)} for {name!r}")
        if not torch.isfinite(s).all():
            raise ValueError(f"the sample set {name!r} contains NaN or inf")
    dims = {s.shape[-1] for s in sets.values()}
    if len(dims) != 1:
        raise ValueError(f"sample sets differ in dimension: {sorted(dims)}")
    dim = dims.pop()
    labels = labels or [f"θ{i + 1}" for i in range(dim)]
    if len(labels) != dim:
        raise ValueError(f"{len(labels)} labels for {dim} dimensions")
    stacked = torch.cat(list(sets.values()))
    low, high = stacked.quantile(0.001, dim=0), stacked.quantile(0.999, dim=0)
    pad = 0.05 * (high - low)
    low, high = low - pad, high + pad
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    figure, axes = plt.subplots(dim, dim, figsize=(2.4 * dim + 1, 2.4 * dim + 1), squeeze=False)
    for row in range(dim):
        for col in range(dim):
            axis = axes[row][col]
            if col > row:
                axis.axis("off")
                continue
            for (name, s), color in zip(sets.items(), colors):
                if row == col:
                    axis.hist(s[:, col].numpy(), bins=bins, range=(float(low[col]), float(high[col])), density=True,
                              histtype="step", color=color, label=name)
                else:
                    hist, (xedges, yedges) = torch.histogramdd(
                        s[:, [col, row]], bins=[bins, bins],
                        range=[float(low[col]), float(high[col]), float(low[row]), float(high[row])],
                    )
                    levels = _mass_levels(hist, (0.95, 0.68, 0.38))
                    axis.contour(((xedges[1:] + xedges[:-1]) / 2).numpy(), ((yedges[1:] + yedges[:-1]) / 2).numpy(),
                                 hist.T.numpy(), levels=levels, colors=[color])
                    axis.set_ylim(float(low[row]), float(high[row]))
            axis.set_xlim(float(low[col]), float(high[col]))
            if row == dim - 1:
                axis.set_xlabel(labels[col])
            if col == 0 and row > 0:
                axis.set_ylabel(labels[row])
    axes[0][0].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.05, 1.0) if dim > 1 else None)
    return _save(plt, figure, path)


def _mass_levels(hist: torch.Tensor, masses: tuple[float, ...]) -> list[float]:
    """Histogram heights enclosing the given probability masses, increasing and distinct."""
    values = hist.flatten().sort(descending=True).values
    cumulative = values.cumsum(0) / values.sum()
    levels = sorted({float(values[min(int((cumulative < m).sum()), values.numel() - 1)]) for m in masses})
    return [level for level in levels if level > 0] or [float(values[0]) / 2]


def trajectories(paths: torch.Tensor, path: str | Path, *, times=None, dims: tuple[int, int] = (0, 1),
                 num_paths: int = 200) -> Path:
    """Write a plot of a continuous flow's paths `(T, n, D)` (as `CNF.sample_trajectory` returns them; for paths
    under B contexts, `(T, n, B, D)`, pick one: `paths[:, :, b]`) to `image_path(path)` and return that path: for
    D >= 2, the first `num_paths` paths projected on `dims`, from their start (noise, grey) to their end (samples,
    black), over a density of the finite ends; for D = 1, the value against `times` `(T,)` (default: T evenly spaced
    times in [0, 1]; only D = 1 plots use them)."""
    plt = _pyplot()
    path = image_path(path)
    paths = torch.as_tensor(paths).detach().cpu().double()
    if paths.dim() != 3 or paths.shape[0] < 2 or paths.shape[1] == 0:
        hint = "; for paths under several contexts (T, n, B, D), pick one: paths[:, :, b]" if paths.dim() == 4 else ""
        raise ValueError(f"paths must be (T >= 2, n >= 1, D), got {tuple(paths.shape)}{hint}")
    shown = paths[:, : positive_int(num_paths, "num_paths")]
    if times is not None or paths.shape[2] == 1:
        times = torch.linspace(0, 1, paths.shape[0]) if times is None else torch.as_tensor(times, dtype=torch.float64)
        if times.shape != (paths.shape[0],):
            raise ValueError(f"times must be ({paths.shape[0]},) for {paths.shape[0]} states, got {tuple(times.shape)}")
    if paths.shape[2] > 1 and (len(dims) != 2 or len(set(dims)) != 2 or not all(
            isinstance(d, numbers.Integral) and not isinstance(d, bool) and 0 <= d < paths.shape[2] for d in dims)):
        raise ValueError(f"dims must be two different dimensions (ints) of the {paths.shape[2]}, got {dims}")
    figure, axis = plt.subplots(figsize=(5, 5))
    if paths.shape[2] == 1:
        axis.plot(times.numpy(), shown[:, :, 0].numpy(), color="tab:blue", alpha=0.3, linewidth=0.7)
        axis.set_xlabel("t")
        axis.set_ylabel("x")
    else:
        first, second = int(dims[0]), int(dims[1])
        ends = paths[-1][:, [first, second]]
        ends = ends[ends.isfinite().all(-1)]  # (a diverged sample broke the histogram's range)
        if len(ends):
            axis.hist2d(ends[:, 0].numpy(), ends[:, 1].numpy(), bins=100, cmap="Blues", cmin=1)
        axis.plot(shown[:, :, first].numpy(), shown[:, :, second].numpy(), color="tab:olive", alpha=0.4, linewidth=0.7)
        axis.scatter(shown[0, :, first].numpy(), shown[0, :, second].numpy(), s=4, color="grey", label="noise (t = 0)")
        axis.scatter(shown[-1, :, first].numpy(), shown[-1, :, second].numpy(), s=4, color="black", label="samples")
        axis.set_xlabel(f"x{first + 1}")
        axis.set_ylabel(f"x{second + 1}")
        axis.legend(fontsize="small", loc="upper right")
    return _save(plt, figure, path)
