"""Submissions for measuring the grader: the attacks of issue #16 and a class of N.

    python benchmarks/bench_grading.py attacks KIT REPO OUT   # one folder per attack
    python benchmarks/bench_grading.py class KIT REPO OUT -n 30

KIT is a student copy made by `make-student` from REPO (the instructor's repository, whose
solution regions fill the stubs). The script only writes folders; grade them with
`python -m minirlhf grade` and time that (docs/instructor.md lists what was measured).
It reads the markers itself, so it works on older layouts of the kit too.
"""
import argparse
import random
import re
import shutil
from pathlib import Path

LOSSES = "minirlhf/losses.py"
STUB = re.compile(r'^(\s*)raise NotImplementedError\("Exercise: (.+?) — see the docstring"\)\s*$')


def solutions(repo):
    """{(file, exercise name): solution region text (markers included)} of the package."""
    found = {}
    for rel in (LOSSES, "minirlhf/model.py"):
        lines = (Path(repo) / rel).read_text().splitlines(keepends=True)
        start, name = None, None
        for i, line in enumerate(lines):
            if line.strip() == "### BEGIN SOLUTION":
                start = i
                for above in reversed(lines[:i]):  # the enclosing function, methods qualified
                    m = re.match(r"^(\s*)def (\w+)", above)
                    if m and len(m.group(1)) < len(line) - len(line.lstrip()):
                        name = m.group(2)
                        if m.group(1):
                            cls = next(re.match(r"^class (\w+)", a).group(1) for a in reversed(lines[:i])
                                       if a.startswith("class "))
                            name = f"{cls}.{name}"
                        break
            elif line.strip() == "### END SOLUTION":
                found[(rel, name)] = "".join(lines[start:i + 1])
    return found


def fill(kit, repo, dest, solved, edits=None, init=None):
    """A copy of KIT's package and notebooks with `solved` exercises filled in, then each
    (file, name) of `edits` replaced by the given body."""
    shutil.rmtree(dest, ignore_errors=True)
    for top in ("minirlhf", "notebooks", "tests", "data"):
        if (Path(kit) / top).exists():
            shutil.copytree(Path(kit) / top, Path(dest) / top)
    for top in ("pyproject.toml", ".minirlhf-student.json"):
        if (Path(kit) / top).exists():
            shutil.copy2(Path(kit) / top, Path(dest) / top)
    regions = solutions(repo)
    for rel in (LOSSES, "minirlhf/model.py"):
        path = Path(dest) / rel
        out = []
        for line in path.read_text().splitlines(keepends=True):
            m = STUB.match(line)
            if m and (rel, m.group(2)) in (edits or {}):
                out += [m.group(1) + body + "\n" for body in edits[(rel, m.group(2))].splitlines()]
            elif m and m.group(2) in solved:
                out.append(regions[(rel, m.group(2))])
            else:
                out.append(line)
        path.write_text("".join(out))
    if init is not None:
        (Path(dest) / "minirlhf" / "__init__.py").write_text(init)
    return Path(dest)


ALL = ["attention_reference", "token_logprobs", "sft_loss", "bradley_terry_loss", "ranking_loss", "kl_penalty",
       "kl_penalized_rewards", "gae", "ppo_policy_loss", "ppo_value_loss", "AdaptiveKLController.update", "dpo_loss"]

FORGE_REPORT = '''import atexit, json, os

def _forge():
    path = os.environ.get("MINIRLHF_GRADE_REPORT")      # the old grader's report
    if path and os.path.exists(path):
        report = json.load(open(path))
        report["outcomes"] = {k: "passed" for k in report["outcomes"]}
        report["collection_errors"] = []
        json.dump(report, open(path, "w"))
    line = json.dumps({"event": "result", "name": "gae", "calls": [{"value": 0.0}] * 9}) + "\\n"
    for fd in range(1, 30):                               # the new grader's pipe, whichever fd
        try:
            os.write(fd, line.encode())
        except OSError:
            pass

atexit.register(_forge)
'''

PATCH = '''import torch, torch.testing
torch.allclose = lambda *a, **k: True
torch.testing.assert_close = lambda *a, **k: None
try:
    import _pytest.reports
    _init = _pytest.reports.TestReport.__init__
    def _passed(self, *a, **k):
        _init(self, *a, **k)
        self.outcome, self.longrepr = "passed", None
    _pytest.reports.TestReport.__init__ = _passed
except ImportError:
    pass
'''


def attacks(kit, repo, out):
    out = Path(out)
    made = {
        "forge_exit_handler": fill(kit, repo, out / "forge_exit_handler", (), init=FORGE_REPORT),
        "patch_torch_pytest": fill(kit, repo, out / "patch_torch_pytest", (), init=PATCH),
        "early_exit_in_one": fill(kit, repo, out / "early_exit_in_one", set(ALL) - {"ranking_loss"},
                                  {(LOSSES, "ranking_loss"): "import os\nos._exit(0)"}),
        "infinite_loop_in_one": fill(kit, repo, out / "infinite_loop_in_one", set(ALL) - {"gae"},
                                     {(LOSSES, "gae"): "while True:\n    pass"}),
        "syntax_error_in_one": fill(kit, repo, out / "syntax_error_in_one", set(ALL) - {"dpo_loss"},
                                    {(LOSSES, "dpo_loss"): "return (policy_chosen_logps +"}),
        "dpo_sign_flipped": fill(kit, repo, out / "dpo_sign_flipped", set(ALL)),
        "leaked_gae_reference": fill(kit, repo, out / "leaked_gae_reference", (),
                                     {(LOSSES, "gae"): "return gae_reference(rewards, values, mask, gamma, lam)"}),
        "attention_shortcut": fill(kit, repo, out / "attention_shortcut", (), {
            ("minirlhf/model.py", "attention_reference"): "return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)"}),
    }
    path = made["dpo_sign_flipped"] / LOSSES
    text = path.read_text()
    path.write_text(text.replace("h = chosen_logratios - rejected_logratios", "h = rejected_logratios - chosen_logratios"))
    victim = out / "victim.txt"
    victim.write_text("the instructor's file\n")
    planted = fill(kit, repo, out / "symlink_report", ())
    for name in ("grade.json", "grade.json.tmp"):
        (planted / name).symlink_to(victim)
    for name, folder in made.items():
        print(name, folder)


def klass(kit, repo, out, n, seed=0):
    """n submissions: each fills a random subset of the exercises, a few with a wrong sign."""
    rng = random.Random(seed)
    for i in range(n):
        solved = {name for name in ALL if rng.random() < 0.7}
        dest = fill(kit, repo, Path(out) / f"student{i:02d}", solved)
        if rng.random() < 0.3 and "dpo_loss" in solved:
            path = dest / LOSSES
            path.write_text(path.read_text().replace("h = chosen_logratios - rejected_logratios",
                                                     "h = rejected_logratios - chosen_logratios"))
    print(f"wrote {n} submissions to {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["attacks", "class"])
    parser.add_argument("kit")
    parser.add_argument("repo")
    parser.add_argument("out")
    parser.add_argument("-n", type=int, default=30)
    args = parser.parse_args()
    (attacks if args.what == "attacks" else lambda k, r, o: klass(k, r, o, args.n))(args.kit, args.repo, args.out)
