"""A byte-level BPE tokenizer trained on the kit's own corpus, served by tiktoken.

Byte-pair encoding (Sennrich et al. 2016; byte-level as in GPT-2, Radford et al. 2019)
starts from the 256 byte values and repeatedly merges the most frequent adjacent pair
into a new token. The ranks (token bytes -> id, in merge order) are saved in tiktoken's
file format, one `base64(token) rank` per line, so that the fast `tiktoken.Encoding`
serves them. Nothing touches the network: no pretrained encoding is downloaded.

Deliberate simplifications: the trainer counts pre-tokenized pieces (words with their
leading space) and merges within pieces only, which is what GPT-2's regex split implies;
ties between equally frequent pairs are broken by the pair's bytes, so training is
deterministic.
"""
import base64
import binascii
import collections
import hashlib
import os
from pathlib import Path

import regex
import tiktoken

from minirlhf.config import ConfigError

# GPT-2's split: a word keeps its leading space, so " good" is one piece.
PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = "<|endoftext|>"
DEFAULT_RANKS_PATH = Path(__file__).resolve().parent.parent / "data" / "tokenizer.tiktoken"
DEFAULT_VOCAB_SIZE = 512   # 256 bytes + 255 merges + <|endoftext|>


# ---------------------------------------------------------------------------
# Training

def _merge(piece, pair, merged):
    """Replace every occurrence of `pair` in `piece` (a tuple of byte strings) by `merged`."""
    out, i = [], 0
    while i < len(piece):
        if i + 1 < len(piece) and (piece[i], piece[i + 1]) == pair:
            out.append(merged)
            i += 2
        else:
            out.append(piece[i])
            i += 1
    return tuple(out)


def train_bpe(texts, vocab_size=DEFAULT_VOCAB_SIZE):
    """Learn BPE ranks from `texts`; return {token bytes: rank}, with len == vocab_size - 1.

    One id is left for <|endoftext|>. Training stops early when no pair occurs twice.
    """
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be at least 257 (256 bytes + <|endoftext|>), got {vocab_size}")
    ranks = {bytes([b]): b for b in range(256)}
    counts = collections.Counter(m for t in texts for m in regex.findall(PATTERN, t))
    pieces = {tuple(bytes([b]) for b in p.encode("utf-8")): n for p, n in counts.items()}
    while len(ranks) < vocab_size - 1:
        pair_counts = collections.Counter()
        for piece, n in pieces.items():
            for pair in zip(piece, piece[1:]):
                pair_counts[pair] += n
        if not pair_counts:
            break
        # most frequent pair; ties broken by the bytes themselves for determinism
        pair = min(pair_counts, key=lambda p: (-pair_counts[p], p))
        if pair_counts[pair] < 2:
            break
        merged = pair[0] + pair[1]
        if merged not in ranks:
            ranks[merged] = len(ranks)
        pieces = {_merge(piece, pair, merged): n for piece, n in pieces.items()}
    return ranks


# ---------------------------------------------------------------------------
# tiktoken's file format, and serving

def save_ranks(ranks, path=DEFAULT_RANKS_PATH):
    """Write `base64(token) rank` lines, sorted by rank (tiktoken's format), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")
    os.replace(tmp, path)


def load_ranks(path=DEFAULT_RANKS_PATH):
    """Read a tiktoken ranks file into {token bytes: rank}; a damaged file is a one-line error."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer ranks at {path}; run `python -m minirlhf data` to train one")
    if not path.is_file():
        raise ConfigError(f"{path}: not a file (expected the tokenizer's ranks)")
    ranks = {}
    for lineno, line in enumerate(path.read_bytes().split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise ConfigError(f"{path}:{lineno}: not a `base64 rank` line; regenerate it with "
                              "`python -m minirlhf data`") from None
    if sorted(ranks.values()) != list(range(len(ranks))) or len(ranks) < 256:
        raise ConfigError(f"{path}: the ranks are not 0..N-1 over at least the 256 bytes; regenerate it with "
                          "`python -m minirlhf data`")
    return ranks


def fingerprint(path=DEFAULT_RANKS_PATH):
    """A short hash of the ranks file's bytes: which tokenizer a model was trained with. Two
    tokenizers of the same size but other merges (a retrained data/) have different fingerprints."""
    path = Path(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None


def load_tokenizer(path=DEFAULT_RANKS_PATH):
    """The kit's `tiktoken.Encoding`: trained ranks plus the <|endoftext|> special token.

    `enc.eot_token` is its id and `enc.n_vocab` the vocabulary size the model needs.
    """
    ranks = load_ranks(path)
    enc = tiktoken.Encoding(name=f"minirlhf-{Path(path).stem}", pat_str=PATTERN,
                            mergeable_ranks=ranks, special_tokens={EOT: len(ranks)})
    enc.fingerprint = fingerprint(path)    # checked against the one a model's config.json records
    return enc


def train_and_save(texts, path=DEFAULT_RANKS_PATH, vocab_size=DEFAULT_VOCAB_SIZE):
    """Train on `texts`, write the ranks file, and return the served tokenizer."""
    save_ranks(train_bpe(texts, vocab_size), path)
    return load_tokenizer(path)
