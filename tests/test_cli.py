"""The `fastflow` command: demo and posterior end to end on small budgets, and bad input."""

from pathlib import Path

import numpy as np
import pytest

from fastflow.cli import main
from fastflow.inference.methods import posterior_samples
from fastflow.tasks import get_task


def test_posterior_command_writes_samples(tmp_path, capsys):
    x_path, out_path = tmp_path / "x.npy", tmp_path / "samples.npy"
    np.save(x_path, get_task("two_moons").observation(1).numpy())
    code = main(["posterior", "two_moons", "--method", "npe", "--sims", "600", "--x-obs", str(x_path),
                 "--num-samples", "300", "--seed", "1", "--out", str(out_path), "--quiet"])
    assert code == 0
    samples = np.load(out_path)
    assert samples.shape == (300, 2) and samples.dtype == np.float32
    assert "wrote (300, 2) samples" in capsys.readouterr().out
    # the file holds the posterior's draws for that observation and seed (not, say, prior draws)
    expected = posterior_samples(get_task("two_moons"), "npe", get_task("two_moons").observation(1),
                                 num_simulations=600, num_samples=300, seed=1, progress=False)
    np.testing.assert_array_equal(samples, expected.numpy())


def test_demo_reports_c2st_time_and_writes_plot(tmp_path, capsys, monkeypatch):
    """Without a suffix matplotlib writes demo.png: the demo reported "demo", a file it did not write. The C2ST
    printed is the one of the reference draws against the posterior's (a spy on fastflow.metrics.c2st)."""
    import fastflow.metrics
    import torch

    calls = []

    def spy(first, second, **kwargs):
        calls.append((first, second, c2st(first, second, **kwargs)))
        return calls[-1][2]

    c2st = fastflow.metrics.c2st
    monkeypatch.setattr(fastflow.metrics, "c2st", spy)
    plot = tmp_path / "demo.png"
    assert main(["demo", "--sims", "1000", "--num-samples", "500", "--out", str(tmp_path / "demo"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "C2ST against the reference posterior" in out and "wall time" in out
    (first, second, score), = calls
    assert first.shape == second.shape == (500, 2) and not torch.equal(first, second)
    assert f"C2ST against the reference posterior: {score:.3f}" in out
    assert f"corner plot: {plot}\n" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "x_obs, task, message",
    [
        ([0.1, 0.2, 0.3], "two_moons", "length 2"),
        ([np.nan, 0.2], "two_moons", "NaN"),
        ([0.1, 0.2], "no_such_task", "unknown task"),
    ],
)
def test_posterior_command_rejects_bad_input(tmp_path, capsys, x_obs, task, message):
    x_path = tmp_path / "x.npy"
    np.save(x_path, np.asarray(x_obs, dtype=np.float32))
    code = main(["posterior", task, "--sims", "100", "--x-obs", str(x_path), "--out", str(tmp_path / "o.npy")])
    assert code == 2
    assert message in capsys.readouterr().err


def test_no_command_runs_the_demo(monkeypatch):
    """`fastflow` alone is the demo (the default job); it exited 2 asking for a command."""
    from fastflow import cli

    ran = []
    monkeypatch.setattr(cli, "_demo", lambda args: ran.append(args.sims) or 0)
    assert main([]) == 0 and ran == [10_000]


def test_unknown_method_non_positive_counts_and_negative_seeds_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        main(["posterior", "two_moons", "--method", "magic", "--sims", "10", "--x-obs", "x.npy", "--out", "o.npy"])
    with pytest.raises(SystemExit):
        main(["posterior", "two_moons", "--sims", "0", "--x-obs", "x.npy", "--out", "o.npy"])
    with pytest.raises(SystemExit):  # it worked for npe and failed for abc
        main(["posterior", "two_moons", "--seed", "-1", "--x-obs", "x.npy", "--out", "o.npy"])
    with pytest.raises(SystemExit):
        main(["posterior", "two_moons", "--seed", str(2**64), "--x-obs", "x.npy", "--out", "o.npy"])


def test_demo_refuses_too_few_draws_for_its_c2st_before_training(monkeypatch, capsys):
    """--num-samples 1 failed after training, and 3 printed a C2ST of 0.200."""
    from fastflow import cli

    monkeypatch.setattr(cli, "_demo", lambda args: pytest.fail("the demo ran"))
    with pytest.raises(SystemExit):
        main(["demo", "--num-samples", "3"])
    assert "at least 10" in capsys.readouterr().err


def test_python_dash_m_runs_the_command():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "fastflow", "posterior", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--x-obs" in result.stdout


def test_files_are_checked_before_any_work(tmp_path, capsys):
    """A missing observation file, one that is not a .npy array, or an output folder that does not exist: a clear
    error (exit 2) before simulating, not a traceback after."""
    x_path, text = tmp_path / "x.npy", tmp_path / "x.txt"
    np.save(x_path, get_task("two_moons").observation(1).numpy())
    text.write_text("0.1 0.2")
    empty, complex_x, bool_x = tmp_path / "empty.npy", tmp_path / "complex.npy", tmp_path / "bool.npy"
    empty.write_bytes(b"")  # np.load raised EOFError: a traceback
    np.save(complex_x, np.array([0.1 + 1j, 0.2]))  # its imaginary part was dropped with a warning
    np.save(bool_x, np.array([True, False]))
    cases = [
        (["--x-obs", str(tmp_path / "missing.npy"), "--out", str(tmp_path / "o.npy")], "no such file"),
        (["--x-obs", str(text), "--out", str(tmp_path / "o.npy")], "not a .npy array file"),
        (["--x-obs", str(empty), "--out", str(tmp_path / "o.npy")], "not a .npy array file"),
        (["--x-obs", str(complex_x), "--out", str(tmp_path / "o.npy")], "real numbers"),
        (["--x-obs", str(bool_x), "--out", str(tmp_path / "o.npy")], "real numbers"),
        (["--x-obs", str(x_path), "--out", str(tmp_path / "no" / "o.npy")], "does not exist"),
    ]
    for arguments, message in cases:
        assert main(["posterior", "two_moons", "--sims", "10", *arguments]) == 2
        assert message in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "no" / "demo.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # an existing folder, or a suffix matplotlib cannot write, failed after all the work
    folder = tmp_path / "folder.npy"
    folder.mkdir()
    assert main(["posterior", "two_moons", "--sims", "10", "--x-obs", str(x_path), "--out", str(folder)]) == 2
    assert "a folder, not a file" in capsys.readouterr().err
    assert main(["bench", "--device", "cpu", "--out", str(folder)]) == 2
    assert "a folder, not a file" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "demo.txt")]) == 2
    assert "matplotlib writes no .txt images" in capsys.readouterr().err


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux's /sys, where no one may create files")
def test_outputs_that_cannot_be_written_fail_before_the_work(tmp_path, capsys):
    """A PermissionError came out as a traceback after the training (demo, posterior) or the first case (bench);
    `--out .` gave "PosixPath('.') has an empty name"."""
    x_path = tmp_path / "x.npy"
    np.save(x_path, np.zeros(2, dtype=np.float32))
    for arguments in (["demo", "--out", "/sys/demo.png"],
                      ["posterior", "two_moons", "--sims", "10", "--x-obs", str(x_path), "--out", "/sys/o.npy"],
                      ["bench", "--device", "cpu", "--out", "/sys/b.json"]):
        assert main(arguments) == 2
        assert "cannot be written" in capsys.readouterr().err
    for command in (["demo"], ["posterior", "two_moons", "--sims", "10", "--x-obs", str(x_path)]):
        assert main([*command, "--out", "."]) == 2
        assert "a folder, not a file" in capsys.readouterr().err


