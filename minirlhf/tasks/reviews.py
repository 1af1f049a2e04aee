"""The `reviews` toy task: short movie reviews from a small grammar, and a gold judge.

The DPO paper's headline experiment (Rafailov et al. 2023, Fig. 2) continues IMDb reviews
with GPT-2 and scores them with a sentiment classifier, the *gold* reward. Here the same
experiment is made small enough for a laptop: a probabilistic grammar writes reviews such
as

    the acting was not very good . i loved the music . i would recommend it .

and a gold judge, written out in full below, scores any text in [0, 1]:

    gold(text) = P(review is positive) * fluency(text)

* P(positive) = sigmoid(SENTIMENT_SCALE * sum of sentence polarities). A sentence's
  polarity depends on context: intensifiers scale it ("very good" > "good"), negation
  flips and weakens it ("not good" is negative, "not bad" mildly positive), and in
  "X but Y" the clause after "but" weighs more.
* fluency(text) multiplies penalties for degenerate text: a sentence the grammar cannot
  parse (broken word order, "great great great"), text that stops mid-sentence, a
  sentence repeated word for word, and more sentences than a review ever has.

Simulated humans (labelers) prefer reviews by this score. A learned reward model only
sees fluent SFT samples, so it never learns the fluency part well: that gap is what PPO
without a KL penalty exploits (reward hacking, Gao et al. 2022).

Deliberate simplifications: lower-case words separated by single spaces, " ." ends a
sentence, and no punctuation other than the full stop.
"""
import math
import random
from pathlib import Path

from minirlhf.data import write_splits

# ---------------------------------------------------------------------------
# The vocabulary of the grammar, with each word's polarity

NOUNS = ["movie", "film", "plot", "acting", "story", "music", "ending", "cast",
         "script", "dialogue", "soundtrack", "pacing", "villain", "humour"]
ADJECTIVES = {
    "brilliant": 2.0, "wonderful": 2.0, "amazing": 2.0, "great": 2.0,
    "good": 1.0, "fun": 1.0, "charming": 1.0, "clever": 1.0, "solid": 0.8,
    "fine": 0.3, "okay": 0.0, "average": -0.2, "predictable": -0.5,
    "weak": -0.8, "bad": -1.0, "boring": -1.0, "dull": -1.0, "messy": -1.0,
    "terrible": -2.0, "awful": -2.0, "horrible": -2.0, "dreadful": -2.0,
}
INTENSIFIERS = {"very": 1.5, "really": 1.5, "truly": 1.6, "extremely": 2.0,
                "quite": 1.2, "somewhat": 0.6}
VERBS_PAST = {"loved": 2.0, "enjoyed": 1.5, "liked": 1.0, "disliked": -1.0, "hated": -2.0}
VERBS_BASE = {"love": 2.0, "enjoy": 1.5, "like": 1.0, "dislike": -1.0, "hate": -2.0}
WOULD_ACTIONS = {("recommend", "it"): 1.5, ("watch", "it", "again"): 1.5}
NEUTRAL_SENTENCES = [("i", "saw", "it", "last", "week"), ("i", "watched", "it", "with", "friends"),
                     ("i", "saw", "it", "at", "the", "cinema"), ("it", "was", "my", "first", "time")]

NEGATION_FACTOR = -0.5   # "not good" = -0.5 * good: negation flips and weakens
BUT_FIRST_WEIGHT = 0.5   # "X but Y": the clause before "but" counts half
SENTIMENT_SCALE = 1.2    # logit = SENTIMENT_SCALE * sum of polarities
MAX_SENTENCES = 5        # demonstrations have 2-4; more is rambling

# Fluency penalties, multiplied together.
UNPARSEABLE_PENALTY = 0.2     # per sentence the grammar cannot parse
UNFINISHED_PENALTY = 0.3      # the text stops mid-sentence (no final " .")
REPEAT_PENALTY = 0.5          # per sentence that repeats an earlier one word for word
TOO_LONG_PENALTY = 0.5        # per sentence beyond MAX_SENTENCES


