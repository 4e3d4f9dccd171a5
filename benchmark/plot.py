"""Learning curves and a results table from the tensorboard logs of finished PPO-TrXL runs.

    python benchmark/plot.py runs --output benchmark/results.png
    python benchmark/plot.py runs --against ../other-implementation/runs     # two sets of runs side by side
    python benchmark/plot.py runs --exp-name ppo_trxl --against my_variant  # two exp_names of one folder

A run is a folder `{env_id}__{exp_name}__{seed}__{time}` holding `events.out.tfevents.*`, anywhere under the
given folder. Runs are grouped by env id (one panel each) and setting (one curve each): the exp_name and the
configuration, the hyperparameters that the trainer logs to tensorboard except those that do not change what is
learnt (seed, budget, logging, checkpoints, speed). Settings that share an exp_name are labelled with the
hyperparameters in which they differ; the folder joins the label when two folders are compared. A curve is the
mean over seeds of the tag, every seed interpolated to a common grid of steps that all of them reached; the band
is the min/max (or +- std) over seeds.

Warnings name what would otherwise be pooled silently: a seed run twice in one setting (the newest run counts),
runs of one setting with different budgets (--total-timesteps), and runs that stopped before their budget.

The table gives, per env and setting:
- final: the last logged value of each seed (episode/r_mean already averages the last 100 episodes),
  mean +- std over seeds (population std, ddof 0), with the number of seeds;
- IQM: the interquartile mean (the mean of the middle 50%) of the last K logged values of every seed
  pooled together, seeds x final points, as in rliable. Consecutive r_mean values share episodes, so the
  K points of a seed are not independent samples.
"""

import argparse
import math
import os
import re
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
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
    "keep_checkpoints",
    "resume",
}
"""Logged hyperparameters that do not change what a run learns: runs that differ only in these are one setting."""


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
    def configuration(self):
        return tuple(sorted((key, value) for key, value in self.hyperparameters.items() if key not in NOT_CONFIGURATION))


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


def settings_of(runs, folder=None):
    """{label: runs}: the runs grouped by exp_name and configuration. A label is the exp_name, followed by the
    hyperparameters in which its configuration differs from the others of the same exp_name and env, and by the
    folder if given."""
    by_setting = {}
    for run in runs:
        by_setting.setdefault((run.exp_name, run.configuration), []).append(run)
    labels = {}
    for (exp_name, configuration), setting_runs in by_setting.items():
        others = [other for name, other in by_setting if name == exp_name and other != configuration]
        own = dict(configuration)
        differing = sorted(
            {key for other in others for key in own.keys() | dict(other).keys() if own.get(key) != dict(other).get(key)}
        )
        label = exp_name + (" (" + ", ".join(f"{key}={own.get(key, '-')}" for key in differing) + ")" if differing else "")
        labels[label + (f" ({folder})" if folder else "")] = setting_runs
    return labels


def warn_about(label, runs):
    """Warnings for one setting's runs: seeds run twice (only the newest is kept), budgets that differ, runs that
    stopped before their budget. Returns the runs to pool."""
    newest = {}
    for run in sorted(runs, key=lambda run: (run.env_id, run.time)):
        if (run.env_id, run.seed) in newest:
            print(
                f"warning: {label}: seed {run.seed} of {run.env_id} was run twice; using {run.path}, not {newest[run.env_id, run.seed].path}"
            )
        newest[run.env_id, run.seed] = run
    kept = sorted(newest.values(), key=lambda run: (run.env_id, run.seed))
    for env_id in sorted({run.env_id for run in kept}):
        env_runs = [run for run in kept if run.env_id == env_id]
        budgets = sorted({run.hyperparameters.get("total_timesteps", "?") for run in env_runs})
        if len(budgets) > 1:
            print(f"warning: {label}: the runs of {env_id} have different budgets (--total-timesteps {', '.join(budgets)})")
        for run in env_runs:
            planned = run.hyperparameters.get("num_iterations"), run.hyperparameters.get("batch_size")
            if None not in planned and run.steps[-1] < int(planned[0]) * int(planned[1]):
                print(
                    f"warning: {label}: {run.path} is unfinished (last logged step {int(run.steps[-1])} of {int(planned[0]) * int(planned[1])})"
                )
    return kept


def interquartile_mean(values):
    """The mean of the middle 50%: a quarter of the sorted values (rounded down) is cut from each end."""
    values = np.sort(np.asarray(values, dtype=np.float64))
    cut = int(0.25 * len(values))
    return float(values[cut : len(values) - cut].mean())


def summarise(runs, last):
    """Final values of the runs (the seeds of one env and setting): (mean, std, number of runs, IQM)."""
    finals = np.array([run.values[-1] for run in runs])
    pooled = np.concatenate([run.values[-last:] for run in runs])
    return float(finals.mean()), float(finals.std()), len(runs), interquartile_mean(pooled)


def seed_curves(runs, num_points=200):
    """The runs' values on a common step grid, from the latest first step to the earliest last step.

    Returns steps (P,) and values (seeds, P); a single logged point stays a single point.
    """
    first, last = max(run.steps[0] for run in runs), min(run.steps[-1] for run in runs)
    grid = np.linspace(first, last, num_points) if last > first else np.array([last])
    return grid, np.stack([np.interp(grid, run.steps, run.values) for run in runs])


