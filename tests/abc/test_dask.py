"""Rejection ABC on a Dask cluster merges the workers' top-k lists into exactly the single-process result."""

import numpy as np
import pytest

from abc_conjugate import PRIOR, X_OBS, simulate
from fastflow.abc import rejection
from fastflow.tasks import get_task

distributed = pytest.importorskip("dask.distributed")


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            yield client


@pytest.mark.parametrize("kwargs", [dict(quantile=0.01), dict(eps=0.05), dict(quantile=0.02, distance="mahalanobis")])
def test_dask_run_equals_the_single_process_run(client, kwargs):
    single = rejection(simulate, PRIOR, X_OBS, 30_000, chunk_size=4_000, seed=5, **kwargs)
    spread = rejection(simulate, PRIOR, X_OBS, 30_000, chunk_size=4_000, seed=5, client=client, **kwargs)
    np.testing.assert_array_equal(spread.index, single.index)
    np.testing.assert_array_equal(spread.theta, single.theta)
    np.testing.assert_array_equal(spread.distances, single.distances)
    assert (spread.tolerance, spread.num_accepted, spread.num_dropped) == (
        single.tolerance, single.num_accepted, single.num_dropped)


def test_dask_run_with_a_task(client):
    task = get_task("two_moons")
    single = rejection(task, task.prior, task.observation(2), 20_000, quantile=0.01, chunk_size=3_000)
    spread = rejection(task, task.prior, task.observation(2), 20_000, quantile=0.01, chunk_size=3_000, client=client)
    np.testing.assert_array_equal(spread.index, single.index)
    np.testing.assert_array_equal(spread.theta, single.theta)