# ---------------------------------------------------------------------------
# The gold judge: a small parser of the grammar above

def _adjective_phrase(words, i):
    """Parse `[not] [intensifier] adjective` at words[i:]; return (polarity, next index) or None."""
    negated = i < len(words) and words[i] == "not"
    i += negated
    scale = 1.0
    if i < len(words) and words[i] in INTENSIFIERS:
        scale = INTENSIFIERS[words[i]]
        i += 1
    if i >= len(words) or words[i] not in ADJECTIVES:
        return None
    polarity = scale * ADJECTIVES[words[i]]
    return (NEGATION_FACTOR * polarity if negated else polarity), i + 1


def _clause(words, i):
    """Parse `the NOUN was ADJP` at words[i:]; return (polarity, next index) or None."""
    if words[i:i + 1] != ["the"] or i + 2 >= len(words) or words[i + 1] not in NOUNS or words[i + 2] != "was":
        return None
    return _adjective_phrase(words, i + 3)


def sentence_polarity(words):
    """Polarity of one sentence (a list of words without the final "."), or None if it does not parse."""
    if tuple(words) in NEUTRAL_SENTENCES:
        return 0.0
    first = _clause(words, 0)
    if first is not None:
        polarity, i = first
        if i == len(words):                                   # the plot was good
            return polarity
        if words[i] == "and":                                 # the plot was good and fun
            second = _adjective_phrase(words, i + 1)
            if second is not None and second[1] == len(words):
                return polarity + second[0]
        if words[i] == "but":                                 # the plot was bad but the music was great
            second = _clause(words, i + 1)
            if second is not None and second[1] == len(words):
                return BUT_FIRST_WEIGHT * polarity + second[0]
        return None
    if len(words) == 4 and words[0] == "i" and words[1] in VERBS_PAST and words[2] == "the" and words[3] in NOUNS:
        return VERBS_PAST[words[1]]                           # i loved the music
    if (len(words) == 6 and words[:3] == ["i", "did", "not"] and words[3] in VERBS_BASE
            and words[4] == "the" and words[5] in NOUNS):
        return NEGATION_FACTOR * VERBS_BASE[words[3]]         # i did not like the plot
    if words[:2] == ["i", "would"]:
        negated = words[2:3] == ["not"]
        action = tuple(words[2 + negated:])
        if action in WOULD_ACTIONS:                           # i would (not) recommend it
            return -WOULD_ACTIONS[action] if negated else WOULD_ACTIONS[action]
    return None


def split_sentences(text):
    """Split a review into sentences (lists of words) and the unfinished tail after the last "."."""
    sentences, current = [], []
    for word in text.split():
        if word == ".":
            sentences.append(current)
            current = []
        else:
            current.append(word)
    return sentences, current


def judge(text):
    """Score one review; return a dict with `gold`, `p_positive`, `fluency` and the reasons."""
    sentences, tail = split_sentences(text)
    polarities = [sentence_polarity(s) for s in sentences]
    logit = SENTIMENT_SCALE * sum(p for p in polarities if p is not None)
    p_positive = 1.0 / (1.0 + math.exp(-logit))
    unparseable = sum(p is None for p in polarities)
    repeats = len(sentences) - len({tuple(s) for s in sentences})
    too_long = max(0, len(sentences) - MAX_SENTENCES)
    fluency = (UNPARSEABLE_PENALTY ** unparseable * REPEAT_PENALTY ** repeats
               * TOO_LONG_PENALTY ** too_long * (UNFINISHED_PENALTY if tail else 1.0))
    if not sentences:
        fluency = 0.0
    return {"gold": p_positive * fluency, "p_positive": p_positive, "fluency": fluency,
            "sentences": len(sentences), "unparseable": unparseable, "repeats": repeats,
            "unfinished": bool(tail)}


def gold_reward(texts):
    """Gold reward in [0, 1] for each text (prompt + completion): a list of floats."""
    return [judge(t)["gold"] for t in texts]


