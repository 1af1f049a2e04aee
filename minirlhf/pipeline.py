"""The whole pipeline in one command: `python -m minirlhf run`.

    data -> SFT -> collect (simulated labelers) -> reward model -> PPO, GRPO, RLOO
                                                 \\-> DPO, Preferred-FT, Best-of-N

Every method starts from the same SFT model and the same preference pairs, and reports
through the same evaluation (gold reward and KL to the SFT model on the same test
prompts), so the report's table compares like with like. The run folder holds one
subfolder per stage, a combined `summary.json`, `gold_vs_kl.png`, `schedule.png`, `timings.json`
and `report.md`.

The schedule (issue #24). SFT and collect run alone, in this process, on all threads. The
stages after them need only the preferences (DPO, Preferred-FT) or the reward model (PPO,
GRPO, RLOO, Best-of-N), so they run side by side, one process and one thread each, as many at
once as there are cores (`--workers`), each once the stages it needs have finished
(parallel.run_jobs). `--workers 1` runs them one after another in this process, also on one
thread: the same numbers, bit for bit (tests/test_pipeline.py checks it). `--fast` does that by
default: its stages take a few seconds, less than starting a process for each (23 s against 29 s).

Why always one thread: torch's CPU results depend on the number of threads (the order of a
sum's round-off changes), and sampling turns one flipped token into a different run. Measured
on `run --fast --seed 0`, one thread against two: SFT and collect identical, DPO, GRPO, RLOO and
Preferred-FT within ~1e-6 relative, the reward model's bias 1.4 % apart and PPO's gold reward
0.207 against 0.260. So a stage's numbers are reproducible only at a fixed thread count, and
the stages after collect never change theirs with how many run at once (the numbers would then
depend on timing). This changed the numbers of the reward model, PPO and the stages after it
once, when they moved from all threads to one; each stage still seeds itself, so the schedule
changes none of them.
"""
import json
import time
from pathlib import Path

from minirlhf import baselines, collect, dpo, grpo, parallel, ppo, reward, sft
from minirlhf.config import ConfigError, build
from minirlhf.data import DATA_DIR
from minirlhf.files import atomic_write_text, read_json, write_json
from minirlhf.runs import Interrupted, figure
from minirlhf.tasks import reviews
from minirlhf.tokenizer import train_and_save

METHODS = ["sft", "ppo", "grpo", "rloo", "dpo", "preferred_ft", "best_of_n"]   # rows of the report's table
RL_METHODS = ("ppo", "grpo", "rloo", "best_of_n")   # they use the reward model: its time counts in theirs
TRAINED = [m for m in METHODS if m != "sft"]


# ---------------------------------------------------------------------------
# The stages, each a function of the run folder and the shared settings

def stage_functions(out, fast, seed, device, progress, resume=False, overwrite=False):
    """(name, run) pairs in pipeline order; each run() returns the stage's summary dict.

    With `resume`, a training stage whose folder holds a checkpoint.pt continues from it;
    with `overwrite`, each stage replaces what its folder holds."""
    kw = dict(device=device, progress=progress, overwrite=overwrite)
    rankings = out / "prefs" / "rankings.jsonl"     # DPO and Preferred-FT: whole rankings, as the reward model

    def config(defaults, fast_overrides, variant=None):
        return build(defaults, variant=variant, fast=fast_overrides if fast else None, seed=seed)

    def go_on(name):          # --resume for the training stages (collect and Best-of-N keep no checkpoint)
        return dict(resume=resume and (out / name / "checkpoint.pt").exists())

    def train_critic_free(name, variant=None):   # GRPO at its defaults; RLOO is advantage=rloo
        return grpo.train_grpo(config(grpo.GRPOConfig(), grpo.FAST, variant), out / "sft", out / "rm", out / name,
                               **kw, **go_on(name))

    def train_rm(config):     # the K-wise loss reads rankings.jsonl, Bradley-Terry pairs.jsonl
        return reward.train_reward_model(config, out / "sft", reward.preferences_file(out / "prefs", config.loss),
                                         out / "rm", **kw, **go_on("rm"))

    return [
        ("sft", lambda: sft.train_sft(config(sft.SFTConfig(), sft.FAST), out / "sft", **kw, **go_on("sft"))),
        ("prefs", lambda: collect.collect(config(collect.CollectConfig(), collect.FAST), out / "sft",
                                          out / "prefs", **kw)),
        ("rm", lambda: train_rm(config(reward.RewardConfig(), reward.FAST))),
        ("ppo", lambda: ppo.train_ppo(config(ppo.PPOConfig(), ppo.FAST), out / "sft", out / "rm",
                                      out / "ppo", **kw, **go_on("ppo"))),
        ("dpo", lambda: dpo.train_dpo(config(dpo.DPOConfig(), dpo.FAST), out / "sft", rankings,
                                      out / "dpo", **kw, **go_on("dpo"))),
        ("preferred_ft", lambda: baselines.train_preferred_ft(
            config(baselines.PreferredFTConfig(), baselines.PREFERRED_FT_FAST), out / "sft", rankings,
            out / "preferred_ft", **kw, **go_on("preferred_ft"))),
        ("best_of_n", lambda: baselines.run_best_of_n(
            config(baselines.BestOfNConfig(), baselines.BEST_OF_N_FAST), out / "sft", out / "rm",
            out / "best_of_n", **kw)),
        ("grpo", lambda: train_critic_free("grpo")),
        ("rloo", lambda: train_critic_free("rloo", {"advantage": "rloo"})),
    ]


