"""Step 2a of RLHF: simulated labelers rank samples of the SFT policy.

InstructGPT (Ouyang et al. 2022, §3.5): "a prompt and several model outputs are sampled;
a labeler ranks the outputs from best to worst". Here the labeler is simulated from the
task's gold judge g(x, y) in [0, 1] by the Plackett-Luce model (Plackett 1975; Luce
1959) with a labeler temperature τ:

    P(ranking y_1 > y_2 > ... > y_K) = Π_i exp(g_i/τ) / Σ_{j>=i} exp(g_j/τ)

sampled exactly with the Gumbel trick: sort by g_i/τ + Gumbel noise. For K = 2 this is the
Bradley-Terry model, P(y_1 > y_2) = σ((g_1 − g_2)/τ). τ → 0 is a perfect labeler; a
larger τ is a noisier one (τ = 0.1 confuses reviews whose gold scores differ by ~0.1).

Outputs in the run folder: `rankings.jsonl` ({"prompt", "completions"} best -> worst),
`pairs.jsonl` (all C(K,2) pairs of each ranking, as InstructGPT uses all of them; DPO
trains on the same pairs), and held-out `rankings_test.jsonl` / `pairs_test.jsonl` from
prompts never used for training.
"""
import dataclasses
import itertools
import random
import statistics
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minirlhf.checkpoints import load_gpt
from minirlhf.config import NON_NEGATIVE, POSITIVE, at_least, between, check_generation_fits, checked, require, validate
from minirlhf.data import default_path, read_jsonl, read_prompts, write_jsonl
from minirlhf.preferences import pairs_of_ranking
from minirlhf.runs import Run, check_same_task
from minirlhf.sampling import generate
from minirlhf.tasks import get_task
from minirlhf.tokenizer import load_tokenizer


@dataclasses.dataclass
class CollectConfig:
    """Sample K completions per prompt from the SFT policy and have a simulated labeler rank them."""
    prompts: str = str(default_path("prompts_train"))  # prompts JSONL: {"prompt"}
    task: str = "reviews"              # whose gold judge the labeler follows
    n_prompts: int = checked(2000, at_least(2))  # prompts to label (train + held-out)
    test_fraction: float = checked(0.1, between(0, 1, low_open=True, high_open=True))  # share of prompts held out for reward-model evaluation
    k: int = checked(16, at_least(2), "a ranking needs two completions")  # completions per prompt (InstructGPT: 4 to 9; see docs/reward.md for 16)
    sample_temperature: float = checked(1.0, POSITIVE)  # sampling temperature of the SFT policy
    labeler_temperature: float = checked(0.1, NON_NEGATIVE)  # Plackett-Luce noise τ; 0 ranks exactly by gold
    max_new_tokens: int = checked(48, POSITIVE)  # completion length limit
    max_prompt_tokens: int = checked(16, POSITIVE)  # longer prompts are refused
    batch_size: int = checked(1024, POSITIVE)  # sequences generated at once (a little faster than 256: benchmarks/)
    seed: int = 0                      # seeds sampling, labels and the split

    validate = validate


FAST = dict(n_prompts=120, k=4)


# ---------------------------------------------------------------------------
# The simulated labeler

def plackett_luce_ranking(scores, temperature, rng):
    """Indices of `scores` ordered best -> worst, sampled from Plackett-Luce(scores / τ).

    Gumbel trick: argsort of s_i/τ + G_i with G_i ~ Gumbel(0, 1) is a Plackett-Luce sample.
    τ = 0 sorts by score exactly (ties keep their original order).
    """
    if temperature == 0:
        keys = list(scores)
    else:
        keys = [s / temperature - torch.log(-torch.log(torch.rand((), generator=rng))).item() for s in scores]
    return sorted(range(len(scores)), key=lambda i: -keys[i])


def rank(prompt, completions, golds, temperature, rng):
    """One labeler's ranking of a prompt's completions: ({"prompt", "completions" best first},
    their gold scores in that order)."""
    order = plackett_luce_ranking(golds, temperature, rng)
    return {"prompt": prompt, "completions": [completions[j] for j in order]}, [golds[j] for j in order]


def label_agreement(rankings_with_gold):
    """Share of labeled pairs (with different gold scores) ordered as the gold judge orders them."""
    agree, total = 0, 0
    for golds in rankings_with_gold:                  # gold scores in the labeler's order
        for i, j in itertools.combinations(range(len(golds)), 2):
            if golds[i] != golds[j]:
                agree += golds[i] > golds[j]
                total += 1
    return agree / total if total else float("nan")


# ---------------------------------------------------------------------------
# Collection

