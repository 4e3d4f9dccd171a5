"""ppo_trxl.py under torchrun, for real: two ranks in subprocesses, with gloo on the CPU.

A run that finishes, a run stopped by SIGTERM and resumed, a simulated two-node run, and inputs that must stop
every rank at start. Every launch works in its own temporary folder, so `runs/` lands there.
"""

import hashlib
import os
import re
import shutil
import signal
import socket
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from test_train import ALWAYS_LOGGED, ROOT, SCRIPT, Launch, Run, load_agent, tiny, train_env  # noqa: F401

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import ppo_trxl  # noqa: E402

RANKS = 2
BATCH = 64  # per rank: 2 envs x 32 steps
GLOBAL_BATCH = RANKS * BATCH
POM_LIMIT = 16
TIMEOUT = 120
RUN_ITERATIONS = 4
STOP_ITERATIONS = 24
# ranks write to the same console unbuffered, so one rank's line may land between another's text and its newline
DIGEST = re.compile(r"rank (\d+): parameters ([0-9a-f]{16})")
STOP = re.compile(
    r"stopped by SIGTERM at step (\d+); resume with: .*?ppo_trxl\.py --resume (runs/ProofofMemory-v0__ppo_trxl__1__\d+)"
)
OWN_TRACEBACK = re.compile(r'File "[^"]*ppo_trxl\.py", line')


def torchrun(*options):
    launcher = Path(sys.executable).with_name("torchrun")
    prefix = [str(launcher)] if launcher.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    return [*prefix, *options]


def standalone(flags):
    return torchrun("--standalone", "--nproc-per-node", str(RANKS), str(SCRIPT), *flags)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def launch(tmp_path_factory, train_env):
    """launch(command, cwd, **env) starts command in cwd (a folder, or the name of a fresh one) with env added."""

    def start(command, cwd, **env):
        if isinstance(cwd, str):
            cwd = tmp_path_factory.mktemp(cwd)
        return Launch(command, cwd, {**train_env, **env}, TIMEOUT)

    return start


def state_digest(state_dict):
    """parameters_digest of a model that holds state_dict: sha256 over its tensors in order, 16 hex digits."""
    digest = hashlib.sha256()
    for tensor in state_dict.values():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def rank_digests(run):
    """{rank: digest} from the `rank R: parameters <digest>` lines, each rank once."""
    found = DIGEST.findall(run.stdout)
    ranks = sorted(int(rank) for rank, _ in found)
    assert ranks == list(range(RANKS)), f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    return {int(rank): digest for rank, digest in found}


def common_digest(run):
    digests = set(rank_digests(run).values())
    assert len(digests) == 1, run.stdout
    return digests.pop()


def expected_iterations(first, last, of):
    return [(i, of, GLOBAL_BATCH * i, GLOBAL_BATCH * of) for i in range(first, last + 1)]


def published_model(run):
    """The --save-model file, loaded into the Agent with strict=True; returns the file and the Agent."""
    path = run.run_dir / "ppo_trxl.cleanrl_model"
    assert f"model saved to runs/{run.run_dir.name}/ppo_trxl.cleanrl_model" in run.stdout
    assert path.is_file(), list(run.run_dir.iterdir())
    model = torch.load(path, map_location="cpu", weights_only=True)
    agent, _ = load_agent(ppo_trxl, model, gym.spaces.Box(-1.0, 1.0, (3,), np.float32), POM_LIMIT)
    return model, agent


def checkpoints(run):
    return sorted((run.run_dir / "checkpoints").glob("step-*.pt"))


def check_no_own_traceback(run):
    assert not OWN_TRACEBACK.search(run.stderr), run.stderr
    # torchrun waits for its ranks to stop before it kills them
    assert "forcefully exiting" not in run.stderr, run.stderr


# 1. Two ranks on one node


@pytest.fixture(scope="module")
def pom_run(launch):
    flags = tiny("ProofofMemory-v0", "save-model", total_timesteps=RUN_ITERATIONS * GLOBAL_BATCH)
    return launch(standalone(flags), "two-ranks").finish()


def test_two_ranks_finish_with_the_same_parameters(pom_run):
    pom_run.check()
    check_no_own_traceback(pom_run)
    assert len(set(rank_digests(pom_run).values())) == 1, pom_run.stdout


def test_saved_model_holds_what_every_rank_held(pom_run):
    digest = common_digest(pom_run.check())
    model, agent = published_model(pom_run)
    assert state_digest(model["model_weights"]) == digest
    assert ppo_trxl.parameters_digest(agent) == digest
    # the saved flags are per rank, as given on the command line
    assert model["args"]["num_envs"] == 2 and model["args"]["batch_size"] == BATCH
    assert model["args"]["total_timesteps"] == RUN_ITERATIONS * GLOBAL_BATCH


