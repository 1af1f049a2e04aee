"""Tests for the grader: minirlhf/course/grade.py, sandbox.py, child.py, gradebook.py, cases.py.

What is checked:
  - the instructor's solutions pass every check of every exercise (two seeds), and each
    usual conceptual error (a flipped sign, a missing mask, per-sequence instead of
    per-token averaging, an off-by-one in GAE, a bootstrap from a pad, the score in the
    last column, a sample std for GRPO's group std, NaN for an equal group, RLOO without
    the leave-one-out, one mean over all tokens for the per-sequence aggregation, empty
    rows left out of it) scores 0 with feedback that names the check and gives a hint;
  - attacks, through the real sandbox: an exit handler and patched torch/pytest/json
    that try to forge outputs; an exit at import; an exit, an infinite loop and a syntax
    error inside one exercise (each fails that exercise only, with the reason); a leaked
    reference (gae_reference is gone); the library shortcut for attention (refused);
    reading the instructor's solution and writing outside the copy (blocked where the
    sandbox is up); a report path that is a planted symlink (refused);
  - the class: folders and zips into one CSV gradebook and a feedback file each; broken
    submissions (empty, not a kit, unreadable zip, zip-slip, a symlink member, a plain
    file) get a row with the reason and do not stop the others.

Each sandbox run starts a python with torch (seconds), so the attacks share few runs.
"""
import csv
import os
import re
import zipfile
from pathlib import Path

import pytest
import torch

from minirlhf import losses
from minirlhf.__main__ import main
from minirlhf.course import grade, student_copy
from minirlhf.course.exercises import EXERCISES

REPO = student_copy.REPO


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    out = tmp_path_factory.mktemp("grading") / "kit"
    student_copy.make_student(out)
    return out


def copy_of(kit, dest, solved=(), edits=None):
    """A copy of the student kit's package and notebooks with the solutions of `solved` put
    back, then each (file, function) in `edits` given the body in its value."""
    import shutil
    for top in ("minirlhf", "notebooks"):
        shutil.copytree(kit / top, dest / top)
    for e in EXERCISES:
        if e.name in solved:
            source = (REPO / e.file).read_text()
            _, first, last, indent, _ = next(r for r in student_copy.find_regions(source, e.file) if r[4] == e.name)
            solution = "".join(source.splitlines(keepends=True)[first:last + 1])
            path = dest / e.file
            path.write_text(path.read_text().replace(student_copy.stub_line(indent, e.name, "") + "\n", solution))
    for (rel, name), body in (edits or {}).items():
        path = dest / rel
        stub = student_copy.stub_line("    ", name, "")
        assert stub in path.read_text(), name
        path.write_text(path.read_text().replace(stub, "\n".join("    " + line for line in body.splitlines())))
    return dest


def scores(record):
    return {r["name"]: r["score"] for r in record["exercises"]}


def feedback(record):
    return {r["name"]: r["feedback"] for r in record["exercises"]}


# ---------------------------------------------------------------------------------------
# The checks themselves, in process: the solution passes, the usual mistakes do not.


@pytest.mark.parametrize("seed", [0, 7])
def test_the_solutions_pass_every_check(seed):
    for grading, expected in grade.make_plan(seed):
        fn = grade._solution(grading)
        result = grade.score_in_process(grading, expected, fn)
        assert result["score"] == 1.0, f"{grading.name}: {result['feedback']}"


def _sign_flipped_dpo(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, **kw):
    return losses.dpo_loss(policy_rejected_logps, policy_chosen_logps, ref_rejected_logps, ref_chosen_logps, **kw)


def _sft_without_mask(logits, targets, mask):
    return losses.sft_loss(logits, targets, torch.ones_like(mask, dtype=torch.float32))


def _sft_row_mean(logits, targets, mask):
    nll = -losses.token_logprobs(logits, targets) * mask
    loss = (nll.sum(1) / mask.sum(1).clamp(min=1)).mean()
    return loss, {"loss/sft": loss.item(), "sft/tokens": float(mask.sum())}


