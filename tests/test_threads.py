"""The kit's thread setup (minirlhf/threads.py): what it sets before torch loads, and that the user wins.

Each check runs a fresh interpreter, since the OpenMP variables only matter before torch is
imported, and this test process imported torch long ago. The interpreter gets none of this
process's OMP_* settings (`pytest -n 2` gives its workers OMP_NUM_THREADS=1), so the checks
mean the same under any outer setting.
"""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def probe(code, **env_changes):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MINIRLHF_THREADS"))}
    env.update(env_changes)
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_probes_do_not_inherit_the_outer_thread_settings(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert probe("import os; print(os.environ.get('OMP_NUM_THREADS'), os.environ.get('OMP_WAIT_POLICY'))") == "None None"


# Each fresh interpreter imports torch, the slow part, so one answers several questions.
POLICY = "import minirlhf, os; print(os.environ.get('OMP_WAIT_POLICY'))"


def test_passive_wait_policy_is_set_before_torch_loads():
    policy, torch_loaded = probe(POLICY + "; import sys; print('torch' in sys.modules)").splitlines()
    assert policy == "PASSIVE"
    assert torch_loaded == "True", "the import of minirlhf is what loads torch, after setting the policy"


def test_the_users_own_settings_win():
    policy, threads, later = probe(POLICY + "; import torch; print(torch.get_num_threads()); "
                                   "torch.set_num_threads(2); print(torch.get_num_threads())",
                                   OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="1").splitlines()
    assert policy == "ACTIVE"
    assert threads == "1"
    assert later == "2", "a later torch.set_num_threads wins over OMP_NUM_THREADS"


def test_off_switch_leaves_torch_defaults():
    assert probe(POLICY, MINIRLHF_THREADS="off") == "None"


def test_too_late_when_torch_came_first_is_said_not_hidden():
    policy, status = probe("import torch, minirlhf, os; print(os.environ.get('OMP_WAIT_POLICY'));"
                           "print(minirlhf.threads.status())").splitlines()
    assert policy == "None"
    assert "torch was imported before minirlhf" in status
