"""benchmark/: the experiment runner (dry runs, a local pool, the Slurm job script), plot.py on the logs of tiny
real training runs, throughput.py's command building, memory.py on a tiny config, phases.py
on a tiny image config, and minigrid_starts.py on a tiny MiniGrid Memory model."""

import glob
import json
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rliable import library, metrics
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.util import tensor_util

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "benchmark" / "ppo_trxl.sh"
ENV = {
    **os.environ,
    "SDL_VIDEODRIVER": "dummy",
    "SDL_AUDIODRIVER": "dummy",
    "MPLBACKEND": "Agg",
    "PYTHONPATH": str(ROOT),
}
EXPERIMENT_ENV_IDS = [
    "MortarMayhem-Grid-v0",
    "MortarMayhem-v0",
    "MysteryPath-Grid-v0",
    "MysteryPath-v0",
    "SearingSpotlights-v0",
    "Endless-MortarMayhem-v0",
    "Endless-MysteryPath-v0",
    "Endless-SearingSpotlights-v0",
    "MiniGrid-MemoryS9-v0",
    "benchmark.minigrid_cue:MiniGrid-MemoryS9Cue-v0",
    "ProofofMemory-v0",
]
LADDER = ["MortarMayhem-Grid-1", "MortarMayhem-Grid-1-control", "MortarMayhem-Grid-3", "MortarMayhem-Grid-3-control"]
# experiments named otherwise than by their env id
NAMED_EXPERIMENTS = [*LADDER, "MiniGrid-MemoryS9-segments", "MiniGrid-MemoryS9-gate", "MiniGrid-MemoryS9-gate-segments"]
TINY_RUN = (
    "--env-id ProofofMemory-v0 --num-envs 2 --num-steps 32 --num-minibatches 2 --update-epochs 1 --trxl-dim 32 "
    "--trxl-num-heads 2 --trxl-num-layers 1 --trxl-memory-length 8 --total-timesteps 256 --no-cuda"
).split()


def run(command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=120, **kwargs)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def flag_values(tokens):
    """{flag: value} of a command's tokens (True for a flag without value); a repeated flag keeps its last value."""
    flags = {}
    for i, token in enumerate(tokens):
        if token.startswith("--"):
            has_value = i + 1 < len(tokens) and not tokens[i + 1].startswith("--")
            flags[token] = tokens[i + 1] if has_value else True
    return flags


