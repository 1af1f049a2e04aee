"""The `arithmetic` task: addition checked by a verifier, for RL with verifiable rewards.

Reasoning models are trained with rewards that a program checks (RLVR: Lambert et al. 2024,
Tülu 3; DeepSeek-AI 2025, R1). Here the problem is adding two numbers of up to three digits,

    prompt      "318+64="
    completion  "382"

and the gold judge is a *verifier*: 1 if the completion is exactly the sum written in
decimal, 0 otherwise (a wrong number, extra text, nothing at all). The kit's tokenizer
spells every digit, "+" and "=" as one token each, so a prompt is at most 8 tokens and an
answer at most 4 (plus EOS).

Imperfect demonstrations. The demonstrations are written by careless "humans": with
probability `ERROR_RATE` the answer has a slip, one digit off by one. An SFT model imitates
the slips along with the arithmetic, so it is right on well under half of held-out prompts
even where it knows the sum; the verifier does not slip, so RL against it can unlearn them.
That is the phenomenon the task is built to show on a laptop (docs/rlvr.md).

A planted loophole. `lenient_reward` is the kind of verifier bug that real RLVR runs have
shipped: it accepts a completion if the right sum appears *anywhere* in it, so a policy
that writes more digits is right more often. `verify_lenient` is there to be found.

Deliberate simplifications: no chain of thought; non-negative integers; the answer has no
leading zeros (as Python's `str(int)` writes it).
"""
import random
import re
import types
from pathlib import Path

from minirlhf.data import DATA_DIR, write_splits

MAX_DIGITS = 2          # operands are drawn uniformly from 0 .. 10**MAX_DIGITS - 1
ERROR_RATE = 0.6        # fraction of demonstrations whose answer has a one-digit slip
PROBLEM = re.compile(r"^(\d+)\+(\d+)=")     # the prompt at the start of a text
ANSWER = re.compile(r"^\d+$")               # a well-formed answer: digits only, nothing else


# ---------------------------------------------------------------------------
# The verifier (the gold judge)

def parse(text):
    """Split `prompt + completion` into (a, b, answer text); None if the text has no problem."""
    match = PROBLEM.match(text)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2)), text[match.end():]


def well_formed(answer):
    """The answer is a decimal number and nothing else (no spaces, no words, not empty)."""
    return ANSWER.match(answer) is not None


def verify(text):
    """1.0 if the completion is exactly the sum, 0.0 otherwise (malformed counts as wrong)."""
    problem = parse(text)
    if problem is None:
        return 0.0
    a, b, answer = problem
    return float(well_formed(answer) and int(answer) == a + b)


def verify_lenient(text):
    """The planted loophole: 1.0 if the sum's digits appear anywhere in the completion."""
    problem = parse(text)
    if problem is None:
        return 0.0
    a, b, answer = problem
    return float(f"{a + b:0{MAX_DIGITS + 1}d}" in answer or str(a + b) in answer)


def gold_reward(texts):
    """Verifier reward in {0, 1} for each text (prompt + completion): a list of floats."""
    return [verify(t) for t in texts]


def lenient_reward(texts):
    """The too-lenient verifier's reward for each text (for the loophole experiment)."""
    return [verify_lenient(t) for t in texts]


def format_reward(texts):
    """1.0 where the completion is a well-formed number (right or wrong): logged, never mixed into gold."""
    return [float(p is not None and well_formed(p[2])) for p in map(parse, texts)]


# ---------------------------------------------------------------------------
# The careless demonstrator

def sample_problem(rng):
    """Two operands drawn uniformly from 0 .. 10**MAX_DIGITS - 1."""
    return rng.randrange(10 ** MAX_DIGITS), rng.randrange(10 ** MAX_DIGITS)


def slip(answer, rng):
    """The answer with one digit off by one."""
    digits = list(answer)
    i = rng.randrange(len(digits))
    d = int(digits[i])
    choices = [x for x in (d - 1, d + 1) if 0 <= x <= 9]
    digits[i] = str(rng.choice(choices))
    return "".join(digits)


def demonstration(a, b, rng, error_rate=ERROR_RATE):
    """(prompt, completion): the sum, or with probability `error_rate` a slip of it."""
    answer = f"{a + b:0{MAX_DIGITS + 1}d}"
    if rng.random() < error_rate:
        answer = slip(answer, rng)
    return f"{a:0{MAX_DIGITS}d}+{b:0{MAX_DIGITS}d}=", answer


# ---------------------------------------------------------------------------
# The datasets under data/arithmetic/

SPLITS = {"sft_train": 5000, "sft_val": 500, "prompts_train": 2000, "prompts_test": 500}
DATA_SUBDIR = "arithmetic"


