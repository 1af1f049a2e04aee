"""The command line: `python -m minirlhf <command>`.

Every stage command takes the same flags: --out DIR, --fast (shrink sizes and steps so the
command finishes in seconds), --seed N, --set key=value (any field of the stage's config
dataclass), --device auto|cpu|cuda|mps, --resume, --overwrite and --debug. Bad input is
reported in one line with exit code 2; --debug shows the traceback instead.
"""
import argparse
import json
import sys
import time
from pathlib import Path

from minirlhf import common
from minirlhf.data import DataError


# ---------------------------------------------------------------------------
# Shared flags and config building

def add_stage_flags(parser, out_required=False):
    parser.add_argument("--out", required=out_required, help="run folder to write (default: runs/<command>-<time>)")
    parser.add_argument("--fast", action="store_true", help="tiny sizes and step counts: finishes in seconds")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: the config's, 0)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config fields")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (auto prefers a GPU)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def build_config(config, fast_overrides, args, extra=None):
    """Defaults, then --fast, then --seed and named flags, then --set (last word wins)."""
    if args.fast:
        config = common.apply_overrides(config, fast_overrides)
    if args.seed is not None:
        config = common.apply_overrides(config, {"seed": args.seed})
    if extra:
        config = common.apply_overrides(config, extra)
    config = common.apply_overrides(config, args.set)
    config.validate()
    return config


def out_dir(args):
    return Path(args.out) if args.out else Path("runs") / f"{args.command}-{time.strftime('%Y%m%d-%H%M%S')}"


def print_summary(summary, out):
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items() if k != "eval/samples"}
    print(json.dumps(shown, indent=2))
    for sample in summary.get("eval/samples", [])[:5]:
        print(f"  [{sample['gold']:.2f}] {sample['text']}")
    print(f"wrote {out}")


# ---------------------------------------------------------------------------
# Commands

def cmd_data(args):
    from minirlhf.data import DATA_DIR
    from minirlhf.tasks import get_task
    from minirlhf.tokenizer import train_and_save
    task = get_task(args.task)
    paths = task.write_datasets(DATA_DIR, seed=args.seed)
    train = [json.loads(line) for line in paths["sft_train"].read_text().splitlines()]
    enc = train_and_save([r["prompt"] + r["completion"] for r in train])
    for name, path in paths.items():
        print(f"{path}: {sum(1 for _ in open(path))} records")
    print(f"tokenizer: {enc.n_vocab} tokens (incl. <|endoftext|>)")


def cmd_tokenizer(args):
    from minirlhf.data import default_path, read_jsonl
    from minirlhf.tokenizer import train_and_save
    train = read_jsonl(args.data or default_path("sft_train"), "demonstrations")
    enc = train_and_save([r["prompt"] + r["completion"] for r in train], vocab_size=args.vocab_size)
    print(f"tokenizer: {enc.n_vocab} tokens (incl. <|endoftext|>)")


def cmd_sft(args):
    from minirlhf.sft import FAST, SFTConfig, train_sft
    config = build_config(SFTConfig(), FAST, args)
    out = out_dir(args)
    summary = train_sft(config, out, device=common.pick_device(args.device), resume=args.resume,
                        overwrite=args.overwrite, progress=not args.quiet)
    print_summary(summary, out)


def cmd_sample(args):
    import torch
    from minirlhf.checkpoints import load_gpt
    from minirlhf.sampling import sample_completions
    from minirlhf.tokenizer import load_tokenizer
    tokenizer = load_tokenizer()
    model = load_gpt(args.model, common.pick_device(args.device), tokenizer)
    generator = torch.Generator().manual_seed(args.seed)
    max_new = min(args.max_new_tokens, model.config.block_size - len(tokenizer.encode(args.prompt)))
    completions = sample_completions(model, tokenizer, [args.prompt] * args.n, max_new_tokens=max_new,
                                     max_prompt_tokens=model.config.block_size - 1,
                                     temperature=args.temperature, top_k=args.top_k, generator=generator)
    for completion in completions:
        print(args.prompt + completion)


def cmd_collect(args):
    from minirlhf.collect import FAST, CollectConfig, collect
    config = build_config(CollectConfig(), FAST, args, extra={"k": args.k} if args.k else None)
    out = out_dir(args)
    summary = collect(config, args.sft, out, device=common.pick_device(args.device), overwrite=args.overwrite,
                      progress=not args.quiet)
    print_summary(summary, out)


# ---------------------------------------------------------------------------
# The command table: name -> (function, help, extra flags)

def data_flags(p):
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", default="reviews")


def tokenizer_flags(p):
    p.add_argument("--data", help="demonstrations JSONL (default: data/sft_train.jsonl)")
    p.add_argument("--vocab-size", type=int, default=512)


def sample_flags(p):
    p.add_argument("--model", required=True, help="a run folder with model.pt (sft, ppo, dpo)")
    p.add_argument("--prompt", required=True)
    p.add_argument("-n", type=int, default=5, help="number of samples")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")


def collect_flags(p):
    add_stage_flags(p)
    p.add_argument("--sft", required=True, help="the SFT run folder to sample from")
    p.add_argument("--k", type=int, default=None, help="completions ranked per prompt (default 4)")


COMMANDS = {
    "data": (cmd_data, "regenerate data/ (datasets and tokenizer) from a seed", data_flags),
    "tokenizer": (cmd_tokenizer, "retrain the BPE tokenizer on the demonstrations", tokenizer_flags),
    "sft": (cmd_sft, "step 1: supervised fine-tuning on demonstrations", add_stage_flags),
    "collect": (cmd_collect, "step 2: simulated labelers rank samples of the SFT model", collect_flags),
    "sample": (cmd_sample, "sample completions from a trained model folder", sample_flags),
}


def make_parser():
    parser = argparse.ArgumentParser(prog="python -m minirlhf", description="minirlhf: RLHF built from scratch")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text, add_flags) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
        add_flags(p)
    return parser


def main(argv=None):
    args = make_parser().parse_args(argv)
    try:
        COMMANDS[args.command][0](args)
    except (common.ConfigError, DataError, FileNotFoundError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except common.NonFiniteLossError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except common.Interrupted as e:
        print(f"\n{e}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
