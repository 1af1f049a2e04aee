"""The frontier's envelope, its plots and the written report of the sweep (`minirlhf.experiments`).

Everything here reads measured points; the sentences are generated from them, so the
report says whichever frontier came out higher, by how much, and at which KL.
"""
import math
import statistics

from minirlhf.files import atomic_write_text
from minirlhf.optimum import best_of_n_kl_bound, ceiling_at, fit_gao
from minirlhf.runs import figure

COLOURS = {"dpo": "tab:red", "rpo": "tab:brown", "ppo": "tab:blue", "ppo_gt": "tab:purple", "grpo": "tab:cyan",
           "rloo": "tab:olive", "preferred_ft": "tab:green", "best_of_n": "tab:orange", "sft": "black"}

KL_BUDGETS = [0.5, 1, 2, 4, 8, 16, 32]
NAMES = {"sft": "SFT", "dpo": "DPO", "rpo": "RPO (DPO + NLL, the kit's default)", "ppo": "PPO (reward model)",
         "ppo_gt": "PPO-GT (gold reward)", "grpo": "GRPO (reward model)", "rloo": "RLOO (reward model)",
         "preferred_ft": "Preferred-FT", "best_of_n": "Best-of-N"}


def frontier_envelope(points):
    """The best gold reward reached at or below each KL: sorted by KL, running maximum of gold."""
    envelope, best = [], float("-inf")
    for kl, gold in sorted(points):
        if gold > best:
            best = gold
            envelope.append((kl, gold))
    return envelope


def best_within(points, budget):
    """Highest gold reward among points with KL ≤ budget (None if there are none)."""
    golds = [g for kl, g in points if kl <= budget]
    return max(golds) if golds else None


def _all_points(runs):
    return [p for run in runs for p in run["points"]]


def efficiency_table(results, ceiling):
    """Each method's best gold reward within every KL budget, the ceiling's gold there, and their ratio
    (None where the method has no point or the ceiling is not trusted): what notebook 05 reads."""
    best = {m: [best_within(_all_points(runs), b) for b in KL_BUDGETS] for m, runs in results.items()}
    roofs = [ceiling_at(ceiling["curve"], b) if ceiling else None for b in KL_BUDGETS]
    ratio = {m: [None if v is None or r is None else v / r for v, r in zip(values, roofs)]
             for m, values in best.items()}
    return {"budgets": KL_BUDGETS, "ceiling": roofs, "best": best, "efficiency": ratio}


# ---------------------------------------------------------------------------
# Seed bands: the same setting trained with several seeds


def band_stats(curves):
    """Mean and standard deviation over seeds, point by point: curves {seed: [(KL, gold), …]} of equal
    settings (cut to the shortest). Returns rows (kl, gold, sd_kl, sd_gold); sd is 0 with one seed."""
    length = min(len(c) for c in curves.values())
    rows = []
    for i in range(length):
        kls, golds = [c[i][0] for c in curves.values()], [c[i][1] for c in curves.values()]
        sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0
        rows.append((statistics.mean(kls), statistics.mean(golds), sd(kls), sd(golds)))
    return rows


def noise_of(method):
    """What a band's spread holds: Best-of-N trains nothing, so its seeds only resample."""
    return "sampling only" if method == "best_of_n" else "training + sampling"