def test_logged_steps_count_both_ranks_envs(pom_run):
    pom_run.check()
    # pom_run.run_dir checks that there is one run folder; only rank 0 writes one event file into it
    assert len(list(pom_run.run_dir.glob("events.out.tfevents.*"))) == 1, list(pom_run.run_dir.iterdir())
    assert sorted(path.name for path in pom_run.run_dir.iterdir() if not path.name.startswith("events.")) == [
        "ppo_trxl.cleanrl_model"
    ]
    scalars = pom_run.scalars()
    steps = [GLOBAL_BATCH * i for i in range(1, RUN_ITERATIONS + 1)]
    for tag in ALWAYS_LOGGED:
        assert [step for step, _ in scalars[tag]] == steps, tag
    assert all(5 <= value <= POM_LIMIT for _, value in scalars["episode/l_mean"]), scalars["episode/l_mean"]


def test_console_lines_come_from_rank_zero(pom_run):
    pom_run.check()
    assert pom_run.iterations() == expected_iterations(1, RUN_ITERATIONS, RUN_ITERATIONS), pom_run.stdout
    assert pom_run.stdout.count("model saved to") == 1, pom_run.stdout


# 2. Stopped by SIGTERM to torchrun, and resumed under torchrun


@pytest.fixture(scope="module")
def stopped(launch, tmp_path_factory):
    """A run stopped by SIGTERM sent to torchrun after its second iteration, and a copy of its folder as it was then."""
    flags = tiny("ProofofMemory-v0", "save-model", total_timesteps=STOP_ITERATIONS * GLOBAL_BATCH, checkpoint_interval=1)
    training = launch(standalone(flags), "sigterm")
    training.wait_for("iteration 2/")
    training.signal(signal.SIGTERM)
    run = training.finish()
    copy = tmp_path_factory.mktemp("sigterm-copy")
    if (run.cwd / "runs").is_dir():
        shutil.copytree(run.cwd / "runs", copy / "runs")
    return run, copy


def stop_message(run):
    matches = STOP.findall(run.stdout)
    assert len(matches) == 1, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    step, run_dir = matches[0]
    return int(step), run_dir


def test_sigterm_stops_every_rank_with_a_checkpoint(stopped):
    run, _ = stopped
    check_no_own_traceback(run)
    step, run_dir = stop_message(run)
    assert run_dir == f"runs/{run.run_dir.name}"
    # the signal came after the line of iteration 2: the ranks agree to stop after an iteration that follows it
    last = step // GLOBAL_BATCH
    assert step == GLOBAL_BATCH * last and 3 <= last < STOP_ITERATIONS, step
    assert run.iterations() == expected_iterations(1, last, STOP_ITERATIONS), run.stdout
    digest = common_digest(run)
    paths = checkpoints(run)
    assert paths and paths[-1].name == f"step-{step:012d}.pt", paths
    checkpoint = torch.load(paths[-1], map_location="cpu", weights_only=True)
    assert (checkpoint["global_step"], checkpoint["iteration"]) == (step, last)
    assert checkpoint["run_name"] == run.run_dir.name
    assert state_digest(checkpoint["model_weights"]) == digest
    # the averaged gradients reached the parameters' AdamW state
    states = checkpoint["optimizer"]["state"].values()
    assert sum(state["exp_avg"].abs().sum() for state in states) > 0
    assert sum(state["exp_avg_sq"].abs().sum() for state in states) > 0
    assert not (run.run_dir / "ppo_trxl.cleanrl_model").exists()
    assert "model saved" not in run.stdout


@pytest.fixture(scope="module")
def resumed(stopped, launch):
    run, _ = stopped
    _, run_dir = stop_message(run)
    return launch(standalone(["--resume", run_dir]), run.cwd).finish()


def test_distributed_resume_reaches_the_total(stopped, resumed):
    run, _ = stopped
    resumed.check()
    check_no_own_traceback(resumed)
    last = stop_message(run)[0] // GLOBAL_BATCH
    assert resumed.iterations() == expected_iterations(last + 1, STOP_ITERATIONS, STOP_ITERATIONS), resumed.stdout
    digest = common_digest(resumed)
    model, agent = published_model(resumed)
    assert state_digest(model["model_weights"]) == ppo_trxl.parameters_digest(agent) == digest
    newest = torch.load(checkpoints(resumed)[-1], map_location="cpu", weights_only=True)
    assert newest["global_step"] == STOP_ITERATIONS * GLOBAL_BATCH
    assert state_digest(newest["model_weights"]) == digest
    steps = [GLOBAL_BATCH * i for i in range(1, STOP_ITERATIONS + 1)]
    assert [step for step, _ in resumed.scalars()["losses/loss"]] == steps