def _ppo_row_mean(logprobs, old_logprobs, advantages, mask, clip_eps=0.2):
    _, metrics = losses.ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps)
    ratio = torch.exp(logprobs - old_logprobs)
    terms = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)) * mask
    return (terms.sum(1) / mask.sum(1)).mean(), metrics


def _gae_off_by_one(rewards, values, mask, gamma=1.0, lam=0.95):
    shifted = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)  # V_{t+1} where V_t belongs
    return losses.gae(rewards, shifted, mask, gamma, lam)


def _gae_bootstrap_from_pad(rewards, values, mask, gamma=1.0, lam=0.95):
    T, advantage, out = values.shape[1], torch.zeros_like(values[:, 0]), []
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(values[:, 0])  # a pad's V leaks in
        advantage = (rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * advantage) * mask[:, t]
        out.append(advantage)
    advantages = torch.stack(out[::-1], dim=1)
    return advantages, (advantages + values) * mask


def _score_in_last_column(scores, logprobs, ref_logprobs, mask, kl_coef, estimator="k1"):
    rewards = -kl_coef * losses.kl_penalty(logprobs, ref_logprobs, estimator) * mask
    rewards[:, -1] += scores
    return rewards


def _grpo_sample_std(rewards, scale_std=True, eps=1e-6, unbiased=False):
    return losses.group_advantages(rewards, scale_std, eps, unbiased=True)  # always divides by G − 1


def _grpo_without_equal_groups(rewards, scale_std=True, eps=1e-6, unbiased=False):
    centred = rewards - rewards.mean(1, keepdim=True)  # ±1 ulp in an equal group, then divided by a ~0 std
    return centred / (rewards.std(1, keepdim=True, correction=1 if unbiased else 0) + eps) if scale_std else centred


def _rloo_without_leave_one_out(rewards):
    return rewards - rewards.mean(1, keepdim=True)  # r_i stays in its own baseline


def _aggregate_token_mean(x, mask, aggregation="token", max_tokens=None):
    return losses.masked_mean(x, mask)  # one mean over all tokens, whatever the name


def _sequence_skips_empty_rows(x, mask, aggregation="token", max_tokens=None):
    if aggregation == "sequence":
        return losses.masked_mean(x, mask, dim=1)[mask.sum(1) > 0].mean()
    return losses.masked_aggregate(x, mask, aggregation, max_tokens)


@pytest.mark.parametrize("name, wrong, words", [
    ("dpo_loss", _sign_flipped_dpo, "sign of h"),
    ("sft_loss", _sft_without_mask, "mask"),
    ("sft_loss", _sft_row_mean, "not a mean of row"),
    ("ppo_policy_loss", _ppo_row_mean, "not per row"),
    ("gae", _gae_off_by_one, "γ·V_{t+1}"),
    ("gae", _gae_bootstrap_from_pad, "pad"),
    ("kl_penalized_rewards", _score_in_last_column, "last masked position"),
    ("group_advantages", _grpo_sample_std, "population std"),
    ("group_advantages", _grpo_without_equal_groups, "exactly 0"),
    ("rloo_advantages", _rloo_without_leave_one_out, "OTHER G − 1"),
    ("masked_aggregate", _aggregate_token_mean, "each row's own tokens"),
    ("masked_aggregate", _sequence_skips_empty_rows, "still counts"),
], ids=["dpo-sign", "sft-no-mask", "sft-row-mean", "ppo-row-mean", "gae-off-by-one", "gae-pad-bootstrap",
        "kl-rewards-last-column", "grpo-sample-std", "grpo-equal-groups-nan", "rloo-no-leave-one-out",
        "aggregate-token-mean", "aggregate-skips-empty-rows"])
