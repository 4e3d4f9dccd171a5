"""Learning curves and a results table from the tensorboard logs of finished PPO-TrXL runs.

    python benchmark/plot.py runs                                            # results.png in this folder
    python benchmark/plot.py runs --against ../other-implementation/runs     # two sets of runs side by side
    python benchmark/plot.py runs --exp-name ppo_trxl --against my_variant  # two exp_names of one folder

A run is a folder `{env_id}__{exp_name}__{seed}__{time}` holding `events.out.tfevents.*`, anywhere under the
given folder. Runs are grouped by env id (one panel each) and, within an env, by setting (one curve each): the
exp_name and the configuration, the hyperparameters that the trainer logs to tensorboard except those that do not
change what is learnt (seed, budget, logging, checkpoints, speed). A setting is labelled with its exp_name and the
hyperparameters in which it differs from the other settings of that exp_name in the same env (never env_id, nor the
batch sizes that follow from other flags); when two folders are compared, the shortest end of each folder's path
that tells them apart joins the exp_name. Each panel has a legend of its own below it, long labels wrapped. A curve
is the mean over seeds of the tag, every seed interpolated to a common grid of steps that all of them reached; the
band is the min/max (or +- std) over seeds.

Warnings name what would otherwise be pooled silently: a seed run twice in one setting (the newest run counts),
runs of one setting with different budgets (--total-timesteps), and runs that stopped before their budget.

The table has a row per env and setting. Its scores are each seed's last logged value of the tag (episode/r_mean
already averages the last 100 episodes, so that is the seed's final return); every env is a task of its own, never
pooled with another, since returns of different envs are on different scales.
- final: mean +- std over seeds (population std, ddof 0), as the published results are given;
- IQM: rliable's interquartile mean over seeds (Agarwal et al. 2021: the mean of the middle 50%; below 4 seeds
  nothing is cut, so it is the mean) with its 95% stratified-bootstrap confidence interval, percentile method,
  BOOTSTRAP_REPS resamples seeded with BOOTSTRAP_SEED afresh for every row, so that a row does not change when
  other runs are added. One seed gives an interval of one point;
- published: the final return of the earlier implementation, mean +- std over 3 seeds (episode/r_mean
  only, and only for runs on the env's default task settings, without --reset-params).
A setting whose label is long is named in the table by its exp_name and a number, and the lines below the table give
the label that each number stands for.
"""

import argparse
import math
import os
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from rliable import library, metrics  # noqa: E402
from tensorboard.backend.event_processing import event_accumulator  # noqa: E402

PUBLISHED = {  # REFERENCE.md section 4: final return, mean +- std over 3 seeds
    "MortarMayhem-Grid-v0": (0.99, 0.00),
    "MortarMayhem-v0": (0.99, 0.00),
    "Endless-MortarMayhem-v0": (1.50, 0.02),
    "MysteryPath-Grid-v0": (0.97, 0.01),
    "MysteryPath-v0": (1.67, 0.02),
    "Endless-MysteryPath-v0": (1.84, 0.06),
    "SearingSpotlights-v0": (1.11, 0.08),
    "Endless-SearingSpotlights-v0": (1.60, 0.03),
}
RUN_NAME = re.compile(r"^(?P<env_id>.+?)__(?P<exp_name>.+)__(?P<seed>\d+)__(?P<time>\d+)$")
BOOTSTRAP_REPS = 2000  # about 0.2 s a row; another BOOTSTRAP_SEED moves the ends of an interval by a few % of its width
BOOTSTRAP_SEED = 0
LEGEND_WIDTH = 40  # characters on a line of a curve's label in the plot; longer labels wrap
TABLE_LABEL_WIDTH = 40


NOT_CONFIGURATION = {
    "exp_name",
    "seed",
    "total_timesteps",
    "num_iterations",
    "torch_deterministic",
    "cuda",
    "track",
    "wandb_project_name",
    "wandb_entity",
    "capture_video",
    "save_model",
    "progress",
    "async_envs",
    "compile",
    "checkpoint_interval",
    "checkpoint_minutes",
    "keep_checkpoints",
    "resume",
}
"""Logged hyperparameters that do not change what a run learns: runs that differ only in these are one setting."""
DERIVED = {"batch_size", "minibatch_size"}
"""Logged hyperparameters that the trainer computes from others (num_envs, num_steps, num_minibatches): labels leave
them out."""


