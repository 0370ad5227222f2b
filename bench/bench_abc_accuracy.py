"""ABC accuracy bought with simulations: mean C2ST over observations against the tasks' reference posteriors.

For each task, rejection keeps the best 10^4 of N simulations (as `fastflow.abc.abc_posterior_samples` does:
the fused Numba kernel, MAD-scaled euclidean distance on the task's summaries), used as they are ("plain") and
after the local-linear regression adjustment per mode of θ ("adjusted", `fastflow.abc.posterior.adjusted_samples`,
what `fastflow posterior TASK --method abc` returns); C2ST (sbibm's classifier, 10^4 against 10^4 reference
draws) is averaged over the observations. Targets from issue 6: two_moons 10^7 ≤ 0.52, gaussian_mixture 10^7
adjusted ≤ 0.53, gaussian_linear 10^7 adjusted ≤ 0.53, slcp 10^8 (summaries) adjusted ≤ 0.80. Plain C2ST is measured for the 2-D tasks only (C2ST in 5-10 D costs
20-60 s a sample on 2 cores).
Prints a table and writes `bench/results/abc_accuracy_<date>_cpu.json`.

Run: `python bench/bench_abc_accuracy.py` (or `python -m pytest bench/bench_abc_accuracy.py -s`). Environment:
- FASTFLOW_BENCH_ABC_TASKS: comma-separated tasks (default all four);
- FASTFLOW_BENCH_ABC_OBS: comma-separated observation indices (default 1,2,3,4,5);
- FASTFLOW_BENCH_ABC_NSIMS: `task=N` pairs overriding the simulations, e.g. `slcp=1e7,two_moons=1e6`;
- FASTFLOW_BENCH_ABC_ACCEPT: accepted draws (default 10000); NUMBA_NUM_THREADS: kernel threads;
- FASTFLOW_BENCH_ABC_TAG: appended to the JSON's name (separate processes per task write separate files).
The JSON is rewritten after every observation, so a run cut short keeps what it measured;
`python bench/bench_abc_accuracy.py --merge` combines today's per-task JSONs into one with the summary table.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path

import numba
import numpy as np

from fastflow.abc import rejection
from fastflow.abc.posterior import adjusted_samples
from fastflow.metrics import c2st
from fastflow.tasks import TASKS, get_task

TARGETS = {  # task: (simulations, samples the target applies to, C2ST target)
    "two_moons": (10**7, "adjusted", 0.52),
    "gaussian_mixture": (10**7, "adjusted", 0.53),
    "gaussian_linear": (10**7, "adjusted", 0.53),
    "slcp": (10**8, "adjusted", 0.80),
}
MODES = {"two_moons": ("plain", "adjusted"), "gaussian_mixture": ("plain", "adjusted")}  # others: adjusted
RESULTS = Path(__file__).parent / "results"


def _config() -> tuple[list[str], list[int], dict[str, int], int]:
    tasks = os.environ.get("FASTFLOW_BENCH_ABC_TASKS", ",".join(TASKS)).split(",")
    observations = [int(i) for i in os.environ.get("FASTFLOW_BENCH_ABC_OBS", "1,2,3,4,5").split(",")]
    sims = {task: n for task, (n, _, _) in TARGETS.items()}
    for pair in filter(None, os.environ.get("FASTFLOW_BENCH_ABC_NSIMS", "").split(",")):
        task, n = pair.split("=")
        sims[task] = int(float(n))
    return tasks, observations, sims, int(float(os.environ.get("FASTFLOW_BENCH_ABC_ACCEPT", "10000")))


def measure(task_name: str, observation: int, n_sims: int, accept: int) -> dict:
    """One row: seconds of the rejection run (and of the adjustment), of the reference sampler and of C2ST, and
    the C2ST of each mode."""
    task = get_task(task_name)
    x_obs = task.observation(observation)
    start = time.perf_counter()
    result = rejection(task, task.prior, x_obs, n_sims, quantile=accept / n_sims, summary=task.summary,
                       seed=observation)
    abc_seconds = time.perf_counter() - start
    samples = {"plain": result.theta, "adjusted": adjusted_samples(task, result, seed=observation)}
    adjust_seconds = time.perf_counter() - start - abc_seconds
    start = time.perf_counter()
    reference = task.reference_posterior_samples(x_obs, accept, seed=observation)
    reference_seconds = time.perf_counter() - start
    start = time.perf_counter()
    scores = {mode: c2st(reference, samples[mode]) for mode in MODES.get(task_name, ("adjusted",))}
    return {"task": task_name, "observation": observation, "n_sims": n_sims, "accepted": accept, "c2st": scores,
            "fused": result.fused, "abc_seconds": abc_seconds, "adjust_seconds": adjust_seconds,
            "reference_seconds": reference_seconds, "c2st_seconds": time.perf_counter() - start,
            "load_average": os.getloadavg()}


def _write(content: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    tag = os.environ.get("FASTFLOW_BENCH_ABC_TAG", "")
    path = RESULTS / f"abc_accuracy_{datetime.date.today().isoformat()}_cpu{'_' + tag if tag else ''}.json"
    path.write_text(json.dumps(content, indent=1))
    return path


def run() -> dict:
    """Measure every configured (task, observation), print the table, write the JSON; returns its content."""
    tasks, observations, sims, accept = _config()
    rows, summary = [], []
    content = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                           "numba_threads": numba.get_num_threads()},
               "accepted": accept, "summary": summary, "rows": rows}
    print(f"ABC accuracy: best {accept} of N, adjusted; {numba.get_num_threads()} Numba threads; "
          f"load average {os.getloadavg()[0]:.2f} at start")
    for task in tasks:
        task_rows = []
        for observation in observations:
            task_rows.append(measure(task, observation, sims[task], accept))
            row = task_rows[-1]
            _write({**content, "rows": rows + task_rows})
            scores = "  ".join(f"{mode} {score:.3f}" for mode, score in row["c2st"].items())
            print(f"  {task:16s} obs {observation}  N={sims[task]:.0e}  C2ST {scores}  "
                  f"rejection {row['abc_seconds']:.1f} s  load {row['load_average'][0]:.2f}", flush=True)
        rows += task_rows
        summary += _summary(task_rows)
    print(_table(summary))
    print(f"wrote {_write(content)}")
    return content


def _summary(task_rows: list[dict]) -> list[dict]:
    """Mean C2ST per mode over the rows of one task (all at the same n_sims)."""
    task, n_sims = task_rows[0]["task"], task_rows[0]["n_sims"]
    n_target, target_mode, target = TARGETS.get(task, (None, None, None))
    return [{"task": task, "mode": mode, "n_sims": n_sims, "observations": [r["observation"] for r in task_rows],
             "mean_c2st": float(np.mean([r["c2st"][mode] for r in task_rows])),
             "per_observation": [r["c2st"][mode] for r in task_rows],
             "target": target if (n_sims, mode) == (n_target, target_mode) else None,
             "mean_rejection_seconds": float(np.mean([r["abc_seconds"] for r in task_rows]))}
            for mode in task_rows[0]["c2st"]]


def _table(summary: list[dict]) -> str:
    lines = ["", f"{'task':16s} {'samples':8s} {'N':>6s} {'obs':>10s} {'mean C2ST':>9s} {'target':>7s} "
                 f"{'rej. s':>6s}  per observation"]
    for s in summary:
        target = "-" if s["target"] is None else f"{s['target']:.2f}"
        verdict = "" if s["target"] is None else ("  ok" if s["mean_c2st"] <= s["target"] else "  MISSED")
        obs = ",".join(map(str, s["observations"]))
        each = " ".join(f"{c:.3f}" for c in s["per_observation"])
        lines.append(f"{s['task']:16s} {s['mode']:8s} {s['n_sims']:6.0e} {obs:>10s} {s['mean_c2st']:9.3f} "
                     f"{target:>7s} {s['mean_rejection_seconds']:6.1f}  {each}{verdict}")
    return "\n".join(lines)


def merge() -> dict:
    """Combine the per-task JSONs of today (`FASTFLOW_BENCH_ABC_TAG` runs, finished or cut short) into one,
    with the summary of what they measured; print its table."""
    today = datetime.date.today().isoformat()
    parts = [json.loads(path.read_text()) for path in sorted(RESULTS.glob(f"abc_accuracy_{today}_cpu_*.json"))]
    rows = [row for part in parts for row in part["rows"]]
    summary = [s for key in dict.fromkeys((r["task"], r["n_sims"]) for r in rows)
               for s in _summary([r for r in rows if (r["task"], r["n_sims"]) == key])]
    content = {**parts[0], "summary": summary, "rows": rows, "merged_from": len(parts)}
    print(_table(summary))
    path = RESULTS / f"abc_accuracy_{today}_cpu.json"
    path.write_text(json.dumps(content, indent=1))
    print(f"wrote {path}")
    return content


def test_abc_accuracy():
    run()


if __name__ == "__main__":
    import sys

    merge() if sys.argv[1:] == ["--merge"] else run()