def test_a_conceptual_error_scores_zero_and_is_explained(name, wrong, words):
    (grading, expected), = grade.make_plan(3, {name})
    result = grade.score_in_process(grading, expected, wrong)
    assert result["score"] == 0.0, f"{name}: {result['feedback']}"
    assert " check '" in result["feedback"] and "Hint: " in result["feedback"] and words in result["feedback"]
    assert "assert" not in result["feedback"]


def test_an_unreadable_answer_fails_the_check_not_the_grader():
    (grading, expected), = grade.make_plan(1, {"gae"})
    for answer in ({"value": {"__tuple__": [{"__tensor__": [1.0], "shape": [10 ** 6], "dtype": "float64"}, 3]}},
                   {"value": {"__ndarray__": [1.0], "shape": [1], "dtype": "V7"}}, "not a dict", {"error": "\x1b[2J"}):
        row = grade._score(grading, expected, {"calls": [answer] * 20}, {"syntax": [], "imports": {}}, None)
        assert row["score"] == 0.0 and row["feedback"].isprintable(), row["feedback"]


# ---------------------------------------------------------------------------------------
# Attacks, through the sandbox.

FORGER = '''
import atexit, json, os, sys

def _forge():
    names = ["attention_reference", "token_logprobs", "sft_loss", "gae", "dpo_loss"]
    lines = [json.dumps({"event": "imports_done"})] + [json.dumps({"event": "start", "name": n}) for n in names] + [
        json.dumps({"event": "result", "name": n, "calls": [{"value": 0.0}] * 20}) for n in names]
    for fd in range(1, 30):
        try:
            os.write(fd, ("\\n".join(lines) + "\\n").encode())
        except OSError:
            pass
    for folder in (os.getcwd(), os.path.dirname(os.getcwd()), os.path.expanduser("~")):
        try:
            with open(os.path.join(folder, "grade.json"), "w") as f:
                json.dump({"total": {"points": 17, "max_points": 17, "score": 1.0}}, f)
        except OSError:
            pass

atexit.register(_forge)
_forge()
import torch, torch.testing
torch.allclose = lambda *a, **k: True
torch.testing.assert_close = lambda *a, **k: None
torch.Tensor.__eq__ = lambda self, other: True
json.dumps = lambda *a, **k: '{"event": "done"}'
sys.modules["pytest"] = None
'''


def test_forging_from_an_exit_handler_and_patching_score_nothing(kit, tmp_path):
    student = copy_of(kit, tmp_path / "forger")
    (student / "minirlhf" / "__init__.py").write_text(FORGER)
    (student / "minirlhf" / "model.py").unlink()
    (student / "minirlhf" / "model.py").symlink_to(REPO / "minirlhf" / "model.py")  # the solution, by a link
    plan = grade.make_plan(1, {"attention_reference", "token_logprobs", "sft_loss", "gae", "dpo_loss"})
    record = grade.grade_submission(student, plan=plan, seed=1, hidden=[REPO])
    assert set(scores(record).values()) == {0.0}, feedback(record)
    assert not (student / "grade.json").exists()
    assert "minirlhf/model.py is not a regular file: left out" in record["notes"]


def test_an_exit_at_import_scores_nothing_and_says_why(kit, tmp_path):
    student = copy_of(kit, tmp_path / "quitter", solved={"token_logprobs"})
    init = student / "minirlhf" / "__init__.py"
    init.write_text("import os\nos._exit(0)\n")
    record = grade.grade_submission(student, plan=grade.make_plan(1, {"token_logprobs"}), seed=1, hidden=[REPO])
    assert scores(record) == {"token_logprobs": 0.0}
    assert "could not import the package: the process exited with code 0" in feedback(record)["token_logprobs"]


STEAL = '''
import os
source = open({path!r}).read()                      # the instructor's solution, if it can be read
open({escape!r}, "w").write("escaped")            # a file outside the copy, if it can be written
scope = {{}}
exec(compile(source, "stolen", "exec"), scope)
return scope["kl_penalized_rewards"](scores, logprobs, ref_logprobs, mask, kl_coef, estimator)
'''


