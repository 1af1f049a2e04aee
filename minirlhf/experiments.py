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
  reward against KL.

The report states which frontier is higher at each KL budget, from the measured points;
it does not assume the paper's answer.
"""
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minirlhf import baselines, dpo, ppo
from minirlhf.checkpoints import load_gpt
from minirlhf.config import ConfigError, build, require, validate
from minirlhf.data import default_path, read_prompts
from minirlhf.files import read_json, write_json
from minirlhf.frontier_report import (COLOURS, best_within, frontier_envelope, plot_frontier,  # noqa: F401
                                      plot_overoptimisation, write_report)
from minirlhf.optim import step_generator
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
    ppo_gt_kl_coefs: str = "0.05"             # PPO on the gold reward (PPO-GT)
    bon_ns: str = "1,4,16,64"                 # Best-of-N sample counts
    temperatures: str = "0.25,0.5,0.75,1.0"   # sampling temperatures for the win-rate plot
    n_eval: int = 128                         # test prompts per periodic evaluation
    ppo_eval_every: int = 10                  # PPO iterations between evaluations
    dpo_eval_every: int = 40                  # DPO steps between evaluations (Preferred-FT: a fifth of it)
    overopt_iterations: int = 60              # length of the no-KL PPO run (over-optimisation)
    seed: int = 0                             # seed of every run

    validate = validate

    def check_together(self):
        for name in ("dpo_betas", "rpo_betas", "ppo_kl_coefs", "ppo_gt_kl_coefs", "bon_ns", "temperatures"):
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


FAST = dict(dpo_betas="0.1,1.0", rpo_betas="0.25", ppo_kl_coefs="0.05,0.5", ppo_gt_kl_coefs="0.05",
            bon_ns="1,4", temperatures="0.5,1.0", n_eval=32, ppo_eval_every=4, dpo_eval_every=10,
            overopt_iterations=12)


def floats(text):
    return [float(v) for v in str(text).split(",") if v.strip()]


# ---------------------------------------------------------------------------
# The runs

def sweep_runs(config, fast):
    """(method, label, run(out_dir, base, resume=False, overwrite=False) -> summary) for every point of the sweep."""
    seed, kw = config.seed, dict(progress=False)

    def stage(defaults, fast_overrides, variant=None, **extra):
        return build(defaults, variant=variant, fast=fast_overrides if fast else None, seed=seed, overrides=[extra])

    runs = []
    for method, betas, variant in (("dpo", config.dpo_betas, dpo.PLAIN_DPO), ("rpo", config.rpo_betas, None)):
        for beta in floats(betas):
            cfg = stage(dpo.DPOConfig(), dpo.FAST, variant=variant, beta=beta, eval_every=config.dpo_eval_every,
                        n_periodic_eval=config.n_eval, n_eval_samples=config.n_eval)
            runs.append((method, f"β={beta:g}", lambda out, b, cfg=cfg, **more: dpo.train_dpo(
                cfg, b / "sft", b / "prefs" / "rankings.jsonl", out, **kw, **more)))
    cfg = stage(baselines.PreferredFTConfig(), baselines.PREFERRED_FT_FAST,
                eval_every=max(1, config.dpo_eval_every // 5), n_periodic_eval=config.n_eval,
                n_eval_samples=config.n_eval)
    runs.append(("preferred_ft", "", lambda out, b, cfg=cfg, **more: baselines.train_preferred_ft(
        cfg, b / "sft", b / "prefs" / "rankings.jsonl", out, **kw, **more)))
    for reward, coefs in (("rm", config.ppo_kl_coefs), ("gold", config.ppo_gt_kl_coefs)):
        for coef in floats(coefs):
            cfg = stage(ppo.PPOConfig(), ppo.FAST, reward=reward, kl_coef=coef, eval_every=config.ppo_eval_every,
                        n_periodic_eval=config.n_eval, n_eval_samples=config.n_eval)
            runs.append(("ppo" if reward == "rm" else "ppo_gt", f"β={coef:g}",
                         lambda out, b, cfg=cfg, **more: ppo.train_ppo(cfg, b / "sft", b / "rm", out, **kw, **more)))
    for n in floats(config.bon_ns):
        cfg = stage(baselines.BestOfNConfig(), baselines.BEST_OF_N_FAST, n=int(n), n_eval_samples=config.n_eval)
        runs.append(("best_of_n", f"N={int(n)}", lambda out, b, cfg=cfg, resume=False, overwrite=False:
                     baselines.run_best_of_n(cfg, b / "sft", b / "rm", out, overwrite=overwrite, **kw)))
    return runs


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
    finals = {}
    for method, label, run in tqdm(sweep_runs(config, fast), desc="frontier", disable=not progress):
        run_dir = out / "runs" / f"{method}{'_' + label.replace('β=', 'beta').replace('N=', 'n') if label else ''}"
        if resume and (run_dir / "summary.json").exists():
            summary = read_json(run_dir / "summary.json")
        else:
            summary = run(run_dir, base, resume=resume and (run_dir / "checkpoint.pt").exists(), overwrite=overwrite)
        results.setdefault(method, []).append({"label": label, "dir": str(run_dir), "points": points_of(run_dir, summary),
                                               "final": {k: v for k, v in summary.items() if k != "eval/samples"}})
        finals.setdefault(method, run_dir)   # the first setting of each method goes into the win-rate plot

    # Over-optimisation (Gao et al. 2022): no KL penalty, a long run, proxy and gold against KL.
    overopt_dir = out / "runs" / "ppo_overoptimisation"
    if not (resume and (overopt_dir / "summary.json").exists()):
        # evaluated every iteration: without the KL penalty the gold reward peaks within a few iterations
        cfg = build(ppo.PPOConfig(), fast=ppo.FAST if fast else None, seed=config.seed,
                    overrides=[dict(kl_coef=0.0, iterations=config.overopt_iterations, eval_every=1,
                                    n_periodic_eval=config.n_eval, n_eval_samples=config.n_eval)])
        ppo.train_ppo(cfg, base / "sft", base / "rm", overopt_dir, progress=False, overwrite=overwrite,
                      resume=resume and (overopt_dir / "checkpoint.pt").exists())
    overopt = [r for r in map(json.loads, (overopt_dir / "metrics.jsonl").read_text().splitlines())
               if "eval/gold_reward" in r]
    # its starting point: Best-of-1 is the SFT model's own samples on the same test prompts, scored
    # by the same reward model and gold judge
    best_of_1 = [r["final"] for r in results.get("best_of_n", []) if r["label"] == "N=1"]
    if best_of_1 and "eval/proxy_reward" in best_of_1[0]:
        overopt.insert(0, {"step": 0, "eval/kl": 0.0, "eval/gold_reward": best_of_1[0]["eval/gold_reward"],
                           "eval/proxy_reward": best_of_1[0]["eval/proxy_reward"]})

    temperatures = floats(config.temperatures)
    rates = win_rates({m: finals[m] for m in ("ppo", "dpo", "rpo", "preferred_ft", "ppo_gt") if m in finals},
                      base, temperatures, config.n_eval, config.seed)
    plot_frontier(results, temperatures, rates, out / "frontier.png")
    plot_overoptimisation(overopt, out / "overoptimisation.png")
    summary = {"results": results, "win_rates": {"temperatures": temperatures, **rates},
               "overoptimisation": [{k: r[k] for k in ("step", "eval/kl", "eval/gold_reward", "eval/proxy_reward")}
                                    for r in overopt],
               "base": str(base), "fast": fast, "seed": config.seed, "n_eval": config.n_eval,
               "total_seconds": time.perf_counter() - started}
    write_report(summary, out / "frontier.md")
    write_json(out / "summary.json", summary)
    return summary
