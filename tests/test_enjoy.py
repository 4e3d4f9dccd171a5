"""enjoy.py end to end: real checkpoints from tiny `ppo_trxl.py --save-model` runs, played headless into videos that
are read back; the --hub path through huggingface_hub's own offline cache; every one-line error; and the rolling
memory window against the published rule played out with a whole episode's memory."""

import hashlib
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import cv2
import gymnasium as gym
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import enjoy  # noqa: E402
from ppo_trxl import Agent, context_length, make_env  # noqa: E402

TINY = (
    "--num-envs 2 --num-steps 32 --num-minibatches 2 --update-epochs 1 --trxl-dim 32 --trxl-num-heads 2 "
    "--trxl-num-layers 1 --trxl-memory-length 8 --total-timesteps 64 --no-cuda --save-model --checkpoint-interval 1"
).split()
TRAINED_ENVS = {"pom": "ProofofMemory-v0", "grid": "MortarMayhem-Grid-v0", "long": "long_env:Long-v0"}
HUB_REPO_FOLDER = "models--LilHairdy--cleanrl_memory_gym"
HUB_COMMIT = "4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c"
LONG_EPISODE = 1030  # past the limit T = 1024 of envs without one, and far past the memory length 8

# Like the Endless ids: no episode limit (max_episode_steps -1), and episodes that run past 1024 steps
LONG_ENV = f"""
import gymnasium as gym
import numpy as np


class LongEnv(gym.Env):
    metadata = {{"render_modes": ["rgb_array"], "render_fps": 30}}

    def __init__(self, render_mode=None):
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (3,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self.render_mode = render_mode

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.max_episode_steps, self.t = -1, 0
        return self.np_random.uniform(-1, 1, 3).astype(np.float32), {{}}

    def step(self, action):
        self.t += 1
        return self.np_random.uniform(-1, 1, 3).astype(np.float32), float(action), self.t >= {LONG_EPISODE}, False, {{}}

    def render(self):
        return np.full((32, 48, 3), self.t % 256, dtype=np.uint8)  # frame k is grey level k % 256


gym.register("Long-v0", entry_point=LongEnv)
"""


