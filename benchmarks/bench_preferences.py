"""The speed-ups that keep collect, the reward model and DPO in budget, measured.

1. Sampling: `GPT.generate` drops finished rows from its working batch (`drop_finished`).
   Without it a batch of reviews runs as long as its longest one. Measured on the SFT model
   of a `run` folder: 1024 completions (64 training prompts x 16, as `collect` samples them)
   at temperature 1, with and without dropping, at two batch sizes.
2. Preference steps: the sequences of a step run in length-sorted chunks
   (`data.by_length_in_chunks`) instead of one padded batch. Measured as reward-model
   training steps (forward, backward, AdamW) on random batches of `rankings.jsonl`.
3. Drawing the next token: inverse-CDF sampling (`sampling.sample_next_token`: one uniform per
   row) against `torch.multinomial` (one exponential per row and vocabulary entry), swapped
   into the same generation loop, 1024 rows a batch as in `collect`.
4. The reward model reads one token, so its last block computes only that token's query
   and MLP (`model.hidden_state_at`): measured against a full pass read at that token.

Each variant gets one warm-up, then the best of 3 (sampling) or the mean over 20 steps.
Run: python benchmarks/bench_preferences.py --run runs/<a run folder>
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import minirlhf.sampling  # noqa: E402
from minirlhf.checkpoints import load_gpt  # noqa: E402
from minirlhf.data import by_length_in_chunks, default_path, encode_example, read_jsonl  # noqa: E402
from minirlhf.model import ScalarHeadModel, at_positions, last_token_index  # noqa: E402
from minirlhf.sampling import generate  # noqa: E402
from minirlhf.tokenizer import load_tokenizer  # noqa: E402

N_SAMPLES, K_PER_PROMPT, STEPS, RANKINGS_PER_STEP = 1024, 16, 20, 8


def sampling_seconds(model, tokenizer, prompts, batch_size, drop_finished):
    """Best of 3 wall-clock seconds to sample one completion per prompt; and the mean length."""
    def run():
        generator = torch.Generator().manual_seed(0)
        start, tokens = time.perf_counter(), 0
        for i in range(0, len(prompts), batch_size):
            out, _ = generate(model, tokenizer, prompts[i:i + batch_size], max_new_tokens=48, max_prompt_tokens=16,
                              generator=generator, drop_finished=drop_finished)
            tokens += int(out.response_mask.sum())
        return time.perf_counter() - start, tokens / len(prompts)

    run()  # warm-up
    return min(run() for _ in range(3))


def score_with_a_full_pass(model, tokens, mask):
    """What `ScalarHeadModel.score` computed before it asked the trunk for one position: every
    position's scalar, then the one at the last real token."""
    values = model(tokens, mask)  # (b, T)
    return model.reward_gain * at_positions(values, last_token_index(mask))[:, 0] + model.reward_bias  # (b,)


def multinomial_next_token(logits, temperature, top_k, generator):
    """The sampler before inverse-CDF sampling, for comparison (this benchmark uses no top-k)."""
    return torch.multinomial((logits / temperature).softmax(dim=-1), 1, generator=generator).squeeze(-1)  # (B,)


def step_milliseconds(model, tokenizer, batches, chunk_rows, full_pass=False):
    """Mean milliseconds of one reward-model step over `batches`; and the share of padding."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    positions = {"all": 0, "real": 0}          # of the padded batches the model actually saw

    def score(tokens, mask, _):
        positions["all"] += mask.numel()
        positions["real"] += int(mask.sum())
        return score_with_a_full_pass(model, tokens, mask) if full_pass else model.score(tokens, mask)  # (b,)

    def step(examples):
        rewards = by_length_in_chunks(score, examples, tokenizer.eot_token, "cpu", chunk_rows)
        optimizer.zero_grad()
        rewards.square().mean().backward()   # any scalar: the cost of a step does not depend on the loss
        optimizer.step()

    step(batches[0])  # warm-up
    positions.update(all=0, real=0)
    start = time.perf_counter()
    for examples in batches[1:]:
        step(examples)
    milliseconds = 1000 * (time.perf_counter() - start) / (len(batches) - 1)
    return milliseconds, 1 - positions["real"] / positions["all"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a `python -m minirlhf run` folder (its sft/ and prefs/)")
    args = parser.parse_args()
    run = Path(args.run)
    tokenizer = load_tokenizer()
    model = load_gpt(run / "sft", tokenizer=tokenizer).eval()
    print(f"{torch.get_num_threads()} threads; SFT model of {run}\n")

    prompts = [r["prompt"] for r in read_jsonl(default_path("prompts_train"), "prompts")]
    prompts = [p for p in prompts[:N_SAMPLES // K_PER_PROMPT] for _ in range(K_PER_PROMPT)]
    print(f"Sampling {len(prompts)} completions (temperature 1, at most 48 tokens), best of 3:\n")
    print("| batch | finished rows | seconds | samples/s | mean length |")
    print("| ---: | --- | ---: | ---: | ---: |")
    with torch.no_grad():
        for batch_size in (256, 1024):
            for drop in (False, True):
                seconds, length = sampling_seconds(model, tokenizer, prompts, batch_size, drop)
                print(f"| {batch_size} | {'dropped' if drop else 'kept'} | {seconds:.2f} "
                      f"| {len(prompts) / seconds:,.0f} | {length:.1f} |")
        inverse_cdf = minirlhf.sampling.sample_next_token
        print("\n| next token drawn by | seconds (batch 1024, finished rows dropped) |")
        print("| --- | ---: |")
        for name, sampler in (("torch.multinomial", multinomial_next_token), ("inverse CDF", inverse_cdf)):
            minirlhf.sampling.sample_next_token = sampler      # the generation loop looks it up at each step
            print(f"| {name} | {sampling_seconds(model, tokenizer, prompts, 1024, True)[0]:.2f} |")
        minirlhf.sampling.sample_next_token = inverse_cdf

    rankings = [r for r in map(json.loads, (run / "prefs" / "rankings.jsonl").read_text().splitlines())]
    examples = [[encode_example(tokenizer, r["prompt"], c, model.config.block_size, 16) for c in r["completions"]]
                for r in rankings]
    generator = torch.Generator().manual_seed(0)
    batches = [[e for i in torch.randint(len(examples), (RANKINGS_PER_STEP,), generator=generator).tolist()
                for e in examples[i]] for _ in range(STEPS + 1)]
    rows = len(batches[0])
    print(f"\nReward-model steps, {RANKINGS_PER_STEP} rankings of K = {len(examples[0])} ({rows} sequences), "
          f"mean of {STEPS}:\n")
    print("| chunks | last block | ms/step | padding |")
    print("| --- | --- | ---: | ---: |")
    reward_model = ScalarHeadModel.from_gpt(model).train()
    for chunk_rows, full_pass in ((rows, True), (32, True), (16, True), (16, False)):
        ms, padding = step_milliseconds(reward_model, tokenizer, batches, chunk_rows, full_pass)
        name = "one padded batch" if chunk_rows == rows else f"sorted, {chunk_rows} rows each"
        print(f"| {name} | {'every position' if full_pass else 'last token only'} | {ms:.0f} | {padding:.0%} |")


if __name__ == "__main__":
    main()
