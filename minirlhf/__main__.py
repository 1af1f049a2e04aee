"""The command line: `python -m minirlhf <command>`.

Every stage command takes the same flags: --out DIR, --fast (shrink sizes and steps so the
command finishes in seconds), --seed N, --set key=value (any field of the stage's config
dataclass), --device auto|cpu|cuda|mps, --resume, --overwrite and --debug. A stage's input
file is --data FILE (sft: demonstrations; collect, ppo: prompts, also --prompts; rm, dpo,
pft: preferences, also --prefs). Bad input is reported in one line with exit code 2;
--debug shows the traceback instead; Ctrl-C saves a checkpoint and exits with 130
(docs/reliability.md).
"""
import argparse
import json
import sys
import time
from pathlib import Path

from minirlhf import common
from minirlhf.data import DataError
from minirlhf.exercises import ExerciseError, unfinished_message


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
    config = build_config(SFTConfig(), FAST, args, extra={"data": args.data} if args.data else None)
    out = out_dir(args)
    summary = train_sft(config, out, device=common.pick_device(args.device), resume=args.resume,
                        overwrite=args.overwrite, progress=not args.quiet)
    print_summary(summary, out)


def sft_flags(p):
    add_stage_flags(p)
    p.add_argument("--data", help="demonstrations JSONL {\"prompt\", \"completion\"} (default: data/sft_train.jsonl; "
                                  "the same as --set data=FILE)")


def cmd_sample(args):
    import torch
    from minirlhf.checkpoints import load_gpt
    from minirlhf.sampling import sample_completions
    from minirlhf.tokenizer import load_tokenizer
    common.require(args.temperature >= 0, "--temperature must be >= 0 (0 is greedy)")
    common.require(args.n >= 1 and args.max_new_tokens >= 1, "-n and --max-new-tokens must be at least 1")
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
    extra = {**({"k": args.k} if args.k else {}), **({"prompts": args.data} if args.data else {})}
    config = build_config(CollectConfig(), FAST, args, extra=extra)
    out = out_dir(args)
    summary = collect(config, args.sft, out, device=common.pick_device(args.device), overwrite=args.overwrite,
                      progress=not args.quiet)
    print_summary(summary, out)


