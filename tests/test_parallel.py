"""Independent runs side by side (minirlhf/parallel.py): results come back, failures are named,
a crashed process is reported rather than lost, and children run with one thread.

The jobs are small functions of the kit itself, so each child only imports minirlhf.
"""
import math

from minirlhf.parallel import Job, run_jobs


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