def group(settings):
    """{env_id: {label: [runs]}} from [(label, runs)], envs sorted, settings in the given order."""
    table = {}
    for label, runs in settings:
        for run in runs:
            table.setdefault(run.env_id, {}).setdefault(label, []).append(run)
    return {env_id: table[env_id] for env_id in sorted(table)}


def plot(groups, labels, tag, spread, output):
    num_panels = len(groups)
    columns = math.ceil(math.sqrt(num_panels))
    rows = math.ceil(num_panels / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.4 * rows), squeeze=False)
    colors = {label: f"C{i}" for i, label in enumerate(labels)}
    for ax, (env_id, by_label) in zip(axes.flat, groups.items()):
        for label, runs in by_label.items():
            steps, values = seed_curves(runs)
            mean = values.mean(0)
            if spread == "std":
                low, high = mean - values.std(0), mean + values.std(0)
            else:
                low, high = values.min(0), values.max(0)
            ax.plot(steps, mean, color=colors[label], marker="o" if len(steps) == 1 else None, label=label)
            ax.fill_between(steps, low, high, color=colors[label], alpha=0.25, linewidth=0)
        if env_id in PUBLISHED and tag == "episode/r_mean":
            ax.axhline(PUBLISHED[env_id][0], color="gray", linestyle="--", linewidth=1, label="published final")
        ax.set_title(env_id)
        ax.set_xlabel("steps")
        ax.set_ylabel(tag)
        ax.grid(alpha=0.3)
    for ax in axes.flat[num_panels:]:
        ax.set_visible(False)
    handles = {}  # one legend for the figure: label -> line
    for ax in axes.flat[:num_panels]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    band = "min/max" if spread == "minmax" else "+- std"
    figure.suptitle(f"{tag}: mean over seeds, band = {band}")
    figure.tight_layout()
    figure.legend(handles.values(), handles.keys(), loc="upper center", bbox_to_anchor=(0.5, 0), ncol=min(len(handles), 3))
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    figure.savefig(output, dpi=120, bbox_inches="tight")
    plt.close(figure)


def results_table(groups, labels, last):
    """A markdown table: per env, each setting's final mean +- std (seeds) and IQM, and the published result."""
    header = ["env id", "published"]
    for label in labels:
        header += [f"{label}: final", f"{label}: IQM"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for env_id, by_label in groups.items():
        published = "{:.2f} +- {:.2f}".format(*PUBLISHED[env_id]) if env_id in PUBLISHED else "-"
        cells = [env_id, published]
        for label in labels:
            if label in by_label:
                mean, std, num_runs, iqm = summarise(by_label[label], last)
                cells += [f"{mean:.2f} +- {std:.2f} ({num_runs} runs)", f"{iqm:.2f}"]
            else:
                cells += ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default."""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("runs", nargs="?", default="runs", help="the folder of runs")
    parser.add_argument("--tag", default="episode/r_mean", help="the scalar to plot and tabulate")
    parser.add_argument("--exp-name", help="only the runs of this exp_name")
    parser.add_argument("--against", help="a second folder of runs, or a second exp_name in the first folder")
    parser.add_argument("--output", default="benchmark/results.png", help="where to write the PNG")
    parser.add_argument("--spread", choices=["minmax", "std"], default="minmax", help="the band over seeds")
    parser.add_argument("--last", type=int, default=10, help="K: final logged values per seed that the IQM pools")
    args = parser.parse_args()
    if args.last < 1:
        parser.error("--last must be at least 1")

    runs = find_runs(args.runs, args.tag)
    if args.against is None:
        first, second = [run for run in runs if args.exp_name in (None, run.exp_name)], []
    elif os.path.isdir(args.against):
        first, second = [run for run in runs if args.exp_name in (None, run.exp_name)], find_runs(args.against, args.tag)
    else:
        first = [run for run in runs if args.exp_name in (None, run.exp_name) and run.exp_name != args.against]
        second = [run for run in runs if run.exp_name == args.against]
    if not first:
        parser.error(
            f"no runs with '{args.tag}' logged under '{args.runs}'"
            + (f" for --exp-name {args.exp_name}" if args.exp_name else "")
        )
    if args.against is not None and not second:
        parser.error(f"no runs with '{args.tag}' logged for --against {args.against}")

    # A setting is an exp_name and a configuration; when two folders are compared, the folder joins its label
    two_folders = args.against is not None and os.path.isdir(args.against)
    settings = {}
    for folder, folder_runs in ((args.runs, first), (args.against, second)):
        settings.update(settings_of(folder_runs, folder if two_folders else None))
    settings = {label: warn_about(label, runs) for label, runs in settings.items()}

    groups = group(settings.items())
    plot(groups, list(settings), args.tag, args.spread, args.output)
    print(f"wrote {args.output}")
    print(
        f"\n{args.tag}. final: each seed's last logged value, mean +- std over seeds; "
        f"IQM: interquartile mean of the last {args.last} logged values of every seed, pooled\n"
    )
    print(results_table(groups, list(settings), args.last))


if __name__ == "__main__":
    main()
