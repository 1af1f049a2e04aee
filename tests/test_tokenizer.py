"""The BPE tokenizer: trained by the kit, saved in tiktoken's format, served offline.

Checks the trainer on a tiny corpus worked by hand, the round trip through the ranks
file, that the shipped tokenizer encodes prompt and completion consistently, and that
retraining on data/ reproduces the shipped ranks file.
"""
import json

from minirlhf import tokenizer as T
from minirlhf.data import default_path


def test_trainer_merges_the_most_frequent_pair_first():
    ranks = T.train_bpe(["aaab aaab aaab"], vocab_size=260)
    # pieces: "aaab" x1, " aaab" x2; the pair (a, a) occurs 2 times per piece -> 6: merged first
    assert ranks[b"aa"] == 256
    assert len(ranks) <= 259


def test_ranks_file_round_trip(tmp_path):
    ranks = T.train_bpe(["the movie was good .", "the plot was bad ."] * 5, vocab_size=300)
    path = tmp_path / "tok.tiktoken"
    T.save_ranks(ranks, path)
    assert T.load_ranks(path) == ranks
    enc = T.load_tokenizer(path)
    text = "the movie was bad . the plot was good ."
    assert enc.decode(enc.encode(text)) == text
    assert enc.eot_token == len(ranks) and enc.n_vocab == len(ranks) + 1


def test_shipped_tokenizer_splits_words_and_keeps_prompt_boundaries():
    enc = T.load_tokenizer()
    assert len(enc.encode(" wonderful")) == 1                      # a grammar word is one token
    prompt, completion = "the acting was", " not very good . i loved the music ."
    assert enc.encode(prompt) + enc.encode(completion) == enc.encode(prompt + completion)
    assert enc.encode("<|endoftext|>", allowed_special="all") == [enc.eot_token]


def test_retraining_reproduces_the_shipped_ranks(tmp_path):
    records = [json.loads(line) for line in open(default_path("sft_train"))]
    ranks = T.train_bpe([r["prompt"] + r["completion"] for r in records])
    assert ranks == T.load_ranks()
