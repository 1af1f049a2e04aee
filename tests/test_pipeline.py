"""The whole pipeline (`run --fast`) and a small frontier sweep on top of it.

Checks that `run` writes every stage's folder (GRPO and RLOO included), a combined summary
with the same keys for every method, gold_vs_kl.png and a report whose table and sentences
come from the measured numbers; that the stages after collect run side by side in the order
their dependencies allow, with the same numbers as one after another, through a SIGTERM and
--resume, and that a failing stage is named while the others finish; and that `frontier --from`
reuses that run's models and writes its figures and a report that compares DPO and PPO with a
noise threshold; that its seed bands (`band_seeds`) train the headline methods again on other
seeds, are drawn, and that the report says which bands hold training noise and which only
sampling noise.

The later `run` tests copy the first run's sft/ and prefs/ and continue with --resume: only the
stages after collect run again, which keeps this file short.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minirlhf.config import apply_overrides
from minirlhf.files import load_torch
from minirlhf.experiments import FAST, FrontierConfig, run_frontier
from minirlhf.frontier_report import band_section, band_stats, best_within, frontier_envelope, plot_frontier
from minirlhf.__main__ import main
from minirlhf.parallel import Outcome
from minirlhf.pipeline import METHODS, SIDE_BY_SIDE, StageFailed, check_outcomes, run_pipeline


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "run"
    return out, run_pipeline(out, fast=True, progress=False, workers=2)


def after_collect(base, out, keep=()):
    """A run folder holding `base`'s finished sft/ and prefs/ (and the stages in `keep`)."""
    out.mkdir()
    for name in ("run.json", "timings.json"):
        shutil.copy(base / name, out / name)
    for stage in ("sft", "prefs", *keep):
        shutil.copytree(base / stage, out / stage)
    return out