def test_each_fault_fails_only_its_exercise_with_the_reason(kit, tmp_path):
    escape = tmp_path / "escaped.txt"
    losses_py = "minirlhf/losses.py"
    student = copy_of(kit, tmp_path / "mixed", solved={"token_logprobs", "sft_loss", "bradley_terry_loss", "kl_penalty",
                                                       "dpo_loss", "AdaptiveKLController.update"}, edits={
        (losses_py, "ranking_loss"): "import os\nos._exit(3)",
        (losses_py, "kl_penalized_rewards"): STEAL.format(path=str(REPO / losses_py), escape=str(escape)),
        (losses_py, "gae"): "return gae_reference(rewards, values, mask, gamma, lam)",
        (losses_py, "ppo_policy_loss"): "return (logprobs +",
        (losses_py, "ppo_value_loss"): "while True:\n    pass",
        ("minirlhf/model.py", "attention_reference"): "return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)",
    })
    text = (student / losses_py).read_text()
    text = text.replace("h = chosen_logratios - rejected_logratios", "h = rejected_logratios - chosen_logratios")
    assert "h = rejected_logratios - chosen_logratios" in text, "the sign flip did not apply: update this test"
    (student / losses_py).write_text(text)
    syntax_line = 1 + text.splitlines().index("    return (logprobs +")
    plan = grade.make_plan(2, {e.name for e in EXERCISES if not e.file.endswith(".ipynb")}, limit_s=3)
    record = grade.grade_submission(student, plan=plan, seed=2, hidden=[REPO])
    got, why = scores(record), feedback(record)
    isolated = record["sandbox"].get("filesystem", "").startswith("read-only")
    stolen = got.pop("kl_penalized_rewards")  # 0 where the sandbox hides the solution (root on Linux)
    assert got == {"attention_reference": 0.0, "token_logprobs": 1.0, "sft_loss": 1.0, "bradley_terry_loss": 1.0,
                   "ranking_loss": 0.0, "kl_penalty": 1.0, "gae": 0.0, "ppo_policy_loss": 0.0,
                   "ppo_value_loss": 0.0, "ppo_ptx_loss": 0.0, "AdaptiveKLController.update": 1.0, "dpo_loss": 0.0,
                   "group_advantages": 0.0, "rloo_advantages": 0.0, "masked_aggregate": 0.0}, why
    assert why["masked_aggregate"].startswith("not done yet"), why["masked_aggregate"]
    assert why["attention_reference"].startswith("refused: attention_reference calls the library's attention")
    assert why["ranking_loss"] == "the process exited with code 3 while running it"
    assert why["gae"].startswith("NameError: name 'gae_reference' is not defined")
    assert why["ppo_policy_loss"].startswith(f"SyntaxError in losses.py line {syntax_line}")
    assert why["ppo_value_loss"] == "timed out after 3 s"
    assert "sign of h" in why["dpo_loss"] and "Hint:" in why["dpo_loss"]
    assert record["children"] == 3  # a fresh child after the exit and after the loop
    if isolated:
        assert stolen == 0.0 and "Errno" in why["kl_penalized_rewards"], why["kl_penalized_rewards"]
        assert not escape.exists()
        assert record["sandbox"]["network"].startswith("isolated")
    else:  # not root, or a container without CAP_SYS_ADMIN: the record says so (docs/instructor.md)
        assert "not isolated" in record["sandbox"].get("filesystem", "not isolated"), record["sandbox"]


