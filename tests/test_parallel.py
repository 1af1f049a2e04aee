"""Independent runs side by side (minirlhf/parallel.py): results come back, failures are named,
a crashed process is reported rather than lost, children run with one thread, a job waits for
the jobs it needs, and the in-process reference (`run_jobs_here`) keeps the same schedule.

The jobs are small functions of the kit itself, so each child only imports minirlhf.
"""
import math

import pytest
import torch

from minirlhf.parallel import Job, Stopped, run_jobs, run_jobs_here


def test_results_come_back_in_order_and_a_failure_is_named_without_stopping_the_others():
    jobs = [Job("bound4", "minirlhf.optimum:best_of_n_kl_bound", {"n": 4}),
            Job("bad", "minirlhf.optimum:fit_gao", {"kl": [1.0, 2.0], "gold_gain": [0.1, 0.2], "form": "linear"}),
            Job("bound16", "minirlhf.optimum:best_of_n_kl_bound", {"n": 16})]
    out = run_jobs(jobs, workers=2, progress=False)
    assert list(out) == ["bound4", "bad", "bound16"]
    assert out["bound4"].status == "done" and math.isclose(out["bound4"].result, math.log(4) - 3 / 4)
    assert out["bound16"].status == "done" and math.isclose(out["bound16"].result, math.log(16) - 15 / 16)
    assert out["bad"].status == "failed"
    assert out["bad"].error == "ValueError: form must be 'bon' or 'rl', got 'linear'"
    assert "Traceback" in out["bad"].details


def test_a_process_that_dies_is_reported_with_its_exit_code():
    out = run_jobs([Job("aborts", "os:abort", {}), Job("fine", "minirlhf.optimum:best_of_n_kl_bound", {"n": 1})],
                   workers=2, progress=False)
    assert out["aborts"].status == "failed" and "exit code" in out["aborts"].error
    assert out["fine"].status == "done" and out["fine"].result == 0.0


def test_children_use_one_thread_unless_the_user_chose():
    out = run_jobs([Job("threads", "torch:get_num_threads", {})], workers=1, progress=False)
    assert out["threads"].result == 1


def test_a_job_waits_for_its_dependencies_and_a_failed_one_leaves_its_dependents_not_started():
    jobs = [Job("bad", "minirlhf.optimum:fit_gao", {"kl": [1.0, 2.0], "gold_gain": [0.1, 0.2], "form": "linear"}),
            Job("first", "minirlhf.optimum:best_of_n_kl_bound", {"n": 4}),
            Job("needs_bad", "minirlhf.optimum:best_of_n_kl_bound", {"n": 2}, after=("bad",)),
            Job("needs_first", "minirlhf.optimum:best_of_n_kl_bound", {"n": 2}, after=("first",)),
            Job("needs_needs_bad", "minirlhf.optimum:best_of_n_kl_bound", {"n": 2}, after=("needs_bad",))]
    out = run_jobs(jobs, workers=2, progress=False)
    assert list(out) == [job.name for job in jobs]
    assert out["bad"].status == "failed" and out["bad"].error_type == "ValueError"
    assert (out["needs_bad"].status, out["needs_bad"].error) == ("not started", "needs bad, which failed")
    assert out["needs_needs_bad"].error == "needs needs_bad, which did not start"
    assert out["needs_bad"].started is None
    assert out["needs_first"].status == "done" and out["needs_first"].started >= out["first"].ended


def test_a_dependency_must_be_listed_before_its_dependent():
    with pytest.raises(ValueError, match="needs b, which is not listed before it"):
        run_jobs([Job("a", "os:getpid", {}, after=("b",)), Job("b", "os:getpid", {})], progress=False)


def test_here_the_same_schedule_runs_on_one_thread_and_gives_the_threads_back(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = run_jobs_here([Job("bad", "minirlhf.optimum:fit_gao", {"kl": [1.0], "gold_gain": [0.1], "form": "x"}),
                             Job("threads", "torch:get_num_threads", {}),
                             Job("needs_bad", "torch:get_num_threads", {}, after=("bad",))])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert out["threads"].result == 1 and out["threads"].ended >= out["threads"].started
    assert out["bad"].status == "failed" and out["bad"].error.startswith("ValueError: form must be")
    assert (out["needs_bad"].status, out["needs_bad"].error) == ("not started", "needs bad, which failed")


def test_a_job_stopped_by_a_signal_stops_the_run_and_starts_nothing_more():
    # a signal that reached a child but not this process (kill of one child, a parent that
    # ignores SIGINT): the run stops as on Ctrl-C, rather than going on without that job
    with pytest.raises(Stopped) as stopped:
        run_jobs([Job("stop", "_thread:interrupt_main", {}),
                  Job("later", "minirlhf.optimum:best_of_n_kl_bound", {"n": 2})], workers=1, progress=False)
    out = stopped.value.outcomes
    assert out["stop"].status == "interrupted" and out["later"].status == "not started"
