"""JSONL datasets: reading with validation, tokenizing, padding and masks.

Formats (the same field names as the wider ecosystem):

    demonstrations  {"prompt": str, "completion": str}
    pairs           {"prompt": str, "chosen": str, "rejected": str}
    rankings        {"prompt": str, "completions": [str, ...]}   best -> worst
    prompts         {"prompt": str}

Every sequence the models see is `prompt tokens + completion tokens + <|endoftext|>`.
Training batches are right-padded; prompts for generation are left-padded. Either way an
`attention_mask` (B, T) marks real tokens and the model derives position ids from it.

Long inputs (documented truncation): a prompt longer than `max_prompt_tokens` is an error;
a completion that does not fit in the context is cut on the right, losing its EOS.
"""
import json
from pathlib import Path

import torch

from minirlhf.files import atomic_write_text

FORMATS = {
    "demonstrations": {"prompt": str, "completion": str},
    "pairs": {"prompt": str, "chosen": str, "rejected": str},
    "rankings": {"prompt": str, "completions": list},
    "prompts": {"prompt": str},
}
DATA_DIR = Path(__file__).resolve().parent.parent / "data"
EOT = "<|endoftext|>"   # the special token that ends every sequence: it cannot appear in the text itself


class DataError(ValueError):
    """A malformed dataset: the message names the file and the line."""


# ---------------------------------------------------------------------------
# Reading and writing JSONL

def read_jsonl(path, kind, tokenizer=None, max_prompt_tokens=None):
    """Read and validate a JSONL file of the given `kind` (a key of FORMATS).

    With a `tokenizer` and `max_prompt_tokens`, every prompt is also checked to fit
    (`encode_prompt`), so a too-long prompt is refused up front with its line number."""
    path = Path(path)
    fields = FORMATS[kind]
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a file (expected a {kind} JSONL file)")
    records = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{where}: not UTF-8 text (is this a JSONL file?)") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object with fields {sorted(fields)}")
            for name, kind_of in fields.items():
                if name not in record:
                    raise DataError(f"{where}: missing field {name!r} ({kind} need {sorted(fields)})")
                if not isinstance(record[name], kind_of):
                    raise DataError(f"{where}: field {name!r} must be {kind_of.__name__}, "
                                    f"got {type(record[name]).__name__}")
            if kind == "rankings":
                ranked = record["completions"]
                if len(ranked) < 2 or not all(isinstance(c, str) for c in ranked):
                    raise DataError(f"{where}: 'completions' must be a list of at least 2 strings")
            texts = [record[name] for name in fields if isinstance(record[name], str)]
            texts += record["completions"] if kind == "rankings" else []
            if any(EOT in text for text in texts):
                raise DataError(f"{where}: the text holds the literal {EOT}, the special token that ends "
                                "a sequence; remove it from the data")
            if tokenizer is not None:
                try:
                    encode_prompt(tokenizer, record["prompt"], max_prompt_tokens)
                except DataError as e:
                    raise DataError(f"{where}: {e}") from None
            records.append(record)
    if not records:
        raise DataError(f"{path}: the file holds no records")
    return records


def read_prompts(path, tokenizer=None, max_prompt_tokens=None):
    """The prompt strings of a prompts file (any format with a "prompt" field), checked to fit."""
    return [r["prompt"] for r in read_jsonl(path, "prompts", tokenizer, max_prompt_tokens)]


def write_jsonl(path, records):
    """Write records one per line, atomically."""
    atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in records))