def label(policy, tokenizer, prompts, gold_fn, config, progress):
    """Shuffle the prompts; sample K completions of each and rank them with the simulated labeler.
    Returns (rankings, each ranking's gold scores in its order, every sample's gold score)."""
    random.Random(config.seed).shuffle(prompts)
    generator = torch.Generator().manual_seed(config.seed)
    labeler_rng = torch.Generator().manual_seed(config.seed + 1)
    per_batch = max(1, config.batch_size // config.k)
    rankings, ordered_golds, all_golds = [], [], []
    for start in tqdm(range(0, len(prompts), per_batch), desc="collect", disable=not progress):
        batch = prompts[start:start + per_batch]
        repeated = [p for p in batch for _ in range(config.k)]     # K samples per prompt, adjacent
        _, completions = generate(policy, tokenizer, repeated, max_new_tokens=config.max_new_tokens,
                                  max_prompt_tokens=config.max_prompt_tokens,
                                  temperature=config.sample_temperature, generator=generator)
        golds = gold_fn([p + c for p, c in zip(repeated, completions)])
        for i, prompt in enumerate(batch):
            group = completions[i * config.k:(i + 1) * config.k]
            group_gold = golds[i * config.k:(i + 1) * config.k]
            ranking, ordered = rank(prompt, group, group_gold, config.labeler_temperature, labeler_rng)
            rankings.append(ranking)
            ordered_golds.append(ordered)
            all_golds.extend(group_gold)
    return rankings, ordered_golds, all_golds


def collect(config, sft_dir, out_dir, device="cpu", overwrite=False, progress=True):
    """Sample, label and write the preference datasets; return the summary dict."""
    config.validate()
    check_same_task(config.task, sft=sft_dir)
    tokenizer = load_tokenizer()
    policy = load_gpt(sft_dir, device, tokenizer)
    check_generation_fits(config, policy.config.block_size)
    gold_fn = get_task(config.task).gold_reward
    prompts = read_prompts(config.prompts, tokenizer, config.max_prompt_tokens)[:config.n_prompts]
    require(len(prompts) >= 2, f"{config.prompts} holds fewer than 2 prompts")
    n_test = max(1, round(len(prompts) * config.test_fraction))
    require(n_test < len(prompts), f"test_fraction={config.test_fraction:g} of {len(prompts)} prompts holds out "
            "every prompt: rankings.jsonl would be empty; lower test_fraction or raise n_prompts")
    with Run(out_dir, "collect", config, overwrite=overwrite, sft=sft_dir) as run:
        run.start({})
        rankings, ordered_golds, all_golds = label(policy, tokenizer, prompts, gold_fn, config, progress)
        return run.finish(write_rankings(run.out_dir, rankings, ordered_golds, all_golds, n_test))


def relabel(config, prefs_dir, out_dir, overwrite=False, progress=True):
    """Rank the completions of a finished collection again, with a labeler of temperature
    `config.labeler_temperature` (and `config.seed`, `config.task`; the other fields are unused):
    the same samples and the same train/held-out split, another labeler. Between the two folders
    only the label noise differs, which is what an experiment on noisy labels wants (notebook
    04), and nothing is sampled, so it takes seconds. Returns the summary, as `collect` does."""
    config.validate()
    prefs_dir = Path(prefs_dir)
    check_same_task(config.task, prefs=prefs_dir)
    gold_fn = get_task(config.task).gold_reward
    test, train = (read_jsonl(prefs_dir / f"{name}.jsonl", "rankings") for name in ("rankings_test", "rankings"))
    with Run(out_dir, "collect", config, overwrite=overwrite, prefs=prefs_dir) as run:
        run.start({})
        labeler_rng = torch.Generator().manual_seed(config.seed + 1)      # as `label` seeds it
        rankings, ordered_golds, all_golds = [], [], []
        for record in tqdm(test + train, desc="relabel", disable=not progress):   # collect's order: held-out first
            group = record["completions"]
            group_gold = gold_fn([record["prompt"] + c for c in group])
            ranking, ordered = rank(record["prompt"], group, group_gold, config.labeler_temperature, labeler_rng)
            rankings.append(ranking)
            ordered_golds.append(ordered)
            all_golds.extend(group_gold)
        return run.finish(write_rankings(run.out_dir, rankings, ordered_golds, all_golds, len(test)))


def write_rankings(out_dir, rankings, ordered_golds, all_golds, n_test):
    """Write the first `n_test` rankings as the held-out files and the rest as the training files
    (rankings and their pairs); return the summary of the labels."""
    test, train = rankings[:n_test], rankings[n_test:]
    for name, records in (("rankings", train), ("rankings_test", test)):
        write_jsonl(out_dir / f"{name}.jsonl", records)
        write_jsonl(out_dir / f"{name.replace('rankings', 'pairs')}.jsonl",
                    [pair for r in records for pair in pairs_of_ranking(r["prompt"], r["completions"])])
    k = len(rankings[0]["completions"])
    return {
        "labels/agreement": label_agreement(ordered_golds[n_test:]),
        "labels/agreement_test": label_agreement(ordered_golds[:n_test]),
        "labels/mean_gold": statistics.mean(all_golds),
        "labels/train_rankings": len(train),
        "labels/test_rankings": len(test),
        "labels/train_pairs": len(train) * k * (k - 1) // 2,
        "labels/identical_completions": sum(len(set(r["completions"])) < k for r in rankings) / len(rankings),
    }