@dataclass
class Run:
    env_id: str
    exp_name: str
    seed: int
    time: int
    path: str
    steps: np.ndarray
    values: np.ndarray
    hyperparameters: dict

    @property
    def default_task_settings(self):
        """whether the run kept its env's default task settings (no --reset-params), the only ones published"""
        return self.hyperparameters.get("reset_params", "None") == "None"

    @property
    def configuration(self):
        return tuple(sorted((key, value) for key, value in self.hyperparameters.items() if key not in NOT_CONFIGURATION))


@dataclass
class Setting:
    """The runs of one env with one exp_name (and folder, when two are compared) and one configuration."""

    env_id: str
    name: str
    """the exp_name, followed by the folder's short name when two folders are compared"""
    flags: tuple
    """`key=value` of the hyperparameters in which it differs from the env's other settings of the same name"""
    runs: list

    @property
    def label(self):
        return f"{self.name} {', '.join(self.flags)}" if self.flags else self.name


def hyperparameters(accumulator):
    """{name: value as text} from the `|name|value|` table that the trainer logs as the text `hyperparameters`."""
    if "hyperparameters/text_summary" not in accumulator.Tags()["tensors"]:
        return {}
    table = accumulator.Tensors("hyperparameters/text_summary")[0].tensor_proto.string_val[0].decode()
    rows = [line.strip("|").split("|") for line in table.splitlines()[2:]]
    return {row[0]: row[1] for row in rows if len(row) == 2}


def find_runs(directory, tag):
    """Every run folder under directory with at least one logged value of tag, sorted by env, exp_name, seed."""
    runs = []
    for path, _, files in os.walk(directory):
        match = RUN_NAME.match(os.path.basename(path))
        if not match or not any(name.startswith("events.out.tfevents.") for name in files):
            continue
        guidance = {event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0}
        accumulator = event_accumulator.EventAccumulator(path, size_guidance=guidance)
        accumulator.Reload()
        if tag not in accumulator.Tags()["scalars"]:
            print(f"skipping {path}: no '{tag}' logged (no episode finished yet?)")
            continue
        events = sorted(accumulator.Scalars(tag), key=lambda event: event.step)
        steps = np.array([event.step for event in events], dtype=np.float64)
        values = np.array([event.value for event in events], dtype=np.float64)
        run = Run(match["env_id"], match["exp_name"], int(match["seed"]), int(match["time"]), path, steps, values, {})
        run.hyperparameters = hyperparameters(accumulator)
        runs.append(run)
    return sorted(runs, key=lambda run: (run.env_id, run.exp_name, run.seed))


def folder_names(first, second):
    """The shortest ends of two different folders' absolute paths that tell them apart: ('runs', 'other')."""
    parts = [Path(os.path.abspath(folder)).parts for folder in (first, second)]
    for length in range(1, max(map(len, parts)) + 1):
        ends = [os.path.join(*folder_parts[-length:]) for folder_parts in parts]
        if ends[0] != ends[1]:
            return ends


def differing(configuration, others):
    """`key=value` for every hyperparameter whose value in configuration differs from its value in any of others."""
    own = dict(configuration)
    keys = set()
    for other in map(dict, others):
        keys |= {key for key in own.keys() | other.keys() if own.get(key) != other.get(key)}
    return tuple(f"{key}={own.get(key, '-')}" for key in sorted(keys - DERIVED))


def panels_of(folders):
    """{env_id: [Setting]} from [(folder's short name or None, runs)]: envs sorted, then settings folder by folder,
    each folder's sorted by exp_name and configuration."""
    by_env = {}
    for folder, runs in folders:
        by_setting = {}
        for run in runs:
            by_setting.setdefault((run.env_id, run.exp_name, run.configuration), []).append(run)
        for (env_id, exp_name, configuration), setting_runs in sorted(by_setting.items()):
            name = f"{exp_name} ({folder})" if folder else exp_name
            by_env.setdefault(env_id, {})[name, configuration] = setting_runs
    panels = {}
    for env_id in sorted(by_env):
        settings = by_env[env_id]
        panels[env_id] = []
        for (name, configuration), runs in settings.items():
            same_name = [other for other_name, other in settings if other_name == name]
            panels[env_id].append(Setting(env_id, name, differing(configuration, same_name), runs))
    return panels


