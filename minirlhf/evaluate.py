"""One evaluation for every policy: gold reward, proxy reward and KL to the reference.

The DPO paper's frontier (Rafailov et al. 2023, Fig. 2) plots a policy's expected reward
against its sequence-level KL(π‖π_ref). Both are measured here the same way for SFT,
PPO, DPO and the baselines: sample one completion per test prompt at temperature 1, score
`prompt + completion` with the task's gold judge (and the reward model, if given), and
estimate

    KL(π‖π_ref) = E_{y~π}[ Σ_t log π(y_t | x, y_<t) − log π_ref(y_t | x, y_<t) ]

by the sample mean of the summed per-token log-ratios (the k1 estimator summed over the
sequence: unbiased, though a single sample can be negative).

On a task with a verifier (gold reward 0 or 1) the mean gold reward of one sample per prompt is
pass@1, logged as `eval/pass@1` too, and the task's format check as `eval/format_reward`: the
share of answers that are well formed, right or wrong (never mixed into the gold reward).
"""
import statistics

import torch

from minirlhf.sampling import generate, sequence_logprobs


@torch.no_grad()
def evaluate_policy(policy, tokenizer, prompts, gold_fn, *, reference=None, reward_model=None,
                    max_new_tokens=48, max_prompt_tokens=16, temperature=1.0, batch_size=128,
                    generator=None, n_show=5, format_fn=None):
    """Sample once per prompt and return the `eval/...` metrics (see docs/metrics.md). `format_fn`
    (texts -> list of 0/1): a verifier task's format check; adds eval/format_reward and eval/pass@1."""
    golds, judged, proxies, kls, lengths, finished, shown = [], [], [], [], [], [], []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        out, completions = generate(policy, tokenizer, batch, max_new_tokens=max_new_tokens,
                                    max_prompt_tokens=max_prompt_tokens, temperature=temperature,
                                    generator=generator)
        texts = [p + c for p, c in zip(batch, completions)]
        golds.extend(gold_fn(texts))
        lengths.extend(out.response_mask.sum(-1).tolist())
        finished.extend(out.finished.float().tolist())
        if reference is not None:
            logp = sequence_logprobs(policy, out.tokens, out.attention_mask, out.response_mask)
            ref_logp = sequence_logprobs(reference, out.tokens, out.attention_mask, out.response_mask)
            kls.extend((logp - ref_logp).tolist())                             # (B,) per-sequence log-ratio
        if reward_model is not None:
            proxies.extend(reward_model.score(out.tokens, out.attention_mask).tolist())
        judged.extend(texts)
    summary = {
        "eval/gold_reward": statistics.mean(golds),
        "eval/gold_reward_sem": statistics.stdev(golds) / len(golds) ** 0.5 if len(golds) > 1 else 0.0,
        "eval/eos_rate": statistics.mean(finished),
        "eval/length": statistics.mean(lengths),
        "eval/n_samples": len(golds),
    }
    if kls:
        summary["eval/kl"] = statistics.mean(kls)
    if proxies:
        summary["eval/proxy_reward"] = statistics.mean(proxies)
    if format_fn is not None:
        summary["eval/pass@1"] = summary["eval/gold_reward"]
        summary["eval/format_reward"] = statistics.mean(format_fn(judged))
    summary["eval/samples"] = [{"text": t, "gold": round(g, 4)} for t, g in zip(judged[:n_show], golds[:n_show])]
    return summary
