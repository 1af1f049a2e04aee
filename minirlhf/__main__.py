"""The command line: `python -m minirlhf <command>`.

Every stage command takes the same flags: --out DIR, --fast (shrink sizes and steps so the
command finishes in seconds), --seed N, --set key=value (any field of the stage's config
dataclass), --device auto|cpu|cuda|mps, --resume, --overwrite and --debug. A stage's input
file is --data FILE (sft: demonstrations; collect, ppo: prompts, also --prompts; rm, dpo,
pft: preferences, also --prefs), and --task NAME picks the toy task (default: the task of the
--sft folder, so later stages follow the SFT model's; else reviews). Bad input is reported in
one line with exit code 2; --debug shows the traceback instead; Ctrl-C saves a checkpoint and
exits with 130 (docs/reliability.md).
"""
import argparse
import json
import secrets
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from minirlhf.baselines import (BEST_OF_N_FAST, PREFERRED_FT_FAST, BestOfNConfig, PreferredFTConfig, run_best_of_n,
                                train_preferred_ft)
from minirlhf.checkpoints import load_gpt
from minirlhf.collect import FAST as COLLECT_FAST, CollectConfig, collect
from minirlhf.config import ConfigError, build, check_seed, pick_device, require
from minirlhf.data import DATA_DIR, DataError, default_path, read_jsonl
from minirlhf.dpo import FAST as DPO_FAST, DPOConfig, train_dpo
from minirlhf.course import exercises
from minirlhf.course.exercises import ExerciseError, unfinished_message
from minirlhf.course.student_copy import make_student
from minirlhf.export import export
from minirlhf.grpo import FAST as GRPO_FAST, GRPOConfig, train_grpo
from minirlhf.experiments import FAST as FRONTIER_FAST, FrontierConfig, run_frontier
from minirlhf.pipeline import StageFailed, run_pipeline
from minirlhf.ppo import FAST as PPO_FAST, PPOConfig, train_ppo
from minirlhf.reward import FAST as RM_FAST, RewardConfig, train_reward_model
from minirlhf.runs import Interrupted, NonFiniteLossError, check_same_task, folder_task
from minirlhf.sampling import SamplingError, sample_completions
from minirlhf.sft import FAST as SFT_FAST, SFTConfig, train_sft
from minirlhf.tasks import TASKS, get_task, is_verifiable, stage_defaults, task_config
from minirlhf.tokenizer import EOT, load_tokenizer, train_and_save
from minirlhf.verifiable import run_verifiable_pipeline, train_dpo_on_verifier_pairs

try:                                      # a student copy ships without the grader's files
    from minirlhf.course import grade as grading, gradebook
except ImportError:
    grading = gradebook = None


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
    parser.add_argument("--task", default=None, help=f"the toy task: {', '.join(TASKS)} (default: the --sft "
                                                     "folder's task, else reviews)")


