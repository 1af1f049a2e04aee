"""The whole pipeline in one command: `python -m minirlhf run`.

    data -> SFT -> collect (simulated labelers) -> reward model -> PPO, GRPO, RLOO
                                                 \\-> DPO, Preferred-FT, Best-of-N

Every method starts from the same SFT model and the same preference pairs, and reports
through the same evaluation (gold reward and KL to the SFT model on the same test
prompts), so the report's table compares like with like. The run folder holds one
subfolder per stage, a combined `summary.json`, `gold_vs_kl.png` and `report.md`.

GRPO and RLOO (grpo.py, at its defaults and with `advantage=rloo`) run last, after the
stages that were there before them: each stage seeds itself, so adding them changed none
of the other stages' numbers.
"""
import json
import time
from pathlib import Path

from minirlhf import baselines, collect, dpo, grpo, ppo, reward, sft
from minirlhf.config import ConfigError, build
from minirlhf.data import DATA_DIR
from minirlhf.files import atomic_write_text, read_json, write_json
from minirlhf.runs import figure
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


def ensure_data(seed=0):
    """data/ ships with the kit; regenerate it only if a file is missing."""
    names = ["sft_train", "sft_val", "prompts_train", "prompts_test"]
    if all((DATA_DIR / f"{n}.jsonl").exists() for n in names) and (DATA_DIR / "tokenizer.tiktoken").exists():
        return "shipped"
    reviews.write_datasets(DATA_DIR, seed=seed)
    train = [json.loads(line) for line in (DATA_DIR / "sft_train.jsonl").read_text().splitlines()]
    train_and_save([r["prompt"] + r["completion"] for r in train])
    return "regenerated"


def run_pipeline(out_dir, fast=False, seed=0, device="cpu", resume=False, overwrite=False, progress=True):
    """Run every stage into `out_dir`; return the combined summary. With `resume`, finished stages are kept."""
    out = Path(out_dir)
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
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "run.json", settings)
    combined = {"data": ensure_data(), "fast": fast, "seed": seed, "stages": {}}
    # read once: timings.json is rewritten after every stage, with the stages seen so far
    timings = read_json(out / "timings.json") if resume and (out / "timings.json").exists() else {}
    for name, run in stage_functions(out, fast, seed, device, progress, resume=resume, overwrite=overwrite):
        stage_dir = out / name
        if resume and (stage_dir / "summary.json").exists():
            summary = read_json(stage_dir / "summary.json")
            seconds = timings.get(name, float("nan"))
        else:
            if progress:
                print(f"== {name}")
            started = time.perf_counter()
            summary = run()
            seconds = time.perf_counter() - started
        combined["stages"][name] = {**summary, "wall_seconds": seconds}
        write_json(out / "timings.json", {k: v["wall_seconds"] for k, v in combined["stages"].items()})
    combined["total_seconds"] = sum(v["wall_seconds"] for v in combined["stages"].values())
    plot_gold_vs_kl(combined, out / "gold_vs_kl.png")
    atomic_write_text(out / "report.md", report(combined, out))
    write_json(out / "summary.json", combined)
    return combined


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
    lines += ["", "PPO, GRPO, RLOO and Best-of-N times include collecting preferences and training the reward "
              "model. GRPO and RLOO run grpo.py at its defaults (G = 4, β = 0.05 as PPO's) and with "
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
    lines += ["## Plots", "", "![gold vs KL](gold_vs_kl.png)", ""]
    for png in sorted(out.glob("*/*.png")):
        relative = png.relative_to(out)
        lines += [f"![{relative}]({relative})", ""]
    return "\n".join(lines) + "\n"


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
