"""Evaluation on a verifiable task: pass@1 and pass@k on held-out prompts, and their plot.

A verifier says right or wrong, so a policy is measured by how often it is right. Sample
n completions for each of P held-out prompts at temperature 1, count the c right ones per
prompt, and average the unbiased estimator `losses.pass_at_k(n, c, k)` over the prompts
(Chen et al. 2021, §2.1). pass@1 is the plain accuracy of one sample; pass@k for large k
asks whether the right answer is *anywhere* in the policy's distribution — Yue et al. 2025
("Does reinforcement learning really incentivize reasoning capacity in LLMs beyond the base
model?") found that RL with verifiable rewards raises pass@1 while the base model's pass@k
at large k matches or beats the RL model's. `pass_at_k_curve` measures both here.

The verifier also labels preference pairs for DPO (`verifier_pairs`: one right and one wrong
sample of the SFT model per prompt), and `run_verifiable_pipeline` is `run --task arithmetic`:
SFT, then GRPO, PPO (both rewarded by the verifier), DPO on verifier pairs and Best-of-N with
the verifier as the ranker, then pass@k of each and a report.

Deliberate simplifications: every prompt gets the same n; sampling at temperature 1 only; a
prompt whose samples are all right or all wrong gives no pair.
"""
import json
import statistics
import time
from pathlib import Path

import torch

from minirlhf.baselines import BEST_OF_N_FAST, BestOfNConfig, run_best_of_n
from minirlhf.checkpoints import load_gpt
from minirlhf.config import ConfigError, require
from minirlhf.data import DATA_DIR, read_jsonl, read_prompts, write_jsonl
from minirlhf.dpo import FAST as DPO_FAST, DPOConfig, train_dpo
from minirlhf.files import atomic_write_text, read_json, write_json
from minirlhf.grpo import FAST as GRPO_FAST, GRPOConfig, train_grpo
from minirlhf.losses import pass_at_k
from minirlhf.ppo import FAST as PPO_FAST, PPOConfig, train_ppo
from minirlhf.runs import check_run_dir, check_same_task, figure
from minirlhf.sampling import sample_completions
from minirlhf.sft import FAST as SFT_FAST, SFTConfig, train_sft
from minirlhf.tasks import get_task, stage_defaults, task_config
from minirlhf.tokenizer import load_tokenizer

DEFAULT_KS = (1, 2, 4, 8, 16, 32, 64)


@torch.no_grad()
def count_correct(policy, tokenizer, prompts, verify_fn, n, *, max_new_tokens, max_prompt_tokens, generator=None,
                  batch_size=512):
    """Per prompt, how many of n samples `verify_fn` (texts -> list of 0/1) accepts: a list of ints."""
    repeated = [p for p in prompts for _ in range(n)]                      # prompt 0's n samples first
    completions = sample_completions(policy, tokenizer, repeated, batch_size=batch_size,
                                     max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens,
                                     generator=generator)
    scores = verify_fn([p + c for p, c in zip(repeated, completions)])
    return [int(sum(scores[i * n:(i + 1) * n])) for i in range(len(prompts))]


def pass_at_k_table(counts, n, ks=DEFAULT_KS):
    """{k: mean over prompts of pass_at_k(n, c, k)} for every k ≤ n."""
    return {k: statistics.mean(pass_at_k(n, c, k) for c in counts) for k in ks if k <= n}


def pass_at_k_curve(policy, tokenizer, prompts, verify_fn, n=128, ks=DEFAULT_KS, *, max_new_tokens,
                    max_prompt_tokens, seed=0):
    """pass@k on held-out prompts: (table {k: pass@k}, per-prompt correct counts)."""
    generator = torch.Generator().manual_seed(seed)
    counts = count_correct(policy, tokenizer, prompts, verify_fn, n, max_new_tokens=max_new_tokens,
                           max_prompt_tokens=max_prompt_tokens, generator=generator)
    return pass_at_k_table(counts, n, ks), counts