def numbers(combined):
    """Every stage's summary without its timings (wall_seconds, train/seconds)."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if "seconds" not in k}
        return [strip(v) for v in value] if isinstance(value, list) else value
    return strip(combined["stages"])


def test_run_writes_every_stage_and_a_report(fast_run):
    out, combined = fast_run
    for stage in ("sft", "prefs", "rm", "ppo", "grpo", "rloo", "dpo", "preferred_ft", "best_of_n"):
        assert (out / stage / "summary.json").exists(), f"{stage}"
    for method in METHODS:
        stage = combined["stages"][method]
        assert 0.0 <= stage["eval/gold_reward"] <= 1.0 and stage["wall_seconds"] > 0, f"{method}"
    assert json.loads((out / "summary.json").read_text())["stages"].keys() == combined["stages"].keys()
    report = (out / "report.md").read_text()
    ppo_gold = combined["stages"]["ppo"]["eval/gold_reward"]
    assert f"| ppo | {ppo_gold:.3f}" in report                        # the table shows the measured number
    rloo_gold = combined["stages"]["rloo"]["eval/gold_reward"]
    assert f"| rloo | {rloo_gold:.3f}" in report and "- grpo lands " in report and "- rloo lands " in report
    assert json.loads((out / "rloo" / "config.json").read_text())["advantage"] == "rloo"
    assert "(bound)" in report and "## Samples for the same prompts" in report
    assert (out / "gold_vs_kl.png").stat().st_size > 1000


def test_stages_start_after_what_they_need_and_the_report_shows_the_schedule(fast_run):
    out, combined = fast_run
    timings = json.loads((out / "timings.json").read_text())
    assert timings.keys() == combined["stages"].keys()
    for name, needs in SIDE_BY_SIDE:
        assert timings[name]["start"] >= timings["prefs"]["end"], f"{name} started before collect ended"
        for need in needs:
            assert timings[name]["start"] >= timings[need]["end"], f"{name} started before {need} ended"
        assert abs(timings[name]["seconds"] - combined["stages"][name]["wall_seconds"]) < 1e-9
    report = (out / "report.md").read_text()
    assert "## Schedule" in report and "| stage | started (s) | ended (s) | wall (s) | ran beside |" in report
    assert f"| rm | {timings['rm']['start']:.1f} | {timings['rm']['end']:.1f} |" in report
    assert f"the stages' own times add up to {combined['stage_seconds']:.1f} s" in report
    beside = [n for n, _ in SIDE_BY_SIDE if n != "rm" and timings[n]["start"] < timings["rm"]["end"]]
    assert beside, "with two workers something runs beside the reward model"     # dpo: it needs no rm
    assert (out / "schedule.png").stat().st_size > 1000


def test_one_worker_gives_the_same_numbers_as_side_by_side(fast_run, tmp_path):
    # Bit for bit: every stage after collect runs on one torch thread either way (torch's results
    # depend on the thread count, so side by side vs one after another must not change it).
    base, combined = fast_run
    one = run_pipeline(after_collect(base, tmp_path / "one"), fast=True, resume=True, progress=False, workers=1)
    assert one["workers"] == 1 and numbers(one) == numbers(combined)


def test_sigterm_stops_every_stage_and_resume_finishes_with_the_same_numbers(fast_run, tmp_path):
    base, combined = fast_run
    out = after_collect(base, tmp_path / "stopped")
    command = [sys.executable, "-m", "minirlhf", "run", "--fast", "--quiet", "--resume", "--workers", "2",
               "--out", str(out)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any((out / s / "metrics.jsonl").exists() for s in ("rm", "dpo")) and time.monotonic() < deadline:
        time.sleep(0.05)                               # until a stage after collect is training
    os.kill(process.pid, signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "--resume to finish the run" in err.strip().splitlines()[-1]
    assert not (out / "summary.json").exists()
    again = run_pipeline(out, fast=True, resume=True, progress=False, workers=2)
    assert numbers(again) == numbers(combined)


def test_a_failing_stage_is_named_and_the_others_finish(fast_run, tmp_path, capsys):
    base, _ = fast_run
    out = after_collect(base, tmp_path / "failing", keep=("dpo", "preferred_ft"))
    for name in ("pairs.jsonl", "rankings.jsonl"):                 # the reward model cannot read them
        with open(out / "prefs" / name, "a") as f:
            f.write("not json\n")
    with pytest.raises(SystemExit) as stop:
        main(["run", "--fast", "--quiet", "--resume", "--out", str(out)])
    assert stop.value.code == 2                                    # a DataError, as when rm runs alone
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: stage rm failed: DataError: ") and "\n" not in line
    assert "not started: ppo (needs rm, which failed)" in line and "--resume" in line
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings) == {"sft", "prefs", "dpo", "preferred_ft"}          # the finished stages only
    assert not (out / "summary.json").exists() and not (out / "ppo").exists()


def test_a_crash_in_a_stage_exits_1_and_the_users_error_exits_2():
    crash = Outcome("ppo", "failed", error="RuntimeError: boom", error_type="RuntimeError", details="Traceback")
    bad_input = Outcome("rm", "failed", error="DataError: x.jsonl:3: not valid JSON", error_type="DataError")
    done = Outcome("dpo", "done")
    for outcomes, code in (([crash, done], 1), ([bad_input, done], 2), ([bad_input, crash], 1)):
        with pytest.raises(StageFailed) as failed:
            check_outcomes({o.name: o for o in outcomes})
        assert failed.value.code == code and "stage " in str(failed.value) and "dpo" not in str(failed.value)
    check_outcomes({"dpo": done})                                   # nothing failed: nothing raised


def test_frontier_reuses_the_run_and_reports_with_noise(fast_run, tmp_path):
    base, _ = fast_run
    config = apply_overrides(FrontierConfig(), {**FAST, "dpo_betas": "0.1", "ppo_kl_coefs": "0.05",
                                                       "bon_ns": "1,2", "temperatures": "1.0",
                                                       "overopt_iterations": 4, "ppo_gt_kl_coefs": "0.05",
                                                       "ceiling_samples": 32, "band_seeds": 1,
                                                       "band_methods": "ppo,best_of_n"})
    summary = run_frontier(config, tmp_path / "frontier", base_dir=base, fast=True, progress=False)
    assert not (tmp_path / "frontier" / "base").exists()                  # the run's models were reused
    assert {"dpo", "rpo", "ppo", "ppo_gt", "grpo", "rloo", "preferred_ft", "best_of_n",
            "sft"} <= summary["results"].keys()
    rloo_config = json.loads((Path(summary["results"]["rloo"][0]["dir"]) / "config.json").read_text())
    assert rloo_config["advantage"] == "rloo"
    # the ceiling: 32 SFT samples of each evaluation prompt; at KL 0 it is the SFT model's own mean gold
    gold = load_torch(tmp_path / "frontier" / "runs" / "ceiling_gold.pt")
    assert gold.shape == (config.n_eval, 32) and ((gold >= 0) & (gold <= 1)).all()
    ceiling = summary["ceiling"]
    assert ceiling["curve"][0]["kl"] == 0.0 and abs(ceiling["curve"][0]["gold"] - gold.mean().item()) < 1e-9
    assert all(r["kl"] <= ceiling["log_n"] + 1e-9 for r in ceiling["curve"])      # never beyond log N
    assert all(o > 0 for o in summary["run_seconds"].values())
    # the paper's DPO and RPO are different runs: the one without and the one with the NLL term
    dpo_config, rpo_config = (json.loads((Path(summary["results"][m][0]["dir"]) / "config.json").read_text())
                              for m in ("dpo", "rpo"))
    assert dpo_config["nll_coef"] == 0.0 and rpo_config["nll_coef"] > 0
    # over-optimisation: the SFT model's Best-of-1 evaluation, then one evaluation per iteration
    overopt = summary["overoptimisation"]
    best_of_1 = next(r["final"] for r in summary["results"]["best_of_n"] if r["label"] == "N=1")
    assert [r["step"] for r in overopt] == [0, 1, 2, 3, 4]
    assert (overopt[0]["eval/kl"], overopt[0]["eval/gold_reward"]) == (0.0, best_of_1["eval/gold_reward"])
    for name in ("frontier.png", "overoptimisation.png", "frontier.md", "ceiling_convergence.png"):
        assert (tmp_path / "frontier" / name).exists(), f"{name}"
    report = (tmp_path / "frontier" / "frontier.md").read_text()
    assert "within noise" in report and "Over-optimisation" in report
    # seed bands: PPO at its default β on seeds 0 (the sweep's own run, not trained twice) and 1; Best-of-N
    # at every N on both seeds; the report names which bands hold training noise and which only sampling
    bands = summary["bands"]
    assert set(bands) == {"ppo", "best_of_n"} and set(bands["ppo"]["curves"]) == {"0", "1"}
    assert [list(p) for p in bands["ppo"]["curves"]["0"]] == [list(p) for p in summary["results"]["ppo"][0]["points"]]
    seed_1 = tmp_path / "frontier" / "runs" / "ppo_beta0.05_seed1"
    assert json.loads((seed_1 / "config.json").read_text())["seed"] == 1
    assert not (tmp_path / "frontier" / "runs" / "ppo_beta0.05_seed0").exists()
    assert [len(c) for c in bands["best_of_n"]["curves"].values()] == [2, 2]       # N = 1, 2 on each seed
    assert "Bands that include training noise: PPO (reward model). Sampling-only bands: Best-of-N" in report
    assert summary["efficiency"]["budgets"] and set(summary["efficiency"]["efficiency"]) == set(summary["results"])
    assert "The ceiling" in report and "efficiency" in report and "Gao et al." in report
    # --resume on a finished sweep trains nothing again and reports the same points
    again = run_frontier(config, tmp_path / "frontier", base_dir=base, fast=True, progress=False, resume=True)
    points = lambda results: {m: [list(map(list, run["points"])) for run in runs] for m, runs in results.items()}
    assert again["run_seconds"] == {} and points(again["results"]) == points(summary["results"])


def test_band_stats_by_hand_and_the_band_is_drawn(tmp_path):
    curves = {"0": [(0.0, 0.5), (1.0, 0.6)], "1": [(0.0, 0.7), (3.0, 0.8)], "2": [(0.0, 0.6)]}
    two = band_stats({k: v for k, v in curves.items() if k != "2"})      # s.d. of (a, b) is |a − b|/√2
    assert [pytest.approx(row) for row in two] == [(0.0, 0.6, 0.0, 0.2 / 2 ** 0.5),
                                                   (2.0, 0.7, 2 / 2 ** 0.5, 0.2 / 2 ** 0.5)]
    assert [pytest.approx(row) for row in band_stats(curves)] == [(0.0, 0.6, 0.0, 0.1)]   # cut to the shortest
    results = {"sft": [{"label": "", "points": [(0.0, 0.5)]}], "ppo": [{"label": "β=0.05", "points": [(1.0, 0.6)]}]}
    bands = {"ppo": {"setting": "β=0.05", "curves": curves, "sems": [0.05]},
             "best_of_n": {"setting": "N=1,N=4", "curves": {"0": [(0.0, 0.5), (0.64, 0.6)],
                                                             "1": [(0.0, 0.52), (0.64, 0.7)]}, "sems": [0.04]}}
    left = plot_frontier(results, [1.0], {"ppo": [0.6]}, tmp_path / "f.png", bands=bands).axes[0]
    labels = left.get_legend_handles_labels()[1]
    assert any("training + sampling" in l and "3 seeds" in l for l in labels)
    assert any(l.startswith("Best-of-N") and "sampling only" in l for l in labels)
    assert len(left.collections) >= 2 + 2                                  # a shaded band per method, besides dots
    text = "\n".join(band_section({"bands": bands, "band_seeds": 2, "seed": 0}))
    assert "| 0.00 ± 0.00 | 0.600 ± 0.100 | 0.050 | training + sampling |" in text   # the last common point
    assert "Sampling-only bands: Best-of-N" in text
    assert "sampling** noise" in "\n".join(band_section({"bands": {}, "seed": 0}))


def test_frontier_envelope_and_budget_by_hand():
    points = [(0.0, 0.5), (2.0, 0.4), (1.0, 0.7), (3.0, 0.9)]
    assert frontier_envelope(points) == [(0.0, 0.5), (1.0, 0.7), (3.0, 0.9)]
    assert best_within(points, 2.0) == 0.7 and best_within(points, -1) is None
