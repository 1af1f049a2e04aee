"""Tests for minirlhf.export: the Hugging Face checkpoint computes what the kit computes.

What is checked (with transformers, tokenizers and safetensors, the `hf` extra that .ci/run
installs; without them the file is skipped, saying so):
  - hand facts: GPT-2's byte alphabet (space is "Ġ", newline "Ċ"), the same set of
    characters as `tokenizers`' ByteLevel alphabet;
  - the tokenizer gives tiktoken's ids on varied text (spaces, tabs, newlines, punctuation,
    unknown words, non-ASCII, <|endoftext|> inside and at the end) and on every line of the
    validation data, and decodes them back to the text;
  - the exported GPT2LMHeadModel's logits equal the kit's on right-, left- and both-padded
    batches to 1e-5, with and without biases; greedy generation of a trained model gives
    the same tokens from a left-padded batch of prompts;
  - the reward model, as GPT2ForSequenceClassification, scores what `ScalarHeadModel.score`
    scores, right- or left-padded;
  - bad input is one line and exit code 2: no such folder, not a model run, --out in use.

Weights are re-drawn at random (biases and LayerNorms included), so a transposed or
misplaced tensor cannot hide behind GPT-2's zero-bias, unit-LayerNorm initialisation.
"""
import json

import pytest
import torch

pytest.importorskip("transformers", reason="the hf extra is not installed: pip install -e \".[hf]\"")
pytest.importorskip("safetensors", reason="the hf extra is not installed: pip install -e \".[hf]\"")

from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,  # noqa: E402
                          AutoTokenizer, PreTrainedTokenizerFast)

from minirlhf.__main__ import main  # noqa: E402
from minirlhf.checkpoints import load_gpt, save_model  # noqa: E402
from minirlhf.data import default_path, read_jsonl  # noqa: E402
from minirlhf.export import PAD, byte_alphabet, export  # noqa: E402
from minirlhf.model import GPT, GPTConfig, ScalarHeadModel  # noqa: E402
from minirlhf.tokenizer import EOT, load_tokenizer  # noqa: E402

from helpers import tiny_sft_dir  # noqa: E402

ENC = load_tokenizer()
TEXTS = [
    "The film was great.",
    "I did not like it at all, not one bit!",
    "  two leading spaces,   three inside, and trailing   ",
    "tabs\tand\nnewlines\n\n  and a blank line",
    "punctuation: ... !? -- (brackets) [x] {y} 'quotes' \"double\" it's we'll they're",
    "zxqvbnm flibbertigibbet supercalifragilistic",  # words the BPE never saw
    "naïve café, ünïcödé, 日本語, emoji 😀 ✓",
    "numbers 123 4567 8.90 1,000,000",
    "a review<|endoftext|>another one",
    "ends with the end-of-text token<|endoftext|>",
    "",
]


def random_run(tmp_path, name, bias=True, reward=False, seed=0):
    """A run folder (config.json + model.pt) with every weight drawn at random."""
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=ENC.n_vocab, block_size=96, n_layer=2, n_head=4, n_embd=32, bias=bias)
    model = ScalarHeadModel(config) if reward else GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_gain = ".ln_" in name and name.endswith("weight")  # LayerNorm gains: around 1
            p.normal_(1.0 if is_gain else 0.0, 0.2)
        if reward:
            model.reward_gain.fill_(1.7)
            model.reward_bias.fill_(-0.4)
    out = tmp_path / name
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model": config.__dict__}))
    save_model(model, out)
    return out, model.eval()


