"""Long runs of ppo_trxl.py, for real in subprocesses: killed with SIGKILL and resumed, stopped by SIGTERM and SIGINT
and resumed, stopped by a non-finite loss that an env forces, and refused at start for inputs that cannot work.

Every run works in its own temporary folder, so `runs/` lands there; a resume runs where its run folder is.
"""

import re
import shutil
import signal
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from test_train import ROOT, SCRIPT, Launch, Run, load_agent, tiny, train_env  # noqa: F401

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import ppo_trxl  # noqa: E402

BATCH = 64  # TINY: 2 envs x 32 steps
POM_LIMIT = 16
CHECKPOINT_KEYS = {"model_weights", "optimizer", "global_step", "iteration", "rng", "run_name", "args"}
STOP_LINE = re.compile(r"^stopped by (SIGTERM|SIGINT) at step (\d+); resume with: python ppo_trxl.py --resume (runs/\S+)$")
TIMEOUT = 180


@pytest.fixture(scope="module")
def start(tmp_path_factory, train_env):
    """start(flags, cwd, **environment) starts ppo_trxl.py in cwd: a folder, or the name of a fresh one."""

    def launch(flags, cwd="run", **environment):
        if isinstance(cwd, str):
            cwd = tmp_path_factory.mktemp(cwd)
        return Launch([sys.executable, str(SCRIPT), *flags], cwd, {**train_env, **environment}, TIMEOUT)

    return launch


def copy_run(run, tmp_path_factory, name):
    """A copy of a run's folder, to resume in."""
    cwd = tmp_path_factory.mktemp(name)
    shutil.copytree(run.cwd / "runs", cwd / "runs")
    return cwd


def checkpoints(run_dir):
    return sorted((Path(run_dir) / "checkpoints").glob("step-*.pt"))


