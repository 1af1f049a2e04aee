"""The reward-vs-KL frontier of the DPO paper (Rafailov et al. 2023, Fig. 2), at toy scale.

`python -m minirlhf frontier` trains, from one SFT model, one preference set and one reward
model:

* DPO (the paper's loss, `dpo.PLAIN_DPO`) over β, RPO (the kit's default DPO: the NLL term
  on the chosen responses added) over β, PPO over the KL coefficient β, PPO-GT (PPO on the
  gold judge itself), Preferred-FT, each evaluated periodically during training, and
  Best-of-N for several N;
* every evaluation is a point (KL(π‖π_SFT), gold reward), measured the same way
  (`evaluate.evaluate_policy`): Fig. 2 left is the scatter of these points with each
  method's frontier (the best gold reward reached at or below each KL);
* the temperature plot (Fig. 2 right's analogue): the final policies' win rate against SFT
  samples (temperature 1), judged by the gold judge, as their sampling temperature varies;
* over-optimisation (Gao et al. 2022): a long PPO run with no KL penalty, proxy and gold
  reward against KL, with their functional forms fitted (`optimum.fit_gao`);
* GRPO and RLOO (critic-free RL, `grpo.py`) over the KL coefficient β, beside PPO;
* the ceiling (`optimum.py`): the best gold reward any policy can reach at each KL,
  π*_β ∝ π_SFT·exp(g/β), estimated from many SFT samples of each evaluation prompt, and
  every method's efficiency against it;
* seed bands (`--set band_seeds=2`, off by default): the headline methods (PPO, GRPO, RPO,
  Best-of-N) at their stage defaults again with other seeds, so the plot shows how far a
  point moves when training is repeated, not only when its evaluation is resampled. Best-of-N
  trains nothing: its band is sampling noise only. The base models (SFT, preferences, reward
  model) are shared by every seed, so their noise is in no band.

The runs are independent, so they run side by side as processes, one thread each, as many
at once as there are cores (`parallel.py`; `--set workers=1` runs them one after another in
this process, also on one thread: the same numbers).

The report states which frontier is higher at each KL budget, from the measured points;
it does not assume the paper's answer.
"""
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from minirlhf import baselines, dpo, grpo, optimum, ppo, runs
from minirlhf.checkpoints import load_gpt
from minirlhf.config import ConfigError, build, require, validate
from minirlhf.data import default_path, read_prompts
from minirlhf.files import load_torch, read_json, save_torch, write_json
from minirlhf.frontier_report import (COLOURS, best_within, efficiency_table, frontier_envelope,  # noqa: F401
                                      plot_ceiling_convergence, plot_frontier, plot_overoptimisation, write_report)
from minirlhf.optim import step_generator
from minirlhf.parallel import Job, run_jobs, run_jobs_here
from minirlhf.pipeline import stage_functions
from minirlhf.sampling import sample_completions
from minirlhf.tasks import get_task
from minirlhf.tokenizer import load_tokenizer