def plot_frontier(results, temperatures, rates, path, ceiling=None, bands=None):
    """Left: gold reward vs KL, every evaluation as a dot, each method's frontier as a line, the
    ceiling (where its estimate is trusted) and the seed bands (mean ± 1 s.d. over seeds, shaded, with
    error bars in KL and gold at the last point). Right: win rate against SFT samples vs temperature."""
    fig, (left, right) = figure(1, 2, figsize=(11, 4.2))
    if ceiling:
        trusted = [r for r in ceiling["curve"] if r["trusted"]]
        left.plot([r["kl"] for r in trusted], [r["gold"] for r in trusted], "k--", lw=1.6,
                  label=f"ceiling π*_β (estimate, {ceiling['n_samples']} SFT samples/prompt)")
    for method, runs in results.items():
        points = _all_points(runs)
        left.scatter([p[0] for p in points], [p[1] for p in points], s=12, alpha=0.45, color=COLOURS[method])
        envelope = frontier_envelope(points)
        left.plot([p[0] for p in envelope], [p[1] for p in envelope], "-o", ms=3, color=COLOURS[method],
                  label=NAMES[method])
    for method, band in (bands or {}).items():
        rows = sorted(band_stats(band["curves"]))
        kl, gold, sd_kl, sd_gold = zip(*rows)
        left.fill_between(kl, [g - s for g, s in zip(gold, sd_gold)], [g + s for g, s in zip(gold, sd_gold)],
                          color=COLOURS[method], alpha=0.18, lw=0)
        left.errorbar(kl[-1], gold[-1], xerr=sd_kl[-1], yerr=sd_gold[-1], fmt="s", ms=4, capsize=3,
                      color=COLOURS[method], label=f"{NAMES[method].split(' (')[0]} {band['setting']}: mean ± 1 s.d., "
                      f"{len(band['curves'])} seeds ({noise_of(method)})")
    left.set_xscale("symlog", linthresh=1.0)
    left.set_xlabel("KL(π ‖ π_SFT), nats (symlog)")
    left.set_ylabel("gold reward")
    left.set_title("Reward vs KL frontier (cf. DPO paper, Fig. 2 left)")
    left.grid(alpha=0.3)
    left.legend(fontsize=7, loc="lower right")
    for method, values in rates.items():
        right.plot(temperatures, values, "-o", color=COLOURS[method], label=NAMES[method])
    right.axhline(0.5, color="grey", ls="--", lw=1)
    right.set_xlabel("sampling temperature")
    right.set_ylabel("win rate vs SFT samples (gold judge)")
    right.set_title("Win rate vs temperature (cf. Fig. 2 right)")
    right.set_ylim(0, 1)
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return fig