def test_dry_run_prints_every_experiment_with_its_flags():
    commands = [shlex.split(line) for line in run(["bash", str(RUNNER), "--dry-run"]).splitlines()]
    documented = [flag_values(command) for command in commands if "--exp-name" not in command]
    runs = sorted((flags["--env-id"], flags["--seed"]) for flags in documented)
    assert runs == sorted((env_id, seed) for env_id in EXPERIMENT_ENV_IDS for seed in "123")
    assert all(command[:2] == ["python", "ppo_trxl.py"] for command in commands)

    by_env = {flags["--env-id"]: flags for flags in documented}
    save = {"--save-model": True, "--checkpoint-interval": "100"}  # every job leaves its model and checkpoints
    pom = {
        "--total-timesteps": "25000",
        "--num-envs": "16",
        "--num-steps": "128",
        "--num-minibatches": "8",
        "--update-epochs": "4",
        "--trxl-num-layers": "4",
        "--trxl-num-heads": "1",
        "--trxl-dim": "64",
        "--trxl-memory-length": "16",
        "--trxl-positional-encoding": "none",
        "--vf-coef": "0.1",
        "--max-grad-norm": "0.5",
        "--init-lr": "3e-4",
        "--init-ent-coef": "0.001",
        "--clip-coef": "0.2",
    }
    assert by_env["ProofofMemory-v0"] == {"--env-id": "ProofofMemory-v0", "--seed": "3", **pom, **save}
    # MiniGrid Memory in the configuration that learns it (README.md, MiniGrid Memory)
    minigrid = {
        "--num-envs": "16",
        "--num-steps": "256",
        "--trxl-num-layers": "2",
        "--trxl-num-heads": "4",
        "--trxl-dim": "256",
        "--trxl-memory-length": "64",
        "--trxl-positional-encoding": "none",
        "--init-lr": "3.5e-4",
        "--final-lr": "3.5e-4",
        "--init-ent-coef": "3e-3",
        "--final-ent-coef": "3e-3",
        "--update-epochs": "5",
        "--clip-coef": "0.1",
        "--max-grad-norm": "0.5",
        "--gae-lambda": "0.99",
    }
    assert by_env["MiniGrid-MemoryS9-v0"] == {
        "--env-id": "MiniGrid-MemoryS9-v0",
        "--seed": "3",
        "--total-timesteps": "2048000",
        **minigrid,
        **save,
    }
    named = {flags["--exp-name"]: flags for flags in map(flag_values, commands) if "--exp-name" in flags}  # seed 3's
    segments = {**by_env["MiniGrid-MemoryS9-v0"], "--exp-name": "MiniGrid-MemoryS9-segments", "--trxl-segment-gradients": True}
    assert named["MiniGrid-MemoryS9-segments"] == segments
    gate = {**segments, "--exp-name": "MiniGrid-MemoryS9-gate", "--total-timesteps": "1024000", "--trxl-gate": "gru"}
    del gate["--trxl-segment-gradients"]
    assert named["MiniGrid-MemoryS9-gate"] == gate
    both = {**gate, "--exp-name": "MiniGrid-MemoryS9-gate-segments", "--trxl-segment-gradients": True}
    assert named["MiniGrid-MemoryS9-gate-segments"] == both
    cue = "benchmark.minigrid_cue:MiniGrid-MemoryS9Cue-v0"
    assert by_env[cue] == {"--env-id": cue, "--seed": "3", "--total-timesteps": "1024000", **minigrid, **save}
    assert by_env["MortarMayhem-Grid-v0"]["--norm-adv"] is True
    endless = by_env["Endless-SearingSpotlights-v0"]
    assert (endless["--reconstruction-coef"], endless["--trxl-memory-length"], endless["--total-timesteps"]) == (
        "0.1",
        "256",
        "350000000",
    )


def test_dry_run_runs_the_ladder_beside_its_memoryless_controls():
    """Every rung of the Memory Gym ladder names its env, its task settings, its epochs (4 for one command, 8 for
    three) and its exp_name; its control is the same command with memory length 1, and the rung's task settings reach
    the trainer as one JSON word."""
    commands = [shlex.split(line) for line in run(["bash", str(RUNNER), "--dry-run", "--seeds", "1"]).splitlines()]
    rungs = {flags["--exp-name"]: flags for flags in map(flag_values, commands) if "--reset-params" in flags}
    assert set(rungs) == set(LADDER)
    for name, flags in rungs.items():
        assert flags["--env-id"] == "MortarMayhem-Grid-v0" and flags["--trxl-segment-gradients"] is True
        commands_count = json.loads(flags["--reset-params"])["command_count"]
        assert commands_count == [int(name.split("-")[2])]
        assert flags["--trxl-memory-length"] == ("1" if name.endswith("-control") else "64")
        assert flags["--update-epochs"] == ("4" if commands_count == [1] else "8")
        if not name.endswith("-control"):
            assert {**rungs[name + "-control"], "--exp-name": name, "--trxl-memory-length": "64"} == flags


def test_dry_run_selects_envs_and_seeds_and_passes_flags_through():
    output = run(
        ["bash", str(RUNNER), "--dry-run", "--envs", "ProofofMemory-v0 MysteryPath-v0", "--seeds", "7 8"]
        + ["--python", "/opt/py", "--", "--no-cuda", "--total-timesteps", "10000"]
    )
    commands = [shlex.split(line) for line in output.splitlines()]
    assert [(flag_values(c)["--env-id"], flag_values(c)["--seed"]) for c in commands] == [
        ("ProofofMemory-v0", "7"),
        ("ProofofMemory-v0", "8"),
        ("MysteryPath-v0", "7"),
        ("MysteryPath-v0", "8"),
    ]
    assert all(command[0] == "/opt/py" and command[-3:] == ["--no-cuda", "--total-timesteps", "10000"] for command in commands)

    unknown = subprocess.run(["bash", str(RUNNER), "--dry-run", "--envs", "NoSuchEnv-v0"], capture_output=True, text=True)
    assert unknown.returncode == 2 and "NoSuchEnv-v0" in unknown.stderr