@dataclasses.dataclass
class FrontierConfig:
    """The sweep. Lists are comma-separated so `--set dpo_betas=0.1,1` works."""
    dpo_betas: str = "0.1,0.25,0.5,1.0,2.0"   # DPO's β values (the paper's loss: dpo.PLAIN_DPO)
    rpo_betas: str = "0.25,1.0"               # RPO's β values (dpo's defaults: DPO + the NLL term)
    ppo_kl_coefs: str = "0.02,0.05,0.2,0.5"   # PPO's per-token KL coefficients β
    ppo_gt_kl_coefs: str = "0.02,0.05,0.2"    # PPO on the gold reward (PPO-GT), its own β sweep
    grpo_kl_coefs: str = "0.02,0.05,0.2"      # GRPO's β (k1 in the reward, as PPO)
    rloo_kl_coefs: str = "0.05,0.2"           # RLOO's β
    bon_ns: str = "1,4,16,64"                 # Best-of-N sample counts
    temperatures: str = "0.25,0.5,0.75,1.0"   # sampling temperatures for the win-rate plot
    n_eval: int = 128                         # test prompts per periodic evaluation
    ppo_eval_every: int = 10                  # PPO iterations between evaluations
    dpo_eval_every: int = 40                  # DPO steps between evaluations (Preferred-FT: a fifth of it)
    overopt_iterations: int = 60              # length of the no-KL PPO run (over-optimisation)
    ceiling_samples: int = 1024               # SFT samples per evaluation prompt for the ceiling (0: no ceiling)
    ceiling_min_ess: float = 32.0             # draw the ceiling only where this many samples carry it (ESS)
    band_seeds: int = 0                       # extra seeds for the headline methods' bands (2: three seeds in all)
    band_methods: str = "ppo,grpo,rpo,best_of_n"  # which methods get bands, each at its stage default setting
    workers: int = 0                          # runs at once, one process each (0: one per core)
    seed: int = 0                             # seed of every run

    validate = validate

    def check_together(self):
        for name in ("dpo_betas", "rpo_betas", "ppo_kl_coefs", "ppo_gt_kl_coefs", "grpo_kl_coefs", "rloo_kl_coefs",
                     "bon_ns", "temperatures"):
            try:
                values = floats(getattr(self, name))
            except ValueError:
                raise ConfigError(f"{name} must be comma-separated numbers, got {getattr(self, name)!r}")
            require(all(v >= 0 for v in values), f"{name} must not be negative")
        require(all(b > 0 for b in floats(self.dpo_betas) + floats(self.rpo_betas)),
                       "dpo_betas and rpo_betas must be positive")
        require(all(t > 0 for t in floats(self.temperatures)), "temperatures must be positive")
        require(self.n_eval >= 2, "n_eval must be at least 2")
        require(all(n >= 1 and n == int(n) for n in floats(self.bon_ns)), "bon_ns must be whole numbers >= 1")
        require(self.ppo_eval_every > 0 and self.overopt_iterations > 0,
                       "ppo_eval_every and overopt_iterations must be positive")
        require(self.dpo_eval_every >= 0, "dpo_eval_every must be >= 0 (0: final evaluation only)")
        require(self.ceiling_samples == 0 or self.ceiling_samples >= 16,
                "ceiling_samples must be 0 (no ceiling) or at least 16")
        require(self.ceiling_min_ess >= 1, "ceiling_min_ess must be >= 1")
        require(self.workers >= 0, "workers must be >= 0 (0: one per core)")
        require(self.band_seeds >= 0, f"band_seeds must be >= 0 (0: no seed bands), got {self.band_seeds}")
        unknown = [m for m in names(self.band_methods) if m not in BAND_SETTINGS]
        require(not unknown, f"band_methods: unknown method {', '.join(unknown)}; "
                             f"choose from {', '.join(BAND_SETTINGS)}")


FAST = dict(dpo_betas="0.1,1.0", rpo_betas="0.25", ppo_kl_coefs="0.05,0.5", ppo_gt_kl_coefs="0.05",
            grpo_kl_coefs="0.05", rloo_kl_coefs="0.05", bon_ns="1,4", temperatures="0.5,1.0", n_eval=32,
            ppo_eval_every=4, dpo_eval_every=10, overopt_iterations=12, ceiling_samples=256)
# Notebook 05 under MINIRLHF_FAST=1 (issue #20): one setting per method, 16 prompts per evaluation, a ceiling
# trusted down to 8 effective samples, one extra seed for two bands: every part of the sweep runs, and its
# numbers show nothing (plumbing only). Its base models are tiny too, so its runs go one after another in the
# notebook's process (workers=1): starting a process per run cost more than running two at once saved
# (a tiny sweep: 57 s side by side, 32 s in one process, the same numbers). On full-size base models the
# runs are long enough for two cores to pay: FAST keeps one process per core.
NOTEBOOK_FAST = {**FAST, "dpo_betas": "0.1", "ppo_kl_coefs": "0.05", "ppo_gt_kl_coefs": "", "rloo_kl_coefs": "",
                 "temperatures": "1.0", "n_eval": 16, "overopt_iterations": 4, "ceiling_samples": 64,
                 "ceiling_min_ess": 8.0, "band_seeds": 1, "band_methods": "ppo,best_of_n", "workers": 1}


class SweepFailed(RuntimeError):
    """Some runs of the sweep failed; the others finished and --resume keeps them."""


