"""Plumbing shared by the course notebooks: run folders, and the stages they share.

This is not course material — the RLHF logic lives in `minirlhf/` and the notebooks call
it directly. This file only makes notebooks 01–06 agree on the settings of the stages
they share (the SFT model, the preference data, the reward model), so that each stage is
trained once and its run folder reused by the notebooks after it:

    runs/notebooks/full/sft      notebook 01 trains it; 02, 03, 04 and 06 reuse it
    runs/notebooks/full/prefs    02 collects it; 03 and 04 reuse it
    runs/notebooks/full/rm       02 trains it; 03 and 06 reuse it
    runs/notebooks/full/ppo      03 trains it; 06 reuses it
    runs/notebooks/full/rlvr_*   07's arithmetic models (SFT, GRPO, GRPO on the lenient verifier): its own

Every notebook still runs on its own: a missing stage is trained on the spot. A run is
reused only if its config.json records the same settings and its inputs (the upstream run
folders) have not been retrained since; otherwise it is trained again (`retrain=True`
forces that). With MINIRLHF_FAST=1 the folders are under
runs/notebooks/fast/ and every stage is tiny. MINIRLHF_NOTEBOOK_RUNS=DIR moves the
folders (the notebook tests use a fresh temporary folder).

In a student copy, importing this module also installs `skip_unfinished` (below): a cell that
runs into an unfinished exercise prints one line naming it, and the notebook goes on.
"""
import contextlib
import dataclasses
import inspect
import json
import os
import time
import warnings
from pathlib import Path

from tqdm import TqdmWarning

warnings.filterwarnings("ignore", category=TqdmWarning)  # no ipywidgets: tqdm falls back to text bars

from minirlhf import collect as collect_stage, reward as reward_stage  # noqa: E402
from minirlhf.collect import CollectConfig, collect  # noqa: E402
from minirlhf.config import build  # noqa: E402
from minirlhf.course.exercises import unfinished_message  # noqa: E402
from minirlhf.grpo import train_grpo  # noqa: E402
from minirlhf.reward import RewardConfig, preferences_file, train_reward_model  # noqa: E402
from minirlhf.sft import SFTConfig, train_sft  # noqa: E402

FAST = os.environ.get("MINIRLHF_FAST") == "1"
REPO = Path(__file__).resolve().parent.parent
RUNS = Path(os.environ.get("MINIRLHF_NOTEBOOK_RUNS") or REPO / "runs" / "notebooks") / ("fast" if FAST else "full")
PROGRESS = not FAST  # progress bars in full runs only (CI logs stay short)

# ---------------------------------------------------------------------------
# Settings: the kit's defaults, or its fast ones (each stage's FAST dict) with MINIRLHF_FAST=1.

# SFT's fast model is smaller still: tests/helpers.py's TINY_SFT, ~4 s, mostly fluent reviews (gold ~0.45).
TINY_SFT = dict(steps=250, n_layer=2, n_embd=48, n_head=2, eval_every=50, n_eval_samples=64, warmup_steps=10,
                lr=5e-3, batch_size=32)


def stage_config(config, fast_overrides, **overrides):
    """`config` with the stage's fast overrides under MINIRLHF_FAST=1, then `overrides`."""
    return build(config, fast=fast_overrides if FAST else None, overrides=[overrides])


def sft_config():
    return stage_config(SFTConfig(), TINY_SFT)


def collect_config(**overrides):
    return stage_config(CollectConfig(), collect_stage.FAST, **overrides)


def reward_config(**overrides):
    return stage_config(RewardConfig(), reward_stage.FAST, **overrides)


# ---------------------------------------------------------------------------
# Train once, reuse afterwards


def _recorded(out_dir):
    """The config.json of a finished run in out_dir, or None."""
    if not (out_dir / "summary.json").exists() or not (out_dir / "config.json").exists():
        return None
    return json.loads((out_dir / "config.json").read_text())


_announced = set()  # run folders whose reuse was already announced


