"""core/device.py: the pool of single-threaded solver workers."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from iis_study.core.device import worker_pool


def test_a_failing_job_cancels_the_queue_and_the_threads_are_restored() -> None:
    """An error in one job is raised with the jobs still queued cancelled, not solved first; workers run at one
    torch thread; the caller's count and the process-wide count a new thread begins with are back afterwards."""
    before = torch.get_num_threads()
    seen = []

    def job(i: int) -> None:
        seen.append(torch.get_num_threads())
        if i == 0:
            raise RuntimeError("head 0 failed")
        time.sleep(0.2)

    with pytest.raises(RuntimeError, match="head 0 failed"):
        with worker_pool(1) as pool:
            jobs = [pool.submit(job, i) for i in range(50)]
            for j in jobs:
                j.result()
    # how many ran before the cancel depends on when this thread ran again (a garbage collection in a long test
    # session delayed it by seconds); without cancelling, none is cancelled and all 49 run (10 s)
    assert sum(j.cancelled() for j in jobs) > 0
    assert set(seen) == {1}
    out = []
    t = threading.Thread(target=lambda: out.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert torch.get_num_threads() == before and out == [before]


@pytest.mark.parametrize("workers", [0, -2, 2.0, False, "2"])
def test_a_bad_worker_count_names_the_parameter(workers) -> None:
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        with worker_pool(workers):
            pass


def test_every_blas_runs_on_one_thread_in_the_pool_and_is_restored_after() -> None:
    """In a fresh interpreter (so that scipy's BLAS, apart from numpy's, is not loaded yet): inside ``worker_pool``
    numpy's and scipy's OpenBLAS both run on one thread (the Newton kernels call scipy's; threadpoolctl limits only
    the libraries loaded when it is called), and both are back at their count after."""
    import json
    import subprocess
    import sys

    code = (
        "import json\n"
        "from threadpoolctl import threadpool_info, threadpool_limits\n"
        "from iis_study.core.device import worker_pool\n"
        "threadpool_limits(2, user_api='blas')\n"
        "blas = lambda: {i['filepath']: i['num_threads'] for i in threadpool_info() if i['user_api'] == 'blas'}\n"
        "with worker_pool(2):\n"
        "    inside = blas()\n"
        "print(json.dumps([inside, blas()]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    inside, after = json.loads(out.stdout.strip().splitlines()[-1])
    assert any("scipy.libs" in path for path in inside), inside  # scipy's own OpenBLAS is loaded and limited
    assert set(inside.values()) == {1}
    assert set(after.values()) == {2}