def floats(text):
    return [float(v) for v in str(text).split(",") if v.strip()]


def names(text):
    return [v.strip() for v in str(text).split(",") if v.strip()]


# ---------------------------------------------------------------------------
# The runs

TRAINERS = {"dpo": dpo.train_dpo, "rpo": dpo.train_dpo, "preferred_ft": baselines.train_preferred_ft,
            "ppo": ppo.train_ppo, "ppo_gt": ppo.train_ppo, "grpo": grpo.train_grpo, "rloo": grpo.train_grpo}
PREFERENCE_METHODS = ("dpo", "rpo", "preferred_ft")
# A band repeats one setting per method: the stage's default, the kit's tuned value (the sweep's best
# is known only once the sweep has run). Best-of-N keeps every N of bon_ns.
BAND_SETTINGS = {"dpo": ("dpo_betas", dpo.PLAIN_DPO["beta"]), "rpo": ("rpo_betas", dpo.DPOConfig().beta),
                 "ppo": ("ppo_kl_coefs", ppo.PPOConfig().kl_coef),
                 "ppo_gt": ("ppo_gt_kl_coefs", ppo.PPOConfig().kl_coef),
                 "grpo": ("grpo_kl_coefs", grpo.GRPOConfig().kl_coef),
                 "rloo": ("rloo_kl_coefs", grpo.GRPOConfig().kl_coef), "best_of_n": ("bon_ns", None)}


