"""ResidentPool: the web server's greenlets run connection after connection, and the
pool still joins, kills and bounds them as gevent's Pool does."""
from __future__ import annotations

import contextvars
from typing import Callable

import gevent
import pytest
from gevent.event import Event

from tests.support import TIMEOUT_S, wait_for
from wsgateway.resident_pool import ResidentPool


def run_one(pool: ResidentPool) -> gevent.Greenlet:
    """Spawn a job, wait for it to finish, and return the greenlet it ran in."""
    return run_one_job(pool, lambda: None)


def run_one_job(pool: ResidentPool, work: Callable[[], None]) -> gevent.Greenlet:
    ran_in: list[gevent.Greenlet] = []
    done = Event()

    def job() -> None:
        ran_in.append(gevent.getcurrent())
        work()
        done.set()
    pool.spawn(job)
    assert done.wait(TIMEOUT_S)
    pool.join(timeout=TIMEOUT_S)
    return ran_in[0]


def test_a_finished_greenlet_runs_the_next_job():
    """The second job runs in the first job's greenlet: no new greenlet per connection."""
    pool = ResidentPool()
    first = run_one(pool)
    assert run_one(pool) is first
    assert not first.dead
    pool.kill()


def test_jobs_run_in_the_pool_never_in_the_caller():
    pool = ResidentPool()
    run_one(pool)
    assert run_one(pool) is not gevent.getcurrent()
    pool.kill()


def test_join_waits_for_running_jobs_only():
    """join returns once no job runs, however many greenlets are parked."""
    pool = ResidentPool()
    run_one(pool)
    release = Event()
    pool.spawn(release.wait)
    assert pool.join(timeout=0.05) is False  # a job runs
    release.set()
    assert pool.join(timeout=TIMEOUT_S) is True
    assert len(pool) == 0
    pool.kill()


def test_kill_ends_running_and_parked_greenlets_and_none_parks_afterwards():
    pool = ResidentPool()
    parked = run_one(pool)
    running = pool.spawn(gevent.sleep, 60)
    gevent.sleep(0)
    pool.kill(timeout=TIMEOUT_S)
    gevent.joinall([parked, running], timeout=TIMEOUT_S)
    assert parked.dead and running.dead
    after = run_one(pool)  # still serves, but each greenlet exits after its job
    after.join(TIMEOUT_S)
    assert after.dead


def test_at_most_most_parked_greenlets_wait_for_work():
    pool = ResidentPool(most_parked=2)
    release = Event()
    workers = [pool.spawn(release.wait) for _ in range(5)]
    gevent.sleep(0)
    release.set()
    pool.join(timeout=TIMEOUT_S)
    wait_for(lambda: sum(1 for worker in workers if not worker.dead) == 2, what="all but two greenlets to exit")
    pool.kill()


def test_a_job_that_raises_ends_its_greenlet_and_the_pool_goes_on(capsys):
    pool = ResidentPool()
    failing = pool.spawn(lambda: 1 / 0)
    failing.join(TIMEOUT_S)
    assert failing.dead and isinstance(failing.exception, ZeroDivisionError)
    pool.join(timeout=TIMEOUT_S)
    assert len(pool) == 0
    assert not run_one(pool).dead
    pool.kill()


def test_a_parked_greenlet_woken_by_a_stray_throw_ends_quietly_and_jobs_still_run():
    pool = ResidentPool()
    parked = run_one(pool)
    gevent.get_hub().loop.run_callback(parked.throw, gevent.Timeout())  # as a timer left running would
    parked.join(TIMEOUT_S)
    assert parked.dead
    replacement = run_one(pool)
    assert replacement is not parked and not replacement.dead
    pool.kill()


@pytest.mark.parametrize("jobs", [1, 50])
def test_a_job_handed_to_a_greenlet_that_died_meanwhile_still_runs(jobs):
    """A parked greenlet handed a job and killed before the job reached it: the job runs in a new one."""
    pool = ResidentPool()
    parked = run_one(pool)
    ran = []
    parked.kill(block=False)  # the kill reaches it in the next loop turn, before the job does
    for index in range(jobs):
        pool.spawn(ran.append, index)
    wait_for(lambda: len(ran) == jobs, what="every job to run")
    assert sorted(ran) == list(range(jobs))
    pool.kill()


def test_a_context_variable_set_by_one_job_is_not_seen_by_the_next():
    pool = ResidentPool()
    variable: contextvars.ContextVar[str] = contextvars.ContextVar("variable", default="unset")
    seen: list[str] = []

    def job() -> None:
        seen.append(variable.get())
        variable.set("set by a job")
    first = run_one_job(pool, job)
    assert run_one_job(pool, job) is first
    assert seen == ["unset", "unset"]
    pool.kill()
