"""FMPE on a task (FASTFLOW_BENCH_TASK, default two_moons) at 10^4 simulations: fastflow against sbi's FMPE
(defaults) on the same simulations; training time, time to draw 10^4 posterior samples, and C2ST against the
package's reference over observations 1..FASTFLOW_BENCH_OBSERVATIONS (default 5); the time of log_prob on 10^4
reference draws of observation 1 and their mean log q (higher: closer to the posterior). A sampler sweep on the trained fastflow model
reports each ODE method's velocity evaluations, time and error against a tight Dopri5 (1e-7) solve
from the same noise, the basis of FMPE's default sampler.

Run: `python -m pytest bench/bench_fmpe.py --benchmark-only -s` (add `--benchmark-json FILE` to keep the
numbers, in `extra_info`); the sbi side needs the `bench` extra. `FASTFLOW_BENCH_SEEDS=0,1,2,3` also fits
fastflow's FMPE on the simulations and with the seed of each (`test_fmpe_seeds`), the study behind its
training defaults (`fastflow/inference/fmpe.py`; `FASTFLOW_BENCH_TASK=slcp FASTFLOW_BENCH_OBSERVATIONS=3` for the
overfitting guard).
"""

import importlib.util
import os
import time

import numpy as np
import pytest
import torch

from fastflow import set_num_threads
from fastflow.fm import OdeConfig, odeint
from fastflow.inference import FMPE, simulate
from fastflow.metrics import c2st
from fastflow.tasks import get_task

NUM_SIMULATIONS = 10_000
NUM_SAMPLES = 10_000
THREADS = int(os.environ.get("FASTFLOW_BENCH_THREADS", "1"))
TASK = os.environ.get("FASTFLOW_BENCH_TASK", "two_moons")
OBSERVATIONS = range(1, int(os.environ.get("FASTFLOW_BENCH_OBSERVATIONS", "5")) + 1)
SEEDS = [int(seed) for seed in os.environ.get("FASTFLOW_BENCH_SEEDS", "").split(",") if seed.strip()]
SWEEP = [OdeConfig("euler", steps=20), OdeConfig("heun", steps=10), OdeConfig("midpoint", steps=10),
         OdeConfig("rk4", steps=5), OdeConfig("rk4", steps=10), OdeConfig("rk4", steps=25),
         OdeConfig("dopri5", rtol=1e-3, atol=1e-3), OdeConfig("dopri5", rtol=1e-4, atol=1e-4),
         OdeConfig("dopri5", rtol=1e-5, atol=1e-5), OdeConfig("rk4", steps=10, mixed_precision="bf16"),
         OdeConfig("rk4", steps=10, spacing=2.5), OdeConfig("rk4", steps=10, mixed_precision="bf16", spacing=2.5)]


def _scores(task, samples):
    return [c2st(task.reference_posterior_samples(task.observation(i), NUM_SAMPLES, seed=0), samples[i]) for i in OBSERVATIONS]


def _timed(call):
    start = time.perf_counter()
    result = call()
    return time.perf_counter() - start, result


def _sample_all(draw):
    seconds, samples = _timed(lambda: {i: draw(task_observation) for i, task_observation in _OBS.items()})
    return seconds / len(_OBS), samples


def _sweep(posterior, x_obs):
    """Velocity evaluations, seconds and the error (flow space: each draw's distance, median and max) of each sampler
    from the same noise, the field as `CNF.sample` calls it (`VelocityMLP.sampling_field`: hidden layers in bfloat16
    where the config says "bf16"). The max is a few draws near where the flow splits the noise between modes, which
    any solver sends either way (on two_moons a few in 10^4 land on the other moon)."""
    cnf = posterior.estimator
    context = cnf.embed(x_obs)
    torch.manual_seed(0)
    x_0 = torch.randn(NUM_SAMPLES, cnf.dim)
    with torch.no_grad():
        reference = odeint(cnf.velocity.sampling_field(context), x_0, [0.0, 1.0], method="dopri5", rtol=1e-7, atol=1e-7).x
        rows = []
        for config in SWEEP:
            field = cnf.velocity.sampling_field(context, bf16=config.mixed_precision == "bf16")
            start = time.perf_counter()
            solution = odeint(field, x_0, config.times(0.0, 1.0), method=config.method, rtol=config.rtol, atol=config.atol)
            seconds = time.perf_counter() - start
            distance = (solution.x - reference).norm(dim=-1)
            rows.append((config, solution.evaluations, seconds, distance.median().item(), distance.max().item()))
    return rows


_OBS: dict[int, torch.Tensor] = {}


def _sbi_prior(prior):
    """The task's prior as sbi takes it: its BoxUniform, or a torch MultivariateNormal for a Gaussian prior."""
    if prior.bounded:
        from sbi.utils import BoxUniform as SbiBoxUniform

        return SbiBoxUniform(prior.low, prior.high)
    return torch.distributions.MultivariateNormal(prior.loc, covariance_matrix=prior.covariance)


