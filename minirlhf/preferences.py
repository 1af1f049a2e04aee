"""Preference data, read once and the same way by the reward model, DPO and Preferred-FT.

`collect` writes rankings, {"prompt", "completions": [best, ..., worst]}, and, for other
tools, the same labels as pairs {"prompt", "chosen", "rejected"}. Both files load into one
`Preferences`: the K completions of each prompt, best first (a pair is a ranking of K = 2).
A ranking of K gives C(K,2) comparisons: InstructGPT (§3.5) trains on all of them, kept
together in one batch element, and so do the reward model and DPO here.

For the policy-side methods, `PairSequences` tokenizes every distinct (prompt, completion)
once: the C(K,2) pairs of a ranking share its K sequences, so a model runs (K−1)/2 times
fewer sequences than there are pair sides, and log π_ref of each is computed once.

Deliberate simplification: all rankings in a file must have the same K.
"""
import dataclasses
import hashlib
import itertools
from pathlib import Path
from typing import Optional

import torch

from minirlhf.data import DataError, by_length_in_chunks, completion_batch, encode_example, read_jsonl
from minirlhf.sampling import sequence_logprobs


@dataclasses.dataclass
class Preferences:
    """Labels of one file: `rankings` holds {"prompt", "completions"} dicts, completions best first."""
    rankings: list
    kind: str                  # "rankings" or "pairs": what the file held (a pair is a ranking of 2)
    path: Path

    def pairs(self):
        """Every ranking's C(K,2) comparisons as {"prompt", "chosen", "rejected"}, ranking by ranking."""
        return [pair for r in self.rankings for pair in pairs_of_ranking(r["prompt"], r["completions"])]


def pairs_of_ranking(prompt, ranked):
    """All C(K,2) (chosen, rejected) pairs of one ranking, chosen ranked higher."""
    return [{"prompt": prompt, "chosen": ranked[i], "rejected": ranked[j]}
            for i, j in itertools.combinations(range(len(ranked)), 2)]


def read_preferences(path, tokenizer=None, max_prompt_tokens=None):
    """Read a rankings or a pairs file (anything else is refused, naming the files to pass).
    With a tokenizer, a prompt longer than `max_prompt_tokens` is refused with its line number."""
    path = Path(path)
    first = read_jsonl(path, "prompts")[0]          # checks JSON lines with a prompt; peeks at the kind
    if "completions" in first:
        rankings = read_jsonl(path, "rankings", tokenizer, max_prompt_tokens)
        ks = sorted({len(r["completions"]) for r in rankings})
        if len(ks) > 1:
            raise DataError(f"{path}: rankings of different lengths K={ks}; use one K per file")
        return Preferences(rankings, "rankings", path)
    if "chosen" in first:
        pairs = read_jsonl(path, "pairs", tokenizer, max_prompt_tokens)
        return Preferences([{"prompt": p["prompt"], "completions": [p["chosen"], p["rejected"]]} for p in pairs],
                           "pairs", path)
    raise DataError(f"{path} holds neither pairs {{'prompt', 'chosen', 'rejected'}} nor rankings "
                    "{'prompt', 'completions'}: pass the pairs.jsonl or rankings.jsonl that `collect` wrote")


def held_out_path(prefs_path):
    """The held-out sibling of a preference file: rankings.jsonl -> rankings_test.jsonl."""
    path = Path(prefs_path)
    return path.with_name(f"{path.stem}_test{path.suffix}")


# ---------------------------------------------------------------------------
# Tokenized, for the policy: distinct sequences, pairs of them, one group of pairs per ranking

@dataclasses.dataclass
class PairSequences:
    """Tokenized preferences. Each distinct (prompt, completion) is stored once."""
    sequences: list            # S distinct (ids, n_prompt) examples: prompt + completion + EOS
    pairs: torch.Tensor        # (N, 2) long: indices [chosen, rejected] into `sequences`
    groups: list               # one long tensor of pair indices per ranking: its C(K,2) pairs
    ref_logps: Optional[torch.Tensor] = None   # (S,) summed log π_ref(y|x) of each sequence, if computed