def test_resume_on_one_rank_ends_at_the_total_or_refuses(stopped, launch):
    """The stopped two-rank run, resumed in a copy of its folder by plain python, as its stop message says.

    Its checkpoint counts iterations of two ranks' batches: on one rank it must still end at --total-timesteps,
    or refuse to start."""
    run, copy = stopped
    _, run_dir = stop_message(run)
    total = STOP_ITERATIONS * GLOBAL_BATCH
    single = launch([sys.executable, str(SCRIPT), "--resume", run_dir], copy).finish()
    steps = [step for _, _, step, _ in single.iterations()]
    assert all(step <= total for step in steps), single.stdout
    if single.returncode:
        # refusing to resume with another number of ranks is fine too, with a one-line error
        errors = [line for line in single.stderr.splitlines() if line.strip()]
        assert len(errors) == 1 and errors[0].startswith("error:"), single.stderr
        assert not steps, single.stdout
    else:
        assert steps and steps[-1] == total, single.stdout


# 3. Two nodes of one rank each, met through a c10d rendezvous on this machine


def two_nodes_command(node, endpoint, flags):
    """torchrun for one of two nodes of one rank each, which meet at endpoint."""
    options = (
        f"--nnodes 2 --node-rank {node} --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint {endpoint} "
        f"--rdzv-id ppo-trxl-{os.getpid()}"
    )
    return torchrun(*options.split(), str(SCRIPT), *flags)


def test_two_nodes_train_like_one(launch, pom_run):
    endpoint = f"127.0.0.1:{free_port()}"
    flags = tiny("ProofofMemory-v0", "save-model", total_timesteps=RUN_ITERATIONS * GLOBAL_BATCH)
    nodes = [launch(two_nodes_command(node, endpoint, flags), f"node-{node}") for node in range(2)]
    runs = [node.finish() for node in nodes]
    for run in runs:
        run.check()
        check_no_own_traceback(run)
    # each node's console shows its own rank; the rendezvous decides which node holds rank 0
    found = [DIGEST.findall(run.stdout) for run in runs]
    assert sorted(int(rank) for lines in found for rank, _ in lines) == [0, 1], [run.stdout for run in runs]
    digests = {digest for lines in found for _, digest in lines}
    assert len(digests) == 1, found
    (writer,) = [run for run in runs if (run.cwd / "runs").exists()]
    (other,) = [run for run in runs if run is not writer]
    assert writer.iterations() == expected_iterations(1, RUN_ITERATIONS, RUN_ITERATIONS), writer.stdout
    assert not other.iteration_lines, other.stdout
    model, _ = published_model(writer)
    assert state_digest(model["model_weights"]) == digests.pop() == common_digest(pom_run)


# 4. Inputs that stop every rank at start


def test_less_than_one_global_batch(launch):
    # 127 steps hold one rank's batch (64) but not the two ranks' (128)
    run = launch(standalone(tiny("ProofofMemory-v0", total_timesteps=GLOBAL_BATCH - 1)), "less-than-a-batch").finish()
    assert run.returncode != 0
    check_no_own_traceback(run)
    message = (
        f"error: --total-timesteps {GLOBAL_BATCH - 1} is less than one batch ({GLOBAL_BATCH} = num_envs x num_steps x ranks)"
    )
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert errors == [message] * RANKS, run.stderr
    assert not run.iteration_lines and not DIGEST.search(run.stdout)
    assert not (run.cwd / "runs").exists()


@pytest.mark.parametrize("flag, values", [("seed", (1, 2)), ("trxl-dim", (32, 64))], ids=["seed", "trxl-dim"])
def test_ranks_that_disagree_stop(launch, tmp_path_factory, flag, values):
    cwd = tmp_path_factory.mktemp(f"disagree-{flag}")
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(RANKS)}
    ranks = [
        launch(
            [
                sys.executable,
                str(SCRIPT),
                *tiny("ProofofMemory-v0", total_timesteps=RUN_ITERATIONS * GLOBAL_BATCH),
                f"--{flag}",
                str(value),
            ],
            cwd,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            **rendezvous,
        )
        for rank, value in enumerate(values)
    ]
    message = f"error: rank 1's flags differ from rank 0's (--{flag}): start every rank with the same command"
    for run in [rank.finish() for rank in ranks]:
        assert run.returncode == 1, f"exit code {run.returncode}\nstdout:\n{run.stdout}\nstderr:\n{run.stderr}"
        assert "Traceback" not in run.stderr, run.stderr
        assert [line for line in run.stderr.splitlines() if line.strip()] == [message], run.stderr
        assert not run.stdout.strip(), run.stdout
    assert not (cwd / "runs").exists()