def test_fmpe(benchmark):
    set_num_threads(THREADS)  # torch's and the native kernels' OpenMP threads alike
    task = get_task(TASK)
    _OBS.update({i: task.observation(i) for i in OBSERVATIONS})
    sims = simulate(task.simulate, task.prior, NUM_SIMULATIONS, seed=0)
    start = time.perf_counter()
    posterior = FMPE(task.prior, progress=False).fit(sims.theta, sims.x)
    train_seconds = time.perf_counter() - start
    torch.manual_seed(0)
    sample_seconds, samples = benchmark.pedantic(lambda: _sample_all(lambda x: posterior.sample(NUM_SAMPLES, x)), rounds=1, iterations=1)
    scores = _scores(task, samples)
    info = {"task": TASK, "threads": THREADS, "fastflow_train_seconds": train_seconds, "fastflow_sample_seconds": sample_seconds,
            "fastflow_c2st": scores, "fastflow_mean_c2st": float(np.mean(scores))}
    lines = [f"fastflow FMPE: train {train_seconds:6.1f} s, 10^4 samples {sample_seconds:6.3f} s, "
             f"C2ST {np.mean(scores):.3f} ({', '.join(f'{s:.3f}' for s in scores)})"]
    reference = task.reference_posterior_samples(task.observation(1), NUM_SAMPLES, seed=1)
    log_prob_seconds, log_q = _timed(lambda: posterior.log_prob(reference, task.observation(1)))
    info.update(fastflow_log_prob_seconds=log_prob_seconds, fastflow_mean_log_q=float(log_q.mean()))
    lines.append(f"fastflow log_prob of 10^4 reference draws (observation 1): {log_prob_seconds:6.2f} s, "
                 f"mean log q {log_q.mean():.3f}")
    sweep = _sweep(posterior, task.observation(1))
    lines.append("sampler sweep (observation 1, flow space, distance to dopri5 1e-7 from the same noise):")
    lines += [f"  {c.method:8s} steps={c.steps:3d} spacing={c.spacing:3.1f} rtol={c.rtol:.0e} {c.mixed_precision:4s}: "
              f"{e:4d} evals {s:6.3f} s  median {median:.1e} max {largest:.1e}" for c, e, s, median, largest in sweep]
    info["sweep"] = [{"config": c.to_dict(), "evaluations": e, "seconds": s, "median_error": median, "max_error": largest}
                     for c, e, s, median, largest in sweep]
    print("\n" + "\n".join(lines), flush=True)  # (before sbi's run, which may fail)
    lines = []
    if importlib.util.find_spec("sbi") is not None:
        from sbi.inference import FMPE as SbiFMPE

        start = time.perf_counter()
        inference = SbiFMPE(prior=_sbi_prior(task.prior), show_progress_bars=False)
        estimator = inference.append_simulations(sims.theta, sims.x).train()
        sbi_train = time.perf_counter() - start
        sbi_posterior = inference.build_posterior(estimator)
        sbi_seconds, sbi_samples = _sample_all(lambda x: sbi_posterior.sample((NUM_SAMPLES,), x=x, show_progress_bars=False))
        sbi_scores = _scores(task, sbi_samples)
        sbi_log_prob_seconds, log_q = _timed(lambda: sbi_posterior.log_prob(reference, x=task.observation(1)))
        info.update(sbi_log_prob_seconds=sbi_log_prob_seconds, sbi_mean_log_q=float(log_q.mean()),
                    log_prob_speedup=sbi_log_prob_seconds / log_prob_seconds)
        lines.append(f"sbi log_prob: {sbi_log_prob_seconds:6.2f} s, mean log q {log_q.mean():.3f} "
                     f"({sbi_log_prob_seconds / log_prob_seconds:.1f}x fastflow's time)")
        info.update(sbi_train_seconds=sbi_train, sbi_sample_seconds=sbi_seconds, sbi_c2st=sbi_scores,
                    sbi_mean_c2st=float(np.mean(sbi_scores)), sample_speedup=sbi_seconds / sample_seconds)
        lines.append(f"sbi FMPE:      train {sbi_train:6.1f} s, 10^4 samples {sbi_seconds:6.3f} s, "
                     f"C2ST {np.mean(sbi_scores):.3f} ({', '.join(f'{s:.3f}' for s in sbi_scores)})")
        lines.append(f"sampling speedup (sbi time / fastflow time): {sbi_seconds / sample_seconds:.1f}x")
    else:
        lines.append("sbi not installed (pip install -e '.[bench]'): no side-by-side run")
    benchmark.extra_info.update(info)
    print("\n".join(lines))


@pytest.mark.skipif(not SEEDS, reason="set FASTFLOW_BENCH_SEEDS (e.g. 0,1,2,3) for the seed study")
def test_fmpe_seeds(benchmark):
    """Mean C2ST and training time of fastflow's FMPE for each seed of the simulations and the fit."""
    set_num_threads(THREADS)
    task = get_task(TASK)

    def fit_and_score(seed: int) -> tuple[float, float]:
        sims = simulate(task.simulate, task.prior, NUM_SIMULATIONS, seed=seed)
        start = time.perf_counter()
        posterior = FMPE(task.prior, seed=seed, progress=False).fit(sims.theta, sims.x)
        seconds = time.perf_counter() - start
        torch.manual_seed(seed)
        return seconds, float(np.mean(_scores(task, {i: posterior.sample(NUM_SAMPLES, task.observation(i)) for i in OBSERVATIONS})))

    results = benchmark.pedantic(lambda: [fit_and_score(seed) for seed in SEEDS], rounds=1, iterations=1)
    benchmark.extra_info.update(task=TASK, seeds=SEEDS, train_seconds=[r[0] for r in results], mean_c2st=[r[1] for r in results])
    print("\n" + "\n".join(f"fastflow FMPE seed {seed}: train {t:6.1f} s, mean C2ST {c:.3f}" for seed, (t, c) in zip(SEEDS, results)))