def make_datasets(seed=0, error_rate=ERROR_RATE):
    """Every split as JSONL records from `seed`; test problems appear in no other split."""
    rng = random.Random(seed)
    seen, datasets = set(), {}
    for name in ("prompts_test", "sft_val", "sft_train", "prompts_train"):   # held-out first
        records = []
        while len(records) < SPLITS[name]:
            a, b = sample_problem(rng)
            if (a, b) in seen:
                continue
            seen.add((a, b))
            prompt, completion = demonstration(a, b, rng, error_rate)
            records.append({"prompt": prompt, "completion": completion} if name.startswith("sft")
                           else {"prompt": prompt})
        datasets[name] = records
    return {name: datasets[name] for name in SPLITS}


def write_datasets(out_dir, seed=0):
    """Write each split to `out_dir/arithmetic/<split>.jsonl`; the same seed gives identical files."""
    return write_splits(Path(out_dir) / DATA_SUBDIR, make_datasets(seed))


# ---------------------------------------------------------------------------
# Each stage's settings for this task (config.build applies them after the stage's defaults)

def _files(**splits):
    return {field: str(DATA_DIR / DATA_SUBDIR / f"{split}.jsonl") for field, split in splits.items()}


LENGTHS = dict(max_prompt_tokens=8, max_new_tokens=6)   # "07+45=" is 6 tokens; "052" + EOS is 4
EVAL = dict(n_eval_samples=500)                          # every held-out prompt
STAGE_DEFAULTS = {
    # docs/rlvr.md "Commands": the sizes the measured numbers there were run with
    "sft": dict(**_files(data="sft_train", val_data="sft_val", test_prompts="prompts_test"), **LENGTHS, **EVAL,
                block_size=16, n_embd=128, n_head=4, steps=500, eval_every=100, lr=3e-3),
    "grpo": dict(**_files(prompts="prompts_train", test_prompts="prompts_test", val_data="sft_val"), **LENGTHS,
                 **EVAL, reward="gold", group_size=8, rollout_batch=256, minibatch_size=64, epochs=1, lr=2e-4,
                 iterations=200, eval_every=25, n_periodic_eval=200),
    # not tuned on this task: GRPO's batch and learning rate, the verifier as the reward
    "ppo": dict(**_files(prompts="prompts_train", test_prompts="prompts_test", ptx_data="sft_train",
                         val_data="sft_val"), **LENGTHS, **EVAL, reward="gold", rollout_batch=256,
                minibatch_size=64, ppo_epochs=1, lr=2e-4, iterations=200, eval_every=25, n_periodic_eval=200),
    # not tuned on this task: pairs of one right and one wrong SFT sample (verifiable.verifier_pairs)
    "dpo": dict(**_files(test_prompts="prompts_test"), **LENGTHS, **EVAL, batch_size=16, steps=200, lr=1e-4),
    "verifier_pairs": dict(**_files(prompts="prompts_train"), n_prompts=2000, n_samples=8, test_fraction=0.1),
    # the verifier ranks the N samples: a right one is kept if any of them is right
    "best_of_n": dict(**_files(test_prompts="prompts_test"), **LENGTHS, **EVAL, ranker="gold", n=8),
    # run --task arithmetic: pass@k from n samples on each of n_prompts held-out prompts
    "pass_at_k": dict(n=128, n_prompts=500),
    "pass_at_k_fast": dict(n=64, n_prompts=16),
    # --fast: seconds, not results
    "sft_fast": dict(n_embd=64, n_head=4, steps=300, batch_size=64, lr=3e-3, warmup_steps=10, eval_every=50,
                     n_eval_samples=64),
    "grpo_fast": dict(group_size=8, rollout_batch=64, iterations=4, lr=2e-4, eval_every=2, n_periodic_eval=32,
                      n_eval_samples=64),
    "ppo_fast": dict(rollout_batch=64, iterations=4, lr=2e-4, eval_every=2, n_periodic_eval=32, n_eval_samples=64),
    "dpo_fast": dict(steps=10, batch_size=16, n_eval_samples=64),
    "verifier_pairs_fast": dict(n_prompts=256),
    "best_of_n_fast": dict(n=8, n_eval_samples=64),
}


# The same task judged by the planted loophole, registered as "arithmetic_lenient": train on it
# (`--set task=arithmetic_lenient`), then judge the policy with the strict verifier (docs/rlvr.md).
LENIENT = types.SimpleNamespace(gold_reward=lenient_reward, format_reward=format_reward, make_datasets=make_datasets,
                                write_datasets=write_datasets, DATA_SUBDIR=DATA_SUBDIR, STAGE_DEFAULTS=STAGE_DEFAULTS)