def run_stage(name, out, fast, seed, device, progress=False, resume=False, overwrite=False):
    """One stage of `stage_functions` by name: what a child process of `run_jobs` calls."""
    return dict(stage_functions(Path(out), fast, seed, device, progress, resume, overwrite))[name]()


def ensure_data(seed=0):
    """data/ ships with the kit; regenerate it only if a file is missing."""
    names = ["sft_train", "sft_val", "prompts_train", "prompts_test"]
    if all((DATA_DIR / f"{n}.jsonl").exists() for n in names) and (DATA_DIR / "tokenizer.tiktoken").exists():
        return "shipped"
    reviews.write_datasets(DATA_DIR, seed=seed)
    train = [json.loads(line) for line in (DATA_DIR / "sft_train.jsonl").read_text().splitlines()]
    train_and_save([r["prompt"] + r["completion"] for r in train])
    return "regenerated"


# SFT and collect run alone, in this process, on all threads. The stages after them need only
# the preferences or the reward model, so they run side by side (parallel.run_jobs): listed
# longest chain first, as run_jobs starts the first ready job in this order.
ALONE = ("sft", "prefs")
SIDE_BY_SIDE = [("rm", ()), ("ppo", ("rm",)), ("grpo", ("rm",)), ("rloo", ("rm",)), ("dpo", ()),
                ("preferred_ft", ()), ("best_of_n", ("rm",))]
USER_ERRORS = ("ConfigError", "DataError")      # raised by a stage: exit 2, as when run alone


class StageFailed(Exception):
    """One or more stages failed; the others finished. `code` is the exit code (2: the user's
    input, 1: a crash)."""

    def __init__(self, message, code, details=""):
        super().__init__(message)
        self.code, self.details = code, details          # details: the stages' tracebacks, for --debug


class RunInterrupted(Interrupted):
    """Ctrl-C or SIGTERM stopped the stages at a step boundary; `run --resume` finishes them."""

    def __init__(self, stopped, out):
        Exception.__init__(self, f"interrupted: {', '.join(stopped) or 'no stage'} stopped with a checkpoint "
                                 f"in {out}. Run the same command with --resume to finish the run.")


