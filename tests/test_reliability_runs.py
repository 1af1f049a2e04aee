"""Reliability, second part (issue #21): nothing lost, one writer, no traceback.

What is checked, each with the smallest run that shows it:
  - a refused command never changes a finished run: `--resume` on a finished run, `--resume` with
    other settings (refused, naming the keys), `--overwrite` with a mistyped input;
  - one writer per run folder: a second writer is refused with one line naming the folder, and a
    writer killed with SIGKILL leaves no stale lock;
  - a model remembers its tokenizer (a fingerprint of the ranks): another tokenizer of the same
    size is refused naming both; a folder from before the fingerprint still loads;
  - a full disk (a write that raises ENOSPC) is one line, leaves no temporary file and no cut
    metrics line, and the run resumes; a metrics line cut by a crash is dropped on --resume with
    a notice; a damaged metrics.jsonl (garbled, a folder, a list) is one line;
  - `run --resume` refuses to mix --fast and full stages;
  - a resumed DPO run writes the same metrics.jsonl, row for row, as an uninterrupted one;
  - every bad value or file of the issue's list is one `error:` line with exit code 2, and an
    unexpected error is one line saying where to report it, with the traceback saved in a file;
  - silent nonsense is refused: DPO with max_new_tokens=0 (before loading anything), a collect
    run that would write no rankings;
  - Best-of-N draws its N samples in calls of at most batch_size sequences.
"""
import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import tiny_sft_dir
from minirlhf import baselines, files as files_module, runs as harness
from minirlhf.baselines import BestOfNConfig, best_of_n
from minirlhf.checkpoints import load_gpt, save_model
from minirlhf.config import ConfigError, apply_overrides, checked, POSITIVE, validate
from minirlhf.data import DataError, read_jsonl
from minirlhf.dpo import DPOConfig, train_dpo
from minirlhf.files import WriteError, save_torch
from minirlhf.model import GPT, GPTConfig
from minirlhf.pipeline import run_pipeline
from minirlhf.tokenizer import load_ranks, load_tokenizer
from test_reliability import SFT_SET, cli, files, one_line, prefs  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass
class ToyConfig:
    """The smallest stage config the harness can run."""
    beta: float = checked(1.0, POSITIVE)
    seed: int = 0
    validate = validate


def finished_run(out, config=ToyConfig(), steps=3):
    """A finished toy run in `out`: config.json, metrics.jsonl, model.pt, summary.json."""
    return toy_run(out, config, steps, finish=True)


def interrupted_run(out, config=ToyConfig(), steps=2):
    """A toy run that stops after `steps` checkpoints without finishing; its model."""
    return toy_run(out, config, steps, finish=False)


def toy_run(out, config, steps, finish):
    model = torch.nn.Linear(2, 1)
    with harness.Run(out, "toy", config, progress=False) as run:
        run.start({"model": model})
        for step in run.steps(steps):
            run.log({"step": step + 1, "loss": float(step)})
            run.checkpoint(step + 1)
        return run.finish({"done": 1}, model) if finish else model


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


# ---------------------------------------------------------------------------
# 1, 2: a refused command never changes a finished run

def test_resume_on_a_finished_run_is_refused_and_changes_nothing(tmp_path):
    finished_run(tmp_path / "out")
    before = snapshot(tmp_path / "out")
    with pytest.raises(ConfigError, match="no checkpoint.*finished"):
        harness.Run(tmp_path / "out", "toy", ToyConfig(beta=5.0), resume=True)
    assert snapshot(tmp_path / "out") == before


def test_resume_with_other_settings_is_refused_naming_the_keys(tmp_path):
    interrupted_run(tmp_path / "out")
    before = snapshot(tmp_path / "out")
    run = harness.Run(tmp_path / "out", "toy", ToyConfig(beta=5.0), resume=True, progress=False)
    with pytest.raises(ConfigError, match=r"beta 1\.0 -> 5\.0"):
        run.start({"model": torch.nn.Linear(2, 1)})
    assert snapshot(tmp_path / "out") == before
    with harness.Run(tmp_path / "out", "toy", ToyConfig(), resume=True, progress=False) as run:  # the same: resumes
        assert run.start({"model": torch.nn.Linear(2, 1)}) == 2