def run_once(train_fn, config, name, *inputs, retrain=False, **kwargs):
    """`train_fn(config, *inputs, RUNS/name)` unless that folder holds a finished run with the
    same config and inputs. Returns (summary dict, run folder)."""
    out_dir = RUNS / name
    wanted = json.loads(json.dumps(dataclasses.asdict(config)))        # as config.json stores it
    recorded = _recorded(out_dir)
    same = (recorded is not None and all(recorded.get(k) == v for k, v in wanted.items())
            and (out_dir / "inputs.json").exists()
            and json.loads((out_dir / "inputs.json").read_text()) == _fingerprints(inputs))
    if same and not retrain:
        if out_dir not in _announced:
            print(f"reusing the finished run in {_short(out_dir)} (delete it, or pass retrain=True, to train again)")
            _announced.add(out_dir)
        return json.loads((out_dir / "summary.json").read_text()), out_dir
    started = time.perf_counter()
    (out_dir / "inputs.json").unlink(missing_ok=True)
    with keep_plot_backend():
        summary = train_fn(config, *inputs, out_dir, overwrite=True, progress=PROGRESS, **kwargs)
    (out_dir / "inputs.json").write_text(json.dumps(_fingerprints(inputs)))
    print(f"trained {name} in {time.perf_counter() - started:.0f} s -> {_short(out_dir)}")
    return summary, out_dir


def _fingerprints(inputs):
    """Each input path with the time its run finished: a retrained upstream stage (a new
    summary.json, or a rewritten file) makes the stages built on it train again."""
    prints = []
    for item in inputs:
        path = Path(item)
        stamp = path / "summary.json" if path.is_dir() else path
        prints.append(f"{path}@{stamp.stat().st_mtime_ns if stamp.exists() else 0}")
    return prints


@contextlib.contextmanager
def keep_plot_backend():
    """Restore matplotlib's backend afterwards: the stages save their plots after
    `matplotlib.use("Agg")`, which would otherwise stop a notebook from showing figures."""
    import matplotlib
    backend = matplotlib.get_backend()
    try:
        yield
    finally:
        if matplotlib.get_backend() != backend:
            shell = _ipython()
            if shell is not None and "inline" in backend:
                shell.run_line_magic("matplotlib", "inline")   # also re-registers the PNG display of figures
            else:
                import matplotlib.pyplot as plt
                plt.switch_backend(backend)


def _ipython():
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


def _short(path):
    with contextlib.suppress(ValueError):
        return str(Path(path).relative_to(REPO))
    return str(path)


# ---------------------------------------------------------------------------
# The shared stages


def sft(retrain=False):
    """The SFT model of notebook 01: (summary, run folder)."""
    return run_once(train_sft, sft_config(), "sft", retrain=retrain)


def preferences(retrain=False):
    """Rankings of SFT samples by the simulated labeler (notebook 02): (summary, run folder)."""
    _, sft_dir = sft()
    return run_once(collect, collect_config(), "prefs", sft_dir, retrain=retrain)


def reward_model(retrain=False):
    """The reward model of notebook 02, trained on the rankings of `preferences`: (summary, run folder)."""
    _, sft_dir = sft()
    _, prefs_dir = preferences()
    config = reward_config()
    prefs_file = preferences_file(prefs_dir, config.loss)
    return run_once(train_reward_model, config, "rm", sft_dir, prefs_file, retrain=retrain)


def train_grpo_verifier(config, sft_dir, out_dir, **kwargs):
    """GRPO with reward="gold" and no reward model (notebook 07): `train_grpo` in run_once's shape."""
    return train_grpo(config, sft_dir, None, out_dir, **kwargs)


@contextlib.contextmanager
def skip_if_unfinished():
    """Around a cell's code that calls an exercise of the kit: in a student copy where that
    exercise is not written yet, print one line naming it instead of a traceback, so that
    "Run All" goes on with the rest of the notebook. Any other error is raised as usual."""
    try:
        yield
    except NotImplementedError as error:
        message = unfinished_message(error)
        if message is None:
            raise
        print(f"skipped the rest of this cell: {message}")


def where(obj):
    """'minirlhf/losses.py:234': the file and first line of a function or class, to open beside a notebook."""
    obj = inspect.unwrap(obj)                       # look through decorators such as @torch.no_grad
    path = Path(inspect.getsourcefile(obj)).resolve()
    return f"{path.parent.name}/{path.name}:{inspect.getsourcelines(obj)[1]}"