def tokenize_preferences(prefs, tokenizer, block_size, max_prompt_tokens):
    """PairSequences of `prefs`: its pairs in order, each sequence tokenized once."""
    index, sequences, pairs, groups = {}, [], [], []
    for ranking in prefs.rankings:
        first = len(pairs)
        for pair in pairs_of_ranking(ranking["prompt"], ranking["completions"]):
            ids = []
            for key in ((pair["prompt"], pair["chosen"]), (pair["prompt"], pair["rejected"])):
                if key not in index:
                    index[key] = len(sequences)
                    sequences.append(encode_example(tokenizer, *key, block_size, max_prompt_tokens))
                ids.append(index[key])
            pairs.append(ids)
        groups.append(torch.arange(first, len(pairs)))
    return PairSequences(sequences, torch.tensor(pairs), groups)


@torch.no_grad()
def logps_of_sequences(model, sequences, pad_id, device, batch_size=256):
    """(S,) summed response log-probs of (ids, n_prompt) examples, batched by length (less padding).

    The batches are cut from the sequences in an order fixed by their content alone (length, then
    tokens), not by the file's order: the same sequences under the same model give the same
    numbers to the last bit whichever file they came from (a batch's round-off depends on what is
    in it). That makes the result safe to remember (`_REFERENCE_SCORES`)."""
    order = sorted(range(len(sequences)), key=lambda i: (len(sequences[i][0]), sequences[i][0], sequences[i][1]))
    canonical = tuple((tuple(sequences[i][0]), sequences[i][1]) for i in order)
    key = (model_fingerprint(model), model.training, canonical, pad_id, str(device), batch_size,
           torch.get_num_threads())
    if key not in _REFERENCE_SCORES:
        scores = by_length_in_chunks(lambda *batch: sequence_logprobs(model, *batch), list(canonical), pad_id,
                                     device, batch_size).cpu()
        while len(_REFERENCE_SCORES) >= 4:         # the last four files scored (a run reads two)
            del _REFERENCE_SCORES[next(iter(_REFERENCE_SCORES))]
        _REFERENCE_SCORES[key] = scores
    inverse = torch.argsort(torch.tensor(order))   # (S,) where each input sequence sits in `canonical`
    return _REFERENCE_SCORES[key][inverse]         # indexing copies: the caller cannot change the memory


# A notebook or a sweep in one process trains several DPO runs from one SFT model on the same
# rankings (or on the same completions relabelled): each would score the same sequences under the
# same frozen π_ref again (~20 s at the default sizes). The last scorings are kept here, keyed by
# everything the numbers depend on, so a repeat costs nothing and returns the very same tensor.
_REFERENCE_SCORES = {}


def model_fingerprint(model):
    """A hash of a model's weights (and buffers): equal for two loads of one checkpoint."""
    digest = hashlib.sha1()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_pair_sequences(path, tokenizer, reference, config, device, with_reference=True):
    """Read a preference file, tokenize each distinct sequence once, and score it under π_ref
    (`config` gives max_prompt_tokens and ref_batch_size)."""
    prefs = read_preferences(path, tokenizer, config.max_prompt_tokens)
    data = tokenize_preferences(prefs, tokenizer, reference.config.block_size, config.max_prompt_tokens)
    if with_reference:
        data.ref_logps = logps_of_sequences(reference, data.sequences, tokenizer.eot_token, device,
                                            config.ref_batch_size)
    return data


def sample_pairs(data, n_groups, generator):
    """Indices (P,) of every pair of `n_groups` rankings drawn at random: a ranking's pairs stay together
    (InstructGPT §3.5 keeps a ranking's comparisons in one batch element, as the reward model does)."""
    drawn = torch.randint(len(data.groups), (n_groups,), generator=generator).tolist()
    return torch.cat([data.groups[i] for i in drawn])                        # (P,)


def distinct_rows(data, ids):
    """The distinct sequences (U,) of the pairs `ids` (P,), and index (P, 2) long: the position in
    them of each pair's [chosen, rejected]. All C(K,2) pairs of a ranking need only K rows."""
    return torch.unique(data.pairs[ids], return_inverse=True)                # (U,), (P, 2)


def pair_batch(data, ids, pad_id, device):
    """The distinct sequences of the pairs `ids` (P,) as one right-padded batch: tokens,
    attention_mask, response_mask, each (U, T), and index (P, 2) (see `distinct_rows`)."""
    rows, index = distinct_rows(data, ids)
    batch = completion_batch([data.sequences[i] for i in rows.tolist()], pad_id)
    return (*(t.to(device) for t in batch), index.to(device))