@pytest.mark.parametrize("command", ["dpo", "bon"])
def test_overwrite_with_a_mistyped_input_keeps_the_finished_run(command, tmp_path, capsys):
    out = tmp_path / "out"
    finished_run(out)
    before = snapshot(out)
    missing = tmp_path / "typo.jsonl"
    argv = {"dpo": ["dpo", "--sft", tiny_sft_dir(), "--prefs", missing],
            "bon": ["bon", "--sft", tiny_sft_dir(), "--rm", tmp_path / "typo"]}[command]
    code, _, err = cli(capsys, *argv, "--fast", "--quiet", "--overwrite", "--out", out)
    assert code == 2 and "typo" in one_line(err)
    assert snapshot(out) == before


# ---------------------------------------------------------------------------
# 3: one writer per run folder

def test_a_second_writer_is_refused_naming_the_folder(tmp_path):
    with harness.Run(tmp_path / "out", "toy", ToyConfig(), progress=False) as first:
        first.start({})
        second = harness.Run(tmp_path / "out", "toy", ToyConfig(), progress=False)
        with pytest.raises(ConfigError, match=f"{tmp_path / 'out'} is in use by another"):
            second.start({})
    with harness.Run(tmp_path / "out", "toy", ToyConfig(), overwrite=True, progress=False) as third:
        third.start({})                    # the first released its lock


