"""Plots: flow paths of a CNF written as images, and their bad input."""

import pytest
import torch

from fastflow.fm import CNF, OdeConfig, VelocityMLP
from fastflow.plot import corner, trajectories

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("dim", [1, 3])
def test_trajectories_of_a_cnf_are_written(tmp_path, dim):
    cnf = CNF(VelocityMLP(dim, hidden=(8,)), dim, sampler=OdeConfig("euler", steps=4))
    paths = cnf.sample_trajectory(50)
    written = trajectories(paths, tmp_path / "paths", dims=(2, 0) if dim == 3 else (0, 1), num_paths=20)
    assert written == tmp_path / "paths.png" and written.read_bytes()[:8] == PNG


def test_diverged_samples_do_not_break_the_plot(tmp_path):
    paths = torch.randn(5, 300, 2)
    paths[-1, 7] = float("nan")
    paths[-1, 8, 0] = float("inf")
    assert trajectories(paths, tmp_path / "p.png").read_bytes()[:8] == PNG


def test_bad_input(tmp_path):
    paths = torch.randn(5, 10, 2)
    for bad in (torch.randn(10, 2), torch.randn(1, 10, 2), torch.randn(5, 0, 2)):
        with pytest.raises(ValueError, match="paths must be"):
            trajectories(bad, tmp_path / "p.png")
    with pytest.raises(ValueError, match=r"pick one: paths\[:, :, b\]"):
        trajectories(torch.randn(5, 10, 3, 2), tmp_path / "p.png")  # a conditional CNF's paths under 3 contexts
    for dims in ((0, 0), (0, 2), (0,), (0.0, 1.0), (False, True)):
        with pytest.raises(ValueError, match="dims must be"):
            trajectories(paths, tmp_path / "p.png", dims=dims)
    for bad_paths in (torch.randn(5, 10, 1), paths):  # (times are checked even where only 1-D plots use them)
        with pytest.raises(ValueError, match="times must be"):
            trajectories(bad_paths, tmp_path / "p.png", times=torch.linspace(0, 1, 4))
    with pytest.raises(ValueError, match="num_paths"):
        trajectories(paths, tmp_path / "p.png", num_paths=0)
    with pytest.raises(ValueError, match="writes no"):
        trajectories(paths, tmp_path / "p.xyz")
    assert not list(tmp_path.iterdir())  # nothing written for bad input


def test_corner_bad_input(tmp_path):
    """A 1-D sample set became an n x n grid of plots (then an IndexError), NaN rows a matplotlib range error."""
    for bad, message in ((torch.randn(4), r"\(n, D\) sample sets"), (torch.randn(5, 3, 2), r"\(n, D\) sample sets"),
                         (torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), "NaN or inf")):
        with pytest.raises(ValueError, match=message):
            corner({"q": bad}, tmp_path / "c.png")
    with pytest.raises(ValueError, match="1 labels for 2 dimensions"):
        corner({"q": torch.randn(50, 2)}, tmp_path / "c.png", labels=["a"])
    assert not list(tmp_path.iterdir())