def test_local_pool_runs_every_job_with_its_own_log(tmp_path):
    # `echo` as the Python: every job prints its command line into its log
    output = run(
        ["bash", str(RUNNER), "--envs", "ProofofMemory-v0", "--jobs", "2", "--python", "echo", "--log-dir", str(tmp_path)]
    )
    assert output.count("done") == 3
    for seed in "123":
        log = (tmp_path / f"ProofofMemory-v0__{seed}.log").read_text()
        assert log.startswith("ppo_trxl.py --env-id ProofofMemory-v0 --seed " + seed)

    failing = subprocess.run(
        ["bash", str(RUNNER), "--envs", "ProofofMemory-v0", "--seeds", "1", "--python", "false", "--log-dir", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert failing.returncode != 0 and "FAILED" in failing.stdout


def test_slurm_dry_run_prints_a_valid_job_array_script(tmp_path):
    output = run(["bash", str(RUNNER), "--slurm", "--dry-run", "--python", "echo", "--log-dir", str(tmp_path)])
    assert list(tmp_path.iterdir()) == [], "a dry run writes nothing"
    script, commands = output.split(f"# {tmp_path}/commands.txt\n")
    script = script.split(f"# {tmp_path}/job.sbatch\n")[1]
    commands = commands.splitlines()
    assert len(commands) == 3 * (len(EXPERIMENT_ENV_IDS) + len(NAMED_EXPERIMENTS))
    assert "#SBATCH --gres=gpu:1" in script and f"#SBATCH --array=0-{len(commands) - 1}\n" in script
    (tmp_path / "job.sbatch").write_text(script)
    run(["bash", "-n", str(tmp_path / "job.sbatch")])

    # Array task 4 runs line 5 of the commands file (with `echo` as the Python: prints it)
    (tmp_path / "commands.txt").write_text("\n".join(commands) + "\n")
    task = subprocess.run(
        ["bash", str(tmp_path / "job.sbatch")], capture_output=True, text=True, env={**ENV, "SLURM_ARRAY_TASK_ID": "4"}
    )
    assert task.returncode == 0, task.stderr
    assert task.stdout.splitlines() == [commands[4], " ".join(shlex.split(commands[4])[1:])]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """runs/ of two seeds of a tiny real ProofofMemory training run."""
    folder = tmp_path_factory.mktemp("benchmark")
    trainings = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "ppo_trxl.py"), *TINY_RUN, "--seed", str(seed)],
            cwd=folder,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for seed in (1, 2)
    ]
    for training in trainings:
        output, _ = training.communicate(timeout=120)
        assert training.returncode == 0, output
    return folder / "runs"


def logged_values(run_folder, tag="episode/r_mean"):
    """The tag's values by step, read straight from the run's event file."""
    (event_file,) = glob.glob(str(run_folder / "events.out.tfevents.*"))
    values = {}
    for event in EventFileLoader(event_file).Load():
        for value in event.summary.value:
            if value.tag == tag:
                values[event.step] = float(tensor_util.make_ndarray(value.tensor))
    return [values[step] for step in sorted(values)]


def plot_module():
    """benchmark/plot.py, imported."""
    if str(ROOT / "benchmark") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmark"))
    import plot

    return plot