def test_the_write_check_leaves_folders_links_and_files_as_they_are(tmp_path, monkeypatch):
    """`--out samples` beside a folder samples/ writes samples.npy (the check refused the folder); the write check
    removed a dangling link and left its target behind, and must not touch an existing file."""
    from fastflow.cli import _check_output

    monkeypatch.chdir(tmp_path)
    np.save("x.npy", np.zeros(2, dtype=np.float32))
    Path("samples").mkdir()
    assert main(["posterior", "two_moons", "--method", "abc", "--sims", "2000", "--num-samples", "10", "--x-obs",
                 "x.npy", "--out", "samples", "--quiet"]) == 0
    assert np.load("samples.npy").shape == (10, 2)
    Path("link.json").symlink_to("target.json")
    _check_output(Path("link.json"), "--out")
    assert Path("link.json").is_symlink()
    Path("kept.txt").write_text("data")
    _check_output(Path("kept.txt"), "--out")
    assert Path("kept.txt").read_text() == "data"
    _check_output(Path("new.json"), "--out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.txt", "link.json", "samples", "samples.npy", "x.npy"]


def test_the_output_name_reported_is_the_file_written(tmp_path, capsys):
    x_path = tmp_path / "x.npy"
    np.save(x_path, get_task("two_moons").observation(1).numpy())
    code = main(["posterior", "two_moons", "--method", "abc", "--sims", "2000", "--x-obs", str(x_path),
                 "--num-samples", "50", "--out", str(tmp_path / "samples"), "--quiet"])
    assert code == 0 and (tmp_path / "samples.npy").is_file()
    assert f"to {tmp_path / 'samples.npy'}" in capsys.readouterr().out


def test_posterior_samples_refuses_a_complex_observation():
    """torch.as_tensor(..., dtype=float32) dropped the imaginary part with only a UserWarning."""
    with pytest.raises(TypeError, match="x_obs must be real"):
        posterior_samples(get_task("two_moons"), "npe", [0.1 + 5j, -0.2], num_simulations=10, num_samples=10)
