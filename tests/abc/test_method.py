"""ABC as an inference method: `fastflow posterior TASK --method abc [--no-adjust]`, and the C2ST it reaches."""

import numpy as np
import pytest
import torch

from fastflow.abc import abc_posterior_samples
from fastflow.cli import main
from fastflow.metrics import c2st
from fastflow.tasks import get_task


@pytest.mark.parametrize("flags", [[], ["--no-adjust"]])
def test_posterior_command_with_abc_writes_samples(tmp_path, capsys, flags):
    x_path, out_path = tmp_path / "x.npy", tmp_path / "samples.npy"
    np.save(x_path, get_task("two_moons").observation(1).numpy())
    code = main(["posterior", "two_moons", "--method", "abc", "--sims", "20000", "--x-obs", str(x_path),
                 "--num-samples", "200", "--out", str(out_path), "--quiet", *flags])
    assert code == 0
    samples = np.load(out_path)
    assert samples.shape == (200, 2) and samples.dtype == np.float32
    assert np.isfinite(samples).all() and (np.abs(samples) <= 1).all()
    assert "wrote (200, 2) samples" in capsys.readouterr().out


def test_no_adjust_differs_from_adjusted_and_is_refused_for_other_methods(tmp_path, capsys):
    task = get_task("gaussian_linear")
    x_obs = task.observation(1)
    plain = abc_posterior_samples(task, x_obs, num_simulations=20_000, num_samples=200, adjust=False)
    adjusted = abc_posterior_samples(task, x_obs, num_simulations=20_000, num_samples=200)
    assert plain.shape == adjusted.shape == (200, 10) and not torch.equal(plain, adjusted)
    x_path = tmp_path / "x.npy"
    np.save(x_path, x_obs.numpy())
    code = main(["posterior", "two_moons", "--method", "npe", "--no-adjust", "--sims", "100", "--x-obs", str(x_path),
                 "--out", str(tmp_path / "o.npy")])
    assert code == 2 and "--no-adjust applies to --method abc only" in capsys.readouterr().err


def test_more_samples_than_simulations_is_refused():
    task = get_task("two_moons")
    with pytest.raises(ValueError, match="num_samples"):
        abc_posterior_samples(task, task.observation(1), num_simulations=100, num_samples=200)
    for count in (2.5, 0, -3):  # 2.5 gave 3 draws; 0 named a quantile the caller never passed
        with pytest.raises(ValueError, match="num_samples must be a positive int"):
            abc_posterior_samples(task, task.observation(1), num_simulations=100, num_samples=count)
    with pytest.raises(ValueError, match="num_simulations must be a positive int"):
        abc_posterior_samples(task, task.observation(1), num_simulations=-1, num_samples=20)


def test_two_moons_c2st_improves_with_the_number_of_simulations():
    task = get_task("two_moons")
    x_obs = task.observation(1)
    reference = task.reference_posterior_samples(x_obs, 1_000, seed=1)
    scores = [c2st(reference, abc_posterior_samples(task, x_obs, num_simulations=n, num_samples=1_000, adjust=False))
              for n in (2_000, 200_000)]
    assert scores[1] < scores[0] - 0.1 and scores[1] < 0.6


def test_task_summary_defaults_to_x_and_checks_its_shape():
    two_moons, slcp = get_task("two_moons"), get_task("slcp")
    x = two_moons.observation(1)[None]
    assert two_moons.summary(x) is x or np.array_equal(two_moons.summary(x), x)
    s = slcp.summary(slcp.observation(1)[None])
    points = slcp.observation(1).reshape(4, 2).double().numpy()
    np.testing.assert_allclose(s[0, :2], points.mean(0), rtol=1e-5)
    np.testing.assert_allclose(s[0, 2:4], points.std(0), rtol=1e-5)
    np.testing.assert_allclose(s[0, 4], np.corrcoef(points.T)[0, 1], rtol=1e-4)
    with pytest.raises(ValueError, match="shape"):
        slcp.summary(x)