def run_pipeline(out_dir, fast=False, seed=0, device="cpu", resume=False, overwrite=False, progress=True,
                 workers=None):
    """Run every stage into `out_dir`; return the combined summary. With `resume`, finished stages
    are kept. `workers`: stages at once after collect (default one per core; with `fast`, 1: at the
    tiny sizes starting a process per stage costs more than running two at once saves); 1 runs them
    one after another in this process, on one thread like each side-by-side stage: the same numbers."""
    out = Path(out_dir)
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ConfigError(f"--workers {workers}: expected a whole number of at least 1")
    if (out / "summary.json").exists() and not (overwrite or resume):
        raise ConfigError(f"{out} already holds a finished run; pass --overwrite or choose another --out")
    if any(out.glob("*/config.json")) and not (overwrite or resume):
        raise ConfigError(f"{out} holds an unfinished run; pass --resume to continue it, --overwrite to "
                                 "start again, or choose another --out")
    settings = {"fast": fast, "seed": seed}     # one configuration for every stage (docs/reliability.md)
    recorded = read_json(out / "run.json") if resume and (out / "run.json").exists() else settings
    if recorded != settings:
        raise ConfigError(f"--resume with other settings than the run in {out} ({recorded} -> {settings}): "
                          f"resume with {'--fast' if recorded.get('fast') else 'no --fast'} and --seed "
                          f"{recorded.get('seed')}, or start again with --overwrite")
    workers = workers or (1 if fast else parallel.default_workers())
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "run.json", settings)
    began = time.perf_counter()
    combined = {"data": ensure_data(), "fast": fast, "seed": seed, "workers": workers, "stages": {}}
    # timings.json: each stage's own seconds, and its start and end in seconds since the run began;
    # rewritten after every stage, with the stages seen so far. --resume keeps a finished stage's.
    done = {name for name in [*ALONE, *(n for n, _ in SIDE_BY_SIDE)]
            if resume and (out / name / "summary.json").exists()}
    timings = {n: t for n, t in read_timings(out / "timings.json").items() if n in done} if resume else {}
    write_json(out / "timings.json", timings)           # only finished stages, from here on
    combined["kept"] = sorted(done)
    kw = dict(out=out, fast=fast, seed=seed, device=device, resume=resume, overwrite=overwrite)

    def record(name, summary, start, end):
        timings[name] = {"seconds": end - start, "start": start, "end": end}
        combined["stages"][name] = {**summary, "wall_seconds": end - start}
        write_json(out / "timings.json", timings)

    for name in ALONE:                                    # (a) alone, on all threads, as before
        if name not in done:
            if progress:
                print(f"== {name}")
            start = time.perf_counter() - began
            summary = run_stage(name, **kw, progress=progress)
            record(name, summary, start, time.perf_counter() - began)
    here = workers == 1          # one after another in this process: each stage shows its own bar
    jobs = [parallel.Job(name, "minirlhf.pipeline:run_stage", {**kw, "name": name, "progress": progress and here},
                         after=tuple(d for d in needs if d not in done))
            for name, needs in SIDE_BY_SIDE if name not in done]
    if progress and jobs:
        how = "one after another" if here else f"side by side, {min(workers, len(jobs))} at a time"
        needs = "".join(f"; {j.name} after {' and '.join(j.after)}" for j in jobs if j.after)
        print(f"== {', '.join(j.name for j in jobs)}: {how}, one thread each{needs}")
    try:                                                  # (b) the rest, one thread each
        outcomes = parallel.run_jobs_here(jobs) if here else parallel.run_jobs(jobs, workers, progress)
        stopped = False
    except parallel.Stopped as stop:                      # every running stage saved a checkpoint
        outcomes, stopped = stop.outcomes, True
    for o in outcomes.values():
        if o.status == "done":
            summary = o.result if o.result is not None else read_json(out / o.name / "summary.json")
            record(o.name, summary, o.started - began, o.ended - began)
    if stopped or any(o.status == "interrupted" for o in outcomes.values()):
        raise RunInterrupted([o.name for o in outcomes.values() if o.status == "interrupted"], out)
    check_outcomes(outcomes)
    for name in done:                                     # kept from before --resume, in pipeline order below
        combined["stages"][name] = {**read_json(out / name / "summary.json"),
                                    "wall_seconds": timings.get(name, {}).get("seconds", float("nan"))}
    order = [*ALONE, "rm", *TRAINED]
    combined["stages"] = {name: combined["stages"][name] for name in order if name in combined["stages"]}
    combined["schedule"] = {name: timings[name] for name in order if name in timings}
    combined["total_seconds"] = time.perf_counter() - began
    combined["stage_seconds"] = sum(v["wall_seconds"] for v in combined["stages"].values())
    plot_gold_vs_kl(combined, out / "gold_vs_kl.png")
    plot_schedule(combined, out / "schedule.png")
    atomic_write_text(out / "report.md", report(combined, out))
    write_json(out / "summary.json", combined)
    return combined


def read_timings(path):
    """timings.json as {stage: {"seconds", "start", "end"}}; a file from before the schedule was
    recorded held {stage: seconds}."""
    recorded = read_json(path) if path.exists() else {}
    if not isinstance(recorded, dict):
        raise ConfigError(f"{path}: expected a JSON object of stage timings; remove it to resume")
    return {name: value if isinstance(value, dict) else {"seconds": value} for name, value in recorded.items()}


