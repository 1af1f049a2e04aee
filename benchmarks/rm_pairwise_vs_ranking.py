"""Pairwise (Bradley-Terry) vs K-wise ranking loss at the same number of labeled comparisons.

InstructGPT (Ouyang et al. 2022, §3.5) trains its reward model on all C(K,2) comparisons of
a prompt as ONE batch element, and gives two reasons: comparisons of one prompt are
correlated, so shuffling them into separate batch elements over-fits; and K forward passes
give C(K,2) comparisons, where separate pairs need 2 forward passes each. This benchmark
measures both on the toy task. For a budget of C labeled comparisons (C = 6N, K = 4):

  ranking          N prompts, each ranked K = 4 ways, loss=ranking (6 comparisons per row)
  pairwise, same   the same 6N comparisons as N·6 separate pairs, shuffled, loss=pairwise:
                   the same labels, only the batching differs
  pairwise, indep  one pair from each of 6N different prompts, loss=pairwise: the same
                   number of comparisons, but independent ones (as if labelers compared
                   two samples of many prompts instead of ranking four of few)

A pair drawn from a Plackett-Luce ranking is labeled exactly as Bradley-Terry would label
it (the order of two items depends only on their own Gumbel noise), so the three arms
see labels from the same labeler. Every run gets the same compute, not the same number of
epochs: the same steps and 64 sequences per step (ranking: 16 prompts x 4; pairwise: 32
pairs x 2), so the ranking arm sees 3x more comparisons per step. Held-out accuracy is
measured on the same held-out pairs for all arms, against its ceiling, the bayes accuracy.

Run (about 6 minutes per seed on one busy core; pass an SFT run folder):
    python benchmarks/rm_pairwise_vs_ranking.py --sft runs/sft [--prefs runs/prefs_bench] [--seeds 0 1]
A --prefs folder without rankings.jsonl is first filled by `collect` on all 2000 train prompts.
"""
import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from minirlhf.collect import CollectConfig, collect  # noqa: E402
from minirlhf.config import apply_overrides  # noqa: E402
from minirlhf.data import read_jsonl, write_jsonl  # noqa: E402
from minirlhf.reward import RewardConfig, train_reward_model  # noqa: E402

PROMPT_COUNTS = [50, 150, 300, 900, 1800]     # N ranked prompts; comparisons C = 6N
SEQUENCES_PER_STEP = 64
STEPS = 150


def arms(rankings, n, rng):
    """{arm: (records, loss)} for a budget of 6n comparisons; None where the data is too small."""
    ranked = rankings[:n]
    same = [{"prompt": r["prompt"], "chosen": r["completions"][i], "rejected": r["completions"][j]}
            for r in ranked for i in range(4) for j in range(i + 1, 4)]
    indep = None
    if 6 * n <= len(rankings):
        indep = []
        for r in rankings[:6 * n]:
            i, j = sorted(rng.sample(range(4), 2))            # one random pair, better one first
            indep.append({"prompt": r["prompt"], "chosen": r["completions"][i], "rejected": r["completions"][j]})
    return {"ranking": (ranked, "ranking"), "pairwise, same": (same, "pairwise"),
            "pairwise, indep": (indep, "pairwise")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft", required=True, help="SFT run folder (its samples are ranked)")
    parser.add_argument("--prefs", default="runs/prefs_bench", help="collect folder (made if missing)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args()
    prefs = Path(args.prefs)
    if not (prefs / "rankings.jsonl").exists():
        print(f"collecting rankings of all train prompts into {prefs} ...", flush=True)
        collect(apply_overrides(CollectConfig(), dict(n_prompts=2000, k=4)), args.sft, prefs, progress=False)
    rankings = read_jsonl(prefs / "rankings.jsonl", "rankings")
    assert all(len(r["completions"]) == 4 for r in rankings), "this benchmark expects K = 4"
    results, bayes = {}, None
    with tempfile.TemporaryDirectory() as work:
        for seed in args.seeds:
            for n in [n for n in PROMPT_COUNTS if n <= len(rankings)]:
                for arm, (records, loss) in arms(rankings, n, random.Random(seed)).items():
                    if records is None:
                        continue
                    data = Path(work) / f"{arm.replace(', ', '_')}_{n}_{seed}.jsonl"
                    write_jsonl(data, records)
                    per_step = SEQUENCES_PER_STEP // (4 if loss == "ranking" else 2)
                    config = apply_overrides(RewardConfig(), dict(
                        loss=loss, batch_size=per_step, steps=args.steps, eval_every=args.steps, seed=seed,
                        n_norm_prompts=16, test_prefs=str(prefs / "pairs_test.jsonl")))
                    start = time.perf_counter()
                    summary = train_reward_model(config, args.sft, data, Path(work) / "rm", overwrite=True,
                                                 progress=False)
                    results.setdefault((6 * n, arm), []).append((summary, time.perf_counter() - start))
                    bayes = summary["eval/bayes_accuracy"]
                    print(f"  seed {seed}  C={6 * n:5d}  {arm:16s} acc {summary['eval/accuracy']:.3f}  "
                          f"gold_corr {summary['eval/gold_corr']:.3f}", flush=True)

    names = ["ranking", "pairwise, same", "pairwise, indep"]
    print(f"\nheld-out accuracy (mean over seeds {args.seeds}); {args.steps} steps x {SEQUENCES_PER_STEP} sequences "
          f"each; bayes accuracy (ceiling) {bayes:.3f}; chance 0.5\n")
    print(f"| comparisons | ranked prompts | {' | '.join(names)} |")
    print("| ---: | ---: |" + " ---: |" * len(names))
    for c in sorted({c for c, _ in results}):
        cells = []
        for arm in names:
            runs = results.get((c, arm))
            cells.append(f"{statistics.mean(s['eval/accuracy'] for s, _ in runs):.3f} "
                         f"(r={statistics.mean(s['eval/gold_corr'] for s, _ in runs):.2f})" if runs else "—")
        print(f"| {c} | {c // 6} | {' | '.join(cells)} |")
    seconds = {arm: statistics.mean(t for (_, a), runs in results.items() if a == arm for _, t in runs)
               for arm in names}
    print("\nmean seconds per run: " + ", ".join(f"{arm} {t:.1f}" for arm, t in seconds.items()))
    print("r = Pearson correlation of the reward with the gold reward on held-out completions")


if __name__ == "__main__":
    main()