def test_a_killed_writer_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "out"
    code = ("import sys, time; from minirlhf.runs import lock_run_dir; from pathlib import Path; "
            f"lock_run_dir(Path({str(out)!r})); print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match="in use"):
            harness.lock_run_dir(out)
    finally:
        proc.kill()
        proc.wait()
    os.close(harness.lock_run_dir(out))


# ---------------------------------------------------------------------------
# 4: a model remembers its tokenizer

def tiny_model_dir(out, tokenizer, recorded="same"):
    out.mkdir()
    model = GPT(GPTConfig(vocab_size=tokenizer.n_vocab, block_size=16, n_layer=1, n_head=1, n_embd=8))
    save_model(model, out)
    config = {"model": dataclasses.asdict(model.config)}
    if recorded is not None:
        config["tokenizer"] = tokenizer.fingerprint if recorded == "same" else recorded
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_a_retrained_tokenizer_of_the_same_size_is_refused_naming_both(tmp_path):
    tokenizer = load_tokenizer()
    folder = tiny_model_dir(tmp_path / "m", tokenizer, recorded="0123456789abcdef")
    with pytest.raises(ConfigError, match=f"0123456789abcdef.*{tokenizer.fingerprint}"):
        load_gpt(folder, tokenizer=tokenizer)
    assert load_gpt(tiny_model_dir(tmp_path / "same", tokenizer), tokenizer=tokenizer) is not None
    assert load_gpt(tiny_model_dir(tmp_path / "old", tokenizer, recorded=None), tokenizer=tokenizer) is not None


def test_every_run_records_its_tokenizer(tmp_path):
    with harness.Run(tmp_path / "out", "toy", ToyConfig(), progress=False) as run:
        run.start({}, GPTConfig())
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tokenizer"] == load_tokenizer().fingerprint


# ---------------------------------------------------------------------------
# 5: a full disk, a cut or damaged metrics.jsonl

def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    out = tmp_path / "out"
    interrupted_run(out)
    before = (out / "checkpoint.pt").read_bytes()
    monkeypatch.setattr(files_module.torch, "save", no_space)
    with pytest.raises(WriteError, match="No space left"):
        save_torch({"step": 9}, out / "checkpoint.pt")
    assert (out / "checkpoint.pt").read_bytes() == before and not (out / "checkpoint.pt.tmp").exists()


class HalfWriter:
    """A file whose writes stop half-way with ENOSPC, as on a full disk."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(data[:len(data) // 2])
        self.f.flush()
        no_space()

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_full_disk_while_logging_leaves_no_cut_line_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "out"
    interrupted_run(out)
    monkeypatch.setattr(harness, "open", lambda *a, **k: HalfWriter(open(*a, **k)), raising=False)
    log = harness.MetricsLog(out / "metrics.jsonl", harness.read_metrics(out / "metrics.jsonl", 2))
    with pytest.raises(WriteError, match="metrics.jsonl.*--resume"):
        log.log({"step": 3, "loss": 1.0})
    monkeypatch.undo()
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    with harness.Run(out, "toy", ToyConfig(), resume=True, progress=False) as run:
        assert run.start({"model": torch.nn.Linear(2, 1)}) == 2


def test_a_metrics_line_cut_by_a_crash_is_dropped_on_resume(tmp_path, capsys):
    out = tmp_path / "out"
    interrupted_run(out)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    with harness.Run(out, "toy", ToyConfig(), resume=True, progress=False) as run:
        assert run.start({"model": torch.nn.Linear(2, 1)}) == 2
        assert [r["step"] for r in run.rows] == [1, 2]
    assert "cut mid-way" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text().count("\n") == 2


@pytest.mark.parametrize("damage", ["garbled line", "a folder", "a list", "not UTF-8"])
def test_a_damaged_metrics_file_is_one_line_on_resume(damage, tmp_path):
    out = tmp_path / "out"
    interrupted_run(out)
    path = out / "metrics.jsonl"
    if damage == "garbled line":
        path.write_text('{"step": 1}\n{garbage\n{"step": 2}\n')
    elif damage == "a folder":
        path.unlink()
        path.mkdir()
    elif damage == "a list":
        path.write_text("[1, 2]\n")
    else:
        path.write_bytes(b"\xff\xfe\n")
    with pytest.raises(ConfigError) as error:
        harness.resume_training(out, {"model": torch.nn.Linear(2, 1)})
    assert "metrics.jsonl" in str(error.value) and "\n" not in str(error.value)


def test_a_checkpoint_without_its_step_is_refused(tmp_path):
    out = tmp_path / "out"
    interrupted_run(out)
    save_torch({"model": torch.nn.Linear(2, 1).state_dict()}, out / "checkpoint.pt")
    with pytest.raises(ConfigError, match="no step count"):
        harness.resume_training(out, {"model": torch.nn.Linear(2, 1)})


# ---------------------------------------------------------------------------
# 6: `run --resume` does not mix --fast and full stages

def test_run_resume_refuses_to_mix_fast_and_full(tmp_path):
    out = tmp_path / "run"
    (out / "sft").mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"fast": True, "seed": 0}))
    (out / "sft" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="--fast"):
        run_pipeline(out, fast=False, resume=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["run.json", "sft"]


# ---------------------------------------------------------------------------
# 7: a resumed metrics.jsonl equals an uninterrupted one

def test_a_resumed_dpo_writes_the_same_metrics_rows(prefs, tmp_path, monkeypatch):
    config = apply_overrides(DPOConfig(), dict(steps=10, log_every=5, batch_size=4, warmup_steps=2,
                                               n_eval_samples=4, max_new_tokens=16))
    train_dpo(config, tiny_sft_dir(), prefs, tmp_path / "whole", progress=False)
    real = harness.check_finite

    def stop_at_step_7(loss, step, out_dir=None):     # between the log lines of steps 5 and 10
        if step == 7:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(loss, step, out_dir)
    monkeypatch.setattr(harness, "check_finite", stop_at_step_7)
    with pytest.raises(harness.Interrupted):
        train_dpo(config, tiny_sft_dir(), prefs, tmp_path / "cut", progress=False)
    monkeypatch.undo()
    train_dpo(config, tiny_sft_dir(), prefs, tmp_path / "cut", resume=True, progress=False)
    whole, cut = ((tmp_path / name / "metrics.jsonl").read_text().splitlines() for name in ("whole", "cut"))
    assert len(whole) == 2 and cut == whole


# ---------------------------------------------------------------------------
# 8: every expected error is one line with exit code 2

def model_folder(tmp_path, edit=None, weights=None):
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "model.pt"):
        (folder / name).write_bytes((tiny_sft_dir() / name).read_bytes())
    if edit is not None:
        config = json.loads((folder / "config.json").read_text())
        edit(config)
        (folder / "config.json").write_text(json.dumps(config))
    if weights is not None:
        model = load_gpt(tiny_sft_dir())
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(weights)
        save_model(model, folder)
    return folder


def set_model(key, value):
    return lambda config: config["model"].update({key: value})


SAMPLE = ["sample", "--prompt", "the movie was", "-n", "1", "--max-new-tokens", "4", "--device", "cpu"]
BAD_SAMPLES = {   # case -> (extra argv given the model folder, how to make the folder, what the line says)
    "seed -1": (["--seed", "-1"], {}, "[0, 2**32)"),
    "seed 2**32": (["--seed", str(2**32)], {}, "[0, 2**32)"),
    "top-k 0": (["--top-k", "0"], {}, "--top-k"),
    "endoftext in the prompt": (["--prompt", "the <|endoftext|> movie"], {}, "<|endoftext|>"),
    "tiny temperature": (["--temperature", "1e-45"], {}, "NaN or inf"),
    "a NaN model": ([], {"weights": float("nan")}, "NaN or inf"),
    "model.pt given": (["--model-file"], {}, "is a file"),
    "config.json a list": ([], {"raw": b"[1, 2]"}, "not a JSON object"),
    "config.json not UTF-8": ([], {"raw": b"\xff\xfe{}"}, "not UTF-8"),
    "config.json a folder": ([], {"raw": "folder"}, "not a file"),
    "n_head 0": ([], {"edit": set_model("n_head", 0)}, "n_head"),
    "block_size 64.5": ([], {"edit": set_model("block_size", 64.5)}, "block_size"),
}


@pytest.mark.parametrize("case", BAD_SAMPLES)
def test_a_bad_sample_command_is_one_line(case, tmp_path, capsys):
    extra, make, says = BAD_SAMPLES[case]
    raw = make.pop("raw", None) if make else None
    folder = model_folder(tmp_path, **make)
    if raw == "folder":
        (folder / "config.json").unlink()
        (folder / "config.json").mkdir()
    elif raw is not None:
        (folder / "config.json").write_bytes(raw)
    model = folder / "model.pt" if extra == ["--model-file"] else folder
    extra = [] if extra == ["--model-file"] else extra
    code, _, err = cli(capsys, *SAMPLE, "--model", model, *extra)
    assert code == 2 and says in one_line(err)


BAD_SFT = {
    "seed -1": (["--seed", "-1"], "[0, 2**32)"),
    "unknown task": (["--set", "task=nope"], "unknown task 'nope'"),
    "block_size 10**12": (["--set", f"block_size={10**12}"], "block_size"),
    "--out a file": (["--out", "FILE"], "is a file"),
    "--out below a file": (["--out", "FILE/run"], "is a file"),
}


@pytest.mark.parametrize("case", BAD_SFT)
def test_a_bad_stage_command_is_one_line_before_any_work(case, tmp_path, capsys):
    extra, says = BAD_SFT[case]
    (tmp_path / "FILE").write_text("not a folder")
    extra = [str(a).replace("FILE", str(tmp_path / "FILE")) for a in extra]
    out = [] if "--out" in extra else ["--out", tmp_path / "out"]
    code, _, err = cli(capsys, "sft", "--fast", "--quiet", *out, *extra)
    assert code == 2 and says in one_line(err)
    assert not (tmp_path / "out").exists()


def test_an_unwritable_out_is_one_line(tmp_path, monkeypatch, capsys):
    def refused(self, *args, **kwargs):        # as root, permissions cannot refuse: the system's answer, faked
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
    monkeypatch.setattr(Path, "mkdir", refused)
    code, _, err = cli(capsys, "sft", "--fast", "--quiet", "--set", *SFT_SET, "--out", tmp_path / "locked" / "out")
    assert code == 2 and "cannot create the run folder" in one_line(err) and "Permission denied" in err


@pytest.mark.parametrize("setting, says", [("ref_batch_size=0", "ref_batch_size"),
                                           ("n_periodic_eval=0 eval_every=5", "n_periodic_eval"),
                                           ("max_new_tokens=0", "max_new_tokens")])
def test_an_impossible_dpo_value_is_refused_before_loading_anything(setting, says, tmp_path, capsys):
    code, _, err = cli(capsys, "dpo", "--sft", tmp_path / "no-sft", "--prefs", tmp_path / "no-prefs", "--fast",
                       "--quiet", "--set", *setting.split(), "--out", tmp_path / "out")
    assert code == 2 and says in one_line(err)


@pytest.mark.parametrize("kind, record", [
    ("demonstrations", {"prompt": "the movie", "completion": " was good .<|endoftext|>"}),
    ("pairs", {"prompt": "the <|endoftext|>", "chosen": " a", "rejected": " b"}),
    ("rankings", {"prompt": "the movie", "completions": [" a", " b<|endoftext|>"]}),
])
def test_the_end_of_text_token_in_data_is_refused_with_its_line(kind, record, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(DataError, match=f"{path}:1: .*<\\|endoftext\\|>"):
        read_jsonl(path, kind)


def test_a_bad_line_in_the_ranks_file_names_the_line(tmp_path):
    path = tmp_path / "tokenizer.tiktoken"
    lines = (ROOT / "data" / "tokenizer.tiktoken").read_text().splitlines()
    lines[300] = "not-base64!! x"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=f"{path}:301: not a `base64 rank` line"):
        load_ranks(path)


def test_an_unexpected_error_says_where_to_report_and_saves_the_traceback(monkeypatch, capsys):
    from minirlhf import __main__ as cli_module

    def broken(args):
        raise RuntimeError("a bug")
    monkeypatch.setitem(cli_module.COMMANDS, "sample", (broken, *cli_module.COMMANDS["sample"][1:]))
    code = cli_module.main(["sample", "--model", "x", "--prompt", "y"])
    line = one_line(capsys.readouterr().err)
    assert code == 1 and "unexpected RuntimeError: a bug" in line and "report" in line
    saved = Path(line.split("saved in ")[1].split()[0])
    assert "RuntimeError: a bug" in saved.read_text()
    saved.unlink()
    with pytest.raises(RuntimeError):
        cli_module.main(["--debug", "sample", "--model", "x", "--prompt", "y"])


# ---------------------------------------------------------------------------
# 9: silent nonsense is refused

def test_collect_refuses_to_write_an_empty_rankings_file(tmp_path, capsys):
    code, _, err = cli(capsys, "collect", "--sft", tiny_sft_dir(), "--fast", "--quiet", "--set",
                       "test_fraction=0.99", "n_prompts=3", "--out", tmp_path / "out")
    assert code == 2 and "rankings.jsonl would be empty" in one_line(err)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------
# 10: Best-of-N draws its samples in bounded batches

@pytest.mark.parametrize("n, batch_size", [(10, 4), (3, 8)])
def test_best_of_n_never_generates_more_than_batch_size_sequences_at_once(n, batch_size, monkeypatch):
    policy, tokenizer = load_gpt(tiny_sft_dir()), load_tokenizer()
    calls, real = [], baselines.generate

    def counted(model, tok, prompts, **kwargs):
        calls.append(len(prompts))
        return real(model, tok, prompts, **kwargs)
    monkeypatch.setattr(baselines, "generate", counted)
    config = apply_overrides(BestOfNConfig(), dict(n=n, batch_size=batch_size, max_new_tokens=8))
    prompts = ["the movie was", "this film is", "i thought the"]
    gold = lambda texts: [float(len(t) % 7) / 7 for t in texts]
    kept = best_of_n(policy, tokenizer, prompts, lambda tokens, mask, texts: gold(texts), gold, config,
                     torch.Generator().manual_seed(0))
    assert max(calls) <= batch_size and sum(calls) == n * len(prompts)
    assert [k["text"][:len(p)] for k, p in zip(kept, prompts)] == prompts
    assert all(k["gold"] >= k["mean_gold"] - 1e-12 for k in kept)   # the ranker is the gold judge here
