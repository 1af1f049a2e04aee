"""Threads and sharing the CPU: each stage alone with 1 and 2 threads, and two at once.

    python benchmarks/bench_threads.py --from runs/<a finished run>   # default sizes, ~15 min on 2 cores
    python benchmarks/bench_threads.py --from runs/<a run> --fast     # plumbing check, tiny sizes

Each stage runs as its own process (as a user would run it), with its step count cut so
that one run takes seconds, at the model and batch sizes of the default configuration
(or of --fast). Three settings of the process's threads:

    spin     torch's defaults (one thread per core, idle OpenMP threads spin): the kit before #23
    kit      what the kit now sets by itself (minirlhf/threads.py)
    1 thread OMP_NUM_THREADS=1

"alone" is one process on an otherwise idle machine; "pair" starts two identical
processes at once and reports the slower one's time. The ratios (pair / alone) are what
matter: two processes on two cores should each take at most about 2x their solo time.
Make sure nothing else runs while this measures: it *is* the thing being measured.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SETTINGS = {
    "spin": {"MINIRLHF_THREADS": "off"},
    "kit": {},
    "1 thread": {"OMP_NUM_THREADS": "1"},
}


def stage_args(stage, src):
    """The command line of a shortened stage, reading its inputs from the finished run `src`."""
    return {
        "sft": ["sft", "--set", "steps=60", "eval_every=60", "n_eval_samples=32"],
        "rm": ["rm", "--sft", f"{src}/sft", "--prefs", f"{src}/prefs/rankings.jsonl", "--set", "steps=40",
               "eval_every=40"],
        "ppo": ["ppo", "--sft", f"{src}/sft", "--rm", f"{src}/rm", "--set", "iterations=3", "eval_every=3",
                "n_periodic_eval=32", "n_eval_samples=32"],
        "dpo": ["dpo", "--sft", f"{src}/sft", "--prefs", f"{src}/prefs/pairs.jsonl", "--set", "steps=40",
                "n_eval_samples=32"],
    }[stage]


def environment(setting):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "MKL_", "MINIRLHF_THREADS"))}
    env.update(SETTINGS[setting])
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def start(stage, src, setting, out, fast):
    command = [sys.executable, "-m", "minirlhf", *stage_args(stage, src), "--out", str(out), "--quiet",
               "--overwrite", *(["--fast"] if fast else [])]
    return subprocess.Popen(command, env=environment(setting), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def timed(processes):
    """Wait for every process; the wall time of each, in seconds (an error stops the benchmark)."""
    t0, times = time.perf_counter(), {}
    while len(times) < len(processes):
        for i, p in enumerate(processes):
            if i not in times and p.poll() is not None:
                times[i] = time.perf_counter() - t0
                if p.returncode != 0:
                    sys.exit(f"a benchmarked stage failed:\n{p.stderr.read()}")
        time.sleep(0.05)
    return [times[i] for i in range(len(processes))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="src", required=True, help="a finished `run` folder (its sft, prefs, rm)")
    parser.add_argument("--stages", default="sft,rm,ppo,dpo")
    parser.add_argument("--fast", action="store_true", help="tiny sizes: checks the benchmark runs, measures little")
    args = parser.parse_args()
    src = Path(args.src).resolve()
    print(f"threads per process, {os.cpu_count()} CPUs; stages cut to a few steps "
          f"({'--fast' if args.fast else 'default'} sizes); seconds, pair = the slower of two at once\n")
    print("| stage | setting | alone (s) | pair (s) | pair / alone |")
    print("|---|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages.split(","):
            start(stage, src, "kit", Path(tmp) / "warm", args.fast).wait()       # page in files and caches
            for setting in SETTINGS:
                alone, = timed([start(stage, src, setting, Path(tmp) / "a", args.fast)])
                pair = max(timed([start(stage, src, setting, Path(tmp) / f"p{i}", args.fast) for i in (0, 1)]))
                print(f"| {stage} | {setting} | {alone:.1f} | {pair:.1f} | {pair / alone:.2f} |", flush=True)


if __name__ == "__main__":
    main()