def load_checkpoint(path):
    """A training checkpoint, loaded as --resume loads it, and checked against its file name."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert CHECKPOINT_KEYS <= set(checkpoint), sorted(checkpoint)
    assert path.name == f"step-{checkpoint['global_step']:012d}.pt"
    assert checkpoint["run_name"] == path.parent.parent.name
    assert checkpoint["global_step"] == checkpoint["iteration"] * checkpoint["args"]["batch_size"]
    assert {"torch", "python", "numpy"} <= set(checkpoint["rng"])
    return checkpoint


def scalar_steps(run, tag="losses/loss"):
    """The steps of a scalar as tensorboard shows them: EventAccumulator honours the purge of a resumed run."""
    return [step for step, _ in run.scalars()[tag]]


def check_published_model(run, memory_dtype="float32"):
    """The final --save-model file: the published format, loadable into the Agent with strict=True."""
    path = run.run_dir / "ppo_trxl.cleanrl_model"
    assert f"model saved to runs/{run.run_dir.name}/ppo_trxl.cleanrl_model" in run.stdout
    model = torch.load(path, map_location="cpu", weights_only=True)
    assert set(model) == {"model_weights", "args"}
    assert model["args"]["memory_dtype"] == memory_dtype
    agent, branches = load_agent(ppo_trxl, model, gym.spaces.Box(-1.0, 1.0, (3,), np.float32), POM_LIMIT)
    assert branches == [2]
    assert all(torch.isfinite(tensor).all() for tensor in agent.state_dict().values())
    return model


def no_temporary_files(cwd):
    return not [path for path in Path(cwd).rglob("*") if path.name.endswith(".tmp")]


# 1. SIGKILL in the middle of an iteration, then --resume

KILL_ITERATIONS = 24
KILL_FLAGS = tiny(
    "ProofofMemory-v0",
    "save-model",
    total_timesteps=KILL_ITERATIONS * BATCH,
    anneal_steps=KILL_ITERATIONS * BATCH,
    checkpoint_interval=2,
    keep_checkpoints=2,
)


@pytest.fixture(scope="module")
def killed(start):
    training = start(KILL_FLAGS, "killed")
    training.wait_for("iteration 5/")
    training.signal(signal.SIGKILL)
    return training.finish()


@pytest.fixture(scope="module")
def resumed(killed, start, tmp_path_factory):
    """The killed run resumed to its end twice, each in a copy: with --resume alone, and with its flags again."""
    resume = ["--resume", f"runs/{killed.run_dir.name}"]
    trainings = {
        "resume-alone": start(resume, copy_run(killed, tmp_path_factory, "resume-alone")),
        "resume-with-flags": start(resume + KILL_FLAGS, copy_run(killed, tmp_path_factory, "resume-with-flags")),
    }
    return {name: training.finish() for name, training in trainings.items()}


def test_sigkill_leaves_loadable_checkpoints(killed):
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    numbers = killed.iterations()
    last = numbers[-1][0]
    assert 5 <= last < KILL_ITERATIONS
    assert numbers == [(i, KILL_ITERATIONS, BATCH * i, BATCH * KILL_ITERATIONS) for i in range(1, last + 1)]
    paths = checkpoints(killed.run_dir)
    assert 1 <= len(paths) <= 2, paths
    steps = [load_checkpoint(path)["global_step"] for path in paths]
    assert all(step % (2 * BATCH) == 0 and step <= BATCH * last for step in steps), steps
    assert steps[-1] >= 4 * BATCH
    assert not (killed.run_dir / "ppo_trxl.cleanrl_model").exists()


@pytest.fixture(params=["resume-alone", "resume-with-flags"])
def resumed_run(request, resumed):
    return resumed[request.param].check()


def test_resume_continues_to_total_timesteps(killed, resumed_run):
    newest = load_checkpoint(checkpoints(killed.run_dir)[-1])["iteration"]
    assert resumed_run.run_dir.name == killed.run_dir.name
    total = BATCH * KILL_ITERATIONS
    expected = [(i, KILL_ITERATIONS, BATCH * i, total) for i in range(newest + 1, KILL_ITERATIONS + 1)]
    assert resumed_run.iterations() == expected, resumed_run.stdout
    assert "Traceback" not in resumed_run.stderr, resumed_run.stderr


def test_resumed_curves_never_repeat_or_go_back(resumed_run):
    expected = [BATCH * i for i in range(1, KILL_ITERATIONS + 1)]
    assert scalar_steps(resumed_run) == expected
    assert scalar_steps(resumed_run, "charts/learning_rate") == expected
    # the learning rate anneals over the whole run, across the kill
    learning_rates = [value for _, value in resumed_run.scalars()["charts/learning_rate"]]
    anneal = [2.75e-4 + (1e-5 - 2.75e-4) * (step - BATCH) / (BATCH * KILL_ITERATIONS) for step in expected]
    np.testing.assert_allclose(learning_rates, anneal, rtol=1e-5)


def test_resumed_checkpoints_load_and_are_pruned(resumed_run):
    paths = checkpoints(resumed_run.run_dir)
    assert [path.name for path in paths] == [f"step-{BATCH * i:012d}.pt" for i in (KILL_ITERATIONS - 2, KILL_ITERATIONS)]
    newest = load_checkpoint(paths[-1])
    assert newest["iteration"] == KILL_ITERATIONS
    assert newest["args"]["total_timesteps"] == BATCH * KILL_ITERATIONS
    # AdamW counts every update of the run, so its state came through the resume: 2 minibatches per iteration
    states = newest["optimizer"]["state"].values()  # one a parameter
    assert len(states) == len(newest["optimizer"]["param_groups"][0]["params"]) > 1
    assert all(float(state["step"]) == 2.0 * KILL_ITERATIONS for state in states)
    assert sum(state["exp_avg"].abs().sum() for state in states) > 0, "the gradients reached AdamW"
    assert all(torch.isfinite(tensor).all() for tensor in newest["model_weights"].values())
    assert no_temporary_files(resumed_run.cwd)


def test_resumed_run_saves_the_published_model(resumed_run):
    model = check_published_model(resumed_run)
    newest = load_checkpoint(checkpoints(resumed_run.run_dir)[-1])
    for name, tensor in model["model_weights"].items():
        assert torch.equal(tensor, newest["model_weights"][name]), name


def test_resume_alone_and_with_the_same_flags_train_alike(resumed):
    alone, with_flags = resumed["resume-alone"].check(), resumed["resume-with-flags"].check()
    assert alone.scalars()["losses/loss"] == with_flags.scalars()["losses/loss"]


def test_resume_of_a_finished_run_trains_nothing(resumed, start, tmp_path_factory):
    finished = resumed["resume-alone"].check()
    before = [path.name for path in checkpoints(finished.run_dir)]
    cwd = copy_run(finished, tmp_path_factory, "resume-finished")
    again = start(["--resume", f"runs/{finished.run_dir.name}"], cwd).finish()
    assert again.returncode == 0, f"stdout:\n{again.stdout}\nstderr:\n{again.stderr}"
    assert not again.stderr, again.stderr
    newest = f"runs/{finished.run_dir.name}/checkpoints/step-{BATCH * KILL_ITERATIONS:012d}.pt"
    assert again.stdout.splitlines() == [
        f"{newest} finished the run's {KILL_ITERATIONS} iterations ({BATCH * KILL_ITERATIONS:,} steps): nothing is left "
        "to do; resume with a larger --total-timesteps to train on"
    ]
    assert [path.name for path in checkpoints(again.run_dir)] == before
    assert scalar_steps(again) == [BATCH * i for i in range(1, KILL_ITERATIONS + 1)]


def test_resume_with_another_batch_size_keeps_the_step_budget(killed, start, tmp_path_factory):
    """Four envs instead of two: the run either ends at exactly total_timesteps, or refuses the change at start."""
    cwd = copy_run(killed, tmp_path_factory, "resume-four-envs")
    before = files_under(cwd)
    run = start(["--resume", f"runs/{killed.run_dir.name}", "--num-envs", "4"], cwd).finish()
    assert "Traceback" not in run.stderr, run.stderr
    if run.returncode != 0:
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), run.stderr
        assert files_under(cwd) == before
        return
    total = BATCH * KILL_ITERATIONS
    steps = scalar_steps(run)
    assert steps == sorted(set(steps)) and steps[-1] == total, steps
    assert run.iterations()[-1][2:] == (total, total), run.stdout


def test_a_run_checkpoints_every_few_minutes_by_default(start):
    """A long run writes a checkpoint once --checkpoint-minutes have passed since the last one, 30 by default; here a
    hundredth of a second, so after every iteration, of which the newest 3 are kept."""
    assert ppo_trxl.Args().checkpoint_minutes == 30
    run = start(tiny("ProofofMemory-v0", total_timesteps=6 * BATCH, checkpoint_minutes=0.0002), "minutes").finish()
    assert run.returncode == 0, run.stderr
    assert [path.name for path in checkpoints(run.run_dir)] == [f"step-{BATCH * i:012d}.pt" for i in (4, 5, 6)]


# 2. SIGTERM and SIGINT: stop at the next safe point, write a checkpoint, say how to resume

SIGNAL_ITERATIONS = 12


def on_disk(run):
    return checkpoints(run.run_dir), (run.run_dir / "ppo_trxl.cleanrl_model").exists(), no_temporary_files(run.cwd)


@pytest.fixture(scope="module")
def signalled(start):
    """A run without --checkpoint-interval: stopped by SIGTERM, resumed and stopped by SIGINT, resumed to its end.

    Returns the three runs and what was on disk after each stop: the checkpoints, whether the model file
    exists, and whether no temporary file is left.
    """
    flags = tiny("ProofofMemory-v0", "save-model", total_timesteps=SIGNAL_ITERATIONS * BATCH)
    runs, saved = [], []
    training = start(flags, "signals")
    training.wait_for("iteration 2/")
    training.signal(signal.SIGTERM)
    runs.append(training.finish())
    saved.append(on_disk(runs[-1]))
    match = STOP_LINE.match(runs[-1].stdout.splitlines()[-1]) if runs[-1].stdout else None
    assert match, f"stdout:\n{runs[-1].stdout}\nstderr:\n{runs[-1].stderr}"

    training = start(["--resume", match.group(3)], runs[0].cwd)
    training.wait_for(f"iteration {int(match.group(2)) // BATCH + 2}/")
    training.signal(signal.SIGINT)
    runs.append(training.finish())
    saved.append(on_disk(runs[-1]))
    match = STOP_LINE.match(runs[-1].stdout.splitlines()[-1]) if runs[-1].stdout else None
    assert match, f"stdout:\n{runs[-1].stdout}\nstderr:\n{runs[-1].stderr}"

    runs.append(start(["--resume", match.group(3)], runs[0].cwd).finish())
    return runs, saved


@pytest.mark.parametrize("stop", [0, 1], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_cleanly_with_a_checkpoint(signalled, stop):
    runs, saved = signalled
    run = runs[stop]
    assert run.returncode == [143, 130][stop], f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"  # 128 + the signal
    assert "Traceback" not in run.stderr, run.stderr
    name, step, run_dir = STOP_LINE.match(run.stdout.splitlines()[-1]).groups()
    assert name == ["SIGTERM", "SIGINT"][stop]
    # said at once; then the iteration under way ends (a signal in its update) or is dropped (in its rollout)
    lines = run.stdout.splitlines()
    announced = lines.index(f"stopping at the next safe point; {['SIGTERM', 'Ctrl-C'][stop]} again to stop at once")
    assert lines[announced + 1].startswith(("iteration ", "stopped by ")), lines[announced:]
    assert run_dir == f"runs/{run.run_dir.name}"
    # the checkpoint holds the last iteration that ended
    assert run.iterations()[-1][2] == int(step)
    paths, model_exists, no_temporary = saved[stop]
    assert len(paths) == stop + 1, paths
    checkpoint = load_checkpoint(paths[-1])
    assert checkpoint["global_step"] == int(step)
    assert checkpoint["args"]["checkpoint_interval"] == 0
    assert "model saved" not in run.stdout
    assert not model_exists and no_temporary


def test_resume_after_signals_finishes(signalled):
    runs, _ = signalled
    sigterm, sigint, last = runs
    last.check()
    for stopped, resumed in ((sigterm, sigint), (sigint, last)):
        step = STOP_LINE.match(stopped.stdout.splitlines()[-1]).group(2)
        resuming = f"resuming runs/{stopped.run_dir.name}/checkpoints/step-{int(step):012d}.pt at step {int(step):,}"
        assert f"{resuming} (iteration {int(step) // BATCH} of {SIGNAL_ITERATIONS} done)" in resumed.stdout.splitlines()
    stopped_at = [run.iterations()[-1][0] for run in (sigterm, sigint)]
    expected = [(i, SIGNAL_ITERATIONS, BATCH * i, BATCH * SIGNAL_ITERATIONS) for i in range(1, SIGNAL_ITERATIONS + 1)]
    assert sigterm.iterations() + sigint.iterations() + last.iterations() == expected
    assert sigint.iterations()[0][0] == stopped_at[0] + 1
    assert scalar_steps(last) == [step for _, _, step, _ in expected]
    check_published_model(last)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_to_the_group_with_async_envs_stops_cleanly(start, signum):
    """A terminal's Ctrl-C, or Slurm's scancel, signals every process of the group, the envs' subprocesses too. An env
    sends it at its 40th step, in the middle of iteration 2's rollout (32 steps an env): the subprocesses leave it to
    the trainer, which drops that rollout at its next step and stops with a checkpoint of iteration 1."""
    flags = tiny("tests.signal_env:SignalGroup-v0", "async-envs", total_timesteps=SIGNAL_ITERATIONS * BATCH)
    run = start(flags, f"group-{signum.name}", SIGNAL_GROUP_WITH=signum.name).finish()
    assert run.returncode == 128 + signum and "Traceback" not in run.stderr, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    assert (run.cwd / "signal-sent").exists()
    assert STOP_LINE.match(run.stdout.splitlines()[-1]).groups()[:2] == (signum.name, str(BATCH)), run.stdout
    assert [path.name for path in checkpoints(run.run_dir)] == [f"step-{BATCH:012d}.pt"]
    assert run.iterations() == [(1, SIGNAL_ITERATIONS, BATCH, SIGNAL_ITERATIONS * BATCH)]


def test_two_signals_at_once_are_one_request(start):
    """A signal that reaches the run twice at once (a launcher such as torchrun passes on what its process group got
    too) stops it after the iteration with a checkpoint, as one signal does."""
    training = start(tiny("ProofofMemory-v0", total_timesteps=SIGNAL_ITERATIONS * BATCH), "double")
    training.wait_for("iteration 2/")
    training.signal(signal.SIGTERM)
    training.signal(signal.SIGTERM)
    run = training.finish()
    assert run.returncode == 143 and "Traceback" not in run.stderr, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    step = int(STOP_LINE.match(run.stdout.splitlines()[-1]).group(2))
    assert [path.name for path in checkpoints(run.run_dir)] == [f"step-{step:012d}.pt"]


def test_a_signal_in_a_rollout_stops_it_at_once(start):
    """Ctrl-C in the middle of a long rollout (16,384 steps an env) drops it at the next step: a checkpoint of the
    last iteration, long before the rollout would have ended; and in the first rollout, nothing to save."""
    flags = tiny("ProofofMemory-v0", num_steps=16384, num_minibatches=1, total_timesteps=4 * 2 * 16384)
    for cwd, stopped in (("first-rollout", "before the first iteration ended"), ("second-rollout", "at step 32768")):
        training = start(flags if cwd == "first-rollout" else flags + ["--update-epochs", "1"], cwd)
        training.wait_for("rollout " if cwd == "first-rollout" else "iteration 1/")
        signalled = time.time()
        training.signal(signal.SIGINT)
        run = training.finish()
        assert run.returncode == 130 and not run.stderr, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
        assert time.time() - signalled < 5, "the rollout was not dropped"
        assert f"stopped by SIGINT {stopped}" in run.stdout.splitlines()[-1]
        saved = [path.name for path in checkpoints(run.run_dir)]
        assert saved == ([] if cwd == "first-rollout" else ["step-000000032768.pt"]), saved


def test_a_second_signal_later_stops_at_once(start):
    """Ctrl-C during an update, which ends before the trainer stops, then Ctrl-C again more than a second later: the
    run stops at once and says in one line what is lost."""
    flags = tiny("ProofofMemory-v0", num_steps=8192, num_minibatches=1, update_epochs=64, total_timesteps=4 * 2 * 8192)
    training = start(flags, "twice")
    training.wait_for("rollout 16,384/16,384 ")  # the first rollout's last note: the update follows
    training.signal(signal.SIGINT)
    time.sleep(1.5)
    training.signal(signal.SIGINT)
    run = training.finish()
    assert run.returncode == 130, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    lost = "stopped at once by a second SIGINT: no checkpoint was written: all that this run trained is lost"
    assert run.stderr.strip().splitlines() == [lost]
    assert run.stdout.splitlines()[-1] == "stopping at the next safe point; Ctrl-C again to stop at once"
    assert not run.iteration_lines and not (run.run_dir / "checkpoints").exists()


# 3. A non-finite loss, forced by an env whose rewards turn to NaN in iteration 4


@pytest.fixture(scope="module")
def nan_run(start):
    flags = tiny("tests.nan_env:NanReward-v0", total_timesteps=8 * BATCH, checkpoint_interval=1, keep_checkpoints=5)
    return start(flags, "nan").finish()


def test_non_finite_loss_stops_with_the_last_good_checkpoint(nan_run):
    assert nan_run.returncode > 0, nan_run.returncode
    assert "Traceback" not in nan_run.stderr, nan_run.stderr
    errors = [line for line in nan_run.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error:"), nan_run.stderr
    # NaN rewards begin at step 101 of every env, within iteration 4's 32 steps per env
    good = f"runs/{nan_run.run_dir.name}/checkpoints/step-{3 * BATCH:012d}.pt"
    assert "iteration 4 " in errors[0] and errors[0].endswith(good), errors[0]
    assert [number[0] for number in nan_run.iterations()] == [1, 2, 3]
    paths = checkpoints(nan_run.run_dir)
    assert [path.name for path in paths] == [f"step-{BATCH * i:012d}.pt" for i in (1, 2, 3)]
    checkpoint = load_checkpoint(nan_run.cwd / good)
    assert all(torch.isfinite(tensor).all() for tensor in checkpoint["model_weights"].values())
    assert no_temporary_files(nan_run.cwd)
    assert scalar_steps(nan_run) == [BATCH * i for i in (1, 2, 3)]


# 5. --memory-dtype bfloat16, and its resume


@pytest.fixture(scope="module")
def bfloat16_run(start):
    flags = tiny("ProofofMemory-v0", "save-model", total_timesteps=3 * BATCH, checkpoint_interval=2, memory_dtype="bfloat16")
    return start(flags, "bfloat16").finish().check()


def test_bfloat16_memory_run_finishes_and_resumes(bfloat16_run, start, tmp_path_factory):
    assert [number[2] for number in bfloat16_run.iterations()] == [BATCH, 2 * BATCH, 3 * BATCH]
    check_published_model(bfloat16_run, "bfloat16")
    (path,) = checkpoints(bfloat16_run.run_dir)
    assert load_checkpoint(path)["args"]["memory_dtype"] == "bfloat16"

    # resume from the checkpoint file of iteration 2: iteration 3 is trained again
    cwd = copy_run(bfloat16_run, tmp_path_factory, "bfloat16-resume")
    resumed = start(["--resume", str(path.relative_to(bfloat16_run.cwd))], cwd).finish().check()
    assert resumed.iterations() == [(3, 3, 3 * BATCH, 3 * BATCH)]
    assert scalar_steps(resumed) == [BATCH, 2 * BATCH, 3 * BATCH]
    check_published_model(resumed, "bfloat16")


# 4. Inputs that cannot work in a long run


def not_a_torch_file(cwd, _):
    (cwd / "notes.txt").write_text("not a checkpoint\n")
    return ["--resume", "notes.txt"]


def run_without_checkpoints(cwd, _):
    (cwd / "runs" / "empty").mkdir(parents=True)
    return ["--resume", "runs/empty"]


def copied_run(cwd, source):
    shutil.copytree(source.cwd / "runs", cwd / "runs")
    return f"runs/{source.run_dir.name}"


def flat_optimizer_state(cwd, source):
    """The run's newest checkpoint with an AdamW state of one flat parameter, as earlier versions of the trainer wrote."""
    run = copied_run(cwd, source)
    newest = checkpoints(cwd / run)[-1]
    checkpoint = torch.load(newest, weights_only=True)
    checkpoint["optimizer"]["param_groups"][0]["params"] = [0]
    checkpoint["optimizer"]["state"] = {}
    torch.save(checkpoint, newest)
    return ["--resume", run]