def warn_about(setting):
    """Warnings for one setting's runs: seeds run twice (only the newest is kept), budgets that differ, runs that
    stopped before their budget. Returns the runs to pool."""
    label, env_id = setting.label, setting.env_id
    newest = {}
    for run in sorted(setting.runs, key=lambda run: run.time):
        if run.seed in newest:
            print(
                f"warning: {label}: seed {run.seed} of {env_id} was run twice; using {run.path}, not {newest[run.seed].path}"
            )
        newest[run.seed] = run
    kept = [newest[seed] for seed in sorted(newest)]
    budgets = sorted({run.hyperparameters.get("total_timesteps", "?") for run in kept})
    if len(budgets) > 1:
        print(f"warning: {label}: the runs of {env_id} have different budgets (--total-timesteps {', '.join(budgets)})")
    for run in kept:
        iterations, batch_size = run.hyperparameters.get("num_iterations"), run.hyperparameters.get("batch_size")
        if None in (iterations, batch_size):
            continue
        planned = int(iterations) * int(batch_size)
        if run.steps[-1] < planned:
            print(f"warning: {label}: {run.path} is unfinished (last logged step {int(run.steps[-1])} of {planned})")
    return kept


def interquartile_mean(finals):
    """rliable's IQM of the seeds' final values, one env being one task, and its 95% stratified-bootstrap interval.

    finals: (seeds,). Returns (IQM, low, high); one seed gives low = high = IQM."""
    np.random.seed(BOOTSTRAP_SEED)  # rliable 1.2.0 resamples with NumPy's global generator: its random_state is unused
    points, intervals = library.get_interval_estimates(
        {"final": finals[:, np.newaxis]},  # (seeds, tasks = 1)
        lambda scores: np.array([metrics.aggregate_iqm(scores)]),
        reps=BOOTSTRAP_REPS,
    )
    return float(points["final"][0]), float(intervals["final"][0, 0]), float(intervals["final"][1, 0])


def seed_curves(runs, num_points=200):
    """The runs' values on a common step grid, from the latest first step to the earliest last step.

    Returns steps (P,) and values (seeds, P); a single logged point stays a single point.
    """
    first, last = max(run.steps[0] for run in runs), min(run.steps[-1] for run in runs)
    grid = np.linspace(first, last, num_points) if last > first else np.array([last])
    return grid, np.stack([np.interp(grid, run.steps, run.values) for run in runs])


def plot(panels, tag, spread, output):
    """One panel per env: its settings' curves and, below it, a legend of its own that names them."""
    labels = {
        env_id: [textwrap.fill(setting.label, LEGEND_WIDTH, break_long_words=False) for setting in settings]
        for env_id, settings in panels.items()
    }
    legend_lines = 1 + max(sum(label.count("\n") + 1 for label in env_labels) for env_labels in labels.values())
    columns = math.ceil(math.sqrt(len(panels)))
    rows = math.ceil(len(panels) / columns)
    size = (4.5 * columns, (3.4 + 0.2 * legend_lines) * rows)  # inches: a panel and its legend's lines
    figure, axes = plt.subplots(rows, columns, figsize=size, squeeze=False, layout="constrained")
    for ax, (env_id, settings) in zip(axes.flat, panels.items()):
        for i, (setting, label) in enumerate(zip(settings, labels[env_id])):
            steps, values = seed_curves(setting.runs)
            mean = values.mean(0)
            if spread == "std":
                low, high = mean - values.std(0), mean + values.std(0)
            else:
                low, high = values.min(0), values.max(0)
            ax.plot(steps, mean, color=f"C{i}", marker="o" if len(steps) == 1 else None, label=label)
            ax.fill_between(steps, low, high, color=f"C{i}", alpha=0.25, linewidth=0)
        if any(published_result(env_id, setting, tag) for setting in settings):
            ax.axhline(PUBLISHED[env_id][0], color="gray", linestyle="--", linewidth=1, label="published final")
        ax.set_title(env_id)
        ax.set_xlabel("steps")
        ax.set_ylabel(tag)
        ax.grid(alpha=0.3)
        # below the x label: the pad is in units of the legend's font size
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, 0), borderaxespad=4, fontsize="small", frameon=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    band = "min/max" if spread == "minmax" else "+- std"
    figure.suptitle(f"{tag}: mean over seeds, band = {band}")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    figure.savefig(output, dpi=120)
    plt.close(figure)