def check_outcomes(outcomes):
    """Raise StageFailed naming each stage that failed (with its error) and those it kept from
    starting; the stages that do not depend on them have finished by now."""
    failed = [o for o in outcomes.values() if o.status not in ("done", "not started")]
    waiting = [o for o in outcomes.values() if o.status == "not started"]
    if not failed and not waiting:
        return
    text = "; ".join(f"stage {o.name} failed: {o.error}" for o in failed)
    if waiting:
        text += "; not started: " + ", ".join(f"{o.name} ({o.error})" for o in waiting)
    code = 2 if all(o.error_type in USER_ERRORS for o in failed) else 1
    raise StageFailed(f"{text}. The other stages finished; fix the cause, then run the same command with "
                      "--resume to train only what is missing.", code, "\n".join(o.details for o in failed))


# ---------------------------------------------------------------------------
# The report

def method_row(name, stages):
    """(gold, sem, kl, proxy, seconds) of a method; SFT's KL to itself is 0 by definition."""
    s = stages[name]
    seconds = s["wall_seconds"] + (stages["rm"]["wall_seconds"] + stages["prefs"]["wall_seconds"]
                                   if name in RL_METHODS else 0.0)
    return s["eval/gold_reward"], s.get("eval/gold_reward_sem", 0.0), s.get("eval/kl", 0.0), s.get("eval/proxy_reward"), seconds