def read_metrics(run_dir):
    """The rows of a run folder's metrics.jsonl."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------
# A student copy runs top to bottom: a cell that needs an unfinished exercise says so in one line

SKIP_MARK = "⏭ skipped:"       # the tests look for it
skipped = []                    # the exercises that made a cell skip, in order


def _skip_or_raise(error):
    """Print one line and swallow `error` if it is an exercise's stub (or a name a skipped cell
    would have defined); raise anything else."""
    from minirlhf.course.exercises import EXERCISES, unfinished_exercise
    name = unfinished_exercise(error)
    if name is not None:
        where = next(("the exercise cell above" if e.file.endswith(".ipynb") else
                      f"{e.file}, introduced in {Path(e.notebook).stem}" for e in EXERCISES if e.name == name), "")
        skipped.append(name)
        print(f"{SKIP_MARK} this cell needs the exercise `{name}` ({where}); write it, then run the cell again")
    elif skipped and (isinstance(error, NameError) or (isinstance(error, FileNotFoundError)
                                                       and str(RUNS) in str(error.filename))):
        # what a skipped cell would have defined or trained
        print(f"{SKIP_MARK} this cell needs what a cell above would have made ({error}); "
              f"unfinished: {', '.join(dict.fromkeys(skipped))}")
    else:
        raise error


def _show(value):
    if value is not None:
        from IPython.display import display
        display(value)


class _GuardCells:
    """IPython AST transformer: runs each cell's body inside `try`, handing errors to _skip_or_raise.
    A cell whose last line is an expression still shows its value."""

    def visit(self, module):
        import ast
        body = module.body
        if not body:
            return module
        if isinstance(body[-1], ast.Expr):          # keep Jupyter's display of the last expression
            body = body[:-1] + [ast.Expr(ast.Call(ast.Attribute(ast.Name("_course_guard", ast.Load()), "_show",
                                                                ast.Load()), [body[-1].value], []))]
        handler = ast.ExceptHandler(ast.Name("Exception", ast.Load()), "_unfinished_error", [ast.Expr(ast.Call(
            ast.Attribute(ast.Name("_course_guard", ast.Load()), "_skip_or_raise", ast.Load()),
            [ast.Name("_unfinished_error", ast.Load())], []))])
        guarded = ast.Module([ast.Try(body, [handler], [], [])], [])
        return ast.fix_missing_locations(ast.copy_location(guarded, module))


def skip_unfinished():
    """Install the guard in the running IPython kernel (only in a student copy; no-op elsewhere)."""
    shell = _ipython()
    if shell is None or not (REPO / ".minirlhf-student.json").exists():
        return
    if not any(isinstance(t, _GuardCells) for t in shell.ast_transformers):
        import sys
        shell.user_ns["_course_guard"] = sys.modules[__name__]
        shell.ast_transformers.append(_GuardCells())


skip_unfinished()


# ---------------------------------------------------------------------------
# The picture of the pipeline (notebook 01 shows it)


def draw_pipeline():
    """RLHF's three steps (InstructGPT Fig. 2), as the kit runs them, drawn with matplotlib."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
    fig, ax = plt.subplots(figsize=(11, 3.8))
    ax.set(xlim=(0, 11), ylim=(-0.2, 3.6)); ax.axis("off")
    steps = [("1 · SFT  (notebook 01)", "demonstrations\n(prompt, completion)", "train_sft:\nnext-token NLL", "SFT model π_SFT"),
             ("2 · reward model  (02)", "SFT samples ranked\nby simulated labelers", "train_reward_model:\nBradley-Terry / K-wise",
              "reward model r_φ"),
             ("3 · RL  (03; 04: DPO)", "prompts; π starts at π_SFT", "train_ppo: maximise\nr_φ − β·KL(π‖π_SFT)",
              "policy π")]
    for i, (title, data, algo, model) in enumerate(steps):
        x = 0.2 + 3.7 * i
        ax.text(x + 1.6, 3.35, title, ha="center", fontsize=11, weight="bold")
        for y, text, colour in ((2.45, data, "#dbe9f6"), (1.45, algo, "#fde9c9"), (0.45, model, "#d9f0d3")):
            ax.add_patch(FancyBboxPatch((x, y), 3.2, 0.7, boxstyle="round,pad=0.05", fc=colour, ec="gray"))
            ax.text(x + 1.6, y + 0.35, text, ha="center", va="center", fontsize=9)
        for y in (2.45, 1.45):
            ax.add_patch(FancyArrowPatch((x + 1.6, y), (x + 1.6, y - 0.28), arrowstyle="-|>", mutation_scale=12))
        if i < 2:   # this step's model feeds the next step's data
            ax.add_patch(FancyArrowPatch((x + 3.25, 0.8), (x + 3.75, 2.6), arrowstyle="-|>", mutation_scale=14,
                                         color="tab:green", lw=1.5))
    ax.text(5.5, 0.02, "green arrows: each step's model feeds the next — π_SFT writes the samples that are ranked; "
            "r_φ scores the rollouts and π_SFT is the KL reference.\nDPO (notebook 04) skips the reward model and "
            "trains π on the ranked comparisons directly.", ha="center", fontsize=8, color="dimgray")
    fig.tight_layout()
    return fig