def write_splits(out_dir, splits):
    """Write {split: records} to `out_dir/<split>.jsonl` (the folder is made); {split: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / f"{name}.jsonl" for name in splits}
    for name, records in splits.items():
        write_jsonl(paths[name], records)
    return paths


def default_path(split):
    """The path of a split shipped in data/ (e.g. 'sft_train')."""
    return DATA_DIR / f"{split}.jsonl"


# ---------------------------------------------------------------------------
# Tokenizing

def encode_prompt(tokenizer, prompt, max_prompt_tokens):
    """Token ids of a prompt; a prompt longer than `max_prompt_tokens` is refused."""
    ids = tokenizer.encode(prompt)
    if not ids:
        raise DataError("empty prompt")
    if len(ids) > max_prompt_tokens:
        raise DataError(f"prompt of {len(ids)} tokens is longer than max_prompt_tokens="
                        f"{max_prompt_tokens}: {prompt[:60]!r}")
    return ids


def encode_example(tokenizer, prompt, completion, block_size, max_prompt_tokens):
    """(ids, n_prompt): prompt + completion + EOS, completion cut to fit `block_size`."""
    prompt_ids = encode_prompt(tokenizer, prompt, max_prompt_tokens)
    completion_ids = tokenizer.encode(completion) + [tokenizer.eot_token]
    ids = (prompt_ids + completion_ids)[:block_size]
    return ids, len(prompt_ids)


# ---------------------------------------------------------------------------
# Padding and masks

def pad_right(sequences, pad_id):
    """(tokens, attention_mask), each (B, T): sequences followed by padding."""
    width = max(len(s) for s in sequences)
    tokens = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        tokens[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return tokens, mask


def pad_left(sequences, pad_id):
    """(tokens, attention_mask), each (B, T): padding followed by sequences (for generation)."""
    width = max(len(s) for s in sequences)
    tokens = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        tokens[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return tokens, mask


def completion_batch(examples, pad_id):
    """Right-padded batch of (ids, n_prompt) examples.

    Returns tokens (B, T), attention_mask (B, T) and response_mask (B, T), the latter 1 on
    completion tokens (EOS included) and 0 on the prompt and on padding.
    """
    tokens, attention_mask = pad_right([ids for ids, _ in examples], pad_id)
    response_mask = attention_mask.clone()
    for i, (_, n_prompt) in enumerate(examples):
        response_mask[i, :n_prompt] = 0
    return tokens, attention_mask, response_mask


def by_length_in_chunks(fn, examples, pad_id, device, chunk_rows):
    """Apply `fn(tokens, attention_mask, response_mask) -> (b,)` to `examples` in batches of
    similar length, and return the (N,) results in the order of `examples`.

    The examples are sorted by length and cut into batches of at most `chunk_rows` rows, so
    each batch pads only to its own longest row. One right-padded batch of preference data
    is about half padding, because the K completions of a prompt differ in length; sorted
    chunks cut that to a few percent. Gradients flow through, so training steps can use it:
    the rows are independent, so the result equals one big padded batch up to round-off.
    """
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    parts = []
    for start in range(0, len(order), chunk_rows):
        batch = completion_batch([examples[i] for i in order[start:start + chunk_rows]], pad_id)
        parts.append(fn(*(t.to(device) for t in batch)))                  # (b,)
    inverse = torch.argsort(torch.tensor(order))                         # (N,) where each example went
    return torch.cat(parts)[inverse.to(parts[0].device)]                 # (N,) back in the input order


def shift_for_loss(tokens, attention_mask, response_mask):
    """Align a batch for next-token prediction.

    Position t predicts token t+1, so the model reads tokens[:, :-1] and is scored on
    tokens[:, 1:]; the loss mask is the response mask of the targets. Returns
    (inputs (B, T-1), input_mask (B, T-1), targets (B, T-1), loss_mask (B, T-1)).
    """
    return tokens[:, :-1], attention_mask[:, :-1], tokens[:, 1:], response_mask[:, 1:]


def length_bucketed_batches(lengths, batch_size, generator, pool=32):
    """One epoch of index batches whose members have similar lengths.

    The examples are shuffled, cut into pools of `pool * batch_size`, each pool is sorted
    by length and cut into batches, and the batches are shuffled. A batch then pads to
    almost nothing (a random batch of our demonstrations is ~40 % padding), while the
    epoch still visits every example once and each batch still draws from a random pool
    (the "bucketing" of fairseq and tensor2tensor). The last batch may be smaller.
    """
    order = torch.randperm(len(lengths), generator=generator).tolist()
    size = pool * batch_size
    out = []
    for start in range(0, len(order), size):
        pooled = sorted(order[start:start + size], key=lambda i: lengths[i])   # stable: ties keep the shuffle
        out += [pooled[i:i + batch_size] for i in range(0, len(pooled), batch_size)]
    return [out[i] for i in torch.randperm(len(out), generator=generator).tolist()]