def test_a_report_is_never_written_through_a_planted_symlink(kit, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    student = copy_of(kit, tmp_path / "planter")
    (student / "grade.json").symlink_to(victim)
    assert main(["grade", str(student), "--json", str(student / "grade.json"), "--quiet"]) == 2
    assert "symlink" in capsys.readouterr().err
    with pytest.raises(Exception, match="symlink"):
        grade.write_private(student / "grade.json", "{}")
    assert victim.read_text() == "keep me"


# ---------------------------------------------------------------------------------------
# A class: the gradebook and broken submissions.


def _zip(path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            if isinstance(data, zipfile.ZipInfo):
                zf.writestr(data, name)
            else:
                zf.writestr(name, data)


def test_a_class_makes_one_gradebook_and_broken_submissions_get_a_reason(kit, tmp_path, capsys):
    klass = tmp_path / "class"
    klass.mkdir()
    alice = copy_of(kit, klass / "alice", solved={"token_logprobs", "sft_loss"}, edits={
        ("minirlhf/model.py", "attention_reference"): "from minirlhf import shortcut\nreturn shortcut.attend(q, k, v, mask)"})
    (alice / "minirlhf" / "shortcut.py").write_text(  # the library call, where the source read does not look
        "import torch.nn.functional as F\n\ndef attend(q, k, v, mask):\n"
        "    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)\n")
    bob = copy_of(kit, tmp_path / "bob" / "minirlhf-student", solved={"token_logprobs"})
    with zipfile.ZipFile(klass / "bob.zip", "w") as zf:
        for path in sorted(bob.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(bob.parent).as_posix())
    (klass / "empty").mkdir()
    (klass / "notakit").mkdir()
    (klass / "notakit" / "README.md").write_text("my homework")
    (klass / "garbage.zip").write_bytes(os.urandom(300))
    _zip(klass / "slip.zip", {"../../evil.py": "print('escaped')"})
    _zip(klass / "absolute.zip", {"/tmp/minirlhf-evil.py": "print('escaped')"})
    link = zipfile.ZipInfo("minirlhf/losses.py")
    link.external_attr = (0o120777 << 16)
    _zip(klass / "link.zip", {"/etc/passwd": link})
    _zip(klass / "hollow.zip", {})
    (klass / "notes.txt").write_text("not a submission")
    out = tmp_path / "grades"
    assert main(["grade", str(klass), "--out", str(out), "--exercise", "token_logprobs", "--exercise", "sft_loss",
                 "--exercise", "attention_reference", "--seed", "4", "--quiet", "--jobs", "2"]) == 0
    rows = {row["student"]: row for row in csv.DictReader((out / "gradebook.csv").open())}
    assert list(rows) == ["absolute", "alice", "bob", "empty", "garbage", "hollow", "link", "notakit", "notes.txt",
                          "slip"]
    assert (rows["alice"]["token_logprobs"], rows["alice"]["sft_loss"], rows["alice"]["total"]) == ("1", "1", "2")
    assert rows["alice"]["attention_reference"] == "0"
    assert "called F.scaled_dot_product_attention while it ran" in rows["alice"]["notes"]
    assert (rows["bob"]["token_logprobs"], rows["bob"]["sft_loss"], rows["bob"]["total"]) == ("1", "0", "1")
    assert "not done: attention_reference, sft_loss" in rows["bob"]["notes"]
    reasons = {"absolute": "archive writes outside its folder", "slip": "archive writes outside its folder",
               "link": "archive writes outside its folder", "garbage": "unreadable archive",
               "hollow": "empty archive", "empty": "empty submission", "notakit": "not a kit",
               "notes.txt": "neither a folder nor a .zip"}
    for name, reason in reasons.items():
        assert rows[name]["total"] == "0" and reason in rows[name]["notes"], rows[name]
    assert not (tmp_path / "evil.py").exists() and not Path("/tmp/minirlhf-evil.py").exists()
    text = (out / "alice.txt").read_text()
    assert "Score: 2 of 3 exercises" in text and "✓ token_logprobs" in text
    assert "Not graded: unreadable archive" in (out / "garbage.txt").read_text()
    assert re.search(r"wrote .*gradebook\.csv .*\(10 submissions\)", capsys.readouterr().out)