BAD_INPUTS = {
    "resume-missing-path": (lambda cwd, _: ["--resume", "runs/no-such-run"], "no such checkpoint file or run directory"),
    "resume-run-without-checkpoints": (run_without_checkpoints, "no training checkpoint in runs/empty/checkpoints"),
    "resume-not-a-torch-file": (not_a_torch_file, "notes.txt is not a readable checkpoint"),
    "resume-published-model": (
        lambda cwd, source: ["--resume", f"{copied_run(cwd, source)}/ppo_trxl.cleanrl_model"],
        "is not a training checkpoint",
    ),
    "resume-other-env": (
        lambda cwd, source: ["--resume", copied_run(cwd, source), "--env-id", "MortarMayhem-Grid-v0"],
        "--env-id MortarMayhem-Grid-v0 differs from the checkpoint's ProofofMemory-v0",
    ),
    "resume-other-dim": (
        lambda cwd, source: ["--resume", copied_run(cwd, source), "--trxl-dim", "64"],
        "resume with the flags that built it; the flags that differ: --trxl-dim 64 (the checkpoint's 32)",
    ),
    "resume-other-encoding": (
        lambda cwd, source: ["--resume", copied_run(cwd, source), "--trxl-positional-encoding", "learned"],
        "the flags that differ: --trxl-positional-encoding learned (the checkpoint's absolute)",
    ),
    "resume-flat-optimizer-state": (flat_optimizer_state, "does not fit this ppo_trxl.py"),
    "resume-other-memory-length": (
        lambda cwd, source: ["--resume", copied_run(cwd, source), "--trxl-memory-length", "4"],
        "memory length 4 differs",
    ),
    "checkpoint-interval": (lambda cwd, _: tiny("ProofofMemory-v0", checkpoint_interval=-1), "--checkpoint-interval"),
    "keep-checkpoints": (lambda cwd, _: tiny("ProofofMemory-v0", keep_checkpoints=0), "--keep-checkpoints"),
}


def files_under(folder):
    return {str(path.relative_to(folder)): path.stat().st_mtime_ns for path in Path(folder).rglob("*")}


@pytest.fixture(scope="module")
def bad_runs(bfloat16_run, start, tmp_path_factory):
    """Every bad-input run, all started at once: {case: (run, the files before it)}."""
    trainings = {}
    for case, (make_flags, _) in BAD_INPUTS.items():
        cwd = tmp_path_factory.mktemp(f"bad-{case}")
        flags = make_flags(cwd, bfloat16_run)
        before = files_under(cwd)
        trainings[case] = (start(flags, cwd), before)
    return {case: (training.finish(), before) for case, (training, before) in trainings.items()}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_long_run_input(bad_runs, case):
    run, before = bad_runs[case]
    assert run.returncode > 0, run.returncode
    assert "Traceback" not in run.stderr, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), run.stderr
    assert BAD_INPUTS[case][1] in lines[0], lines[0]
    assert not run.stdout.strip(), run.stdout
    assert files_under(run.cwd) == before