def table_rows(output, env_id):
    """The cells of env_id's rows in plot.py's markdown table."""
    lines = [line for line in output.splitlines() if line.startswith(f"| {env_id} |")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def check_cells(row, seeds):
    """A row's seeds, final 'mean +- std' and 'IQM [low, high]' cells against the logged values of the seeds, the IQM
    and its interval computed here with rliable on each seed's last value, with plot.py's bootstrap seed and size."""
    plot = plot_module()
    last = np.array([values[-1] for values in seeds])
    np.random.seed(plot.BOOTSTRAP_SEED)
    points, intervals = library.get_interval_estimates(
        {"last": last[:, np.newaxis]}, lambda scores: np.array([metrics.aggregate_iqm(scores)]), reps=plot.BOOTSTRAP_REPS
    )
    _, _, num_seeds, final, iqm, _ = row
    assert int(num_seeds) == len(seeds)
    mean, std = re.fullmatch(r"(-?[\d.]+) \+- ([\d.]+)", final).groups()
    assert float(mean) == pytest.approx(last.mean(), abs=0.006)
    assert float(std) == pytest.approx(last.std(), abs=0.006)
    iqm, low, high = re.fullmatch(r"(-?[\d.]+) \[(-?[\d.]+), (-?[\d.]+)\]", iqm).groups()
    assert float(iqm) == pytest.approx(points["last"][0], abs=0.006)
    assert float(low) == pytest.approx(intervals["last"][0, 0], abs=0.006)
    assert float(high) == pytest.approx(intervals["last"][1, 0], abs=0.006)


def png_width(path):
    """The pixel width in a PNG's header chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">I", data[16:20])[0]


def test_plot_draws_the_curves_and_tabulates_the_runs(tiny_runs, tmp_path):
    output = run([sys.executable, str(ROOT / "benchmark" / "plot.py"), str(tiny_runs)], cwd=tmp_path)
    assert "wrote results.png" in output and png_width(tmp_path / "results.png") > 0  # the current folder by default
    seeds = [logged_values(folder) for folder in sorted(tiny_runs.iterdir())]
    assert len(seeds) == 2 and all(len(values) == 4 for values in seeds)
    assert table_rows(output, "env id") == [["env id", "setting", "seeds", "final", "IQM [95% CI]", "published"]]
    (row,) = table_rows(output, "ProofofMemory-v0")
    assert row[1] == "ppo_trxl" and row[5] == "-"  # ProofofMemory is not in the published table
    check_cells(row, seeds)


def test_plot_iqm_trims_a_quarter_of_the_seeds_from_each_end():
    interquartile_mean = plot_module().interquartile_mean
    finals = np.array([0.3, 100.0, 0.1, 0.2, -50.0, 0.4, 0.5, 0.6])
    iqm, low, high = interquartile_mean(finals)
    assert iqm == pytest.approx(np.sort(finals)[2:6].mean())
    assert low <= iqm <= high < 100
    np.random.seed(123)  # the interval does not depend on the generator's state before
    assert interquartile_mean(finals) == (iqm, low, high)
    assert interquartile_mean(np.array([0.7])) == (0.7, 0.7, 0.7)  # one seed: an interval of one point


def test_plot_against_puts_two_settings_side_by_side(tiny_runs, tmp_path):
    plot = [sys.executable, str(ROOT / "benchmark" / "plot.py"), str(tiny_runs)]
    seeds = [logged_values(folder) for folder in sorted(tiny_runs.iterdir())]

    # Another folder of runs: the same runs here, so both rows hold the same numbers
    other = shutil.copytree(tiny_runs, tmp_path / "other")
    output = run(plot + ["--against", str(other), "--output", str(tmp_path / "folders.png")])
    rows = table_rows(output, "ProofofMemory-v0")
    assert [row[1] for row in rows] == ["ppo_trxl (runs)", "ppo_trxl (other)"]
    for row in rows:
        check_cells(row, seeds)

    # A second exp_name in the same folder: seed 1 alone, renamed
    mixed = shutil.copytree(tiny_runs, tmp_path / "mixed")
    seed_1 = sorted(mixed.iterdir())[0]
    seed_1.rename(mixed / seed_1.name.replace("__ppo_trxl__", "__variant__"))
    output = run(plot[:-1] + [str(mixed), "--against", "variant", "--output", str(tmp_path / "names.png")])
    ppo_trxl, variant = table_rows(output, "ProofofMemory-v0")
    assert (ppo_trxl[1], variant[1]) == ("ppo_trxl", "variant")
    check_cells(ppo_trxl, seeds[1:])
    check_cells(variant, seeds[:1])
    assert variant[4] == "{0} [{0}, {0}]".format(f"{seeds[0][-1]:.2f}")  # one seed: an interval of one point
    assert (tmp_path / "names.png").stat().st_size > 0


def test_plot_groups_runs_by_configuration_and_warns_before_pooling(tiny_runs, tmp_path):
    """Real runs beside the two tiny seeds: one with another gamma (a setting of its own), one with a larger budget
    stopped by SIGTERM (unfinished), and seed 2 copied as a later run (run twice)."""
    runs = shutil.copytree(tiny_runs, tmp_path / "runs")
    seed_2 = sorted(runs.iterdir())[1]
    shutil.copytree(seed_2, runs / re.sub(r"__\d+$", "__9999999999", seed_2.name))
    trainer = [sys.executable, str(ROOT / "ppo_trxl.py"), *TINY_RUN]
    other_gamma = subprocess.Popen(trainer + ["--gamma", "0.9"], cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL)
    stopped = subprocess.Popen(
        trainer + ["--seed", "3", "--total-timesteps", "6400"], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, text=True
    )
    for line in stopped.stdout:
        if line.startswith("iteration 1/"):
            stopped.terminate()
    assert stopped.wait(timeout=120) == 143
    assert other_gamma.wait(timeout=120) == 0

    output = run([sys.executable, str(ROOT / "benchmark" / "plot.py"), str(runs), "--output", str(tmp_path / "c.png")])
    seeds = {row[1]: row[2] for row in table_rows(output, "ProofofMemory-v0")}
    assert seeds == {"ppo_trxl gamma=0.995": "3", "ppo_trxl gamma=0.9": "1"}  # seeds 1, 2 (once) and 3; seed 1
    warnings = [line for line in output.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 3, output
    assert "seed 2 of ProofofMemory-v0 was run twice; using " in warnings[0] and "__9999999999, not" in warnings[0]
    assert "different budgets (--total-timesteps 256, 6400)" in warnings[1]
    assert re.search(r"__3__\d+ is unfinished \(last logged step \d+ of 6400\)", warnings[2])


def test_plot_gives_every_env_a_panel_labelled_by_what_differs_within_it(tiny_runs, tmp_path):
    """Beside the two tiny ProofofMemory seeds: two tiny MortarMayhem-Grid runs with other flags, which only their task
    settings tell apart, so that env_id and the shared flags name nothing, and the published result stands beside the
    default settings alone; and a ProofofMemory run that differs from the seeds in four flags, which name it in its
    panel's legend and, being long, below the table, the table naming it by a number."""
    runs = shutil.copytree(tiny_runs, tmp_path / "runs")
    trainer = [sys.executable, str(ROOT / "ppo_trxl.py"), *TINY_RUN]
    mortar_flags = ["--env-id", "MortarMayhem-Grid-v0", "--num-steps", "64", "--trxl-memory-length", "8"]
    one_command = mortar_flags + ["--reset-params", '{"command_count": [1]}', "--checkpoint-minutes", "0", "--seed", "2"]
    pom_flags = ["--gamma", "0.9", "--gae-lambda", "0.9", "--clip-coef", "0.3", "--trxl-memory-length", "16"]
    trainings = [
        subprocess.Popen(trainer + flags, cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL)
        for flags in (mortar_flags, one_command, pom_flags)
    ]
    assert [training.wait(timeout=180) for training in trainings] == [0, 0, 0]

    output = run([sys.executable, str(ROOT / "benchmark" / "plot.py"), str(runs), "--output", str(tmp_path / "envs.png")])
    mortar = {row[1]: row for row in table_rows(output, "MortarMayhem-Grid-v0")}
    assert mortar.keys() == {"ppo_trxl reset_params=None", "ppo_trxl [1]"}, output
    assert mortar["ppo_trxl reset_params=None"][5] == "0.99 +- 0.00" and mortar["ppo_trxl [1]"][5] == "-"
    assert [row[1] for row in table_rows(output, "ProofofMemory-v0")] == ["ppo_trxl [2]", "ppo_trxl [3]"]
    assert output.splitlines()[-3:] == [
        '[1] ppo_trxl reset_params={"command_count": [1]}',
        "[2] ppo_trxl clip_coef=0.1, gae_lambda=0.95, gamma=0.995, trxl_memory_length=8",
        "[3] ppo_trxl clip_coef=0.3, gae_lambda=0.9, gamma=0.9, trxl_memory_length=16",
    ]
    assert "env_id" not in output and "num_steps" not in output
    assert max(len(line) for line in output.splitlines() if line.startswith("|")) < 300
    assert png_width(tmp_path / "envs.png") <= 2500


def test_plot_help_gives_the_defaults():
    output = run([sys.executable, str(ROOT / "benchmark" / "plot.py"), "--help"])
    output = " ".join(output.split())
    assert "(default: results.png)" in output and "(default: minmax)" in output


def test_throughput_builds_the_documented_commands():
    sys.path.insert(0, str(ROOT / "benchmark"))
    import throughput

    flags = flag_values(throughput.trainer_flags(throughput.CONFIGS["minigrid"], 3, cuda=False))
    assert (flags["--env-id"], flags["--trxl-dim"], flags["--no-cuda"]) == ("MiniGrid-MemoryS9-v0", "256", True)
    assert flags["--total-timesteps"] == str(3 * 16 * 256)
    flags = flag_values(throughput.trainer_flags(throughput.CONFIGS["mmgrid"], 2, cuda=True))
    assert (flags["--num-envs"], flags["--num-steps"], flags["--num-minibatches"], flags["--cuda"]) == ("8", "128", "4", True)
    assert flags["--total-timesteps"] == str(2 * 8 * 128)
    extra = ["--encoder-dtype", "bfloat16", "--compile"]
    with_extra = flag_values(throughput.trainer_flags(throughput.CONFIGS["mmgrid"], 2, cuda=True, extra=extra))
    assert with_extra == {**flags, "--encoder-dtype": "bfloat16", "--compile": True}
    # the full default Endless config runs only when named: 32 envs x 512 steps an iteration
    flags = flag_values(throughput.trainer_flags(throughput.CONFIGS["endless"], 2, cuda=True))
    assert (flags["--env-id"], flags["--trxl-memory-length"], flags["--total-timesteps"]) == (
        "Endless-MortarMayhem-v0",
        "256",
        str(2 * 32 * 512),
    )
    assert not throughput.CONFIGS["endless"].by_default
    # Proof of Memory runs by default its whole documented budget: 12 iterations of 16 envs x 128 steps
    pom = throughput.CONFIGS["pom"]
    documented = flag_values(throughput.documented_flags(pom.env_id))
    flags = flag_values(throughput.trainer_flags(pom, pom.iterations, cuda=False))
    assert int(flags["--total-timesteps"]) == pom.iterations * 16 * 128 <= int(documented["--total-timesteps"])
    assert (pom.iterations + 1) * 16 * 128 > int(documented["--total-timesteps"])
    # 1,000 steps a second after the first iteration, whatever the first one took
    assert throughput.steps_per_second([(10.0, 100, 5), (11.0, 1100, 90), (13.0, 3100, 200)]) == 1000


def test_memory_prints_the_buffers_of_a_tiny_config():
    memory = [sys.executable, str(ROOT / "benchmark" / "memory.py"), "--env-id", "ProofofMemory-v0", "--num-envs", "4"]
    memory += "--num-steps 32 --num-minibatches 2 --trxl-dim 32 --trxl-num-heads 2 --trxl-num-layers 1".split()
    output = run(memory + ["--trxl-memory-length", "8", "--memory-dtype", "bfloat16"])

    def row_bytes(name):
        (line,) = [line for line in output.splitlines() if line.strip().startswith(name + " ")]
        return int(re.search(r"([\d,]+) B", line)[1].replace(",", ""))

    assert row_bytes("obs") == 4 * 32 * 3 * 4  # float32 vector observations
    assert row_bytes("timeline.memory") == 4 * (7 + 32) * 1 * 32 * 2  # (E, C+S, L, D) in bfloat16
    assert row_bytes("timeline.steps") == 4 * (7 + 32) * 8
    assert row_bytes("one minibatch's episode copy") == 64 * 16 * 1 * 32 * 4
    assert row_bytes("timeline.keys") == row_bytes("timeline.values") == 1 * 4 * (7 + 32) * 32 * 4  # (L, E, H, C+S, h)
    assert row_bytes("keys, layer 0") == row_bytes("values, layer 0") == 4 * (7 + 16) * 32 * 4  # a chunk's window, every env
    assert "keys, layer 1" not in output
    assert row_bytes("transformer layer 0") > 0
    assert "peak during forward + backward" in output


def test_phases_splits_an_image_iteration_into_its_parts():
    phases = [sys.executable, str(ROOT / "benchmark" / "phases.py"), "mmgrid", "--iterations", "2", "--"]
    phases += "--num-envs 2 --num-steps 64 --num-minibatches 2 --update-epochs 1 --trxl-dim 32 --trxl-num-heads 2".split()
    output = run(phases + ["--trxl-num-layers", "1", "--trxl-memory-length", "8", "--no-cuda"])
    assert re.search(r"^iteration 2: [\d.]+ s, [\d,]+ steps/s$", output, re.MULTILINE)
    seconds = {}
    for phase, part, value, share in re.findall(
        r"^\| (rollout|update) \| ([^|]+) \| ([\d.]+) \| (\d+)% \|$", output, re.MULTILINE
    ):
        seconds[phase, part.strip()] = float(value)
    rollout_parts = ["envs", "encoder", "transformer", "heads", "caching keys and values", "the rest"]
    update_parts = ["encoder forward", "transformer", "heads", "encoder backward", "gradient clipping and optimizer step"]
    update_parts.append("the rest: the transformer's and heads' backward, keys and values, losses, GAE")
    assert set(seconds) == {("rollout", part) for part in rollout_parts + ["total"]} | {
        ("update", part) for part in update_parts + ["total"]
    }
    for phase, parts in (("rollout", rollout_parts), ("update", update_parts)):
        assert sum(seconds[phase, part] for part in parts) == pytest.approx(seconds[phase, "total"], abs=0.004)
    # every wrapped part was timed: an image config's envs, encoder (both directions) and transformer take measurable time
    timed = [("rollout", "envs"), ("rollout", "encoder"), ("rollout", "transformer")]
    assert min(seconds[key] for key in timed + [("update", "encoder forward"), ("update", "encoder backward")]) > 0
    # the encoder's share of a minibatch of 2 envs x 32 steps: each distinct image once
    encoded = re.search(
        r"^The update's encoder took [\d,]+ of a minibatch's 64 observations on average \((\d+)-(\d+)\)", output, re.M
    )
    assert encoded and 1 <= int(encoded[1]) <= int(encoded[2]) <= 64, output


def test_phases_rejects_compile():
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmark" / "phases.py"), "pom", "--", "--compile"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert result.returncode == 2 and result.stderr.strip().endswith(
        "--compile is not supported: its compiled graphs hide the parts that are timed here"
    )


