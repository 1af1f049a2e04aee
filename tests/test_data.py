"""Data loading, padding and masks.

Checks that a malformed JSONL line is an error naming file and line, that padding on
either side keeps tokens and masks aligned, that a too-long prompt is refused and a
too-long completion cut as documented, that the loss targets line up with the
response mask after the one-token shift, and that length-sorted chunks give the numbers
(and gradients) of one padded batch, in the input order.
"""
import json

import pytest
import torch

from minirlhf.data import (DataError, by_length_in_chunks, completion_batch, encode_example, pad_left, pad_right,
                           read_jsonl, shift_for_loss, write_jsonl)
from minirlhf.model import GPT, GPTConfig
from minirlhf.sampling import sequence_logprobs
from minirlhf.tokenizer import load_tokenizer


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize("line, problem", [
    ('{"prompt": "a", "completion": "b"', "not valid JSON"),
    ('{"prompt": "a"}', "missing field 'completion'"),
    ('{"prompt": "a", "completion": 3}', "field 'completion' must be str"),
    ('["a", "b"]', "expected a JSON object"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, problem):
    path = write_lines(tmp_path / "demos.jsonl", ['{"prompt": "x", "completion": "y"}', line])
    with pytest.raises(DataError) as err:
        read_jsonl(path, "demonstrations")
    assert f"{path}:2" in str(err.value) and problem in str(err.value)


def test_empty_file_and_short_ranking_are_errors(tmp_path):
    with pytest.raises(DataError, match="no records"):
        read_jsonl(write_lines(tmp_path / "empty.jsonl", []), "prompts")
    path = write_lines(tmp_path / "r.jsonl", [json.dumps({"prompt": "p", "completions": ["only one"]})])
    with pytest.raises(DataError, match="r.jsonl:1"):
        read_jsonl(path, "rankings")


def test_write_then_read_round_trip(tmp_path):
    records = [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 3
    write_jsonl(tmp_path / "pairs.jsonl", records)
    assert read_jsonl(tmp_path / "pairs.jsonl", "pairs") == records


def test_padding_left_and_right():
    tokens, mask = pad_right([[1, 2, 3], [4]], pad_id=0)
    assert tokens.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    tokens, mask = pad_left([[1, 2, 3], [4]], pad_id=0)
    assert tokens.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_response_mask_and_shift_align_targets_with_completion_tokens():
    enc = load_tokenizer()
    ids, n_prompt = encode_example(enc, "the movie was", " good .", block_size=32, max_prompt_tokens=8)
    assert ids[-1] == enc.eot_token and n_prompt == 3
    tokens, attention, response = completion_batch([(ids, n_prompt), (ids[:2] + [enc.eot_token], 1)], enc.eot_token)
    inputs, input_mask, targets, loss_mask = shift_for_loss(tokens, attention, response)
    # the scored targets of row 0 are exactly the completion tokens and EOS
    assert targets[0][loss_mask[0].bool()].tolist() == ids[n_prompt:]
    assert inputs.shape == targets.shape == (2, len(ids) - 1)
    assert loss_mask[1].tolist() == [1, 1] + [0] * (len(ids) - 3)


def test_long_prompt_refused_long_completion_cut():
    enc = load_tokenizer()
    with pytest.raises(DataError, match="longer than max_prompt_tokens"):
        encode_example(enc, "the movie was very good", " .", block_size=32, max_prompt_tokens=3)
    ids, n_prompt = encode_example(enc, "the movie", " was good . i loved the music .", block_size=6,
                                   max_prompt_tokens=4)
    assert len(ids) == 6 and enc.eot_token not in ids


@pytest.mark.parametrize("chunk_rows", [1, 2, 3, 64])
def test_length_sorted_chunks_equal_one_padded_batch(chunk_rows):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16))
    lengths = [9, 3, 12, 5, 5, 7, 2]                        # deliberately unsorted, with a tie
    examples = [(torch.randint(1, 50, (n,)).tolist(), 1) for n in lengths]

    def logps(tokens, mask, response):
        return sequence_logprobs(model, tokens, mask, response)

    whole = logps(*completion_batch(examples, pad_id=0))   # (7,), one batch padded to 12
    whole.pow(2).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    chunked = by_length_in_chunks(logps, examples, pad_id=0, device="cpu", chunk_rows=chunk_rows)
    assert chunked.shape == (7,)
    torch.testing.assert_close(chunked, whole.detach(), rtol=1e-5, atol=1e-5)   # same rows, same order
    chunked.pow(2).sum().backward()
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)