def plot_ceiling_convergence(ceiling, path):
    """The ceiling estimated from 16, 64, … samples per prompt: where the curves agree, it has converged."""
    fig, ax = figure(figsize=(6, 4.2))
    for size, curve in ceiling["convergence"].items():
        trusted = [r for r in curve if r["trusted"]]
        ax.plot([r["kl"] for r in curve], [r["gold"] for r in curve], ":", lw=1, alpha=0.6)
        ax.plot([r["kl"] for r in trusted], [r["gold"] for r in trusted], "-o", ms=3,
                color=ax.lines[-1].get_color(), label=f"N = {size} (log N = {math.log(int(size)):.1f} nats)")
    ax.set_xlabel("KL(π*_β ‖ π_SFT), nats (estimate)")
    ax.set_ylabel("gold reward of π*_β (estimate)")
    ax.set_title("The ceiling as the samples per prompt grow\n(solid: median ESS ≥ "
                 f"{ceiling['min_ess']:g}; dotted: not trusted)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_overoptimisation(rows, path):
    """Gold and proxy reward against KL along one long PPO run without a KL penalty (Gao et al. 2022)."""
    fig, ax = figure(figsize=(5.5, 4))
    kls = [r["eval/kl"] for r in rows]
    ax.plot(kls, [r["eval/gold_reward"] for r in rows], "-o", ms=3, label="gold reward", color="tab:green")
    ax.set_xlabel("KL(π ‖ π_SFT), nats")
    ax.set_ylabel("gold reward", color="tab:green")
    twin = ax.twinx()
    twin.plot(kls, [r["eval/proxy_reward"] for r in rows], "-s", ms=3, label="proxy (RM) reward", color="tab:red")
    twin.set_ylabel("proxy reward (normalised RM score)", color="tab:red")
    ax.set_title("Over-optimisation: PPO with β = 0")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def schedule_words(workers):
    """How the sweep's runs shared the machine, as the report's first line says it."""
    if workers == 1:
        return "one run after another in one process"
    return f"{workers or 'one per core'} runs at a time"


def write_report(summary, path):
    results = summary["results"]
    methods = [m for m in NAMES if m in results]
    lines = ["# Reward vs KL frontier", "",
             f"Seed {summary['seed']}, {'fast' if summary['fast'] else 'full'} sweep, "
             f"{summary['total_seconds'] / 60:.1f} minutes "
             f"({schedule_words(summary.get('workers'))}, one thread each). Base models (SFT, preferences, reward model): "
             f"`{summary['base']}`. Every point is one evaluation: gold reward and KL(π‖π_SFT) "
             "of one sample per test prompt (Best-of-N: the analytic KL bound log N − (N−1)/N).", "",
             "![frontier](frontier.png)", "", "## Best gold reward within a KL budget", "",
             "| method | " + " | ".join(f"KL ≤ {b:g}" for b in KL_BUDGETS) + " |",
             "| --- |" + " ---: |" * len(KL_BUDGETS)]
    best = {m: [best_within(_all_points(results[m]), b) for b in KL_BUDGETS] for m in methods}
    for m in methods:
        lines.append(f"| {NAMES[m]} | " + " | ".join("–" if v is None else f"{v:.3f}" for v in best[m]) + " |")
    lines += ["", *comparison(best, "dpo", "ppo", summary["n_eval"]),
              "", *comparison(best, "rpo", "ppo", summary["n_eval"]), "", "## Every run", "",
              "| method | setting | final gold reward | final KL | train seconds | wall seconds |",
              "| --- | --- | ---: | ---: | ---: | ---: |"]
    for m in methods:
        for run in results[m]:
            final = run.get("final", {})
            gold, kl = run["points"][-1][1], run["points"][-1][0]
            lines.append(f"| {NAMES[m]} | {run['label']} | {gold:.3f} | {kl:.2f} | "
                         f"{final.get('train/seconds', 0.0):.1f} | {_fmt_s(run.get('wall_seconds'))} |")
    rates = summary["win_rates"]
    temps = rates["temperatures"]
    lines += ["", "## Win rate against SFT samples by sampling temperature", "",
              "| method | " + " | ".join(f"T={t:g}" for t in temps) + " |", "| --- |" + " ---: |" * len(temps)]
    for m, values in rates.items():
        if m != "temperatures":
            lines.append(f"| {NAMES[m]} (first setting) | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    lines += ["", "## Over-optimisation", "", "![over-optimisation](overoptimisation.png)", "",
              *overoptimisation_sentences(summary["overoptimisation"]), "", *gao_fits(summary)]
    lines += ["", *band_section(summary)]
    if summary.get("ceiling"):
        lines += ["", *ceiling_section(summary["ceiling"], efficiency_table(results, summary["ceiling"]), methods,
                                       results)]
    atomic_write_text(path, "\n".join(lines) + "\n")


def ceiling_section(ceiling, table, methods, results):
    """The ceiling's curve, its convergence, and each method's efficiency against it."""
    trusted = [r for r in ceiling["curve"] if r["trusted"]]
    top = trusted[-1]
    lines = ["## The ceiling: the best any policy can reach", "",
             f"π*_β ∝ π_SFT·exp(g/β) (DPO eq. 4 with the gold reward g) maximises gold reward at each KL. "
             f"Estimated by self-normalised weights from {ceiling['n_samples']} SFT samples of each of the "
             f"{ceiling['n_prompts']} evaluation prompts (`minirlhf/optimum.py`). A finite sample cannot express a "
             f"KL above log N = {ceiling['log_n']:.1f} nats; the curve is drawn and used only where the median "
             f"effective sample size is at least {ceiling['min_ess']:g}: up to KL {top['kl']:.2f} "
             f"(gold {top['gold']:.3f}). It is an estimate: a method's point above it means noise in its "
             "evaluation, or an estimate not converged.", "",
             "![convergence](ceiling_convergence.png)", "",
             "| samples per prompt | " + " | ".join(f"KL ≤ {b:g}" for b in KL_BUDGETS) + " |",
             "| --- |" + " ---: |" * len(KL_BUDGETS)]
    for size, curve in ceiling["convergence"].items():
        lines.append(f"| {size} | " + " | ".join(_fmt(ceiling_at(curve, b)) for b in KL_BUDGETS) + " |")
    lines += ["", "Each method's **efficiency**: its best gold reward within the KL budget divided by the "
              "ceiling's at that KL (– where the ceiling is not trusted or the method has no point).", "",
              "| method | " + " | ".join(f"KL ≤ {b:g}" for b in KL_BUDGETS) + " |", "| --- |" + " ---: |" * len(KL_BUDGETS)]
    for m in methods:
        lines.append(f"| {NAMES[m]} | " + " | ".join("–" if e is None else f"{e:.2f}" for e in table["efficiency"][m])
                     + " |")
    lines.append("")
    for run in results.get("best_of_n", []):
        n = int(run["label"].split("=")[1])
        kl, gold = run["points"][-1]
        roof = ceiling_at(ceiling["curve"], kl)
        lines.append(f"- Best-of-{n}: KL {kl:.2f} (the bound log N − (N−1)/N = {best_of_n_kl_bound(n):.2f} of "
                     f"Beirami et al. 2024, used as its KL), gold {gold:.3f}, ceiling at that KL "
                     + ("not trusted" if roof is None else f"{roof:.3f}: efficiency {gold / roof:.2f}") + ".")
    return lines


def band_section(summary):
    """Which noise the report's numbers include: the seed bands' spread against one evaluation's."""
    bands = summary.get("bands") or {}
    out = ["## Noise: seed bands", ""]
    if not bands:
        return out + [f"No seed bands in this sweep (band_seeds = 0): every run used seed {summary['seed']}, so the "
                      "only noise this report accounts for is **sampling** noise in each evaluation (the "
                      "two-standard-error rule above); how far a point moves when training is repeated is not "
                      "measured. `--set band_seeds=2` trains the headline methods on two more seeds."]
    out += [f"The headline methods at their default settings, trained with {summary.get('band_seeds', 0)} more "
            "seed(s) than the sweep's; the plot shades mean ± 1 standard deviation over seeds. The base models "
            "(SFT, preferences, reward model) are the same for every seed, so their noise is in no band.", "",
            "| method | setting | seeds | final KL, mean ± s.d. | final gold, mean ± s.d. | one evaluation's "
            "s.e. (median) | noise in the band |", "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for method, band in bands.items():
        kl, gold, sd_kl, sd_gold = band_stats(band["curves"])[-1]
        sems = [s for s in band["sems"] if s is not None]
        out.append(f"| {NAMES[method]} | {band['setting']} | {len(band['curves'])} | {kl:.2f} ± {sd_kl:.2f} | "
                   f"{gold:.3f} ± {sd_gold:.3f} | {_fmt(statistics.median(sems) if sems else None)} "
                   f"| {noise_of(method)} |")
    training = [NAMES[m] for m in bands if noise_of(m) != "sampling only"]
    sampling = [NAMES[m] for m in bands if noise_of(m) == "sampling only"]
    out += ["", f"Bands that include training noise: {', '.join(training) or 'none'}. Sampling-only bands: "
            f"{', '.join(sampling) or 'none'}" + (" (Best-of-N trains nothing: its seeds draw other samples)"
                                                  if sampling else "") +
            ". Every method without a band in this report is one seed: sampling noise only."]
    return out


def gao_fits(summary):
    """Gao et al. 2022's functional forms fitted to the kit's own curves (d = √KL)."""
    out = ["### Over-optimisation's functional forms (Gao et al. 2022)", "",
           "Gold reward gained over the SFT model, fitted by least squares: RL d·(α − β·log d) on the no-KL "
           "PPO run, Best-of-N d·(α − β·d) on the Best-of-N points.", "",
           "| curve | form | α | β | R² | points |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    rows = summary["overoptimisation"]
    bon = [run["points"][-1] for run in summary["results"].get("best_of_n", [])]
    sft = summary["results"]["sft"][0]["points"][0][1]
    for name, points, base in (("PPO, β = 0", [(r["eval/kl"], r["eval/gold_reward"]) for r in rows],
                                rows[0]["eval/gold_reward"] if rows else sft), ("Best-of-N", bon, sft)):
        for form, label in (("rl", "d(α − β log d)"), ("bon", "d(α − β d)")):
            if len(points) < 3:
                out.append(f"| {name} | {label} | – | – | – | {len(points)} (too few to fit) |")
                continue
            fit = fit_gao([k for k, _ in points], [g - base for _, g in points], form)
            out.append(f"| {name} | {label} | {fit['alpha']:.3f} | "
                       f"{fit['beta']:.3f} | {fit['r2']:.3f} | {len(points)} |")
    return out


def _fmt_s(seconds):
    return "–" if seconds is None else f"{seconds:.0f}"


def _fmt(value):
    return "–" if value is None else f"{value:.3f}"


def comparison(best, a, b, n_eval):
    """Sentences comparing two methods' frontiers at every budget where both have a point.

    A gap counts only if it exceeds twice its standard error. Each point is a mean of n_eval
    gold rewards in [0, 1], whose variance is at most g(1 − g) (Bhatia-Davis), so
    se ≤ sqrt(g(1 − g)/n_eval): a conservative bound that needs no per-sample record.
    """
    if a not in best or b not in best:
        return []
    pairs = [(budget, x, y) for budget, x, y in zip(KL_BUDGETS, best[a], best[b]) if x is not None and y is not None]
    if not pairs:
        return [f"{NAMES[a]} and {NAMES[b]} have no points at a common KL budget."]
    se = lambda g: (max(g * (1 - g), 0.0) / n_eval) ** 0.5
    noise = [2 * (se(x) ** 2 + se(y) ** 2) ** 0.5 for _, x, y in pairs]
    higher = sum(x - y > n for (_, x, y), n in zip(pairs, noise))
    lower = sum(y - x > n for (_, x, y), n in zip(pairs, noise))
    out = [f"Of {len(pairs)} KL budgets where both have points, {NAMES[a]}'s frontier is clearly higher at "
           f"{higher}, clearly lower at {lower}, and within noise (gap < 2 standard errors, {n_eval} prompts "
           f"per evaluation) at {len(pairs) - higher - lower}:"]
    out += [f"- KL ≤ {budget:g}: {NAMES[a]} {x:.3f} vs {NAMES[b]} {y:.3f} ({x - y:+.3f}, noise ±{n:.3f})"
            for (budget, x, y), n in zip(pairs, noise)]
    return out


def overoptimisation_sentences(rows):
    if not rows:
        return ["The over-optimisation run logged no evaluations."]
    first, last = rows[0], rows[-1]
    peak = max(rows, key=lambda r: r["eval/gold_reward"])
    hacked = (last["eval/proxy_reward"] > peak["eval/proxy_reward"]
              and last["eval/gold_reward"] < peak["eval/gold_reward"] - 0.05)
    verdict = ("the proxy reward kept rising while the gold reward fell: reward hacking" if hacked
               else "the gold reward did not fall clearly in this run")
    where = "the SFT model" if first["step"] == 0 else f"iteration {first['step']}"
    return [f"From gold {first['eval/gold_reward']:.3f} and proxy {first['eval/proxy_reward']:.2f} at {where} "
            f"(KL {first['eval/kl']:.1f}), the gold reward peaked at {peak['eval/gold_reward']:.3f} (iteration "
            f"{peak['step']}, KL {peak['eval/kl']:.1f}, proxy {peak['eval/proxy_reward']:.2f}); at the end of the "
            f"run it was {last['eval/gold_reward']:.3f} at KL {last['eval/kl']:.1f} with proxy "
            f"{last['eval/proxy_reward']:.2f}: {verdict}."]