def plot_gold_vs_kl(combined, path):
    fig, ax = figure(figsize=(5.5, 4))
    for name in METHODS:
        gold, sem, kl, _, _ = method_row(name, combined["stages"])
        ax.errorbar([kl], [gold], yerr=[sem], fmt="o", capsize=3, label=name)
    ax.set_xlabel("KL(π ‖ π_SFT), nats")
    ax.set_ylabel("gold reward")
    ax.set_title("Every method from the same SFT model")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def report(combined, out):
    """report.md: the table, what happened in words, samples side by side, the plots."""
    stages = combined["stages"]
    lines = ["# minirlhf run report", "",
             f"Seed {combined['seed']}, {'fast' if combined['fast'] else 'full'} configuration, "
             f"{combined['total_seconds']:.0f} s in all. Every method starts from the same SFT model and is "
             "evaluated on the same test prompts (one sample each, temperature 1).", "",
             "| method | gold reward | KL to SFT (nats) | proxy reward | wall time (s) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name in METHODS:
        gold, sem, kl, proxy, seconds = method_row(name, stages)
        bound = " (bound)" if stages[name].get("eval/kl_is_analytic_bound") else ""
        proxy_text = f"{proxy:.2f}" if proxy is not None else "–"
        lines.append(f"| {name} | {gold:.3f} ± {sem:.3f} | {kl:.2f}{bound} | {proxy_text} | {seconds:.1f} |")
    lines += ["", "Wall time is each stage's own time, measured while it shared the machine with the stages "
              "beside it (Schedule, below); PPO, GRPO, RLOO and Best-of-N times include collecting preferences "
              "and training the reward model. GRPO and RLOO run grpo.py at its defaults (G = 4, β = 0.05 as PPO's) and with "
              "`advantage=rloo` (docs/grpo.md). "
              "`dpo` is the kit's default DPO, which adds an NLL term on the chosen responses (RPO; "
              "`--set nll_coef=0 beta=1 lr=2e-4` trains the DPO paper's loss: docs/dpo.md).", "",
              "## What happened", "", *what_happened(stages), "", "## Samples for the same prompts", ""]
    n_show = min(len(stages[m].get("eval/samples", [])) for m in METHODS)
    for i in range(n_show):
        lines.append(f"**Prompt {i + 1}**")
        lines.append("")
        for name in METHODS:
            sample = stages[name]["eval/samples"][i]
            lines.append(f"- {name} [{sample['gold']:.2f}]: {sample['text']}")
        lines.append("")
    lines += [*schedule_lines(combined), "## Plots", "", "![gold vs KL](gold_vs_kl.png)", "",
              "![schedule](schedule.png)", ""]
    for png in sorted(out.glob("*/*.png")):
        relative = png.relative_to(out)
        lines += [f"![{relative}]({relative})", ""]
    return "\n".join(lines) + "\n"


def schedule_lines(combined):
    """The Schedule section: when each stage ran, beside which others, and what that saved."""
    schedule, kept = combined["schedule"], set(combined["kept"])
    timed = {n: t for n, t in schedule.items() if n not in kept and "start" in t}
    how = ("one after another" if combined["workers"] == 1 else
           f"side by side, up to {combined['workers']} at a time")
    lines = ["## Schedule", "", f"SFT and collect ran alone, on every thread; the stages after them ran {how}, "
             "one thread each, each once the stages it needs had finished. Each stage seeds itself and always "
             "runs on one thread, so its numbers do not depend on this schedule.", "",
             "| stage | started (s) | ended (s) | wall (s) | ran beside |", "| --- | ---: | ---: | ---: | --- |"]
    for name, t in schedule.items():
        if name not in timed:
            lines.append(f"| {name} | – | – | {t['seconds']:.1f} | (finished before --resume) |")
            continue
        beside = [o for o, u in timed.items() if o != name and u["start"] < t["end"] and t["start"] < u["end"]]
        lines.append(f"| {name} | {t['start']:.1f} | {t['end']:.1f} | {t['seconds']:.1f} | "
                     f"{', '.join(beside) or '–'} |")
    resumed = " (this invocation; the stages kept from before --resume are not in it)" if kept else ""
    lines += ["", f"Wall time {combined['total_seconds']:.1f} s{resumed}; the stages' own times add up to "
              f"{combined['stage_seconds']:.1f} s. Times count from the start of the command that ran the stage.",
              ""]
    return lines


def plot_schedule(combined, path):
    """A timeline: one bar per stage, from its start to its end."""
    timed = {n: t for n, t in combined["schedule"].items() if n not in combined["kept"] and "start" in t}
    fig, ax = figure(figsize=(6.5, 0.4 * len(timed) + 1.5))
    names = list(timed)[::-1]                              # the first stage at the top
    ax.barh(names, [timed[n]["seconds"] for n in names], left=[timed[n]["start"] for n in names], height=0.6)
    ax.set_xlabel("seconds since the run began")
    ax.set_ylabel("stage")
    ax.set_title(f"Schedule: up to {combined['workers']} stages at once after collect")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def what_happened(stages):
    """A few sentences generated from the measured numbers (nothing here is hard-coded)."""
    sft_gold = stages["sft"]["eval/gold_reward"]
    rm = stages["rm"]
    sentences = [
        f"- The SFT model writes reviews of mixed sentiment: gold reward {sft_gold:.2f}.",
        f"- The reward model agrees with held-out labels {rm['eval/accuracy']:.1%} of the time; the noisy labels "
        f"themselves agree with the gold judge {rm['eval/bayes_accuracy']:.1%} of the time (the ceiling).",
    ]
    for name in TRAINED:
        gold, _, kl, _, _ = method_row(name, stages)
        change = "raised" if gold > sft_gold else "did not raise"
        sentences.append(f"- {name} {change} the gold reward: {sft_gold:.2f} → {gold:.2f} at KL {kl:.2f} nats.")
    sentences += [critic_free_vs_ppo(name, stages) for name in ("grpo", "rloo")]
    best = max(TRAINED, key=lambda m: stages[m]["eval/gold_reward"])
    sentences.append(f"- Highest gold reward: {best}. A single run at one setting says little about which "
                     "method is better at equal KL: `python -m minirlhf frontier` sweeps that, and docs/grpo.md "
                     "compares GRPO and RLOO with PPO over three seeds.")
    return sentences


def critic_free_vs_ppo(name, stages):
    """Where GRPO or RLOO lands against PPO in this run: above, below or within noise (two standard
    errors of the difference: the evaluation samples' noise only, not the seed's)."""
    gold, sem, kl, _, _ = method_row(name, stages)
    ppo_gold, ppo_sem, ppo_kl, _, _ = method_row("ppo", stages)
    noise = 2 * (sem ** 2 + ppo_sem ** 2) ** 0.5
    if abs(gold - ppo_gold) <= noise:
        where = "within noise of PPO's"
    else:
        where = "above PPO's" if gold > ppo_gold else "below PPO's"
    return (f"- {name} lands {where} gold reward ({gold:.3f} vs {ppo_gold:.3f}, noise ±{noise:.3f}) at "
            f"{'less' if kl < ppo_kl else 'more'} KL ({kl:.2f} vs {ppo_kl:.2f} nats), in "
            f"{stages[name]['wall_seconds']:.0f} s of training against PPO's {stages['ppo']['wall_seconds']:.0f} s.")