def sweep_runs(config, fast):
    """(method, label, stage config) for every training run of the sweep, in report order."""
    def stage(defaults, fast_overrides, variant=None, **extra):
        return build(defaults, variant=variant, fast=fast_overrides if fast else None, seed=config.seed,
                     overrides=[extra])

    evals = dict(n_periodic_eval=config.n_eval, n_eval_samples=config.n_eval)
    points = []
    for method, betas, variant in (("dpo", config.dpo_betas, dpo.PLAIN_DPO), ("rpo", config.rpo_betas, None)):
        for beta in floats(betas):
            points.append((method, f"β={beta:g}", stage(dpo.DPOConfig(), dpo.FAST, variant=variant, beta=beta,
                                                        eval_every=config.dpo_eval_every, **evals)))
    points.append(("preferred_ft", "", stage(baselines.PreferredFTConfig(), baselines.PREFERRED_FT_FAST,
                                             eval_every=max(1, config.dpo_eval_every // 5), **evals)))
    for method, coefs, cls, fast_overrides, extra in (
            ("ppo", config.ppo_kl_coefs, ppo.PPOConfig, ppo.FAST, {}),
            ("ppo_gt", config.ppo_gt_kl_coefs, ppo.PPOConfig, ppo.FAST, dict(reward="gold")),
            ("grpo", config.grpo_kl_coefs, grpo.GRPOConfig, grpo.FAST, {}),
            ("rloo", config.rloo_kl_coefs, grpo.GRPOConfig, grpo.FAST, dict(advantage="rloo"))):
        for coef in floats(coefs):
            points.append((method, f"β={coef:g}", stage(cls(), fast_overrides, kl_coef=coef,
                                                        eval_every=config.ppo_eval_every, **evals, **extra)))
    for n in floats(config.bon_ns):
        points.append(("best_of_n", f"N={int(n)}", stage(baselines.BestOfNConfig(), baselines.BEST_OF_N_FAST,
                                                        n=int(n), n_eval_samples=config.n_eval)))
    return points


def band_runs(config, fast):
    """(method, label, seed, stage config) for every run of the seed bands: each band method at its
    setting in BAND_SETTINGS, for the sweep's seed and `band_seeds` more; empty without bands."""
    if not config.band_seeds:
        return []
    methods = names(config.band_methods)
    only = {field: str(value) for m, (field, value) in BAND_SETTINGS.items() if value is not None}
    runs_ = []
    for seed in range(config.seed, config.seed + config.band_seeds + 1):
        one = dataclasses.replace(config, seed=seed, **only)
        runs_ += [(m, label, seed, cfg) for m, label, cfg in sweep_runs(one, fast) if m in methods]
    return runs_


def run_dir_of(out, method, label, seed=None):
    """runs/ppo_beta0.05; a band's run at another seed than the sweep's: runs/ppo_beta0.05_seed1."""
    name = f"{method}{'_' + label.replace('β=', 'beta').replace('N=', 'n') if label else ''}"
    return out / "runs" / (name if seed is None else f"{name}_seed{seed}")


def train_point(method, config, base, out_dir, resume=False, overwrite=False, device="cpu", progress=False):
    """One training run of the sweep, in its own process (`parallel.run_jobs`; its bar is the
    parent's) or in this one (`workers=1`: its own bar)."""
    base, kw = Path(base), dict(device=device, overwrite=overwrite, progress=progress)
    if method == "best_of_n":
        return baselines.run_best_of_n(config, base / "sft", base / "rm", out_dir, **kw)
    second = base / "prefs" / "rankings.jsonl" if method in PREFERENCE_METHODS else base / "rm"
    return TRAINERS[method](config, base / "sft", second, out_dir, resume=resume, **kw)


# ---------------------------------------------------------------------------
# The ceiling: many samples of the SFT model per evaluation prompt, scored by the gold judge

@torch.no_grad()
def sample_ceiling(base, path, n_samples, n_prompts, seed, device="cpu", batch_size=256):
    """Save the gold reward of `n_samples` SFT samples of each of the first `n_prompts` test
    prompts (the prompts every method is evaluated on) as a (P, N) tensor at `path`."""
    tokenizer, gold_fn = load_tokenizer(), get_task("reviews").gold_reward
    model = load_gpt(Path(base) / "sft", tokenizer=tokenizer).to(device)
    prompts = read_prompts(default_path("prompts_test"))[:n_prompts]
    per_chunk = max(1, batch_size // n_samples) if n_samples < batch_size else 1
    rows = []
    for chunk, start in enumerate(range(0, len(prompts), per_chunk)):
        repeated = [p for p in prompts[start:start + per_chunk] for _ in range(n_samples)]
        completions = sample_completions(model, tokenizer, repeated, batch_size=batch_size, temperature=1.0,
                                         max_new_tokens=48, max_prompt_tokens=16,
                                         generator=step_generator(seed, -1000 - chunk))
        gold = torch.tensor(gold_fn([p + c for p, c in zip(repeated, completions)]), dtype=torch.float64)
        rows.append(gold.view(-1, n_samples))                                  # (prompts in chunk, N)
        if runs.on_step is not None:
            runs.on_step("ceiling", min(start + per_chunk, len(prompts)), len(prompts))
    save_torch(torch.cat(rows), path)


def ceiling_summary(gold, min_ess):
    """The ceiling curve at the full sample count, and at fewer samples to show its convergence."""
    betas = [2.0 ** k for k in range(3, -9, -1)] + [0.005, 0.003, 0.002, 0.001]
    n = gold.shape[1]
    sizes = sorted({min(n, s) for s in (16, 64, 256, 1024, 4096, n)})
    return {"n_samples": n, "n_prompts": gold.shape[0], "min_ess": min_ess, "log_n": float(torch.log(torch.tensor(n))),
            "curve": optimum.ceiling_curve(gold, betas, min_ess),
            "convergence": {str(s): optimum.ceiling_curve(gold[:, :s], betas, min_ess) for s in sizes}}


def band_curves(band):
    """{method: {"setting", "curves": {seed: [(KL, gold), …]}, "sems"}} for the seed bands: a trained
    method's curve is its run's evaluations in order; Best-of-N's is one final point per N (bon_ns's order).
    "sems": each run's final standard error of the gold reward, the sampling noise of one evaluation."""
    bands = {}
    for method, label, seed, _, run_dir in band:
        summary = read_json(run_dir / "summary.json")
        entry = bands.setdefault(method, {"setting": label, "curves": {}, "sems": []})
        if method == "best_of_n" and label not in entry["setting"].split(","):
            entry["setting"] += "," + label
        curve = entry["curves"].setdefault(str(seed), [])
        curve += points_of(run_dir, summary)[-1:] if method == "best_of_n" else points_of(run_dir, summary)
        entry["sems"].append(summary.get("eval/gold_reward_sem"))
    return bands


def points_of(run_dir, summary):
    """(KL, gold) points: every periodic evaluation in metrics.jsonl, then the final summary."""
    points = []
    metrics = Path(run_dir) / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            row = json.loads(line)
            if "eval/gold_reward" in row and "eval/kl" in row:
                points.append((row["eval/kl"], row["eval/gold_reward"]))
    points.append((summary.get("eval/kl", 0.0), summary["eval/gold_reward"]))
    return points


# ---------------------------------------------------------------------------
# Win rate against SFT samples as the sampling temperature varies

@torch.no_grad()
def win_rates(policy_dirs, base, temperatures, n_eval, seed):
    """{method: [win rate at each temperature]} against SFT samples at temperature 1 (ties count ½)."""
    tokenizer, gold_fn = load_tokenizer(), get_task("reviews").gold_reward
    prompts = read_prompts(default_path("prompts_test"))[:n_eval]
    kw = dict(max_new_tokens=48, max_prompt_tokens=16)

    def golds(model, temperature, salt):
        completions = sample_completions(model, tokenizer, prompts, temperature=temperature,
                                         generator=step_generator(seed, salt), **kw)
        return gold_fn([p + c for p, c in zip(prompts, completions)])

    baseline = golds(load_gpt(base / "sft", tokenizer=tokenizer), 1.0, -7)
    rates = {}
    for method, run_dir in policy_dirs.items():
        model = load_gpt(run_dir, tokenizer=tokenizer)
        rates[method] = [statistics.mean(1.0 if a > b else 0.5 if a == b else 0.0
                                         for a, b in zip(golds(model, t, -8), baseline)) for t in temperatures]
    return rates


# ---------------------------------------------------------------------------
# The whole sweep

def run_frontier(config, out_dir, base_dir=None, fast=False, device="cpu", resume=False, overwrite=False,
                 progress=True):
    """Run the sweep into `out_dir` and write frontier.png, overoptimisation.png, frontier.md, summary.json.

    `base_dir` is a `run` folder whose sft/, prefs/ and rm/ are reused; without it they are
    trained into out_dir/base first.
    """
    config.validate()
    out = Path(out_dir)
    if (out / "summary.json").exists() and not (overwrite or resume):
        raise ConfigError(f"{out} already holds a finished sweep; pass --overwrite or choose another --out")
    if (out / "runs").exists() and not (overwrite or resume):
        raise ConfigError(f"{out} holds an unfinished sweep; pass --resume to continue it, --overwrite to "
                                 "start again, or choose another --out")
    started = time.perf_counter()
    base = Path(base_dir) if base_dir else out / "base"
    if base_dir is None:
        stages = stage_functions(base, fast, config.seed, device, progress, resume=resume, overwrite=overwrite)
        for name, run in stages[:3]:   # sft, prefs, rm
            if not (resume and (base / name / "summary.json").exists()):
                run()
    for needed in ("sft", "prefs", "rm"):
        require((base / needed / "summary.json").exists(), f"{base / needed} is missing: pass a finished "
                       "`python -m minirlhf run` folder as --from, or leave --from out")

    results = {"sft": [{"label": "", "points": [(0.0, read_json(base / "sft" / "summary.json")["eval/gold_reward"])]}]}
    points = sweep_runs(config, fast)
    overopt_dir, ceiling_path = out / "runs" / "ppo_overoptimisation", out / "runs" / "ceiling_gold.pt"
    overopt_config = build(ppo.PPOConfig(), fast=ppo.FAST if fast else None, seed=config.seed,   # evaluated every
                           overrides=[dict(kl_coef=0.0, iterations=config.overopt_iterations, eval_every=1,  # iteration
                                           n_periodic_eval=config.n_eval, n_eval_samples=config.n_eval)])
    band = [(m, label, seed, cfg, run_dir_of(out, m, label, None if seed == config.seed else seed))
            for m, label, seed, cfg in band_runs(config, fast)]
    jobs = []
    for method, label, cfg, run_dir in ([(m, label, cfg, run_dir_of(out, m, label)) for m, label, cfg in points]
                                        + [("ppo", "overoptimisation", overopt_config, overopt_dir)]
                                        + [(m, label, cfg, run_dir) for m, label, _, cfg, run_dir in band]):
        if not (resume and (run_dir / "summary.json").exists()) and run_dir.name not in {j.name for j in jobs}:
            jobs.append(Job(run_dir.name, "minirlhf.experiments:train_point", dict(
                method=method, config=cfg, base=str(base), out_dir=str(run_dir), device=device, overwrite=overwrite,
                resume=resume and (run_dir / "checkpoint.pt").exists(), progress=progress and config.workers == 1)))
    if config.ceiling_samples and not (resume and ceiling_path.exists()):
        jobs.append(Job("ceiling", "minirlhf.experiments:sample_ceiling", dict(
            base=str(base), path=str(ceiling_path), n_samples=config.ceiling_samples, n_prompts=config.n_eval,
            seed=config.seed, device=device)))
    # the two longest jobs first, so that no core waits alone on one of them at the end of the sweep
    jobs.sort(key=lambda job: job.name not in ("ceiling", overopt_dir.name))
    (out / "runs").mkdir(parents=True, exist_ok=True)
    # workers=1: one run after another in this process (no process to start per run: at the fast
    # sizes that start costs more than the run), on one thread as a child has: the same numbers
    outcomes = (run_jobs_here(jobs) if config.workers == 1 else
                run_jobs(jobs, workers=config.workers or None, progress=progress))
    failed = [o for o in outcomes.values() if o.status != "done"]
    if failed:
        raise SweepFailed("; ".join(f"{o.name}: {o.error}" for o in failed) +
                          f" — the other runs finished; fix the cause and rerun with --resume to train only these")
    seconds = {o.name: o.seconds for o in outcomes.values()}

    finals = {}
    for method, label, _ in points:
        run_dir = run_dir_of(out, method, label)
        summary = read_json(run_dir / "summary.json")
        results.setdefault(method, []).append({"label": label, "dir": str(run_dir), "points": points_of(run_dir, summary),
                                               "final": {k: v for k, v in summary.items() if k != "eval/samples"},
                                               "wall_seconds": seconds.get(run_dir.name)})
        finals.setdefault(method, run_dir)   # the first setting of each method goes into the win-rate plot

    bands = band_curves(band)

    # Over-optimisation (Gao et al. 2022): no KL penalty, a long run, proxy and gold against KL.
    overopt = [r for r in map(json.loads, (overopt_dir / "metrics.jsonl").read_text().splitlines())
               if "eval/gold_reward" in r]
    # its starting point: Best-of-1 is the SFT model's own samples on the same test prompts, scored
    # by the same reward model and gold judge
    best_of_1 = [r["final"] for r in results.get("best_of_n", []) if r["label"] == "N=1"]
    if best_of_1 and "eval/proxy_reward" in best_of_1[0]:
        overopt.insert(0, {"step": 0, "eval/kl": 0.0, "eval/gold_reward": best_of_1[0]["eval/gold_reward"],
                           "eval/proxy_reward": best_of_1[0]["eval/proxy_reward"]})

    ceiling = None
    if config.ceiling_samples:
        ceiling = ceiling_summary(load_torch(ceiling_path), config.ceiling_min_ess)
        plot_ceiling_convergence(ceiling, out / "ceiling_convergence.png")
    temperatures = floats(config.temperatures)
    rates = win_rates({m: finals[m] for m in ("ppo", "grpo", "rloo", "dpo", "rpo", "preferred_ft", "ppo_gt")
                       if m in finals}, base, temperatures, config.n_eval, config.seed)
    plot_frontier(results, temperatures, rates, out / "frontier.png", ceiling=ceiling, bands=bands)
    plot_overoptimisation(overopt, out / "overoptimisation.png")
    summary = {"results": results, "win_rates": {"temperatures": temperatures, **rates},
               "overoptimisation": [{k: r[k] for k in ("step", "eval/kl", "eval/gold_reward", "eval/proxy_reward")}
                                    for r in overopt],
               "ceiling": ceiling, "efficiency": efficiency_table(results, ceiling), "bands": bands,
               "band_seeds": config.band_seeds, "base": str(base), "fast": fast, "seed": config.seed,
               "n_eval": config.n_eval,
               "workers": config.workers or None, "run_seconds": seconds,
               "total_seconds": time.perf_counter() - started}
    write_report(summary, out / "frontier.md")
    write_json(out / "summary.json", summary)
    return summary