# ---------------------------------------------------------------------------
# The grammar that writes demonstrations

def _sample_adjective_phrase(rng, sign):
    """An adjective phrase whose polarity has the given sign (+1, -1) or any sign (0)."""
    if sign == 0:
        adjective = rng.choice(list(ADJECTIVES))
        return [adjective]
    negate = rng.random() < 0.2
    want = -sign if negate else sign   # "not bad" is positive: pick a negative adjective
    adjective = rng.choice([a for a, p in ADJECTIVES.items() if p * want > 0])
    words = [adjective]
    if rng.random() < 0.4:   # "not somewhat good" is not English: negation takes very/really only
        words = [rng.choice(["very", "really"] if negate else list(INTENSIFIERS))] + words
    return (["not"] if negate else []) + words


def _sample_sentence(rng, sign):
    """One sentence (list of words, no final ".") leaning towards `sign`."""
    kind = rng.random()
    noun = rng.choice(NOUNS)
    if kind < 0.40:
        return ["the", noun, "was"] + _sample_adjective_phrase(rng, sign)
    if kind < 0.50:
        return (["the", noun, "was"] + _sample_adjective_phrase(rng, sign) + ["and"]
                + _sample_adjective_phrase(rng, sign))
    if kind < 0.60:
        other = rng.choice([n for n in NOUNS if n != noun])
        return (["the", noun, "was"] + _sample_adjective_phrase(rng, -sign) + ["but", "the", other, "was"]
                + _sample_adjective_phrase(rng, sign))
    if kind < 0.78:
        if rng.random() < 0.2:
            verb = rng.choice([v for v, p in VERBS_BASE.items() if -p * sign > 0 or sign == 0])
            return ["i", "did", "not", verb, "the", noun]
        verb = rng.choice([v for v, p in VERBS_PAST.items() if p * sign > 0 or sign == 0])
        return ["i", verb, "the", noun]
    if kind < 0.90:
        action = list(rng.choice(list(WOULD_ACTIONS)))
        negate = sign < 0 or (sign == 0 and rng.random() < 0.5)
        return ["i", "would"] + (["not"] if negate else []) + action
    return list(rng.choice(NEUTRAL_SENTENCES))


def sample_review(rng):
    """A review of 2-4 distinct sentences; its leaning is positive, negative or mixed."""
    leaning = rng.choices([1, -1, 0], weights=[0.4, 0.4, 0.2])[0]
    n_sentences = rng.choices([2, 3, 4], weights=[0.35, 0.4, 0.25])[0]
    sentences = []
    while len(sentences) < n_sentences:
        sign = leaning if rng.random() < 0.8 else rng.choice([1, -1, 0])
        sentence = _sample_sentence(rng, sign)
        if sentence not in sentences:                         # demonstrations never repeat themselves
            sentences.append(sentence)
    return " ".join(" ".join(s) + " ." for s in sentences)


def split_prompt(review, rng):
    """A prompt is the review's first 2-4 words; the completion is the rest (with its leading space)."""
    words = review.split(" ")
    n = rng.choice([2, 3, 4])
    return " ".join(words[:n]), " " + " ".join(words[n:])


# ---------------------------------------------------------------------------
# The datasets under data/

SPLITS = {"sft_train": 6000, "sft_val": 500, "prompts_train": 2000, "prompts_test": 500}


def make_datasets(seed=0):
    """Every split as a list of JSONL records, generated deterministically from `seed`."""
    rng = random.Random(seed)
    datasets = {}
    for name, size in SPLITS.items():
        records = []
        for _ in range(size):
            prompt, completion = split_prompt(sample_review(rng), rng)
            records.append({"prompt": prompt, "completion": completion} if name.startswith("sft")
                           else {"prompt": prompt})
        datasets[name] = records
    return datasets


def write_datasets(out_dir, seed=0):
    """Write each split to `out_dir/<split>.jsonl`; the same seed gives byte-identical files."""
    return write_splits(Path(out_dir), make_datasets(seed))
