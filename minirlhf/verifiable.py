"""Evaluation on a verifiable task: pass@1 and pass@k on held-out prompts, and their plot.

A verifier says right or wrong, so a policy is measured by how often it is right. Sample
n completions for each of P held-out prompts at temperature 1, count the c right ones per
prompt, and average the unbiased estimator `losses.pass_at_k(n, c, k)` over the prompts
(Chen et al. 2021, §2.1). pass@1 is the plain accuracy of one sample; pass@k for large k
asks whether the right answer is *anywhere* in the policy's distribution — Yue et al. 2025
("Does reinforcement learning really incentivize reasoning capacity in LLMs beyond the base
model?") found that RL with verifiable rewards raises pass@1 while the base model's pass@k
at large k matches or beats the RL model's. `pass_at_k_curve` measures both here.

Deliberate simplifications: every prompt gets the same n; sampling at temperature 1 only.
"""
import json
import statistics
from pathlib import Path

import torch

from minirlhf.files import write_json
from minirlhf.runs import figure
from minirlhf.checkpoints import load_gpt
from minirlhf.data import DATA_DIR, read_jsonl
from minirlhf.losses import pass_at_k
from minirlhf.sampling import sample_completions
from minirlhf.tasks import get_task
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


if __name__ == "__main__":
    # python -m minirlhf.verifiable OUT LABEL=RUN_DIR [LABEL=RUN_DIR ...]
    import sys
    report = pass_at_k_report(dict(arg.split("=", 1) for arg in sys.argv[2:]), sys.argv[1])
    for label, row in report.items():
        print(label, " ".join(f"pass@{k}={v:.3f}" for k, v in row["pass_at_k"].items()),
              f"never_right={row['never_right']:.3f}")