def test_minigrid_starts_tabulates_a_trained_agent_by_start_and_cue(tmp_path):
    """A tiny real MiniGrid-MemoryS9 model, played from its run directory: every episode in one row of its start x and
    whether the cue was seen, which from x = 1 it always is (the cue lies in the view at reset)."""
    trainer = [sys.executable, str(ROOT / "ppo_trxl.py"), *TINY_RUN, "--save-model"]
    run(trainer + ["--env-id", "MiniGrid-MemoryS9-v0", "--num-steps", "64", "--total-timesteps", "128"], cwd=tmp_path)
    (run_dir,) = (tmp_path / "runs").iterdir()
    output = run([sys.executable, str(ROOT / "benchmark" / "minigrid_starts.py"), str(run_dir), "--episodes", "24"])
    assert output.splitlines()[0] == f"MiniGrid-MemoryS9-v0 | {run_dir / 'ppo_trxl.cleanrl_model'} | sampled actions"
    rows = [line.strip("|").split("|") for line in output.splitlines() if re.match(r"\| \d", line)]
    starts = [(int(row[0]), row[1].strip()) for row in rows]
    assert {x for x, _ in starts} <= set(range(1, 7)) and len(set(starts)) == len(starts)
    assert (1, "no") not in starts
    assert sum(int(row[2]) for row in rows) == 24
    assert all(0 <= float(row[3]) <= 1 and 0 < float(row[4]) <= 96 for row in rows)
    (total,) = [line for line in output.splitlines() if line.startswith("| all |")]
    assert total.split("|")[3].strip() == "24"


def test_minigrid_starts_refuses_other_envs(tmp_path):
    run([sys.executable, str(ROOT / "ppo_trxl.py"), *TINY_RUN, "--save-model", "--total-timesteps", "64"], cwd=tmp_path)
    (run_dir,) = (tmp_path / "runs").iterdir()
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmark" / "minigrid_starts.py"), str(run_dir)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "was trained on ProofofMemory-v0: this tool reads MiniGrid Memory envs' cue" in lines[0]