def start(script, *args, cwd, hf_home, **environment):
    env = {key: value for key, value in os.environ.items() if key not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), str(cwd)]),
        SDL_VIDEODRIVER="dummy",
        SDL_AUDIODRIVER="dummy",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_HOME=str(hf_home),
        HF_HUB_CACHE=str(Path(hf_home) / "hub"),
    )
    env.update(environment)
    command = [sys.executable, str(ROOT / script), *map(str, args)]
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process):
    stdout, stderr = process.communicate(timeout=300)
    return types.SimpleNamespace(returncode=process.returncode, stdout=stdout, stderr=stderr)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Trains the tiny checkpoints side by side; returns the work folder and {name: checkpoint path}."""
    folder = tmp_path_factory.mktemp("enjoy")
    (folder / "long_env.py").write_text(LONG_ENV)
    runs = {
        name: start("ppo_trxl.py", "--env-id", env_id, "--exp-name", name, *TINY, cwd=folder, hf_home=folder / "hf")
        for name, env_id in TRAINED_ENVS.items()
    }
    checkpoints = {}
    for name, process in runs.items():
        result = finish(process)
        assert result.returncode == 0, result.stderr
        (checkpoints[name],) = folder.glob(f"runs/*/{name}.cleanrl_model")
    return types.SimpleNamespace(folder=folder, checkpoints=checkpoints)


def enjoy_py(trained, *args, hf_home=None):
    return finish(start("enjoy.py", *args, cwd=trained.folder, hf_home=hf_home or trained.folder / "hf"))


def episode_lengths(stdout):
    return [int(length) for length in re.findall(r"^episode \d+/\d+: return \S+, length (\d+)$", stdout, re.M)]


def read_video(path):
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            return frames
        frames.append(frame)


def video_shape(frame_shape, num_layers):
    height = max(frame_shape[0], enjoy.panel_height(num_layers))
    width = frame_shape[1] + enjoy.PANEL_WIDTH
    return (height + height % 2, width + width % 2, 3)


def test_video_of_vector_agent(trained):
    result = enjoy_py(trained, "--name", trained.checkpoints["pom"], "--episodes", 2, "--seed", 3, "--video", "pom.mp4")
    assert result.returncode == 0, result.stderr
    lengths = episode_lengths(result.stdout)
    assert len(lengths) == 2
    frames = read_video(trained.folder / "pom.mp4")
    assert len(frames) == sum(lengths) + len(lengths)  # every step's frame, and each episode's last one
    assert {frame.shape for frame in frames} == {video_shape((96, 528), num_layers=1)}
    assert not list(trained.folder.glob("*.part.mp4"))


def test_video_of_image_agent_shows_the_debug_render(trained):
    result = enjoy_py(trained, "--name", trained.checkpoints["grid"], "--deterministic", "--seed", 4, "--video", "grid.mp4")
    assert result.returncode == 0, result.stderr
    (length,) = episode_lengths(result.stdout)
    frames = read_video(trained.folder / "grid.mp4")
    assert len(frames) == length + 1
    assert {frame.shape for frame in frames} == {video_shape((336, 336), num_layers=1)}
    env = make_env("MortarMayhem-Grid-v0", 0, False, "", render_mode="debug_rgb_array")()
    env.reset(seed=4)
    first_frame = cv2.cvtColor(env.render(), cv2.COLOR_RGB2BGR)
    env.close()
    assert np.abs(frames[0][:336, :336].astype(float) - first_frame).mean() < 8  # mp4 is lossy


def test_episodes_past_the_episode_limit_and_memory_length(trained):
    result = enjoy_py(trained, "--name", trained.checkpoints["long"], "--video", "long.mp4")
    assert result.returncode == 0, result.stderr
    assert episode_lengths(result.stdout) == [LONG_EPISODE]
    frames = read_video(trained.folder / "long.mp4")
    assert len(frames) == LONG_EPISODE + 1
    assert {frame.shape for frame in frames} == {video_shape((32, 48), num_layers=1)}
    for step in (0, 700, LONG_EPISODE):
        assert abs(frames[step][4:28, 4:44].mean() - step % 256) < 6


def test_run_directory_plays_its_model_else_its_newest_checkpoint(trained):
    """A run directory plays its --save-model file; one that is still training (checkpoints only) its newest
    checkpoint, which after the run's last iteration holds the same weights."""
    run_dir = trained.checkpoints["pom"].parent
    training = trained.folder / "still_training"
    (training / "checkpoints").mkdir(parents=True)
    (checkpoint,) = (run_dir / "checkpoints").glob("step-*.pt")
    (training / "checkpoints" / checkpoint.name).write_bytes(checkpoint.read_bytes())
    flags = ("--deterministic", "--episodes", 1, "--seed", 5)
    saved, in_training = [enjoy_py(trained, "--name", folder, *flags) for folder in (run_dir, training)]
    assert saved.returncode == in_training.returncode == 0, saved.stderr + in_training.stderr
    header, *rest = saved.stdout.splitlines()
    assert header == f"ProofofMemory-v0 | {run_dir / 'pom.cleanrl_model'} | cpu | deterministic actions"
    assert rest[0] == "no display to show the episodes on: add --video agent.mp4 to watch them"
    assert re.search(r"^1 episode: return \S+ \+- 0.000, length", saved.stdout, re.M)
    assert in_training.stdout.splitlines()[0] == (
        f"ProofofMemory-v0 | {training / 'checkpoints' / checkpoint.name} | cpu | deterministic actions"
    )
    assert in_training.stdout.splitlines()[1:] == rest


def test_max_steps_ends_endless_episodes(trained):
    result = enjoy_py(trained, "--name", trained.checkpoints["long"], "--episodes", 2, "--max-steps", 50)
    assert result.returncode == 0, result.stderr
    assert episode_lengths(result.stdout) == [50, 50]


def test_action_names_where_the_env_gives_them():
    minigrid = make_env("MiniGrid-MemoryS9-v0", 0, False, "")()
    assert enjoy.action_names(minigrid)[:3] == ["left", "right", "forward"]
    assert enjoy.action_names(gym.make("ProofofMemory-v0")) == ["left", "right"]
    assert enjoy.action_names(make_env("MortarMayhem-Grid-v0", 0, False, "")()) is None