def resolve_task(args, folders):
    """The command's task: --task (or --set task=NAME), else the task the input folders were trained
    on, else reviews. Checked now, before anything is written: an unknown name lists the valid ones,
    and a folder of another task is refused."""
    asked = {k.strip(): v.strip() for k, _, v in (item.partition("=") for item in args.set)}.get("task", args.task)
    trained = next(filter(None, (folder_task(f) for f in folders.values() if f)), None)
    task = asked or trained or "reviews"
    require(task in TASKS, f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    check_same_task(task, **folders)
    return task


def build_config(defaults, fast_overrides, args, stage, extra=None, folders=None):
    """Defaults, then the task's, then --fast, then --seed, then named flags, then --set (last word
    wins); validated. `folders` (sft=DIR, rm=DIR) are the inputs whose task a later stage follows."""
    task = resolve_task(args, folders or {})
    return task_config(defaults, stage, task, fast=args.fast, stage_fast=fast_overrides, seed=args.seed,
                       overrides=[extra, args.set]).validate()


def refuse_verifiable(task, command):
    """collect and rm make no sense where a verifier is the reward: say what to run instead."""
    require(not is_verifiable(task), f"{command}: task {task} is scored by a verifier, so no preferences or reward "
            f"model are needed (ppo/grpo --reward gold; dpo --task {task} labels its own pairs)")


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
    require(args.task in TASKS, f"unknown task {args.task!r}; valid tasks: {', '.join(TASKS)}")
    task = get_task(args.task)
    paths = task.write_datasets(args.out or DATA_DIR, seed=args.seed)
    for name, path in paths.items():
        print(f"{path}: {sum(1 for _ in open(path))} records")
    if not hasattr(task, "DATA_SUBDIR") and args.out is None:   # the tokenizer learns the reviews; others reuse it
        train = [json.loads(line) for line in paths["sft_train"].read_text().splitlines()]
        enc = train_and_save([r["prompt"] + r["completion"] for r in train])
        print(f"tokenizer: {enc.n_vocab} tokens (incl. <|endoftext|>)")


def cmd_tokenizer(args):
    train = read_jsonl(args.data or default_path("sft_train"), "demonstrations")
    enc = train_and_save([r["prompt"] + r["completion"] for r in train], vocab_size=args.vocab_size)
    print(f"tokenizer: {enc.n_vocab} tokens (incl. <|endoftext|>)")


def cmd_sft(args):
    config = build_config(SFTConfig(), SFT_FAST, args, "sft", extra={"data": args.data} if args.data else None)
    out = out_dir(args)
    summary = train_sft(config, out, device=pick_device(args.device), resume=args.resume,
                        overwrite=args.overwrite, progress=not args.quiet)
    print_summary(summary, out)


def sft_flags(p):
    add_stage_flags(p)
    p.add_argument("--data", help="demonstrations JSONL {\"prompt\", \"completion\"} (default: data/sft_train.jsonl; "
                                  "the same as --set data=FILE)")


def cmd_sample(args):
    require(args.temperature >= 0, "--temperature must be >= 0 (0 is greedy)")
    require(args.n >= 1 and args.max_new_tokens >= 1, "-n and --max-new-tokens must be at least 1")
    require(args.top_k is None or args.top_k >= 1, "--top-k must be at least 1 (leave it out to keep every token)")
    require(EOT not in args.prompt, f"--prompt holds the literal {EOT}, the special token that ends a sequence")
    tokenizer = load_tokenizer()
    model = load_gpt(args.model, pick_device(args.device), tokenizer)
    generator = torch.Generator().manual_seed(args.seed)
    max_new = min(args.max_new_tokens, model.config.block_size - len(tokenizer.encode(args.prompt)))
    completions = sample_completions(model, tokenizer, [args.prompt] * args.n, max_new_tokens=max_new,
                                     max_prompt_tokens=model.config.block_size - 1,
                                     temperature=args.temperature, top_k=args.top_k, generator=generator)
    for completion in completions:
        print(args.prompt + completion)


def cmd_collect(args):
    extra = {**({"k": args.k} if args.k else {}), **({"prompts": args.data} if args.data else {})}
    config = build_config(CollectConfig(), COLLECT_FAST, args, "collect", extra=extra, folders={"sft": args.sft})
    refuse_verifiable(config.task, "collect")
    out = out_dir(args)
    summary = collect(config, args.sft, out, device=pick_device(args.device), overwrite=args.overwrite,
                      progress=not args.quiet)
    print_summary(summary, out)


def cmd_rm(args):
    config = build_config(RewardConfig(), RM_FAST, args, "rm", folders={"sft": args.sft})
    refuse_verifiable(config.task, "rm")
    out = out_dir(args)
    summary = train_reward_model(config, args.sft, args.prefs, out, device=pick_device(args.device),
                                 resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    print_summary(summary, out)


def rm_flags(p):
    add_stage_flags(p)
    p.add_argument("--sft", required=True, help="the SFT run folder whose model starts the reward model")
    p.add_argument("--prefs", "--data", dest="prefs", required=True,
                   help="rankings.jsonl (the default loss=ranking) or pairs.jsonl (loss=pairwise) from `collect` "
                        "(held out: the sibling *_test.jsonl, or --set test_prefs=PATH)")


def cmd_ppo(args):
    extra = {**({"reward": args.reward} if args.reward else {}), **({"prompts": args.data} if args.data else {})}
    config = build_config(PPOConfig(), PPO_FAST, args, "ppo", extra=extra, folders={"sft": args.sft, "rm": args.rm})
    out = out_dir(args)
    summary = train_ppo(config, args.sft, args.rm, out, device=pick_device(args.device), resume=args.resume,
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
    extra = {**({"reward": args.reward} if args.reward else {}), **({"prompts": args.data} if args.data else {})}
    config = build_config(GRPOConfig(), GRPO_FAST, args, "grpo", extra=extra,
                          folders={"sft": args.sft, "rm": args.rm})
    out = out_dir(args)
    summary = train_grpo(config, args.sft, args.rm, out, device=pick_device(args.device), resume=args.resume,
                         overwrite=args.overwrite, progress=not args.quiet)
    print_summary(summary, out)


def cmd_dpo(args):
    config = build_config(DPOConfig(), DPO_FAST, args, "dpo", folders={"sft": args.sft})
    out, kw = out_dir(args), dict(device=pick_device(args.device), resume=args.resume, overwrite=args.overwrite,
                                  progress=not args.quiet)
    if args.prefs is None:     # a verifier task labels its own pairs: one right and one wrong SFT sample
        require(is_verifiable(config.task), "--prefs is needed (pairs or rankings from `collect`), unless the "
                                            "task has a verifier (--task arithmetic labels its own pairs)")
        pairs = {**stage_defaults(config.task, "verifier_pairs"),
                 **(stage_defaults(config.task, "verifier_pairs", fast=True) if args.fast else {})}
        summary = train_dpo_on_verifier_pairs(config, args.sft, out, pairs, **kw)
    else:
        summary = train_dpo(config, args.sft, args.prefs, out, **kw)
    print_summary(summary, out)


def cmd_pft(args):
    require(args.prefs is not None, "--prefs is needed (pairs or rankings from `collect`)")
    config = build_config(PreferredFTConfig(), PREFERRED_FT_FAST, args, "preferred_ft", folders={"sft": args.sft})
    out = out_dir(args)
    summary = train_preferred_ft(config, args.sft, args.prefs, out, device=pick_device(args.device),
                                 resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    print_summary(summary, out)


def dpo_flags(p):
    add_stage_flags(p)
    p.add_argument("--sft", required=True, help="the SFT run folder: initial policy and frozen reference")
    p.add_argument("--prefs", "--data", dest="prefs", default=None,
                   help="rankings.jsonl from `collect` (a batch: whole rankings), or pairs.jsonl (a batch: pairs); "
                        "held out: the sibling *_test.jsonl, or --set test_prefs=PATH. A verifier task "
                        "(--task arithmetic) without --prefs labels pairs of SFT samples itself")


def cmd_bon(args):
    config = build_config(BestOfNConfig(), BEST_OF_N_FAST, args, "best_of_n",
                          folders={"sft": args.sft, "rm": args.rm})
    out = out_dir(args)
    summary = run_best_of_n(config, args.sft, args.rm, out, device=pick_device(args.device),
                            overwrite=args.overwrite, progress=not args.quiet)
    print_summary(summary, out)


def bon_flags(p):
    add_stage_flags(p)
    p.add_argument("--sft", required=True, help="the SFT run folder to sample from")
    p.add_argument("--rm", default=None, help="the reward-model run folder that ranks the N samples "
                                              "(not needed with --set ranker=gold)")


def cmd_run(args):
    out = out_dir(args)
    if args.task != "reviews":         # a verifier task: its own pipeline (verifiable.py)
        return cmd_run_verifiable(args, out)
    try:
        combined = run_pipeline(out, fast=args.fast, seed=args.seed or 0, device=pick_device(args.device),
                                resume=args.resume, overwrite=args.overwrite, progress=not args.quiet,
                                workers=args.workers)
    except StageFailed as e:       # the stages that could finish did; name the others in one line
        if args.debug:
            print(e.details, file=sys.stderr)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.code)
    print((out / "report.md").read_text().split("## Samples")[0])
    print(f"wrote {out} ({combined['total_seconds']:.0f} s)")


def cmd_run_verifiable(args, out):
    """`run --task arithmetic`: sft -> grpo, ppo, dpo, best-of-n against the verifier -> pass@k, report.md."""
    require(args.task in TASKS, f"unknown task {args.task!r}; valid tasks: {', '.join(TASKS)}")
    require(is_verifiable(args.task), f"run --task {args.task}: only reviews and the verifier tasks have a pipeline")
    combined = run_verifiable_pipeline(out, task=args.task, fast=args.fast, seed=args.seed or 0,
                                       device=pick_device(args.device), resume=args.resume,
                                       overwrite=args.overwrite, progress=not args.quiet)
    print((out / "report.md").read_text())
    print(f"wrote {out} ({combined['total_seconds']:.0f} s)")


def run_flags(p):
    p.add_argument("--out", help="run folder to write (default: runs/run-<time>)")
    p.add_argument("--fast", action="store_true", help="tiny sizes and step counts: the whole run in under a minute")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--resume", action="store_true", help="keep the stages an interrupted run finished")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--task", default="reviews", help=f"the toy task: {', '.join(TASKS)} (a verifier task runs "
                                                     "sft, grpo, ppo, dpo and best-of-n, then pass@k)")
    p.add_argument("--workers", type=int, default=None,
                   help="stages at once after collect (default: one per core; with --fast, 1); "
                        "1 runs them one after another in this process, with the same numbers")


def cmd_frontier(args):
    require(args.task in (None, "reviews"), "frontier runs on the reviews task only (its reward model is learned)")
    config = build(FrontierConfig(), fast=FRONTIER_FAST if args.fast else None, seed=args.seed,
                   overrides=[args.set]).validate()
    out = out_dir(args)
    summary = run_frontier(config, out, base_dir=args.base, fast=args.fast, device=pick_device(args.device),
                           resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    print((out / "frontier.md").read_text())
    print(f"wrote {out} ({summary['total_seconds'] / 60:.1f} min)")


def frontier_flags(p):
    add_stage_flags(p)
    p.add_argument("--from", dest="base", default=None,
                   help="a finished `run` folder whose sft/, prefs/ and rm/ are reused (default: train them)")


def cmd_export(args):
    kind = export(args.model, args.out, overwrite=args.overwrite)
    loader = "AutoModelForCausalLM" if kind == "lm" else "AutoModelForSequenceClassification"
    print(f"wrote {args.out}: load it with transformers' {loader}.from_pretrained and "
          f"AutoTokenizer.from_pretrained (docs/scale.md)")


def export_flags(p):
    p.add_argument("--model", required=True, help="a stage folder with model.pt: sft, ppo, dpo (a GPT2LMHeadModel) "
                                                  "or rm (a one-label GPT2ForSequenceClassification)")
    p.add_argument("--out", required=True, help="folder to write the Hugging Face checkpoint into")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds")


def version():
    """The installed package's version; from a plain checkout, the one pyproject.toml declares."""
    from importlib import metadata
    try:
        return metadata.version("minirlhf")
    except metadata.PackageNotFoundError:
        import re
        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        found = re.search(r'^version = "(.+)"', pyproject.read_text(), re.M) if pyproject.exists() else None
        return found.group(1) if found else "unknown"


# ---------------------------------------------------------------------------
# The command table: name -> (function, help, extra flags)

def data_flags(p):
    p.add_argument("--seed", type=int, default=0, help="the same seed writes byte-identical files")
    p.add_argument("--task", default="reviews", help=f"whose datasets to write: {', '.join(TASKS)}")
    p.add_argument("--out", default=None, help="folder to write into (default: data/; a task with its own "
                                               "folder writes <out>/<task>/)")


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


# Instructors: the student copy and grading (minirlhf/course/, docs/instructor.md)

def cmd_make_student(args):
    result = make_student(args.out, overwrite=args.overwrite)
    names = ", ".join(name for name, _ in result["stubbed"])
    print(f"wrote the student copy to {args.out}: {result['files']} files, "
          f"{len(result['stubbed'])} exercises stubbed ({names}); hidden tests and instructor-only code left out")


def make_student_flags(p):
    p.add_argument("out", metavar="OUT", help="folder to write the student copy into (must be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a student copy made earlier in OUT")


def cmd_grade(args):
    if grading is None:
        raise ExerciseError("grading runs from the instructor's repository (this copy has no grader)")
    for name in args.exercise:
        exercises.get(name)
    seed = args.seed if args.seed is not None else secrets.randbelow(10**6)
    path = Path(args.path)
    if args.json and Path(args.json).is_symlink():
        raise ExerciseError(f"{args.json} is a symlink: refusing to write a grade through it")
    if not path.is_dir():
        raise ExerciseError(f"{path} is not a folder")
    if (path / "minirlhf").is_dir():  # one student copy
        plan = grading.make_plan(seed, set(args.exercise) or None, limit_s=args.limit)
        hidden = [grading.REPO] + ([Path(args.json).resolve().parent] if args.json else [])
        record = grading.grade_submission(path, plan=plan, seed=seed, hidden=hidden, isolate=not args.no_isolation,
                                        echo=print)
        if args.json:
            grading.write_private(args.json, json.dumps(record, indent=1) + "\n")
            print(f"wrote {args.json}")
        return
    out = Path(args.out or "grades")
    rows = gradebook.grade_class(path, out, seed=seed, jobs=args.jobs, isolate=not args.no_isolation,
                                 only=set(args.exercise) or None, limit_s=args.limit, progress=not args.quiet)
    for row in rows:
        print(f"  {row['student']:<30} {row['points']:>5g} / {row['max_points']}  {row['notes'][:90]}")
    print(f"wrote {out / 'gradebook.csv'} and a feedback file per student in {out}/ ({len(rows)} submissions)")


def grade_flags(p):
    p.add_argument("path", metavar="STUDENT_DIR|SUBMISSIONS_DIR",
                   help="a student copy, or a folder of submissions (folders or .zip files, one per student)")
    p.add_argument("--json", default=None, help="one student: write the gradebook record to this file")
    p.add_argument("--out", default=None, help="a class: folder for gradebook.csv and the feedback files "
                                               "(default: grades/)")
    p.add_argument("--jobs", type=int, default=None, help="a class: submissions graded at once (default: cores)")
    p.add_argument("--exercise", action="append", default=[], metavar="NAME", help="grade only this exercise")
    p.add_argument("--seed", type=int, default=None, help="seed of the random reference inputs (default: fresh)")
    p.add_argument("--limit", type=float, default=None, metavar="S",
                   help="seconds each exercise may run (default 10)")
    p.add_argument("--no-isolation", action="store_true",
                   help="no namespaces or read-only mounts (limits and the separate process stay)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


COMMANDS = {
    "run": (cmd_run, "the whole pipeline (SFT, preferences, RM, PPO, GRPO, RLOO, DPO, baselines) and a report", run_flags),
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
    "pft": (cmd_pft, "baseline: Preferred-FT, SFT on the chosen responses (DPO's batches and evaluation)", dpo_flags),
    "bon": (cmd_bon, "baseline: Best-of-N samples of the SFT model ranked by the reward model", bon_flags),
    "frontier": (cmd_frontier, "the reward-vs-KL frontier sweep of DPO, PPO and baselines (DPO paper Fig. 2)",
                 frontier_flags),
    "sample": (cmd_sample, "sample completions from a trained model folder", sample_flags),
    "export": (cmd_export, "a Hugging Face checkpoint of a stage folder, to continue in transformers and TRL",
               export_flags),
    "make-student": (cmd_make_student, "instructors: write a student copy, solutions replaced by stubs",
                     make_student_flags),
    "grade": (cmd_grade, "instructors: score a student copy, or a class into a CSV gradebook (sandboxed)",
              grade_flags),
}


def make_parser():
    parser = argparse.ArgumentParser(prog="python -m minirlhf", description="minirlhf: RLHF built from scratch")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--version", action="version", version=f"minirlhf {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text, add_flags) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # SUPPRESS: without the flag here, a --debug given before the command still counts
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
        add_flags(p)
    return parser


REPORT_TO = "your instructor or the kit's maintainers"
# Errors the user can fix: one line and exit code 2. OSError covers a full disk, no permission, a
# folder where a file was expected, as the operating system words it.
EXPECTED = (ConfigError, DataError, FileNotFoundError, ExerciseError, SamplingError, OSError)


def main(argv=None):
    args = make_parser().parse_args(argv)
    try:
        for name in ("seed",):                       # every command's seeds: in [0, 2**32)
            check_seed(getattr(args, name, None), f"--{name}")
        COMMANDS[args.command][0](args)
    except EXPECTED as e:
        if args.debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except NotImplementedError as e:  # a stub of the student copy: name the exercise, no traceback
        if args.debug or unfinished_message(e) is None:
            raise
        print(f"error: {unfinished_message(e)}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"\n{e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:          # Ctrl-C outside a training loop (loading, evaluation)
        if args.debug:
            raise
        print("\ninterrupted; nothing was saved since the last checkpoint. With a checkpoint.pt in --out, "
              "run the same command with --resume to continue.", file=sys.stderr)
        return 130
    except Exception as e:             # a bug: say so in one line, keep the traceback in a file
        if args.debug:
            raise
        saved = save_traceback()
        print(f"error: unexpected {type(e).__name__}: {one_line(e)} -- this is a bug in minirlhf; please report "
              f"it to {REPORT_TO} with the traceback {'saved in ' + saved if saved else 'that --debug shows'}",
              file=sys.stderr)
        return 1
    return 0


def one_line(error):
    """The error's message on one line; an OSError names its file and the system's reason."""
    if isinstance(error, OSError) and error.strerror and not isinstance(error, FileNotFoundError):
        return f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    text = " ".join(str(error).split())
    return text[:500] or type(error).__name__


def save_traceback():
    """Write the current exception's traceback to a file in the temporary folder; its path, or None."""
    try:
        with tempfile.NamedTemporaryFile("w", prefix="minirlhf-traceback-", suffix=".txt", delete=False) as f:
            f.write(f"minirlhf {version()}: python -m minirlhf {' '.join(sys.argv[1:])}\n\n")
            traceback.print_exc(file=f)
            return f.name
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