def cmd_rm(args):
    from minirlhf.reward import FAST, RewardConfig, train_reward_model
    config = build_config(RewardConfig(), FAST, args)
    out = out_dir(args)
    summary = train_reward_model(config, args.sft, args.prefs, out, device=common.pick_device(args.device),
                                 resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    print_summary(summary, out)


def rm_flags(p):
    add_stage_flags(p)
    p.add_argument("--sft", required=True, help="the SFT run folder whose model starts the reward model")
    p.add_argument("--prefs", "--data", dest="prefs", required=True,
                   help="rankings.jsonl (the default loss=ranking) or pairs.jsonl (loss=pairwise) from `collect` "
                        "(held out: the sibling *_test.jsonl, or --set test_prefs=PATH)")


def cmd_ppo(args):
    from minirlhf.ppo import FAST, PPOConfig, train_ppo
    extra = {**({"reward": args.reward} if args.reward else {}), **({"prompts": args.data} if args.data else {})}
    config = build_config(PPOConfig(), FAST, args, extra=extra)
    out = out_dir(args)
    summary = train_ppo(config, args.sft, args.rm, out, device=common.pick_device(args.device), resume=args.resume,
                        overwrite=args.overwrite, progress=not args.quiet)
    print_summary(summary, out)


def ppo_flags(p):
    add_stage_flags(p)
    p.add_argument("--sft", required=True, help="the SFT run folder: initial policy and KL reference")
    p.add_argument("--rm", default=None, help="the reward-model run folder (not needed with --reward gold)")
    p.add_argument("--reward", choices=["rm", "gold"], default=None,
                   help="optimise the reward model (default) or the gold judge (PPO-GT)")
    p.add_argument("--data", "--prompts", dest="data", help="rollout prompts JSONL {\"prompt\"} (default: "
                   "data/prompts_train.jsonl; the same as --set prompts=FILE)")


def cmd_grpo(args):
    from minirlhf.grpo import FAST, GRPOConfig, train_grpo
    extra = {**({"reward": args.reward} if args.reward else {}), **({"prompts": args.data} if args.data else {})}
    config = build_config(GRPOConfig(), FAST, args, extra=extra)
    out = out_dir(args)
    summary = train_grpo(config, args.sft, args.rm, out, device=common.pick_device(args.device), resume=args.resume,
                         overwrite=args.overwrite, progress=not args.quiet)
    print_summary(summary, out)


def cmd_dpo(args, stage="dpo"):
    from minirlhf.dpo import FAST, DPOConfig, train_dpo
    from minirlhf.baselines import PREFERRED_FT, PREFERRED_FT_FAST
    base = common.apply_overrides(DPOConfig(), PREFERRED_FT) if stage == "pft" else DPOConfig()
    config = build_config(base, {**FAST, **PREFERRED_FT_FAST} if stage == "pft" else FAST, args)
    out = out_dir(args)
    summary = train_dpo(config, args.sft, args.prefs, out, device=common.pick_device(args.device), resume=args.resume,
                        overwrite=args.overwrite, progress=not args.quiet, stage=stage)
    print_summary(summary, out)


def cmd_pft(args):
    cmd_dpo(args, stage="pft")


def dpo_flags(p):
    add_stage_flags(p)
    p.add_argument("--sft", required=True, help="the SFT run folder: initial policy and frozen reference")
    p.add_argument("--prefs", "--data", dest="prefs", required=True,
                   help="pairs.jsonl from `collect` (held out: the sibling pairs_test.jsonl, or --set test_prefs=PATH)")


def cmd_bon(args):
    from minirlhf.baselines import BEST_OF_N_FAST, BestOfNConfig, run_best_of_n
    config = build_config(BestOfNConfig(), BEST_OF_N_FAST, args)
    out = out_dir(args)
    summary = run_best_of_n(config, args.sft, args.rm, out, device=common.pick_device(args.device),
                            overwrite=args.overwrite, progress=not args.quiet)
    print_summary(summary, out)


def bon_flags(p):
    add_stage_flags(p)
    p.add_argument("--sft", required=True, help="the SFT run folder to sample from")
    p.add_argument("--rm", default=None, help="the reward-model run folder that ranks the N samples "
                                              "(not needed with --set ranker=gold)")


def cmd_run(args):
    from minirlhf.pipeline import run_pipeline
    out = out_dir(args)
    combined = run_pipeline(out, fast=args.fast, seed=args.seed or 0, device=common.pick_device(args.device),
                            resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    print((out / "report.md").read_text().split("## Samples")[0])
    print(f"wrote {out} ({combined['total_seconds']:.0f} s)")


def run_flags(p):
    p.add_argument("--out", help="run folder to write (default: runs/run-<time>)")
    p.add_argument("--fast", action="store_true", help="tiny sizes and step counts: the whole run in under a minute")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--resume", action="store_true", help="keep the stages an interrupted run finished")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def cmd_frontier(args):
    from minirlhf.experiments import FAST, FrontierConfig, run_frontier
    config = build_config(FrontierConfig(), FAST, args)
    out = out_dir(args)
    summary = run_frontier(config, out, base_dir=args.base, fast=args.fast, device=common.pick_device(args.device),
                           resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    print((out / "frontier.md").read_text())
    print(f"wrote {out} ({summary['total_seconds'] / 60:.1f} min)")


def frontier_flags(p):
    add_stage_flags(p)
    p.add_argument("--from", dest="base", default=None,
                   help="a finished `run` folder whose sft/, prefs/ and rm/ are reused (default: train them)")


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
    p.add_argument("--data", "--prompts", dest="data", help="prompts JSONL {\"prompt\"} to label (default: "
                   "data/prompts_train.jsonl; the same as --set prompts=FILE)")


# Instructors: the student copy and grading (minirlhf/exercises.py, docs/instructor.md)

def cmd_make_student(args):
    from minirlhf.exercises import make_student
    result = make_student(args.out, overwrite=args.overwrite)
    names = ", ".join(name for name, _ in result["stubbed"])
    print(f"wrote the student copy to {args.out}: {result['files']} files, "
          f"{len(result['stubbed'])} exercises stubbed ({names}); hidden tests left out")


def make_student_flags(p):
    p.add_argument("out", metavar="OUT", help="folder to write the student copy into (must be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a student copy made earlier in OUT")


def cmd_grade(args):
    from minirlhf.exercises import grade
    record = grade(args.student_dir, json_path=args.json, timeout=args.timeout, all_tests=args.all)
    if record["pytest"]["timed_out"]:
        raise ExerciseError(f"the tests did not finish within {args.timeout} s (see the table above)")


def grade_flags(p):
    p.add_argument("student_dir", metavar="STUDENT_DIR", help="a student copy with the student's minirlhf/")
    p.add_argument("--json", default=None, help="gradebook record to write (default: STUDENT_DIR/grade.json)")
    p.add_argument("--timeout", type=float, default=900, help="seconds before the test run is stopped")
    p.add_argument("--all", action="store_true", help="run every instructor test, not only the exercises' files")


COMMANDS = {
    "run": (cmd_run, "the whole pipeline (SFT, preferences, RM, PPO, DPO, baselines) and a report", run_flags),
    "data": (cmd_data, "regenerate data/ (datasets and tokenizer) from a seed", data_flags),
    "tokenizer": (cmd_tokenizer, "retrain the BPE tokenizer on the demonstrations", tokenizer_flags),
    "sft": (cmd_sft, "step 1: supervised fine-tuning on demonstrations", sft_flags),
    "collect": (cmd_collect, "step 2: simulated labelers rank samples of the SFT model", collect_flags),
    "rm": (cmd_rm, "step 2: a reward model learns the preferences (--set loss=pairwise|ranking)", rm_flags),
    "ppo": (cmd_ppo, "step 3: RLHF with PPO against the reward model", ppo_flags),
    "grpo": (cmd_grpo, "step 3 without a critic: GRPO, Dr. GRPO, RLOO or REINFORCE++ (--set advantage=...; "
                       "docs/grpo.md)", ppo_flags),
    "dpo": (cmd_dpo, "the direct alternative: DPO on the preference pairs, plus an NLL term on the "
                     "chosen (RPO; --set nll_coef=0 beta=1 lr=2e-4: the paper's loss; --set loss_type=...)",
            dpo_flags),
    "pft": (cmd_pft, "baseline: Preferred-FT, SFT on the chosen responses (DPO loop, loss_type=preferred_ft)", dpo_flags),
    "bon": (cmd_bon, "baseline: Best-of-N samples of the SFT model ranked by the reward model", bon_flags),
    "frontier": (cmd_frontier, "the reward-vs-KL frontier sweep of DPO, PPO and baselines (DPO paper Fig. 2)",
                 frontier_flags),
    "sample": (cmd_sample, "sample completions from a trained model folder", sample_flags),
    "make-student": (cmd_make_student, "instructors: write a student copy, solutions replaced by stubs",
                     make_student_flags),
    "grade": (cmd_grade, "instructors: score a student copy per exercise with the full tests", grade_flags),
}


def make_parser():
    parser = argparse.ArgumentParser(prog="python -m minirlhf", description="minirlhf: RLHF built from scratch")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text, add_flags) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # SUPPRESS: without the flag here, a --debug given before the command still counts
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
        add_flags(p)
    return parser


def main(argv=None):
    args = make_parser().parse_args(argv)
    try:
        COMMANDS[args.command][0](args)
    except (common.ConfigError, DataError, FileNotFoundError, ExerciseError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NotImplementedError as e:  # a stub of the student copy: name the exercise, no traceback
        if args.debug or unfinished_message(e) is None:
            raise
        print(f"error: {unfinished_message(e)}", file=sys.stderr)
        return 2
    except common.NonFiniteLossError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except common.Interrupted as e:
        print(f"\n{e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:          # Ctrl-C outside a training loop (loading, evaluation)
        if args.debug:
            raise
        print("\ninterrupted; nothing was saved since the last checkpoint. With a checkpoint.pt in --out, "
              "run the same command with --resume to continue.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