def plot_pass_at_k(curves, path, title="pass@k on held-out prompts"):
    """curves: {label: {k: pass@k}}; one line per policy, k on a log axis."""
    fig, ax = figure(figsize=(5, 3.5))
    for label, table in curves.items():
        ks = sorted(table)
        ax.plot(ks, [table[k] for k in ks], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (samples per prompt)")
    ax.set_ylabel("pass@k")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


# ---------------------------------------------------------------------------
# A report: pass@k of several run folders on the task's held-out prompts

def pass_at_k_report(run_dirs, out_dir, *, task="arithmetic", prompts=None, n=128, ks=DEFAULT_KS, n_prompts=500,
                     seed=0, device="cpu"):
    """pass@k of each run folder ({label: dir}) by the task's verifier; writes pass_at_k.json and .png."""
    module = get_task(task)
    tokenizer = load_tokenizer()
    prompts = prompts or str(DATA_DIR / module.DATA_SUBDIR / "prompts_test.jsonl")
    test = [r["prompt"] for r in read_jsonl(prompts, "prompts")][:n_prompts]
    curves, results = {}, {}
    for label, run_dir in run_dirs.items():
        config = json.loads((Path(run_dir) / "config.json").read_text())
        policy = load_gpt(run_dir, device, tokenizer).eval()
        table, counts = pass_at_k_curve(policy, tokenizer, test, module.gold_reward, n=n, ks=ks, seed=seed,
                                        max_new_tokens=config["max_new_tokens"],
                                        max_prompt_tokens=config["max_prompt_tokens"])
        curves[label] = table
        results[label] = {"run": str(run_dir), "pass_at_k": table, "n": n, "prompts": len(test),
                          "never_right": sum(c == 0 for c in counts) / len(counts),
                          "always_right": sum(c == n for c in counts) / len(counts)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "pass_at_k.json", results)
    plot_pass_at_k(curves, out_dir / "pass_at_k.png", f"pass@k on {len(test)} held-out prompts ({n} samples each)")
    return results


# ---------------------------------------------------------------------------
# DPO on pairs the verifier labels

@torch.no_grad()
def verifier_pairs(policy, tokenizer, prompts, verify_fn, n, *, max_new_tokens, max_prompt_tokens, generator=None):
    """{"prompt", "chosen", "rejected"} for each prompt whose n samples hold a right and a wrong
    answer: the first right one is chosen, the first wrong one rejected (the verifier's label)."""
    repeated = [p for p in prompts for _ in range(n)]                      # prompt 0's n samples first
    completions = sample_completions(policy, tokenizer, repeated, batch_size=512, max_new_tokens=max_new_tokens,
                                     max_prompt_tokens=max_prompt_tokens, generator=generator)
    right = verify_fn([p + c for p, c in zip(repeated, completions)])
    pairs = []
    for i, prompt in enumerate(prompts):
        samples = list(zip(completions[i * n:(i + 1) * n], right[i * n:(i + 1) * n]))
        chosen = next((c for c, r in samples if r == 1), None)
        rejected = next((c for c, r in samples if r == 0), None)
        if chosen is not None and rejected is not None:
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def write_verifier_pairs(sft_dir, out_dir, config, *, prompts, n_prompts, n_samples, test_fraction, device="cpu"):
    """Label pairs of SFT samples with the task's verifier; write pairs.jsonl and the held-out
    pairs_test.jsonl (the last `test_fraction` of them) into `out_dir`. Returns pairs.jsonl's path."""
    tokenizer = load_tokenizer()
    policy = load_gpt(sft_dir, device, tokenizer).eval()
    texts = read_prompts(prompts, tokenizer, config.max_prompt_tokens)[:n_prompts]
    pairs = verifier_pairs(policy, tokenizer, texts, get_task(config.task).gold_reward, n_samples,
                           max_new_tokens=config.max_new_tokens, max_prompt_tokens=config.max_prompt_tokens,
                           generator=torch.Generator().manual_seed(config.seed))
    n_test = max(1, round(test_fraction * len(pairs)))
    require(len(pairs) > n_test, f"{sft_dir}: only {len(pairs)} of {len(texts)} prompts had a right and a wrong "
                                 f"answer among {n_samples} samples; too few pairs for DPO (raise n_prompts)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "pairs.jsonl", pairs[:-n_test])
    write_jsonl(out_dir / "pairs_test.jsonl", pairs[-n_test:])
    return out_dir / "pairs.jsonl"


def train_dpo_on_verifier_pairs(config, sft_dir, out_dir, pair_settings, *, device="cpu", resume=False,
                                overwrite=False, progress=True):
    """`dpo --task arithmetic`: write verifier-labelled pairs into the run folder (kept on --resume),
    then DPO on them. `pair_settings`: the task's "verifier_pairs" settings (tasks.stage_defaults)."""
    out_dir = check_run_dir(out_dir, overwrite=overwrite, resume=resume)   # refuse before writing pairs
    check_same_task(config.task, sft=sft_dir)
    path = out_dir / "pairs.jsonl"
    if not (resume and path.exists()):
        path = write_verifier_pairs(sft_dir, out_dir, config, device=device, **pair_settings)
    return train_dpo(config, sft_dir, path, out_dir, device=device, resume=resume, overwrite=overwrite,
                     progress=progress)


# ---------------------------------------------------------------------------
# `run --task arithmetic`: every method against the verifier, then pass@k

POLICIES = ("sft", "grpo", "ppo", "dpo")          # model folders, measured by pass@k
METHODS = POLICIES + ("best_of_n",)               # rows of the report's table


def verifiable_stages(out, task, fast, seed, device, progress, resume, overwrite):
    """(name, run) pairs in pipeline order; every method starts from out/sft."""
    kw = dict(device=device, progress=progress, overwrite=overwrite)
    sft_dir = out / "sft"

    def config(defaults, stage, stage_fast):
        return task_config(defaults, stage, task, fast=fast, stage_fast=stage_fast, seed=seed)

    def go_on(name):     # --resume: a stage whose folder holds a checkpoint continues from it
        return dict(resume=resume and (out / name / "checkpoint.pt").exists())

    pairs = {**stage_defaults(task, "verifier_pairs"), **(stage_defaults(task, "verifier_pairs", True) if fast else {})}
    return [
        ("sft", lambda: train_sft(config(SFTConfig(), "sft", SFT_FAST), sft_dir, **kw, **go_on("sft"))),
        ("grpo", lambda: train_grpo(config(GRPOConfig(), "grpo", GRPO_FAST), sft_dir, None, out / "grpo",
                                    **kw, **go_on("grpo"))),
        ("ppo", lambda: train_ppo(config(PPOConfig(), "ppo", PPO_FAST), sft_dir, None, out / "ppo",
                                  **kw, **go_on("ppo"))),
        ("dpo", lambda: train_dpo_on_verifier_pairs(config(DPOConfig(), "dpo", DPO_FAST), sft_dir, out / "dpo",
                                                    pairs, **kw, **go_on("dpo"))),
        ("best_of_n", lambda: run_best_of_n(config(BestOfNConfig(), "best_of_n", BEST_OF_N_FAST), sft_dir, None,
                                            out / "best_of_n", **kw)),
    ]


def run_verifiable_pipeline(out_dir, task="arithmetic", fast=False, seed=0, device="cpu", resume=False,
                            overwrite=False, progress=True):
    """Every stage of a verifier task into `out_dir`, pass@k of each policy, report.md; returns the
    combined summary. With `resume`, finished stages are kept; `overwrite` replaces each stage."""
    out = Path(out_dir)
    require(not (resume and overwrite), "--resume and --overwrite contradict each other: choose one")
    if (out / "summary.json").exists() and not (overwrite or resume):
        raise ConfigError(f"{out} already holds a finished run; pass --overwrite or choose another --out")
    if any(out.glob("*/config.json")) and not (overwrite or resume):
        raise ConfigError(f"{out} holds an unfinished run; pass --resume to continue it, --overwrite to "
                          "start again, or choose another --out")
    settings = {"task": task, "fast": fast, "seed": seed}
    recorded = read_json(out / "run.json") if resume and (out / "run.json").exists() else settings
    require(recorded == settings, f"--resume with other settings than the run in {out} ({recorded} -> {settings}): "
                                  "resume with the same --task, --fast and --seed, or start again with --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "run.json", settings)
    timings = read_json(out / "timings.json") if resume and (out / "timings.json").exists() else {}
    combined = {**settings, "stages": {}}
    for name, run in verifiable_stages(out, task, fast, seed, device, progress, resume, overwrite):
        if resume and (out / name / "summary.json").exists():
            summary, seconds = read_json(out / name / "summary.json"), timings.get(name, float("nan"))
        else:
            if progress:
                print(f"== {name}")
            started = time.perf_counter()
            summary = run()
            seconds = time.perf_counter() - started
        combined["stages"][name] = {**summary, "wall_seconds": seconds}
        write_json(out / "timings.json", {k: v["wall_seconds"] for k, v in combined["stages"].items()})
    if progress:
        print("== pass@k")
    passk = {**stage_defaults(task, "pass_at_k"), **(stage_defaults(task, "pass_at_k", True) if fast else {})}
    combined["pass_at_k"] = pass_at_k_report({name: out / name for name in POLICIES}, out / "pass_at_k", task=task,
                                             seed=seed, device=device, **passk)
    combined["total_seconds"] = sum(v["wall_seconds"] for v in combined["stages"].values())
    atomic_write_text(out / "report.md", verifiable_report(combined))
    write_json(out / "summary.json", combined)
    return combined


def verifiable_report(combined):
    """report.md: pass@1, pass@8, pass@64, format rate and time of each method, and the pass@k plot."""
    def cell(value):
        return "—" if value is None else f"{value:.3f}"

    first = next(iter(combined["pass_at_k"].values()))
    lines = [f"# {combined['task']}: every method against the verifier (seed {combined['seed']}"
             f"{', --fast' if combined['fast'] else ''})", "",
             f"pass@k from {first['n']} samples on each of {first['prompts']} held-out prompts (temperature 1); "
             "Best-of-N keeps one of its N samples (the verifier picks a right one if any), so it has a pass@1 only. "
             "Format: share of well-formed answers, right or wrong (one sample per prompt). Time: the stage's wall "
             "time on this machine.", "",
             "| method | pass@1 | pass@8 | pass@64 | format | time (s) |", "| --- | --- | --- | --- | --- | --- |"]
    for name in METHODS:
        stage = combined["stages"][name]
        table = combined["pass_at_k"].get(name, {}).get("pass_at_k", {})
        table = {int(k): v for k, v in table.items()}
        pass1 = table.get(1, stage.get("eval/pass@1"))
        lines.append(f"| {name} | {cell(pass1)} | {cell(table.get(8))} | {cell(table.get(64))} | "
                     f"{cell(stage.get('eval/format_reward'))} | {stage['wall_seconds']:.0f} |")
    lines += ["", "![pass@k](pass_at_k/pass_at_k.png)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    # python -m minirlhf.verifiable OUT LABEL=RUN_DIR [LABEL=RUN_DIR ...]
    import sys
    report = pass_at_k_report(dict(arg.split("=", 1) for arg in sys.argv[2:]), sys.argv[1])
    for label, row in report.items():
        print(label, " ".join(f"pass@{k}={v:.3f}" for k, v in row["pass_at_k"].items()),
              f"never_right={row['never_right']:.3f}")