def test_unreachable_hub_fails_at_once_without_retries(trained):
    """Not offline by HF_HUB_OFFLINE, but no network: one line at once instead of the hub client's retries."""
    process = start(
        "enjoy.py",
        "--hub",
        "--name",
        "ProofofMemory-v0_1.nn",
        cwd=trained.folder,
        hf_home=trained.folder / "unreachable_hf",
        HF_HUB_OFFLINE="0",
        HF_ENDPOINT="https://hub.invalid",  # a top-level domain that never resolves
    )
    result = finish(process)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # no "Retrying in 1s" lines
    assert lines[0].startswith("error: the Hugging Face hub cannot be reached and 'ProofofMemory-v0_1.nn' is not in its")


def test_deterministic_play_repeats_and_sums_up(trained):
    args = ("--name", trained.checkpoints["pom"], "--deterministic", "--episodes", 3, "--seed", 5)
    processes = [start("enjoy.py", *args, cwd=trained.folder, hf_home=trained.folder / "hf") for _ in range(2)]
    first, second = [finish(process) for process in processes]
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert first.stdout == second.stdout
    returns = [float(value) for value in re.findall(r"^episode \d+/3: return (\S+),", first.stdout, re.M)]
    summary = re.search(r"^3 episodes: return (\S+) \+- (\S+), length", first.stdout, re.M)
    assert len(returns) == 3 and summary
    assert float(summary[1]) == pytest.approx(np.mean(returns), abs=1e-3)
    assert float(summary[2]) == pytest.approx(np.std(returns), abs=1e-3)


def test_hub_download_from_the_offline_cache(trained):
    """HF_HUB_OFFLINE=1 and a cache laid out as huggingface_hub writes it: refs/main, blobs, snapshot links."""
    repo = trained.folder / "hub_cache" / "hub" / HUB_REPO_FOLDER
    blob = trained.checkpoints["pom"].read_bytes()
    blob_name = hashlib.sha256(blob).hexdigest()
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / blob_name).write_bytes(blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_COMMIT)
    (repo / "snapshots" / HUB_COMMIT).mkdir(parents=True)
    (repo / "snapshots" / HUB_COMMIT / "ProofofMemory-v0_1.nn").symlink_to(Path("..", "..", "blobs", blob_name))
    result = enjoy_py(
        trained, "--hub", "--name", "ProofofMemory-v0_1.nn", "--video", "hub.mp4", hf_home=trained.folder / "hub_cache"
    )
    assert result.returncode == 0, result.stderr
    (length,) = episode_lengths(result.stdout)
    assert len(read_video(trained.folder / "hub.mp4")) == length + 1


def foreign_files(folder, checkpoint):
    """Files that are not checkpoints of this format, each made from real bytes or a real checkpoint."""
    (folder / "notes.txt").write_text("not a checkpoint\n")
    (folder / "empty_run").mkdir()
    torch.save({"weights": torch.zeros(3)}, folder / "no_keys.pt")
    published = torch.load(checkpoint, weights_only=True)
    variants = {
        "wrong_shapes.pt": {"trxl_dim": 16},
        "unknown_env.pt": {"env_id": "NoSuchEnv-v0"},
        "missing_module.pt": {"env_id": "no_such_package:NoSuchEnv-v0"},
    }
    for name, changes in variants.items():
        torch.save({**published, "args": {**published["args"], **changes}}, folder / name)