def published_result(env_id, setting, tag):
    """(mean, std) of the published final return that the setting's runs compare with, or None: the published results
    are final returns on an env's default task settings."""
    if tag == "episode/r_mean" and setting.runs[0].default_task_settings:
        return PUBLISHED.get(env_id)
    return None


def results_table(panels, tag):
    """A markdown table, a row per env and setting, and below it the labels that the table abbreviates."""
    lines = ["| env id | setting | seeds | final | IQM [95% CI] | published |", "| --- | --- | --- | --- | --- | --- |"]
    numbers = {}  # a long label -> its number in the table
    for env_id, settings in panels.items():
        for setting in settings:
            result = published_result(env_id, setting, tag)
            published = "{:.2f} +- {:.2f}".format(*result) if result else "-"
            label = setting.label
            if len(label) > TABLE_LABEL_WIDTH:
                label = f"{setting.name} [{numbers.setdefault(label, len(numbers) + 1)}]"
            finals = np.array([run.values[-1] for run in setting.runs])
            iqm, low, high = interquartile_mean(finals)
            final = f"{finals.mean():.2f} +- {finals.std():.2f}"
            lines.append(f"| {env_id} | {label} | {len(finals)} | {final} | {iqm:.2f} [{low:.2f}, {high:.2f}] | {published} |")
    if numbers:
        lines += [""] + [f"[{number}] {label}" for label, number in numbers.items()]
    return "\n".join(lines)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default."""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("runs", nargs="?", default="runs", help="the folder of runs")
    parser.add_argument("--tag", default="episode/r_mean", help="the scalar to plot and tabulate")
    parser.add_argument("--exp-name", help="only the runs of this exp_name")
    parser.add_argument("--against", help="a second folder of runs, or a second exp_name in the first folder")
    parser.add_argument("--output", default="results.png", help="where to write the PNG")
    parser.add_argument("--spread", choices=["minmax", "std"], default="minmax", help="the band over seeds")
    args = parser.parse_args()

    two_folders = args.against is not None and os.path.isdir(args.against)
    if two_folders and os.path.realpath(args.runs) == os.path.realpath(args.against):
        parser.error(f"--against {args.against} is the folder of runs itself: give another folder or an exp_name")
    runs = find_runs(args.runs, args.tag)
    if args.against is None:
        first, second = [run for run in runs if args.exp_name in (None, run.exp_name)], []
    elif two_folders:
        first, second = [run for run in runs if args.exp_name in (None, run.exp_name)], find_runs(args.against, args.tag)
    else:
        first = [run for run in runs if args.exp_name in (None, run.exp_name) and run.exp_name != args.against]
        second = [run for run in runs if run.exp_name == args.against]
    if not first:
        parser.error(
            f"no runs with '{args.tag}' logged under '{args.runs}'"
            + (f" for --exp-name {args.exp_name}" if args.exp_name else "")
            + ": give the folder that holds the run folders, or another --tag"
        )
    if args.against is not None and not second:
        parser.error(
            f"no runs with '{args.tag}' logged for --against {args.against}: "
            f"give a folder of runs or an exp_name in '{args.runs}'"
        )

    names = folder_names(args.runs, args.against) if two_folders else (None, None)
    panels = panels_of([(names[0], first), (names[1], second)])
    for settings in panels.values():
        for setting in settings:
            setting.runs = warn_about(setting)

    plot(panels, args.tag, args.spread, args.output)
    print(f"wrote {args.output}")
    print(
        f"\n{args.tag}, each seed's last logged value. final: mean +- std over seeds; IQM: rliable's interquartile mean "
        "over seeds with its 95% stratified-bootstrap confidence interval "
        f"({BOOTSTRAP_REPS} resamples, seed {BOOTSTRAP_SEED})\n"
    )
    print(results_table(panels, args.tag))


if __name__ == "__main__":
    main()
