"""The `fastflow` command: `demo` (the default job: NPE on two_moons end to end), `posterior` (samples for one
observation) and `bench` (the speed table for this device)."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fastflow._checks import check_seed

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from fastflow.inference.methods import train_npe
    from fastflow.metrics import c2st
    from fastflow.plot import corner, image_path
    from fastflow.tasks import get_task

    _check_output(image_path(_named(args.out, "--out")), "--out")
    task = get_task("two_moons")
    x_obs = task.observation(args.observation)
    start = time.perf_counter()
    posterior = train_npe(task, num_simulations=args.sims, seed=args.seed, progress=not args.quiet)
    torch.manual_seed(args.seed)
    samples = posterior.sample(args.num_samples, x_obs)
    wall = time.perf_counter() - start
    reference = task.reference_posterior_samples(x_obs, args.num_samples, seed=args.seed)
    score = c2st(reference, samples)
    path = corner({"reference": reference, "fastflow NPE": samples}, args.out)
    print(f"task: two_moons, observation {args.observation}, {args.sims} simulations, {args.num_samples} samples")
    print(f"NPE wall time (simulate + train + sample): {wall:.1f} s ({posterior.history.epochs} epochs)")
    print(f"C2ST against the reference posterior: {score:.3f} (0.5 = indistinguishable)")
    print(f"corner plot: {path}")
    return 0


def _posterior(args: argparse.Namespace) -> int:
    from fastflow.inference.methods import posterior_samples
    from fastflow.tasks import get_task

    task = get_task(args.task)
    _named(args.out, "--out")
    out = args.out if args.out.suffix == ".npy" else args.out.with_name(args.out.name + ".npy")  # as np.save names it
    _check_output(out, "--out")
    if not args.x_obs.is_file():
        raise ValueError(f"--x-obs {args.x_obs}: no such file")
    try:
        x_obs = np.load(args.x_obs, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:  # EOFError: an empty or truncated file
        raise ValueError(f"--x-obs {args.x_obs}: not a .npy array file ({error!r})") from None
    if not isinstance(x_obs, np.ndarray) or x_obs.ndim != 1:
        raise ValueError(f"--x-obs must hold a 1-D array, got {getattr(x_obs, 'shape', type(x_obs).__name__)}")
    if x_obs.dtype.kind not in "iuf":  # complex parts would be dropped, booleans read as 0/1
        raise ValueError(f"--x-obs must hold real numbers, got dtype {x_obs.dtype}")
    method = args.method
    if args.no_adjust:
        if method != "abc":
            raise ValueError(f"--no-adjust applies to --method abc only, not {method!r}")
        method = "abc-rejection"
    samples = posterior_samples(
        task, method, torch.from_numpy(x_obs.astype(np.float32)),
        num_simulations=args.sims, num_samples=args.num_samples, seed=args.seed, progress=not args.quiet,
    )
    np.save(out, samples.cpu().numpy())
    print(f"wrote {tuple(samples.shape)} samples to {out}")
    return 0


def _named(path: Path, flag: str) -> Path:
    """`path` when it names a file (a suffix may be added to it); "." or "/" name none."""
    if not path.name:
        raise ValueError(f"{flag} {path}: a folder, not a file")
    return path


def _check_output(path: Path, flag: str) -> None:
    """Fail before any work when `path` cannot be written (its folder is missing, it is a folder, or the file cannot
    be opened for writing: a read-only folder raised PermissionError after the training), not after it. An existing
    file (or a link's target) is opened for appending, which leaves it as it is; for a new one a temporary file is
    made and removed in its folder."""
    if not path.parent.is_dir():
        raise ValueError(f"{flag} {path}: the folder {path.parent} does not exist")
    if path.is_dir():
        raise ValueError(f"{flag} {path}: a folder, not a file")
    target = path.resolve()  # (a link's target: a dangling link's is made by the write)
    try:
        if target.exists():
            with open(target, "ab"):
                pass
        else:
            with tempfile.NamedTemporaryFile(dir=target.parent):
                pass
    except OSError as error:
        raise ValueError(f"{flag} {path}: cannot be written ({error.strerror})") from None


def _bench(args: argparse.Namespace) -> int:
    import json

    from fastflow import benchmarks

    device = torch.device(args.device)
    if args.out is not None:
        if args.out.exists():  # (rewritten after every case: a run stopped early leaves only its own results)
            print(f"--out {args.out} exists: it is replaced by this run's results", file=sys.stderr, flush=True)
        _check_output(args.out, "--out")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible")
    print(f"device: {benchmarks.device_name(device)}, torch {torch.__version__}, {torch.get_num_threads()} threads",
          flush=True)
    measured: list[benchmarks.Result] = []

    def report(rows: list[benchmarks.Result]) -> None:
        """Print each case as it is measured and rewrite --out, so a run stopped early keeps its results."""
        print(benchmarks.table(rows), flush=True)
        measured.extend(rows)
        if args.out is not None:
            families = benchmarks.family_names(args.family) if args.family else None
            settings = {"quick": args.quick, "repeats": args.repeats, "budget": args.budget, "families": families}
            args.out.write_text(json.dumps(benchmarks.to_json(measured, device, settings), indent=1))

    benchmarks.run(device, quick=args.quick, repeats=args.repeats, families=args.family, on_case=report, budget=args.budget)
    if args.out is not None:
        print(f"wrote {args.out}")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _demo_samples(text: str) -> int:
    """The demo's draws: C2ST's 5 folds need at least 2 of them each (fewer failed after training, or scored 0.2)."""
    value = int(text)
    if value < 10:
        raise argparse.ArgumentTypeError(f"must be at least 10 (C2ST's 5 folds need 2 draws each), got {text}")
    return value


def _seed(text: str) -> int:
    try:
        return check_seed(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer in 0 … 2**63 - 1, got {text}") from None


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from fastflow.inference.methods import METHODS

    parser = argparse.ArgumentParser(prog="fastflow", description="Fast normalizing flows and simulation-based inference.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="NPE on two_moons: C2ST against the reference, wall time, corner plot")
    demo.add_argument("--sims", type=_positive_int, default=10_000)
    demo.add_argument("--num-samples", type=_demo_samples, default=10_000)
    demo.add_argument("--observation", type=int, default=1, choices=range(1, 11), metavar="{1..10}")
    demo.add_argument("--seed", type=_seed, default=0)
    demo.add_argument("--out", type=Path, default=Path("fastflow-demo.png"))
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(run=_demo)
    _add_threads(demo)

    posterior = commands.add_parser("posterior", help="posterior samples for one observation")
    posterior.add_argument("task")
    posterior.add_argument("--method", default="npe", choices=sorted(METHODS))
    posterior.add_argument("--sims", type=_positive_int, required=True)
    posterior.add_argument("--x-obs", type=Path, required=True, help=".npy file with a 1-D observation")
    posterior.add_argument("--num-samples", type=_positive_int, default=10_000)
    posterior.add_argument("--seed", type=_seed, default=0)
    posterior.add_argument("--out", type=Path, required=True, help=".npy file for the (num_samples, dim) samples")
    posterior.add_argument("--quiet", action="store_true")
    posterior.add_argument("--no-adjust", action="store_true", help="--method abc: plain rejection, no regression adjustment")
    posterior.set_defaults(run=_posterior)
    _add_threads(posterior)

    bench = commands.add_parser("bench", help="the speed table: fastflow against its baselines on this device")
    bench.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    bench.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    bench.add_argument("--repeats", type=_positive_int, default=5)
    bench.add_argument("--budget", type=_positive_float, default=None,
                       help="seconds of timed calls per implementation after which its repeats stop (slow cases)")
    bench.add_argument("--family", action="append", help="only these benchmark families (repeatable)")
    bench.add_argument("--out", type=Path, help="write the results as JSON here")
    bench.set_defaults(run=_bench)
    _add_threads(bench)
    return parser


def _add_threads(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--threads", type=_positive_int, default=1,
        help="CPU threads (default 1: small-batch training gains nothing from more, and loses much on a busy machine)",
    )


def main(argv: list[str] | None = None) -> int:
    from fastflow.backends import set_num_threads

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv or ["demo"])  # (no command: the demo, the default job)
    set_num_threads(args.threads)
    try:
        return args.run(args)
    except ValueError as error:
        print(f"fastflow {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