def padded_batch(rows, side, pad_id):
    """(tokens, attention_mask) (B, T) of id lists, padded on `side`: right, left or both
    (left padding, then the row, then right padding, as generated sequences are)."""
    width = max(len(r) for r in rows) + (2 if side == "both" else 0)
    tokens = torch.full((len(rows), width), pad_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        start = {"right": 0, "left": width - len(r), "both": 1 + i % 2}[side]
        tokens[i, start:start + len(r)] = torch.tensor(r)
        mask[i, start:start + len(r)] = 1
    return tokens, mask


def kit_positions(mask):
    """The kit's position ids, counted over real tokens: what a left-padded batch must pass."""
    return (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)


ROWS = [ENC.encode(t, allowed_special="all") for t in TEXTS[:6]]


# ---------------------------------------------------------------------------
# The tokenizer


def test_byte_alphabet_is_gpt2s():
    from tokenizers import pre_tokenizers
    alphabet = byte_alphabet()
    assert alphabet[ord(" ")] == "Ġ" and alphabet[ord("\n")] == "Ċ" and alphabet[ord("a")] == "a"
    assert alphabet[0] == chr(256) and alphabet[255] == "ÿ"
    assert sorted(alphabet.values()) == sorted(pre_tokenizers.ByteLevel.alphabet())


@pytest.fixture(scope="module")
def exported_lm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    run, model = random_run(tmp, "lm")
    export(run, tmp / "hf")
    return tmp / "hf", model


def test_tokenizer_gives_tiktokens_ids_and_decodes_back(exported_lm):
    tok = AutoTokenizer.from_pretrained(exported_lm[0])
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert tok.eos_token == EOT and tok.eos_token_id == ENC.eot_token and tok.pad_token_id == ENC.eot_token
    texts = TEXTS + [r["prompt"] + r["completion"] for r in read_jsonl(default_path("sft_val"), "demonstrations")]
    for text in texts:
        ids = ENC.encode(text, allowed_special="all")
        assert tok(text)["input_ids"] == ids, text
        assert tok.decode(ids) == text
    assert tok("x<|endoftext|>")["input_ids"][-1] == ENC.eot_token
    assert len(texts) > 100


# ---------------------------------------------------------------------------
# The language model


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("side", ["right", "left", "both"])
def test_logits_equal_on_padded_batches(tmp_path, bias, side):
    run, model = random_run(tmp_path, "lm", bias=bias)
    export(run, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens, mask = padded_batch(ROWS, side, ENC.eot_token)
    with torch.no_grad():
        ours = model(tokens, mask)  # (B, T, V)
        theirs = hf(input_ids=tokens, attention_mask=mask, position_ids=kit_positions(mask)).logits  # (B, T, V)
    real = mask.bool()
    assert theirs.shape == ours.shape
    assert ours[real].abs().max() > 1  # the weights are not near zero: a wrong layout would show
    assert (ours[real] - theirs[real]).abs().max() < 1e-5
    if side == "right":  # positions as GPT-2 counts them already agree
        with torch.no_grad():
            plain = hf(input_ids=tokens, attention_mask=mask).logits
        assert (ours[real] - plain[real]).abs().max() < 1e-5


def test_greedy_generation_gives_the_same_tokens(tmp_path):
    sft = tiny_sft_dir()
    main(["export", "--model", str(sft), "--out", str(tmp_path / "hf")])
    model = load_gpt(sft)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    prompts = [ENC.encode(p) for p in ["The movie", "I thought this film was", "Honestly,", "The acting"]]
    tokens, mask = padded_batch(prompts, "left", ENC.eot_token)
    ours = model.generate(tokens, mask, max_new_tokens=24, temperature=0, eos_token_id=ENC.eot_token).tokens
    theirs = hf.generate(input_ids=tokens, attention_mask=mask, max_new_tokens=24, do_sample=False)
    assert theirs.size(1) > tokens.size(1) + 3
    assert torch.equal(ours[:, :theirs.size(1)], theirs)
    assert (ours[:, theirs.size(1):] == ENC.eot_token).all()  # the kit only pads further


# ---------------------------------------------------------------------------
# The reward model


@pytest.mark.parametrize("side", ["right", "left"])
def test_reward_model_scores_equal(tmp_path, side):
    run, model = random_run(tmp_path, "rm", reward=True)
    assert export(run, tmp_path / "hf") == "reward"
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf.config.num_labels == 1 and tok.pad_token == PAD and tok.pad_token_id == ENC.n_vocab
    rows = [r + [ENC.eot_token] for r in ROWS]  # the kit scores prompt + completion + EOS
    tokens, mask = padded_batch(rows, side, ENC.eot_token)  # the kit pads with EOS
    with torch.no_grad():
        ours = model.score(tokens, mask)  # (B,)
        hf_tokens = tokens.masked_fill(mask == 0, tok.pad_token_id)  # transformers finds the end by <|pad|>
        theirs = hf(input_ids=hf_tokens, attention_mask=mask, position_ids=kit_positions(mask)).logits[:, 0]
    assert ours.abs().max() > 0.5
    assert (ours - theirs).abs().max() < 1e-5
    if side == "right":  # the exported tokenizer builds the same batch from text
        batch = tok([t + EOT for t in TEXTS[:6]], padding=True, return_tensors="pt")
        assert torch.equal(batch["input_ids"], hf_tokens) and torch.equal(batch["attention_mask"], mask)


# ---------------------------------------------------------------------------
# Bad input: one line, exit code 2


def test_bad_input_is_one_line(tmp_path, capsys):
    run, _ = random_run(tmp_path, "lm")
    (tmp_path / "notes").mkdir()

    def error(*args):
        assert main(["export", *args]) == 2
        message = capsys.readouterr().err
        assert message.startswith("error: ") and message.count("\n") == 1
        return message

    assert "no such folder" in error("--model", str(tmp_path / "missing"), "--out", str(tmp_path / "a"))
    assert "not a model run" in error("--model", str(tmp_path / "notes"), "--out", str(tmp_path / "a"))
    assert "--model " + str(run) in error("--model", str(tmp_path), "--out", str(tmp_path / "a"))  # names a stage
    assert main(["export", "--model", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert "--overwrite" in error("--model", str(run), "--out", str(tmp_path / "hf"))
    (tmp_path / "hf" / "mine.txt").write_text("keep me")
    assert main(["export", "--model", str(run), "--out", str(tmp_path / "hf"), "--overwrite"]) == 0
    assert (tmp_path / "hf" / "mine.txt").exists()  # --overwrite replaces only the export's own files


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("minirlhf ") and out.split()[1][0].isdigit()
