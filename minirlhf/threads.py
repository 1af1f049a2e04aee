"""CPU threads: let two kit processes share a small machine without a cliff.

Machinery, not course material. torch's CPU build runs its parallel loops on OpenMP
(libgomp). Between two parallel regions an idle worker thread *spins*, waiting for
the next one, instead of sleeping. Alone that saves a wake-up; but when two kit
processes share a 2-core machine (a notebook beside `run`, pytest beside a notebook),
each one's spinning workers take the cores the other one's working threads need, and
both crawl: two `sft --fast` runs took 155 s each instead of 9 s (issue #23).
`benchmarks/bench_threads.py` measures this on your machine.

What the kit does, before torch is imported (libgomp reads the variables once, when
torch loads it, so `minirlhf/__init__.py` imports this module first):

- `OMP_WAIT_POLICY=PASSIVE`: idle workers sleep instead of spinning.

Whatever the user set wins: an `OMP_NUM_THREADS` or `OMP_WAIT_POLICY` of their own is
left alone, and so is a later `torch.set_num_threads`. `MINIRLHF_THREADS=off` leaves
everything to torch's own defaults (the benchmark uses it to measure "before").
If torch was imported before minirlhf, the wait policy can no longer change; `status()`
says so.
"""
import os
import sys

# Decided once, at import, before this module (or anyone after it) imports torch.
TOO_LATE = "torch" in sys.modules       # libgomp has read its variables already
if os.environ.get("MINIRLHF_THREADS", "").lower() != "off" and not TOO_LATE:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402  (after the environment above is set)


def status():
    """One line that says how this process's torch threads are set up (for reports and benchmarks)."""
    policy = os.environ.get("OMP_WAIT_POLICY", "unset: torch's default, idle threads spin")
    late = " (torch was imported before minirlhf: the policy above may not apply)" if TOO_LATE else ""
    return f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY {policy}{late}"