ERRORS = {
    "missing file": (["--name", "no_such.cleanrl_model"], "no checkpoint file 'no_such.cleanrl_model'"),
    "text file": (["--name", "notes.txt"], "'notes.txt' is not a PPO-TrXL checkpoint: torch.load cannot read it"),
    "empty run directory": (["--name", "empty_run"], "the run directory 'empty_run' holds no model"),
    "unpublished hub name": (["--hub", "--name", "MortarMayhem-v0_1.nn"], "'MortarMayhem-v0_1.nn' is not a published agent"),
    "max steps": (["--name", "no_keys.pt", "--max-steps", "0"], "--max-steps must be at least 1"),
    "torch file of another kind": (["--name", "no_keys.pt"], "'no_keys.pt' is not a PPO-TrXL checkpoint"),
    "weights that do not fit": (["--name", "wrong_shapes.pt"], "do not fit the model that its args describe"),
    "env id not registered": (["--name", "unknown_env.pt"], "unknown env id 'NoSuchEnv-v0'"),
    "env module not installed": (["--name", "missing_module.pt"], "cannot import module 'no_such_package'"),
    "hub offline, file not cached": (
        ["--hub", "--name", "ProofofMemory-v0_1.nn"],
        "offline (HF_HUB_OFFLINE is set) and 'ProofofMemory-v0_1.nn' is not in its local cache: download it by hand",
    ),
}


@pytest.fixture(scope="module")
def error_runs(trained):
    """Runs every error case side by side, each with an empty hub cache."""
    foreign_files(trained.folder, trained.checkpoints["pom"])
    processes = {
        case: start("enjoy.py", *args, cwd=trained.folder, hf_home=trained.folder / "empty_hf")
        for case, (args, _) in ERRORS.items()
    }
    return {case: finish(process) for case, process in processes.items()}


@pytest.mark.parametrize("case", ERRORS)
def test_errors_are_one_line(error_runs, case):
    result = error_runs[case]
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert ERRORS[case][1] in lines[0]


def test_player_acts_as_the_published_model_given_the_windows_of_the_rule(trained, monkeypatch):
    """enjoy's Player acts on the trainer's timeline (rollout_step), which begins anew every TIMELINE_STEPS steps and
    carries the last C over. Its values and attention equal the published interface's, given the windows that the
    window rule spells out with the whole episode's memory kept: at step t the C + 1 slots [0..C] while t <= C,
    [t-C..t] after, of which the steps before t are attended (C = M - 1 as published)."""
    monkeypatch.setattr(enjoy, "TIMELINE_STEPS", 5)
    weights, args = enjoy.load_checkpoint(str(trained.checkpoints["long"]), "cpu")
    agent = Agent(args, gym.spaces.Box(-1.0, 1.0, (3,)), (2,), 1024)
    agent.load_state_dict(weights)
    C = context_length(args.trxl_memory_length)
    steps = 3 * args.trxl_memory_length + 2
    episode_memory = torch.zeros((steps, args.trxl_num_layers, args.trxl_dim))  # (T, L, D)
    observations = torch.rand((steps, 3), generator=torch.Generator().manual_seed(0)) * 2 - 1
    player = enjoy.Player(agent, "float32", "cpu")
    for t in range(steps):
        memory_indices = torch.arange(C + 1) + max(t - C, 0)
        memory_mask = (memory_indices < t).float()
        with torch.inference_mode():
            trxl_out, new_memory, published_weights = agent.window_pass(
                observations[t : t + 1], episode_memory[memory_indices][None], memory_mask[None], memory_indices[None]
            )
            expected_value = agent.policy_and_value(trxl_out).value[0]
        episode_memory[t] = new_memory[0]

        _, value, by_age = player.act(observations[t], t, deterministic=True)
        torch.testing.assert_close(value, expected_value)
        expected_by_age = torch.full((args.trxl_num_layers, C), float("nan"))  # ages C .. 1, oldest first
        ages = t - memory_indices[: min(t, C)]
        expected_by_age[:, C - ages] = torch.stack([w[0].mean(0)[: min(t, C)] for w in published_weights])
        torch.testing.assert_close(by_age, expected_by_age, equal_nan=True)
    assert player.timeline.steps[0, C + player.s - 1] == steps - 1  # in the timeline's sixth stretch of 5 steps


def test_help_says_what_it_does_with_examples():
    result = subprocess.run([sys.executable, str(ROOT / "enjoy.py"), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Watch and evaluate a trained PPO-TrXL agent" in result.stdout
    assert "python enjoy.py --hub --name Endless-MortarMayhem-v0_12.nn" in result.stdout
