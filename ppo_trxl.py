"""PPO with a Transformer-XL episodic memory (PPO-TrXL) for partially observable tasks.

Docs: README.md. A one-minute run on the CPU:

    python ppo_trxl.py --env-id ProofofMemory-v0 --total-timesteps 25000 --num-envs 16 --num-steps 128 \
        --update-epochs 4 --trxl-num-layers 4 --trxl-num-heads 1 --trxl-dim 64 --trxl-memory-length 16 \
        --trxl-positional-encoding none --vf-coef 0.1 --max-grad-norm 0.5 --init-lr 3e-4 --init-ent-coef 0.001 \
        --clip-coef 0.2 --no-cuda

How memory works here. Every layer caches its input at every step; at an episode's step t a layer attends to
the cached inputs of the same episode's last steps before t, as many as the window rule (reach) lets it: a band
that ends just before the current step. The band of a sample is a slice of its env's timeline, the stream of
steps that the env produced. While acting, each layer's keys and values of a step are computed once and cached,
as language models do at inference; the update computes them once per chunk of an env's consecutive steps, and
the scores of a chunk are one matrix product with a band mask. No window is copied per sample. And the update
encodes each distinct image of a minibatch once: on memory tasks many repeat.

The flags beyond the published model (--trxl-gate, --trxl-positional-encoding rotary, --trxl-segment-gradients) are
off by default: a published configuration trains as published.
"""

import ctypes
import dataclasses
import glob
import hashlib
import importlib
import json
import math
import multiprocessing
import os
import random
import shutil
import signal
import sys
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Annotated, Literal, NamedTuple, Optional

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")


def missing_package(error):
    """Stops with one line that names the package that a ModuleNotFoundError misses and how to install it."""
    raise SystemExit(
        f"error: the package {error.name} is not installed for {sys.executable}: "
        "install the requirements (pip install -r requirements/requirements.txt, see README.md) or use their environment"
    )


try:
    import cv2
    import gymnasium as gym
    import memory_gym  # noqa: F401  (registers the Memory Gym ids)
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.nn as nn
    import torch.nn.functional as F
    import tyro
    from gymnasium.wrappers.record_video import capped_cubic_video_schedule
    from minigrid.envs.memory import MemoryEnv
    from minigrid.wrappers import ImgObsWrapper, RGBImgPartialObsWrapper
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm
except ModuleNotFoundError as missing:
    missing_package(missing)

import pom_env  # noqa: F401  (registers ProofofMemory-v0)

POSITIONAL_ENCODINGS = ("absolute", "learned", "rotary", "none")
"""The --trxl-positional-encoding choices; checkpoints of the published model may store none as ""."""
GATES = ("none", "gru")
"""The --trxl-gate choices."""


def encoding_of(name):
    """The encoding a flag value or a checkpoint's trxl_positional_encoding means: "absolute", "learned", "rotary", or
    "" for none."""
    return "" if name == "none" else name


DTYPES = ("float32", "bfloat16")
"""The --memory-dtype and --encoder-dtype choices."""

DEFAULT_EPISODE_LIMIT = 1024
"""The episode limit T of envs that have none (the Endless ids): it sizes the positional encoding."""


@dataclass
class ExperimentArgs:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """make cuDNN's convolutions deterministic (torch.backends.cudnn.deterministic); --no-torch-deterministic may be faster"""
    cuda: bool = True
    """train on the GPU when one is available; --no-cuda trains on the CPU"""
    track: bool = False
    """track the experiment with Weights and Biases"""
    wandb_project_name: str = "cleanRL"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    capture_video: bool = False
    """record videos of env 0's episodes 0, 1, 8, 27, ... to `videos/{run_name}`"""
    save_model: bool = False
    """save the final model to `runs/{run_name}/{exp_name}.cleanrl_model` (the published format, for enjoy.py)"""
    progress: bool = False
    """show a progress bar (tqdm) instead of a line per iteration"""


@dataclass
class EnvArgs:
    env_id: str = "MortarMayhem-Grid-v0"
    """the id of the environment (`module:EnvId` imports the module that registers it)"""
    reset_params: Optional[str] = None
    """Memory Gym task settings for every reset of every env, a JSON object such as '{"command_count": [3]}'"""
    num_envs: int = 32
    """the number of parallel game environments"""
    async_envs: bool = False
    """step every env in a subprocess of its own (gymnasium's AsyncVectorEnv): faster with spare CPU cores, as on GPU machines"""


@dataclass
class PPOArgs:
    total_timesteps: int = 200000000
    """total timesteps of the experiments"""
    init_lr: float = 2.75e-4
    """the initial learning rate of the optimizer"""
    final_lr: float = 1.0e-5
    """the final learning rate of the optimizer after linearly annealing"""
    num_steps: int = 512
    """the number of steps to run in each environment per policy rollout"""
    anneal_steps: int = 32 * 512 * 10000
    """the number of steps to linearly anneal the learning rate and entropy coefficient from initial to final (0: constant)"""
    gamma: float = 0.995
    """the discount factor gamma"""
    gae_lambda: float = 0.95
    """the lambda for the general advantage estimation"""
    num_minibatches: int = 8
    """the number of mini-batches (each holds a chunk of num_steps / num_minibatches steps of every env)"""
    update_epochs: int = 3
    """the K epochs to update the policy"""
    norm_adv: bool = False
    """normalize the advantages of each minibatch"""
    clip_coef: float = 0.1
    """the surrogate clipping coefficient"""
    clip_vloss: bool = True
    """clip the value loss with clip_coef, as per the paper"""
    init_ent_coef: float = 0.0001
    """initial coefficient of the entropy bonus"""
    final_ent_coef: float = 0.000001
    """final coefficient of the entropy bonus after linearly annealing"""
    vf_coef: float = 0.5
    """coefficient of the value function"""
    max_grad_norm: float = 0.25
    """the maximum norm for the gradient clipping"""
    target_kl: Optional[float] = None
    """the target KL divergence threshold"""
    reconstruction_coef: float = 0.0
    """the coefficient of the observation reconstruction loss, if set to 0.0 the reconstruction loss is not used"""


@dataclass
class TrXLArgs:
    trxl_num_layers: int = 3
    """the number of transformer layers"""
    trxl_num_heads: int = 4
    """the number of heads used in multi-head attention"""
    trxl_dim: int = 384
    """the dimension of the transformer"""
    trxl_memory_length: int = 119
    """the length of the memory window (clipped to the episode limit); the last memory_length - 1 steps are attended"""
    trxl_positional_encoding: Literal[POSITIONAL_ENCODINGS] = "absolute"
    """the positional encoding of the memory: absolute (sinusoids), learned, rotary (scores depend on distance), or none"""
    trxl_gate: Literal[GATES] = "none"
    """every layer's residual connections: plain sums, as published, or GTrXL's GRU gates (Parisotto et al. 2020)"""
    trxl_gate_bias: float = 2.0
    """the bias of the GRU gates' update gate: the larger, the nearer to the identity a layer starts"""
    trxl_segment_gradients: bool = False
    """let the update's gradients flow between the steps of a minibatch's chunks, as Transformer-XL trains its segments"""


@dataclass
class CheckpointArgs:
    checkpoint_minutes: float = 30.0
    """write a training checkpoint to `runs/{run_name}/checkpoints` once this many minutes have passed since the last (0: off)"""
    checkpoint_interval: int = 0
    """also write a training checkpoint every this many iterations (0: off); a stop by a signal writes one too"""
    keep_checkpoints: int = 3
    """how many of the newest training checkpoints to keep"""
    resume: Optional[str] = None
    """a training checkpoint or a run directory whose newest checkpoint to continue; its flags are the defaults"""


@dataclass
class PerformanceArgs:
    memory_dtype: Literal[DTYPES] = "float32"
    """the dtype in which the cached memory of the rollout is stored: bfloat16 halves it"""
    encoder_dtype: Literal[DTYPES] = "float32"
    """the dtype of the image encoder and decoder: bfloat16 (mixed precision) pays on GPUs and on CPUs with AMX"""
    compile: bool = False
    """compile the rollout's step and the update's pass with torch.compile: a minute at the start, and a C++ compiler"""


ARG_GROUPS = {
    "experiment": ExperimentArgs,
    "env": EnvArgs,
    "ppo": PPOArgs,
    "trxl": TrXLArgs,
    "checkpoints": CheckpointArgs,
    "performance": PerformanceArgs,
}
"""The flags as --help shows them, group by group; every flag keeps its flat name (--gamma, not --ppo.gamma)."""


@dataclass
class Args(PerformanceArgs, CheckpointArgs, TrXLArgs, PPOArgs, EnvArgs, ExperimentArgs):
    """All flags in one flat dataclass (the bases' fields, in ARG_GROUPS' order), and the sizes they imply."""

    batch_size: int = field(init=False)
    """the batch size (num_envs * num_steps)"""
    minibatch_size: int = field(init=False)
    """the mini-batch size (batch_size // num_minibatches)"""
    num_iterations: int = field(init=False)
    """the number of iterations (total_timesteps // (batch_size x the number of ranks under torchrun))"""

    def __post_init__(self):
        self.batch_size = self.num_envs * self.num_steps
        self.minibatch_size = self.batch_size // max(self.num_minibatches, 1)
        self.num_iterations = self.total_timesteps // max(self.batch_size * world_size(), 1)


DESCRIPTION = """PPO with a Transformer-XL episodic memory (PPO-TrXL) for partially observable tasks (README.md).

Example, Proof of Memory in about a minute on a CPU:
  python ppo_trxl.py --env-id ProofofMemory-v0 --total-timesteps 25000 --num-envs 16 --num-steps 128 --update-epochs 4 \\
    --trxl-num-layers 4 --trxl-num-heads 1 --trxl-dim 64 --trxl-memory-length 16 --trxl-positional-encoding none \\
    --vf-coef 0.1 --max-grad-norm 0.5 --init-lr 3e-4 --init-ent-coef 0.001 --clip-coef 0.2 --no-cuda"""


def cli(defaults=None):
    """Args from the command line, the flags grouped in --help; defaults (Args) replace the built-in defaults."""
    defaults = defaults or Args()
    Flags = dataclasses.make_dataclass(
        "Flags", [(name, Annotated[group, tyro.conf.OmitArgPrefixes]) for name, group in ARG_GROUPS.items()]
    )
    grouped_defaults = Flags(
        **{
            name: group(**{flag.name: getattr(defaults, flag.name) for flag in dataclasses.fields(group)})
            for name, group in ARG_GROUPS.items()
        }
    )
    flags = tyro.cli(Flags, description=DESCRIPTION, default=grouped_defaults)
    return Args(**{name: value for group in ARG_GROUPS for name, value in vars(getattr(flags, group)).items()})


def world_size():
    """The number of processes that train together: torchrun's WORLD_SIZE, else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def fail(message):
    """Stops the program with a one-line error that says what is wrong and how to fix it. The line goes out in one
    write: the ranks of a distributed run share their stderr, and SystemExit's message and newline are two writes,
    between which another rank's line could fall."""
    sys.stderr.write(f"error: {message}\n")
    if dist.is_available() and dist.is_initialized():
        leave_process_group(1)
    sys.stderr.flush()
    raise SystemExit(1)


def leave_process_group(exit_code):
    """Ends a process of a distributed run without Python's shutdown. gloo's worker threads may still be releasing
    the last collective's tensors, and a thread that needs Python while the interpreter shuts down aborts the
    process (SIGABRT). Everything must be written before."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


def check_args(args):
    """Rejects flag combinations that cannot work, before any env is created or file written."""
    for names, holds, rule in (
        ("num_envs num_steps num_minibatches update_epochs trxl_num_layers trxl_num_heads", lambda v: v >= 1, "be at least 1"),
        ("keep_checkpoints", lambda v: v >= 1, "be at least 1"),
        ("init_lr clip_coef max_grad_norm target_kl", lambda v: v is None or v > 0, "be positive"),
        ("final_lr init_ent_coef final_ent_coef vf_coef reconstruction_coef", lambda v: v >= 0, "be 0 or positive"),
        ("anneal_steps", lambda v: v >= 0, "be 0 (constant coefficients) or positive"),
        ("gamma gae_lambda", lambda v: 0 <= v <= 1, "lie in [0, 1] (0.9 to 0.999 is usual)"),
        ("checkpoint_minutes checkpoint_interval", lambda v: v >= 0, "be 0 (off) or positive"),
    ):
        for name in names.split():
            if not holds(getattr(args, name)):
                fail(f"{flag(name)} is {getattr(args, name)}: it must {rule}")
    if args.num_steps % args.num_minibatches:
        fail(f"--num-minibatches {args.num_minibatches} does not divide --num-steps {args.num_steps}: choose a divisor")
    if args.num_iterations < 1:
        batch = f"{args.batch_size * world_size()} = num_envs x num_steps x ranks"
        fail(f"--total-timesteps {args.total_timesteps} is less than one batch ({batch})")
    if args.trxl_dim % args.trxl_num_heads:
        fail(f"--trxl-dim {args.trxl_dim} is not divisible by --trxl-num-heads {args.trxl_num_heads}")
    if args.trxl_positional_encoding == "rotary" and args.trxl_dim // args.trxl_num_heads % 2:
        fail("--trxl-positional-encoding rotary turns pairs of a head's features: --trxl-dim / --trxl-num-heads must be even")
    if args.trxl_memory_length < 1:
        fail(f"--trxl-memory-length {args.trxl_memory_length} is below 1 (1 is no memory at all, the memoryless control)")
    if args.compile and not cpp_compiler():
        fail("--compile needs a C++ compiler for torch.compile (g++, or the one $CXX names): install one or drop --compile")
    task_settings(args.env_id, args.reset_params)


def cpp_compiler():
    """The C++ compiler that torch.compile builds its CPU kernels with (g++, or $CXX), or None."""
    return shutil.which(os.environ.get("CXX", "g++"))


def flag(name):
    """The command line's spelling of the field name: --num-envs for num_envs."""
    return "--" + name.replace("_", "-")


def find_env_spec(env_id):
    """The registered spec of env_id; `module:EnvId` first imports the module that registers EnvId."""
    module, _, name = env_id.rpartition(":")
    if module:
        try:
            importlib.import_module(module)
        except ImportError as error:
            fail(f"cannot import module '{module}' of env id '{env_id}' ({error}): install it or fix the id")
    try:
        return gym.spec(name)
    except gym.error.Error:
        fail(
            f"unknown env id '{name}': use a Memory Gym id (e.g. MortarMayhem-Grid-v0), MiniGrid-MemoryS9-v0, "
            "ProofofMemory-v0, or module:EnvId for an env that a module registers"
        )


def env_class(env_id):
    """What builds env_id's envs: a class, for the ids of Memory Gym, MiniGrid and this project."""
    entry_point = find_env_spec(env_id).entry_point
    return gym.envs.registration.load_env_creator(entry_point) if isinstance(entry_point, str) else entry_point


def is_memory_gym(env_id):
    return env_class(env_id).__module__.startswith("memory_gym")


def watch_render_mode(env_id):
    """How to draw an env for people: Memory Gym can show the hidden ground truth, which the agent never sees."""
    return "debug_rgb_array" if is_memory_gym(env_id) else "rgb_array"


class VideoFile:
    """An mp4 file written frame by frame; it appears under its name only once close() has finished it."""

    def __init__(self, path, fps):
        root, extension = os.path.splitext(path)
        self.path, self.partial_path, self.fps = path, f"{root}.part{extension}", fps
        self.writer = None

    def write(self, frame):
        """frame (h, w, 3) uint8 BGR, opencv's order; every frame has the size of the first."""
        if self.writer is None:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            fourcc = cv2.VideoWriter_fourcc(*"mp4v")
            self.writer = cv2.VideoWriter(self.partial_path, fourcc, self.fps, frame.shape[1::-1])
            if not self.writer.isOpened():
                fail(
                    f"opencv cannot write the video '{self.path}': give it a name that ends in .mp4, in a folder you can write to"
                )
        self.writer.write(np.ascontiguousarray(frame))

    def close(self):
        if self.writer is not None:
            self.writer.release()
            os.replace(self.partial_path, self.path)


class VideoRecorder(gym.Wrapper):
    """Records episodes 0, 1, 8, 27, ... (cubes up to 1000, then every 1000th) to `folder/episode-{k}.mp4`."""

    def __init__(self, env, folder):
        super().__init__(env)
        self.folder, self.episode, self.video = folder, -1, None

    def reset(self, **kwargs):
        self.close_video()
        observation, info = self.env.reset(**kwargs)
        self.episode += 1
        if capped_cubic_video_schedule(self.episode):
            self.video = VideoFile(os.path.join(self.folder, f"episode-{self.episode}.mp4"), fps=30)
        self.record()
        return observation, info

    def step(self, action):
        result = self.env.step(action)
        self.record()
        return result

    def record(self):
        if self.video:
            self.video.write(cv2.cvtColor(self.env.render(), cv2.COLOR_RGB2BGR))

    def close_video(self):
        if self.video:
            self.video.close()
            self.video = None

    def close(self):
        self.close_video()
        super().close()


class TaskSettings(gym.Wrapper):
    """Passes Memory Gym task settings to every reset: a vector env resets a finished episode without options, and
    Memory Gym then goes back to its defaults."""

    def __init__(self, env, settings):
        super().__init__(env)
        self.settings = settings

    def reset(self, *, seed=None, options=None):
        return self.env.reset(seed=seed, options={**self.settings, **(options or {})})


def task_settings(env_id, reset_params):
    """The task settings (dict) that the JSON object reset_params gives env_id, checked against the env's own
    default_reset_parameters; {} without reset_params. Stops with one line when they do not fit the env."""
    if reset_params is None:
        return {}
    try:
        settings = json.loads(reset_params)
    except json.JSONDecodeError:
        settings = None
    if not isinstance(settings, dict):
        fail(f"--reset-params {reset_params} is not a JSON object: write it as '{{\"command_count\": [3]}}'")
    defaults = getattr(env_class(env_id), "default_reset_parameters", None)
    if not isinstance(defaults, dict):
        fail(f"{env_id} takes no task settings (only Memory Gym envs do): drop --reset-params")
    for key, value in settings.items():
        if key not in defaults:
            fail(f"--reset-params: {env_id} has no setting '{key}'; its settings are {', '.join(defaults)}")
        if not fits_setting(value, defaults[key]):
            fail(
                f"--reset-params: {key} takes a value like {json.dumps(defaults[key])} (its default), not {json.dumps(value)}"
            )
    return settings


def fits_setting(value, default):
    """Whether value has the type of a task setting's default (a number may stand for a float), or for a list, whether
    it is a non-empty list of such values."""
    if isinstance(default, list):
        return isinstance(value, list) and len(value) > 0 and all(fits_setting(v, default[0]) for v in value)
    return type(value) is type(default) or type(value) is int and type(default) is float


def make_env(env_id, idx, capture_video, run_name, render_mode=None, settings=None):
    """A thunk that builds env idx, reset with the task settings (dict, see task_settings) at every reset; with
    capture_video, env 0 records its episodes to `videos/{run_name}`."""

    def thunk():
        mode = render_mode or (watch_render_mode(env_id) if capture_video and idx == 0 else None)
        if "MiniGrid" in env_id:
            env = gym.make(env_id, agent_view_size=3, tile_size=28, render_mode=mode or "rgb_array")
            env = ImgObsWrapper(RGBImgPartialObsWrapper(env, tile_size=28))
            env = gym.wrappers.TimeLimit(env, 96)
        else:
            env = gym.make(env_id, render_mode=mode)
        if settings:
            env = TaskSettings(env, settings)
        if capture_video and idx == 0:
            env = VideoRecorder(env, f"videos/{run_name}")
        if is_minigrid_memory(env_id):  # outermost, so that the trainer reaches cue_in_view() without a lookup
            env = CueInView(env)
        return env

    find_env_spec(env_id)
    return thunk


def is_minigrid_memory(env_id):
    """Whether env_id is a MiniGrid Memory env (MemoryEnv or a subclass of it), whose grid tells where its cue lies."""
    creator = env_class(env_id)
    return isinstance(creator, type) and issubclass(creator, MemoryEnv)


class CueInView(gym.Wrapper):
    """A MiniGrid Memory env that tells whether the agent's view shows the cue, the object at (1, height // 2 - 1) of
    its start room. The agent never sees this: the trainer logs how much attention the steps that showed it get."""

    def cue_in_view(self):
        # the cue lies in the view's square (in_view) only while the agent stands in the open start room, where no
        # wall can hide it: the same answer as agent_sees (all of 32,000 random steps of 16 envs), without
        # rendering the view again (0.4 ms a step of the 16 envs instead of 1.5 ms; their steps take 12 ms)
        env = self.env.unwrapped
        return env.in_view(1, env.height // 2 - 1)


def cue_in_view(envs):
    """(E,) bool: whether each env's view shows its cue (CueInView), asked of the vector env's envs directly: through
    gymnasium's wrappers every attribute lookup would raise and filter a deprecation warning, at a cost of a few ms a step."""
    return np.array(envs.unwrapped.call("cue_in_view"), dtype=bool)


def in_subprocess(thunk):
    """thunk for an AsyncVectorEnv worker, which leaves SIGINT and SIGTERM to the trainer: a Ctrl-C reaches every
    process of the terminal, and the trainer still steps the envs to finish its iteration before it stops them."""

    def worker_thunk():
        if multiprocessing.parent_process() is not None:  # a worker, not the copy that AsyncVectorEnv makes here first
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return thunk()

    return worker_thunk


def make_envs(args, run_name, seed, capture_video=False):
    """The vector env of args.num_envs envs, reset with seed, with what the model needs to know of it.

    Returns envs, the first observations, the observation space, the action branches and the episode limit, which
    Memory Gym sets in reset from the task settings (--reset-params).
    """
    settings = task_settings(args.env_id, args.reset_params)
    max_episode_steps = episode_limit_under(args.env_id, settings)
    thunks = [make_env(args.env_id, i, capture_video, run_name, settings=settings) for i in range(args.num_envs)]
    if args.async_envs:
        envs = gym.vector.AsyncVectorEnv([in_subprocess(thunk) for thunk in thunks])
    else:
        envs = gym.vector.SyncVectorEnv(thunks)
    observation_space, action_space = envs.single_observation_space, envs.single_action_space
    check_observation_space(observation_space, args.reconstruction_coef)
    action_space_shape = action_branches(action_space)
    # gymnasium 0.29's own vector RecordEpisodeStatistics trips its wrapper-attribute deprecation warning
    warnings.filterwarnings("ignore", message=".*to get variables from other wrappers is deprecated")
    envs = gym.wrappers.RecordEpisodeStatistics(envs)
    next_obs, _ = envs.reset(seed=seed)
    return envs, next_obs, observation_space, action_space_shape, max_episode_steps


def episode_limit_under(env_id, settings):
    """The episode limit T of env_id under the task settings (dict). Memory Gym sets it in reset, where it also asserts
    that the settings lie in their ranges: it is read from an env made, reset and closed here, before any other
    (Memory Gym's close() would end the envs made before it)."""
    env = make_env(env_id, 0, False, "", settings=settings)()
    try:
        env.reset(seed=0)
    except AssertionError as error:
        reason = str(error) or "a setting lies outside the range that the env allows"
        fail(f"{env_id} rejects the task settings {json.dumps(settings)}: {reason} (see the env's default_reset_parameters)")
    limit = episode_limit(env)
    env.close()
    return limit


def episode_limit(env):
    """The episode limit T of a (reset) env: its TimeLimit, Memory Gym's own `max_episode_steps`, else 1024."""
    while isinstance(env, gym.Wrapper):
        if isinstance(env, gym.wrappers.TimeLimit):
            return env._max_episode_steps
        env = env.env
    limit = getattr(env, "max_episode_steps", -1)
    return limit if limit > 0 else DEFAULT_EPISODE_LIMIT


def action_branches(action_space):
    """The number of choices of each action branch: Discrete(n) is one branch, MultiDiscrete one per entry."""
    if isinstance(action_space, gym.spaces.Discrete):
        return (int(action_space.n),)
    if isinstance(action_space, gym.spaces.MultiDiscrete) and action_space.nvec.ndim == 1:
        return tuple(int(n) for n in action_space.nvec)
    fail(f"unsupported action space {action_space}: ppo_trxl.py takes Discrete or MultiDiscrete actions")


def check_observation_space(observation_space, reconstruction_coef):
    image = observation_space.shape == (84, 84, 3) and observation_space.dtype == np.uint8
    if not isinstance(observation_space, gym.spaces.Box) or not (image or len(observation_space.shape) == 1):
        fail(f"unsupported observation space {observation_space}: ppo_trxl.py takes an 84x84x3 uint8 image or a 1-D vector")
    if reconstruction_coef > 0 and not image:
        fail("--reconstruction-coef needs image observations; this env's are vectors: set it to 0")


def layer_init(layer, std=np.sqrt(2)):
    """Orthogonal weights with gain std; the bias keeps PyTorch's default initialisation, as in the published runs."""
    nn.init.orthogonal_(layer.weight, std)
    return layer


def reach(episode_steps, memory_length):
    """The window rule, and its one home: a step at episode step t attends to the cached steps of its own episode
    that lie 1 .. w steps before it, where w = min(t, memory_length - 1) is its reach. The published window of
    memory_length slots holds the step itself, which is never attended. At t = 0 a step attends to nothing and gets
    a fresh window's value instead (Transformer.fresh_values). Acting and the update (band_mask), the steps that the
    timeline carries over (context_length), a minibatch's windows (chunk_windows), the fresh window, the attention
    statistics, enjoy.py and the tests all derive from it.

    episode_steps (...) int -> (...) int
    """
    return episode_steps.clamp(max=memory_length - 1)


def context_length(memory_length):
    """C, the reach of a step far into its episode: the most steps that any step attends to."""
    return int(reach(torch.tensor(memory_length), memory_length))


def band_mask(ages, episode_steps, memory_length):
    """Which slots each query may attend by the window rule: the w = reach(t) slots just before it.

    ages (..., P): how many timeline slots each slot lies before its query; episode_steps (...): the queries'
    episode steps t -> allowed (..., P) bool. A query at timeline slot p sees the slots [p - w, p - 1], the
    ages 1 .. w:

        slot   . . . p-w . . . p-1  p  . . .
        seen         x  x  x  x     -
    """
    return (ages >= 1) & (ages <= reach(episode_steps, memory_length).unsqueeze(-1))


def window_ages(num_slots, num_queries, device):
    """(Q, P): how many slots each of a window's P slots lies before each of its last Q slots, the queries'."""
    positions = torch.arange(num_slots, device=device)
    return positions[num_slots - num_queries :].unsqueeze(-1) - positions


class PositionalEncoding(nn.Module):
    """The `absolute` encoding: step s of an episode with limit T is encoded as the value v = T - 1 - s,
    [sin(v * inv_freqs), cos(v * inv_freqs)]. Past T the same formula continues with negative v."""

    def __init__(self, dim, max_episode_steps):
        super().__init__()
        self.max_episode_steps = max_episode_steps
        self.register_buffer("inv_freqs", 10000 ** (-torch.arange(0, dim, 2.0) / dim))

    def forward(self, steps):
        # steps (...) int -> (..., dim)
        angles = (self.max_episode_steps - 1 - steps).float().unsqueeze(-1) * self.inv_freqs
        return torch.cat((angles.sin(), angles.cos()), dim=-1)


def rotate(x, rotation):
    """x (N, H, P, h) with every pair (x_i, x_{i + h/2}) of each head's features turned by an angle (RoFormer):
    rotation = (cos, sin) of the angles (N, 1, P, h/2), Transformer.rotation."""
    cos, sin = rotation
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)


class LayerMemory(NamedTuple):
    """What one layer attends to: the keys and values (N, H, P, h) of its P memory slots, and fresh (D,), the value
    that a query which may attend no slot gets (Transformer.fresh_values). Without fresh such a query attends
    uniformly over the P slots, as the published model does."""

    keys: torch.Tensor
    values: torch.Tensor
    fresh: Optional[torch.Tensor] = None


class Band(NamedTuple):
    """Which of P slots each of S queries may attend (band_mask), as the attention takes it."""

    mask: torch.Tensor
    """(N, 1, S, P): 0 where a slot may be attended, -1e20 where not (not -inf: a row without a slot is never NaN)"""
    sees: torch.Tensor
    """(N, S, 1) bool: whether a query may attend some slot"""


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention as published: every head maps its slice of width h = D / H with the same
    values, keys and queries maps, scores are divided by sqrt(D), and fc_out joins the heads."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.scale = dim**-0.5
        head_size = dim // num_heads
        self.values = nn.Linear(head_size, head_size, bias=False)
        self.keys = nn.Linear(head_size, head_size, bias=False)
        self.queries = nn.Linear(head_size, head_size, bias=False)
        self.fc_out = nn.Linear(dim, dim)

    def per_head(self, x, projection):
        """x (N, P, D) -> projection of every head's slice (N, H, P, h)"""
        return projection(x.unflatten(-1, (self.num_heads, -1))).transpose(1, 2)

    def keys_and_values(self, slots):
        """slots (N, P, D) the normalised memory -> keys, values (N, H, P, h)"""
        return self.per_head(slots, self.keys), self.per_head(slots, self.values)

    def forward(self, query, memory, band, rotation=None, need_weights=False):
        """query (N, S, D) normalised; memory: the LayerMemory of P slots; band: the Band of the slots that each query
        may attend; rotation: the queries' rotary encoding (Transformer.rotation), or None. A query that may attend no
        slot gets memory.fresh; without it, it attends uniformly over all P slots, as the published model does.
        Returns the output (N, S, D), and with need_weights the attention weights (N, H, S, P), else None."""
        queries = self.per_head(query, self.queries)  # (N, H, S, h)
        if rotation is not None:
            queries = rotate(queries, rotation)
        if need_weights:
            weights = torch.softmax(queries @ memory.keys.mT * self.scale + band.mask, dim=-1)
            attended = weights @ memory.values
        else:  # the same in one fused operation
            weights = None
            attended = F.scaled_dot_product_attention(queries, memory.keys, memory.values, band.mask, scale=self.scale)
        attended = attended.transpose(1, 2).flatten(-2)  # (N, H, S, h) -> (N, S, D)
        if memory.fresh is not None:
            attended = torch.where(band.sees, attended, memory.fresh)
        return self.fc_out(attended), weights


class GRUGate(nn.Module):
    """GTrXL's gate (Parisotto et al. 2020) in place of a residual sum x + y: a GRU's update of x by y. The update
    gate z is biased by -bias, so that a new layer starts near the identity, x."""

    def __init__(self, dim, bias):
        super().__init__()
        self.w_r, self.w_z, self.w_g = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.u_r, self.u_z, self.u_g = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.bias = bias

    def forward(self, x, y):
        r = torch.sigmoid(self.w_r(y) + self.u_r(x))
        z = torch.sigmoid(self.w_z(y) + self.u_z(x) - self.bias)
        h = torch.tanh(self.w_g(y) + self.u_g(r * x))
        return (1 - z) * x + z * h


class TransformerLayer(nn.Module):
    """A pre-layer-norm block. It attends to its own inputs cached at earlier steps (Transformer.memory)."""

    def __init__(self, dim, num_heads, gate="none", gate_bias=2.0):
        super().__init__()
        self.attention = MultiHeadAttention(dim, num_heads)
        self.layer_norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.layer_norm_attn = nn.LayerNorm(dim)
        self.fc_projection = nn.Sequential(nn.Linear(dim, dim), nn.ReLU())
        self.gates = nn.ModuleList([GRUGate(dim, gate_bias), GRUGate(dim, gate_bias)]) if gate == "gru" else None

    def residual(self, i, x, y):
        """x + y, as published, or GTrXL's gate i on y after a ReLU, as the paper has it"""
        return x + y if self.gates is None else self.gates[i](x, F.relu(y))

    def forward(self, x, memory, band, rotation=None, need_weights=False):
        attended, weights = self.attention(self.layer_norm_q(x), memory, band, rotation, need_weights)
        x = self.residual(0, x, attended)
        return self.residual(1, x, self.fc_projection(self.layer_norm_attn(x))), weights


class TransformerOutput(NamedTuple):
    out: torch.Tensor
    """(N, S, D) the last layer's output"""
    layer_inputs: torch.Tensor
    """(N, S, L, D) every layer's input, which later steps attend to"""
    weights: list
    """every layer's attention weights [(N, H, S, P)] * L, or [None] * L"""


class Transformer(nn.Module):
    """L layers that attend to their own inputs at earlier steps of the episode, within memory_length (clipped to
    the episode limit T, which sizes the positional encoding)."""

    def __init__(self, args, max_episode_steps):
        super().__init__()
        self.dim, self.max_episode_steps, dim, num_heads = args.trxl_dim, max_episode_steps, args.trxl_dim, args.trxl_num_heads
        self.memory_length = min(args.trxl_memory_length, max_episode_steps)
        self.context = context_length(self.memory_length)
        self.positional_encoding = encoding_of(args.trxl_positional_encoding)
        if self.positional_encoding == "absolute":
            self.pos_embedding = PositionalEncoding(dim, max_episode_steps)
        elif self.positional_encoding == "learned":
            self.pos_embedding = nn.Parameter(torch.randn(max_episode_steps, dim))
        elif self.positional_encoding == "rotary":
            head_size = dim // num_heads
            self.register_buffer("rotary_inv_freqs", 10000 ** (-torch.arange(0, head_size, 2.0) / head_size), False)
        gate, gate_bias = getattr(args, "trxl_gate", "none"), getattr(args, "trxl_gate_bias", 2.0)  # published args lack them
        self.transformer_layers = nn.ModuleList(
            [TransformerLayer(dim, num_heads, gate, gate_bias) for _ in range(args.trxl_num_layers)]
        )

    def positions(self, steps):
        """steps (...) episode steps -> (..., D) the absolute or learned encodings, which are added to the memory at
        those steps, or None (the other encodings add nothing); past the episode limit T, `learned` reuses its last row."""
        if self.positional_encoding == "absolute":
            return self.pos_embedding(steps)
        if self.positional_encoding == "learned":
            return self.pos_embedding[steps.clamp(max=self.max_episode_steps - 1)]
        return None

    def rotation(self, steps):
        """steps (N, P) episode steps -> the rotary encoding's (cos, sin) of the angles steps * inv_freqs, each
        (N, 1, P, h/2), which rotate the queries and keys at those steps (rotate); None for the other encodings."""
        if self.positional_encoding != "rotary":
            return None
        angles = (steps.float().unsqueeze(-1) * self.rotary_inv_freqs).unsqueeze(1)
        return angles.cos(), angles.sin()

    def layer_memory(self, layer, slots, rotation=None, fresh=None):
        """layer's LayerMemory of slots (N, P, D), its inputs with their positions added: its attention's keys and
        values of norm_kv(slots), the keys rotated by rotation (the slots' rotary encoding, or None)."""
        keys, values = layer.attention.keys_and_values(layer.norm_kv(slots))
        return LayerMemory(keys if rotation is None else rotate(keys, rotation), values, fresh)

    def memory(self, slots, steps, fresh=None):
        """What every layer attends to, [LayerMemory] * L, given slots (N, P, L, D), the layers' inputs cached at the
        episode steps (N, P) (layer_memory of slot + position). fresh: every layer's value for a query that may
        attend no slot ([(D,)] * L, fresh_values), or None."""
        slots, positions, rotation = slots.float(), self.positions(steps), self.rotation(steps)
        if positions is not None:
            slots = slots + positions.unsqueeze(-2)
        fresh = fresh or [None] * len(self.transformer_layers)
        return [
            self.layer_memory(layer, layer_slots, rotation, layer_fresh)
            for layer, layer_slots, layer_fresh in zip(self.transformer_layers, slots.unbind(-2), fresh)
        ]

    def fresh_values(self):
        """What every layer's attention gives a query at an episode's first step, [(D,)] * L: the published model
        attends uniformly over a fresh episode's window, the C + 1 slots of zero memory at the steps 0 .. C (C =
        context), so the query gets the value of their mean slot (the maps are linear)."""
        steps = torch.arange(self.context + 1, device=self.transformer_layers[0].norm_kv.weight.device)
        fresh, positions = torch.zeros((len(steps), self.dim), device=steps.device), self.positions(steps)
        if positions is not None:
            fresh = fresh + positions
        return [
            layer.attention.per_head(layer.norm_kv(fresh).mean(0)[None, None], layer.attention.values).flatten()
            for layer in self.transformer_layers
        ]

    def forward(self, x, steps, memory, allowed, need_weights=False, segment=False):
        """x (N, S, D) the encoded observations at episode steps (N, S); memory: every layer's LayerMemory of P
        slots; allowed (N, S, P) bool (band_mask). With segment, the memory holds the slots before the S steps, and
        every layer appends the S steps' own slots as this pass computes them, with their gradients: allowed then
        spans P + S slots. Returns the TransformerOutput."""
        rotation, positions = self.rotation(steps), self.positions(steps) if segment else None
        band = Band(torch.where(allowed, 0.0, -1e20).unsqueeze(1), allowed.any(-1, keepdim=True))
        layer_inputs, weights = [], []
        for layer, layer_memory in zip(self.transformer_layers, memory):
            layer_inputs.append(x.detach())
            if segment:
                own = self.layer_memory(layer, x if positions is None else x + positions, rotation)
                keys, values = torch.cat((layer_memory.keys, own.keys), 2), torch.cat((layer_memory.values, own.values), 2)
                layer_memory = LayerMemory(keys, values, layer_memory.fresh)
            x, layer_weights = layer(x, layer_memory, band, rotation, need_weights)
            weights.append(layer_weights)
        return TransformerOutput(x, torch.stack(layer_inputs, dim=-2), weights)


class Policy(NamedTuple):
    action: torch.Tensor
    """(B, branches) the given or sampled action"""
    log_probs: torch.Tensor
    """(B, branches) its log-probability in every branch"""
    entropy: torch.Tensor
    """(B,) summed over the branches"""
    value: torch.Tensor
    """(B,)"""
    hidden: torch.Tensor
    """(B, D) the features after hidden_post_trxl, which the heads read"""


class Chunks(NamedTuple):
    """What the update evaluates: G chunks of Q consecutive rollout steps, each with the R slots before it that its
    bands reach (chunk_windows)."""

    images: torch.Tensor
    """(G*Q, *obs_shape) the steps' observations, or with image_index the distinct ones (U, *obs_shape)"""
    image_index: Optional[torch.Tensor]
    """(G*Q,) the distinct image of every step (distinct_images), or None"""
    actions: torch.Tensor
    """(G, Q, branches)"""
    slots: torch.Tensor
    """(G, R+Q, L, D) the layers' inputs cached at the windows' slots"""
    steps: torch.Tensor
    """(G, R+Q) the episode steps of the windows' slots"""


class Evaluation(NamedTuple):
    """The update's pass over its G*Q steps (Agent.forward)."""

    log_probs: torch.Tensor
    """(G*Q, branches) of the steps' actions"""
    entropy: torch.Tensor
    """(G*Q,)"""
    value: torch.Tensor
    """(G*Q,)"""
    hidden: torch.Tensor
    """(G*Q, D) the features after hidden_post_trxl"""
    trxl_out: torch.Tensor
    """(G*Q, D) the transformer's output"""
    weights: list
    """every layer's attention weights [(G, H, Q, R+Q)] * L, or [None] * L"""


class Agent(nn.Module):
    def __init__(self, args, observation_space, action_space_shape, max_episode_steps):
        super().__init__()
        self.obs_shape = observation_space.shape
        self.transformer_dim = dim = args.trxl_dim
        self.encoder_dtype = getattr(torch, getattr(args, "encoder_dtype", "float32"))  # published args lack it
        if len(self.obs_shape) > 1:
            self.encoder = nn.Sequential(
                layer_init(nn.Conv2d(3, 32, 8, stride=4)),
                nn.ReLU(inplace=True),
                layer_init(nn.Conv2d(32, 64, 4, stride=2)),
                nn.ReLU(inplace=True),
                layer_init(nn.Conv2d(64, 64, 3, stride=1)),
                nn.ReLU(inplace=True),
                nn.Flatten(),
                layer_init(nn.Linear(64 * 7 * 7, dim)),
                nn.ReLU(inplace=True),
            )
        else:
            self.encoder = layer_init(nn.Linear(self.obs_shape[0], dim))
        self.transformer = Transformer(args, max_episode_steps)
        self.segment_gradients = getattr(args, "trxl_segment_gradients", False)  # published args lack it
        self.hidden_post_trxl = nn.Sequential(layer_init(nn.Linear(dim, dim)), nn.ReLU())
        self.actor_branches = nn.ModuleList([layer_init(nn.Linear(dim, n), std=0.1) for n in action_space_shape])
        self.critic = layer_init(nn.Linear(dim, 1), std=1)
        self.last_hidden = None  # the published reconstruct_observation() decodes the last get_action_and_value's features
        if args.reconstruction_coef > 0.0:
            self.transposed_cnn = nn.Sequential(
                layer_init(nn.Linear(dim, 64 * 7 * 7)),
                nn.ReLU(),
                nn.Unflatten(1, (64, 7, 7)),
                layer_init(nn.ConvTranspose2d(64, 64, 3, stride=1)),
                nn.ReLU(),
                layer_init(nn.ConvTranspose2d(64, 32, 4, stride=2)),
                nn.ReLU(),
                layer_init(nn.ConvTranspose2d(32, 3, 8, stride=4)),
                nn.Sigmoid(),
            )

    def autocast(self, device):
        """Mixed precision in encoder_dtype for the convolutional parts; off in float32."""
        return torch.autocast(device.type, self.encoder_dtype, enabled=self.encoder_dtype != torch.float32)

    def encode(self, obs):
        # obs (B, 84, 84, 3) uint8 or (B, obs_dim) -> (B, D) float32, images as (B, 3, 84, 84) in [0, 1]
        with self.autocast(obs.device):
            if len(self.obs_shape) > 1:
                obs = obs.to(self.encoder_dtype).permute(0, 3, 1, 2) / 255.0
            return self.encoder(obs).float()

    def policy_and_value(self, trxl_out, action=None):
        """trxl_out (B, D) -> the Policy: one categorical distribution per action branch, from which action (B,
        branches) is drawn unless given; the entropy is summed over branches."""
        hidden = self.hidden_post_trxl(trxl_out)
        branch_log_probs = [branch(hidden).log_softmax(-1) for branch in self.actor_branches]  # [(B, n_k)]
        if action is None:
            action = torch.stack([torch.multinomial(lp.exp(), 1).squeeze(1) for lp in branch_log_probs], dim=1)
        log_probs = torch.stack(
            [lp.gather(1, a.unsqueeze(1)).squeeze(1) for lp, a in zip(branch_log_probs, action.unbind(1))], 1
        )
        entropy = -sum((lp.exp() * lp).sum(-1) for lp in branch_log_probs)
        return Policy(action, log_probs, entropy, self.critic(hidden).flatten(), hidden)

    def reconstruct_observation(self, hidden=None):
        """hidden (B, D) post-TrXL features -> (B, 84, 84, 3) float32 in [0, 1]. Without hidden, as published analysis
        scripts call it, the features of the last get_action_and_value call."""
        if hidden is None:
            hidden = self.last_hidden
        with self.autocast(hidden.device):
            return self.transposed_cnn(hidden).float().permute(0, 2, 3, 1)

    def window_pass(self, x, memory, memory_mask, memory_indices):
        """The published interface's transformer pass over explicit windows.

        x (B, *obs_shape); memory (B, M, L, D): the window's cached layer inputs; memory_mask (B, M): which
        slots may be attended; memory_indices (B, M): the episode step of every slot. A step that may attend no slot
        attends uniformly over its window, as published. The step's own episode step, which rotary positions need, is
        read off the published window: its first slot's step plus the number of slots it may attend.
        Returns the transformer output (B, D), the new memory (B, L, D) and every layer's attention
        weights over the window [(B, H, M)] * L.
        """
        layers_memory = self.transformer.memory(memory, memory_indices)
        allowed = memory_mask.bool().unsqueeze(1)  # (B, 1, M)
        steps = (memory_indices[:, 0] + allowed.sum(-1)[:, 0]).unsqueeze(1)  # (B, 1)
        out, new_memory, weights = self.transformer(self.encode(x).unsqueeze(1), steps, layers_memory, allowed, True)
        return out.squeeze(1), new_memory.squeeze(1), [layer_weights.squeeze(2) for layer_weights in weights]

    def get_value(self, x, memory, memory_mask, memory_indices):
        return self.policy_and_value(self.window_pass(x, memory, memory_mask, memory_indices)[0]).value

    def get_action_and_value(self, x, memory, memory_mask, memory_indices, action=None):
        out, new_memory, _ = self.window_pass(x, memory, memory_mask, memory_indices)
        policy = self.policy_and_value(out, action)
        self.last_hidden = policy.hidden
        return policy.action, policy.log_probs, policy.entropy, policy.value, new_memory

    def forward(self, chunks, need_weights=False):
        """The update's pass over Chunks of consecutive rollout steps, called through the update's wrappers of the
        agent (DistributedDataParallel, torch.compile). Every step attends to its band in its chunk's window:

            slots    [0 ........ R) [R ........ R+Q)
            step R+i        [band]   ^ the step's own slot

        The slots hold the layer inputs that the rollout cached; with segment_gradients, those of the chunk's own
        steps are the ones that this pass computes, with their gradients (Transformer.forward's segment).
        Returns the Evaluation, with every layer's attention weights if need_weights.
        """
        num_queries = chunks.actions.shape[1]  # Q
        transformer, steps = self.transformer, chunks.steps[:, -num_queries:]  # (G, Q)
        cached = slice(0, -num_queries if self.segment_gradients else None)
        memory = transformer.memory(chunks.slots[:, cached], chunks.steps[:, cached], transformer.fresh_values())
        ages = window_ages(chunks.steps.shape[1], num_queries, chunks.steps.device)  # (Q, R+Q)
        allowed = band_mask(ages, steps, transformer.memory_length)  # (G, Q, R+Q)
        x = self.encode(chunks.images)  # (U, D)
        if chunks.image_index is not None:  # each step's features as a product with its one-hot row (G*Q, U): the backward
            # then sums a repeated image's gradients in a fixed order, where index_select's atomics on a GPU would not
            x = F.one_hot(chunks.image_index, len(x)).to(x.dtype) @ x
        x = x.view(-1, num_queries, self.transformer_dim)  # (G, Q, D)
        out, _, weights = transformer(x, steps, memory, allowed, need_weights, self.segment_gradients)
        trxl_out = out.flatten(0, 1)
        policy = self.policy_and_value(trxl_out, chunks.actions.flatten(0, 1))
        return Evaluation(policy.log_probs, policy.entropy, policy.value, policy.hidden, trxl_out, weights)


class Timeline:
    """Every env's recent stream of steps: the cached layer inputs that later steps attend to, and their keys and
    values under the rollout's parameters (a key/value cache, as in language-model inference).

    Slots [0, C) hold the last C steps of the previous rollout (C = context_length: all that a step reaches back),
    slots [C, C + num_steps) this rollout's steps:

        slot   0 ......... C-1 | C ............... C+num_steps-1
               previous rollout | this rollout: step s at slot C + s
    """

    def __init__(self, num_envs, num_steps, transformer, dtype, device, cue_in_view=False):
        self.memory_length, self.context = transformer.memory_length, transformer.context
        num_layers, dim = len(transformer.transformer_layers), transformer.dim
        num_heads = transformer.transformer_layers[0].attention.num_heads
        # (C,): how many slots each of the C slots before a rollout step lies before it (band_mask's ages)
        self.window_ages = window_ages(self.context + 1, 1, device)[0, :-1]
        slots = self.context + num_steps
        self.memory = torch.zeros((num_envs, slots, num_layers, dim), dtype=dtype, device=device)  # (E, C+S, L, D)
        self.steps = torch.zeros((num_envs, slots), dtype=torch.long, device=device)  # (E, C+S) episode steps
        # every layer's keys and values of every slot: (L, E, H, C+S, h)
        self.keys = torch.zeros((num_layers, num_envs, num_heads, slots, dim // num_heads), device=device)
        self.values = torch.zeros_like(self.keys)
        # with cue_in_view, whether each slot's observation showed the cue (MiniGrid Memory, see cue_in_view): (E, C+S),
        # and whether each env's current episode has shown it so far: (E,)
        self.cue_in_view = torch.zeros((num_envs, slots), dtype=torch.bool, device=device) if cue_in_view else None
        self.cue_seen = torch.zeros(num_envs, dtype=torch.bool, device=device) if cue_in_view else None

    def begin(self, transformer):
        """Makes room for a rollout: moves the last C steps to the front and caches their keys and values under
        transformer's parameters, which the rollout keeps, and the values its episodes' first steps get (fresh_values)."""
        if self.context > 0:
            self.memory[:, : self.context] = self.memory[:, -self.context :].clone()
            self.steps[:, : self.context] = self.steps[:, -self.context :].clone()
            if self.cue_in_view is not None:
                self.cue_in_view[:, : self.context] = self.cue_in_view[:, -self.context :].clone()
        self.cache(transformer, slice(0, self.context))
        with torch.inference_mode():
            self.fresh_values = transformer.fresh_values()  # [(D,)] * L

    def window(self, s):
        """What rollout step s attends to: every layer's LayerMemory of the C slots before slot C + s."""
        window = slice(s, s + self.context)
        keys, values = self.keys[:, :, :, window], self.values[:, :, :, window]  # (L, E, H, C, h)
        return [LayerMemory(k, v, fresh) for k, v, fresh in zip(keys, values, self.fresh_values)]

    def record(self, transformer, s, episode_steps, layer_inputs):
        """Caches rollout step s at episode steps (E,): every layer's input (E, L, D), and its keys and values."""
        self.steps[:, self.context + s] = episode_steps
        self.memory[:, self.context + s] = layer_inputs
        self.cache(transformer, slice(self.context + s, self.context + s + 1))

    @torch.inference_mode()
    def cache(self, transformer, slots):
        """Caches the keys and values of slots (a slice) under transformer's parameters."""
        memory = transformer.memory(self.memory[:, slots], self.steps[:, slots])
        self.keys[:, :, :, slots] = torch.stack([layer.keys for layer in memory])
        self.values[:, :, :, slots] = torch.stack([layer.values for layer in memory])


class RolloutEncoder:
    """The encoder while acting, the same as `agent.encode(obs)`. Its parameters stay fixed for the whole rollout, so
    with remember_images an image seen before in the rollout keeps the features it got then and is not encoded
    again (an agent that waits or walks into a wall, a cue shown for several steps, a room that several envs show
    alike). Images are keyed by image_hashes and compared in full with the one seen under their hash. On a GPU,
    where each comparison would wait for the device, every image is encoded."""

    def __init__(self, agent, remember_images):
        self.agent = agent
        self.seen = {} if remember_images else None  # hash -> (the image (H, W, 3) seen with it, its features (D,))

    @torch.no_grad()
    def __call__(self, obs):
        """obs (E, *obs_shape), which stay unchanged while the rollout lasts -> features (E, D)"""
        if self.seen is None:
            return self.agent.encode(obs)
        hashes = image_hashes(obs).tolist()
        entries = [self.seen.get(h) for h in hashes]  # each env's (image, features) seen under its hash, or None
        # an image whose hash came with another image is new
        new = [i for i, entry in enumerate(entries) if entry is None or not torch.equal(entry[0], obs[i])]
        if new:
            for i, encoded in zip(new, self.agent.encode(obs[new])):
                self.seen[hashes[i]] = entries[i] = (obs[i], encoded)
        return torch.stack([features for _, features in entries])  # (E, D)


class Step(NamedTuple):
    """The policy at one step of every env (rollout_step)."""

    action: torch.Tensor
    """(E, branches) sampled"""
    log_probs: torch.Tensor
    """(E, branches)"""
    value: torch.Tensor
    """(E,)"""
    layer_inputs: torch.Tensor
    """(E, L, D) every layer's input, to cache at the step's slot"""
    trxl_out: torch.Tensor
    """(E, D) the transformer's output"""
    weights: list
    """every layer's attention weights over the C slots before the step [(E, H, 1, C)] * L, or [None] * L"""


@torch.inference_mode()
def rollout_step(agent, timeline, features, episode_steps, s, need_weights=False):
    """The policy at rollout step s for all envs, given their observations' features (E, D) at episode steps (E,):
    each env attends to its band just before slot C + s, from the timeline's key/value cache. Returns the Step."""
    steps = episode_steps.unsqueeze(1)  # (E, 1)
    allowed = band_mask(timeline.window_ages, steps, timeline.memory_length)  # (E, 1, C)
    out, layer_inputs, weights = agent.transformer(features.unsqueeze(1), steps, timeline.window(s), allowed, need_weights)
    trxl_out = out.squeeze(1)
    policy = agent.policy_and_value(trxl_out)
    return Step(policy.action, policy.log_probs, policy.value, layer_inputs.squeeze(1), trxl_out, weights)


def compiled_rollout_step():
    """rollout_step compiled by torch.compile (--compile). It is traced under no_grad: inference mode, which
    spares the eager step some bookkeeping, defeats the tracing of the timeline's views."""
    return torch.compile(torch.no_grad()(rollout_step.__wrapped__))


class Rollout:
    """One rollout's samples, env-major (E, S, ...), and the timeline of cached memory that they attend to."""

    def __init__(self, args, observation_space, num_branches, transformer, device, cue_in_view=False):
        E, S = args.num_envs, args.num_steps
        obs_dtype = torch.uint8 if observation_space.dtype == np.uint8 else torch.float32
        self.obs = torch.zeros((E, S) + observation_space.shape, dtype=obs_dtype, device=device)
        self.actions = torch.zeros((E, S, num_branches), dtype=torch.long, device=device)
        self.logprobs = torch.zeros((E, S, num_branches), device=device)
        self.rewards = torch.zeros((E, S), device=device)
        self.values = torch.zeros((E, S), device=device)
        self.timeline = Timeline(E, S, transformer, getattr(torch, args.memory_dtype), device, cue_in_view)

    def advantages(self, next_value, next_episode_steps, gamma, gae_lambda):
        """The GAE advantages (E, S) of this rollout, bootstrapped with next_value (E,) of the observations that
        follow it, at next_episode_steps (E,). A sample whose episode step is 0 begins an episode."""
        episode_starts = self.timeline.steps[:, self.timeline.context :] == 0  # (E, S)
        return compute_gae(self.rewards, self.values, episode_starts, next_value, next_episode_steps == 0, gamma, gae_lambda)


def collect_rollout(agent, envs, rollout, next_obs, next_episode_steps, policy_step=rollout_step, on_step=None):
    """Steps every env num_steps times with the current policy, filling rollout.

    next_obs (E, *obs_shape) and next_episode_steps (E,) are where the envs stand; policy_step is rollout_step
    or compiled_rollout_step(); on_step(s), if given, is called after every step s (and may raise to drop the rollout).
    Returns the same after the rollout, the bootstrap value of next_obs (E,), and the finished episodes as (return,
    length, time), followed on MiniGrid Memory by whether the episode's view ever showed the cue.
    """
    timeline, context = rollout.timeline, rollout.timeline.context
    device = next_obs.device
    timeline.begin(agent.transformer)
    encode = RolloutEncoder(agent, remember_images=rollout.obs.dtype == torch.uint8 and device.type == "cpu")
    finished_episodes = []
    for s in range(rollout.obs.shape[1]):
        rollout.obs[:, s] = next_obs
        if timeline.cue_in_view is not None:
            in_view = torch.as_tensor(cue_in_view(envs), device=device)
            timeline.cue_in_view[:, context + s] = in_view
            timeline.cue_seen |= in_view
        step = policy_step(agent, timeline, encode(rollout.obs[:, s]), next_episode_steps, s)
        rollout.actions[:, s], rollout.logprobs[:, s], rollout.values[:, s] = step.action, step.log_probs, step.value
        timeline.record(agent.transformer, s, next_episode_steps, step.layer_inputs)

        next_obs, reward, terminations, truncations, infos = envs.step(
            step.action.cpu().numpy().reshape(envs.action_space.shape)
        )
        rollout.rewards[:, s] = torch.as_tensor(reward, dtype=torch.float32, device=device)
        next_obs = torch.as_tensor(next_obs, device=device)
        done = np.logical_or(terminations, truncations)
        next_done = torch.as_tensor(done, device=device)
        next_episode_steps = torch.where(next_done, 0, next_episode_steps + 1)
        if "_episode" in infos:
            finished = infos["_episode"]
            columns = [infos["episode"][key][finished].tolist() for key in ("r", "l", "t")]
            if timeline.cue_seen is not None:
                columns.append(timeline.cue_seen[torch.as_tensor(finished, device=device)].tolist())
            finished_episodes.extend(zip(*columns))
        if timeline.cue_seen is not None:
            timeline.cue_seen &= ~next_done
        if on_step is not None:
            on_step(s)

    # The bootstrap value follows the same band rule as every rollout step
    next_value = policy_step(agent, timeline, encode(next_obs), next_episode_steps, rollout.obs.shape[1]).value
    return next_obs, next_episode_steps, next_value, finished_episodes


def compute_gae(rewards, values, dones, next_value, next_done, gamma, gae_lambda):
    """Generalized advantage estimation. rewards, values, dones (E, S); next_value, next_done (E,).

    dones[:, s] marks that obs s begins a new episode (the step before it ended one): a time limit ends an episode
    too, as published, so nothing is bootstrapped past it.
    Returns advantages (E, S).
    """
    # whether the episode goes on after each step, and the value of the obs that follows it: (E, S)
    next_nonterminal = 1.0 - torch.cat([dones[:, 1:], next_done.unsqueeze(1)], dim=1).float()
    next_values = torch.cat([values[:, 1:], next_value.unsqueeze(1)], dim=1)
    deltas = rewards + gamma * next_values * next_nonterminal - values
    decays = gamma * gae_lambda * next_nonterminal
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(next_value)
    for s in reversed(range(rewards.shape[1])):
        last_gae = torch.addcmul(deltas[:, s], decays[:, s], last_gae)
        advantages[:, s] = last_gae
    return advantages


def minibatches(num_envs, num_steps, num_minibatches, device):
    """Cuts every env's steps into num_minibatches chunks of consecutive steps and deals them at random:
    every minibatch holds one chunk of every env, each env's from its own random place in the rollout.
    Yields each minibatch as an index into the (E, S) rollout buffers: env rows (E, 1) and steps (E, S/n)."""
    share = num_steps // num_minibatches
    chunks = torch.rand(num_envs, num_minibatches, device=device).argsort(dim=1)  # (E, n): env e's chunk in minibatch k
    rows = torch.arange(num_envs, device=device).unsqueeze(1)
    offsets = torch.arange(share, device=device)
    for k in range(num_minibatches):
        yield rows, chunks[:, k : k + 1] * share + offsets


def image_hashes(images):
    """images (N, 84, 84, 3) uint8 -> (N,) int64: every image's 8-byte words w_i (2,646 of them) summed as
    sum_i c_i * w_i modulo 2^64, with random coefficients c_i fixed by a seed. Equal images hash alike."""
    words = images.flatten(1).view(torch.int64)  # (N, W)
    generator = torch.Generator(images.device).manual_seed(0)
    coefficients = torch.randint(1 << 62, words.shape[1:], generator=generator, device=images.device)  # (W,)
    return (words * coefficients).sum(1)  # the products and the sum wrap around


def distinct_images(images):
    """images (N, 84, 84, 3) uint8 -> the distinct images (U, 84, 84, 3) and each image's index among them (N,);
    images and None where all N differ.

    Encoding the distinct images and giving each image its own one's features is the same as encoding all N: the
    encoder maps each image on its own, and in the backward pass a repeated image's gradients add up. On the memory
    tasks many images repeat (an agent that waits or walks into a wall, a cue shown for several steps, a room that
    several envs show alike). Images are grouped by their hash, then compared in full with their group's first
    image: where two images share a hash but differ, all N are returned as they are."""
    hashes, index = torch.unique(image_hashes(images), return_inverse=True)  # (U,), (N,)
    if len(hashes) == len(images):
        return images, None
    samples = torch.arange(len(images), device=images.device)
    first = index.new_full(hashes.shape, len(images)).scatter_reduce_(0, index, samples, "amin")  # (U,): each group's first
    words = images.flatten(1).view(torch.int64)  # compared 8 bytes at a time
    if not torch.equal(words.index_select(0, first[index]), words):  # two different images with one hash
        return images, None
    return images.index_select(0, first), index


def chunk_windows(timeline, chunks):
    """The timeline slots that chunks = (env rows (G, 1), steps (G, Q)) of consecutive rollout steps attend to:
    (env rows (G, 1), slots (G, R+Q)), from R slots before each chunk's first step to its last step. A chunk's
    first step reaches back furthest (reach), so R, the most that the chunks' first steps reach, is at most C; the
    same as windows of the C slots before every chunk, whose slots before the R are masked for every query."""
    rows, steps = chunks
    first = timeline.context + steps[:, :1]  # (G, 1): each chunk's first step's slot
    reach_back = int(reach(timeline.steps[rows, first], timeline.memory_length).max())  # R
    return rows, first - reach_back + torch.arange(reach_back + steps.shape[1], device=steps.device)


def evaluate(learner, timeline, windows, obs, actions, need_weights=False):
    """The update's pass (Agent.forward) over chunks of consecutive rollout steps, given their windows (chunk_windows).
    obs (G, Q, *obs_shape), actions (G, Q, branches); images are encoded once each (distinct_images), vectors, which
    one product encodes, as they are. learner is the agent or its wrapper (DistributedDataParallel, torch.compile).
    Returns the Evaluation."""
    images, image_index = obs.flatten(0, 1), None
    if obs.dtype == torch.uint8:
        images, image_index = distinct_images(images)
    return learner(Chunks(images, image_index, actions, timeline.memory[windows], timeline.steps[windows]), need_weights)


def attention_summary(weights, timeline, windows):
    """What the steps of a minibatch's chunks attended to, from the update's attention weights over their windows
    (chunk_windows) [(G, H, Q, R+Q)] * L, by name: each layer's mean age of the attended slots (in steps before the
    query), the entropy of its attention (nats; log w for w slots attended alike), and on MiniGrid Memory the
    attention on the slots whose observation showed the cue (cue_in_view), each averaged over the heads and over the
    steps that may attend some slot (t >= 1)."""
    rows, slots = windows
    num_queries = weights[0].shape[2]
    ages = window_ages(slots.shape[1], num_queries, slots.device)  # (Q, R+Q)
    attending = reach(timeline.steps[rows, slots[:, -num_queries:]], timeline.memory_length) > 0  # (G, Q)
    count = attending.sum().clamp(min=1) * weights[0].shape[1]
    summary = {}
    for layer, layer_weights in enumerate(weights):  # (G, H, Q, R+Q)
        per_query = {
            "mean_age": (layer_weights * ages).sum(-1),
            "entropy": torch.special.entr(layer_weights).sum(-1),
        }
        if timeline.cue_in_view is not None:
            per_query["cue_weight"] = (layer_weights * timeline.cue_in_view[windows][:, None, None, :]).sum(-1)
        for name, values in per_query.items():  # (G, H, Q)
            summary[f"attention/layer{layer}_{name}"] = (values * attending.unsqueeze(1)).sum() / count
    return summary


def ppo_loss(args, ent_coef, learner, agent, rollout, mb, advantages, returns, need_attention=False):
    """The loss of minibatch mb = (env rows (E, 1), steps (E, Q)) of rollout, whose E*Q samples learner (the agent,
    or its wrapper) evaluates, flattened: the clipped PPO loss with per-branch ratios, the (clipped) value loss,
    the entropy bonus and the optional loss of agent's observation reconstruction (binary cross-entropy against the
    observation / 255), as published. advantages, returns (E, S).

    Returns the loss and its metrics by name, as the trainer logs them: its parts, how far the update moved the
    policy, and with need_attention what the steps attended to (attention_summary)."""
    mb_obs = rollout.obs[mb]  # (E, Q, *obs_shape)
    windows = chunk_windows(rollout.timeline, mb)
    evaluation = evaluate(learner, rollout.timeline, windows, mb_obs, rollout.actions[mb], need_attention)
    mb_logprobs = rollout.logprobs[mb].flatten(0, 1)  # (E*Q, branches)
    mb_advantages, mb_returns, mb_values = advantages[mb].flatten(), returns[mb].flatten(), rollout.values[mb].flatten()
    if args.norm_adv:
        mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)
    mb_advantages = mb_advantages.unsqueeze(1)  # the same advantage for every action branch

    logratio = evaluation.log_probs - mb_logprobs
    ratio = logratio.exp()
    pg_loss1 = -mb_advantages * ratio
    pg_loss2 = -mb_advantages * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
    pg_loss = torch.max(pg_loss1, pg_loss2).mean()

    newvalue = evaluation.value
    if args.clip_vloss:  # no factor 1/2, as published: --vf-coef weighs the squared error itself
        v_loss_unclipped = (newvalue - mb_returns) ** 2
        v_clipped = mb_values + torch.clamp(newvalue - mb_values, -args.clip_coef, args.clip_coef)
        v_loss = torch.max(v_loss_unclipped, (v_clipped - mb_returns) ** 2).mean()
    else:
        v_loss = ((newvalue - mb_returns) ** 2).mean()
    entropy_loss = evaluation.entropy.mean()
    loss = pg_loss - ent_coef * entropy_loss + v_loss * args.vf_coef
    r_loss = torch.zeros((), device=loss.device)
    if args.reconstruction_coef > 0.0:
        r_loss = F.binary_cross_entropy(agent.reconstruct_observation(evaluation.hidden), mb_obs.flatten(0, 1).float() / 255.0)
        loss = loss + args.reconstruction_coef * r_loss

    with torch.no_grad():
        metrics = {
            "losses/policy_loss": pg_loss,
            "losses/value_loss": v_loss,
            "losses/entropy": entropy_loss,
            "losses/reconstruction_loss": r_loss,
            "losses/loss": loss,
            "losses/old_approx_kl": (-logratio).mean(),
            "losses/approx_kl": ((ratio - 1) - logratio).mean(),
            "losses/clipfrac": ((ratio - 1.0).abs() > args.clip_coef).float().mean(),
        }
        if need_attention:
            metrics.update(attention_summary(evaluation.weights, rollout.timeline, windows))
    return loss, {name: value.detach() for name, value in metrics.items()}


def save_atomically(obj, path):
    """torch.save through a temporary file that replaces path only once complete: a kill at any moment
    leaves either the old file or the new one, never half of one."""
    temporary = f"{path}.tmp"
    with open(temporary, "wb") as file:
        torch.save(obj, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def load_training_checkpoint(path):
    """The training checkpoint at path, or the newest one of a run directory, with its "path"."""
    if os.path.isdir(path):
        names = sorted(glob.glob(os.path.join(path, "checkpoints", "step-*.pt")))
        if not names:
            fail(f"no training checkpoint in {os.path.join(path, 'checkpoints')}: the run stopped before writing one")
        path = names[-1]
    if not os.path.isfile(path):
        fail(f"--resume {path}: no such checkpoint file or run directory")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        fail(f"{path} is not a readable checkpoint ({type(error).__name__}): pass a file from runs/<run>/checkpoints")
    if not isinstance(checkpoint, dict) or not {"model_weights", "args", "optimizer", "global_step"} <= checkpoint.keys():
        fail(f"{path} is not a training checkpoint of ppo_trxl.py (a published or --save-model file cannot be resumed)")
    return {**checkpoint, "path": path}


def parse_args():
    """The flags, and with --resume the training checkpoint, whose flags are the defaults that the command line
    overrides."""
    args = cli()
    if args.resume is None:
        return args, None
    checkpoint = load_training_checkpoint(args.resume)
    flags = {field.name for field in dataclasses.fields(Args) if field.init}
    saved = {name: value for name, value in checkpoint["args"].items() if name in flags}
    saved["trxl_positional_encoding"] = saved["trxl_positional_encoding"] or "none"  # as older checkpoints write it
    args = cli(Args(**{**saved, "resume": checkpoint["path"]}))
    if args.env_id != checkpoint["args"]["env_id"]:
        fail(
            f"--env-id {args.env_id} differs from the checkpoint's {checkpoint['args']['env_id']}: a run goes on with its env"
        )
    if checkpoint["global_step"] != checkpoint["iteration"] * args.batch_size * world_size():
        fail(
            f"the checkpoint took {checkpoint['global_step'] // checkpoint['iteration']} steps an iteration: resume with the "
            "same --num-envs x --num-steps (x torchrun ranks) so that the run ends at its --total-timesteps"
        )
    return args, checkpoint


def restore(agent, optimizer, args, checkpoint, restore_rng):
    """Loads a training checkpoint into agent and optimizer (and the random generators' states with restore_rng),
    or stops with one line where its model does not fit the one that args build."""
    saved = {**checkpoint["args"], "resume": args.resume}  # the checkpoint's flags
    if agent.transformer.memory_length != saved["trxl_memory_length"]:
        fail(f"memory length {agent.transformer.memory_length} differs from the checkpoint's {saved['trxl_memory_length']}")
    mismatch = state_dict_mismatch(agent.state_dict(), checkpoint["model_weights"])
    if mismatch:
        names = [f.name for f in dataclasses.fields(Args) if f.init and getattr(args, f.name) != saved.get(f.name)]
        differing = [f"{flag(name)} {getattr(args, name)} (the checkpoint's {saved.get(name)})" for name in names]
        fail(
            f"this model does not fit the checkpoint's ({mismatch}): resume with the flags that built it; the flags that "
            f"differ: {', '.join(differing) or 'none'}"
        )
    agent.load_state_dict(checkpoint["model_weights"])
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except ValueError:
        fail(
            f"the optimizer state in {checkpoint['path']} does not fit this ppo_trxl.py: resume it with the version that wrote it"
        )
    if restore_rng:
        rng = checkpoint["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        rng["numpy"]["state"]["key"] = np.array(rng["numpy"]["state"]["key"], dtype=np.uint32)
        np.random.set_state(rng["numpy"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])


def state_dict_mismatch(expected, given):
    """'' when the state_dict `given` fits the model's `expected`, else a short account of what differs."""

    def shape(value):
        return tuple(value.shape) if torch.is_tensor(value) else type(value).__name__

    differences = {
        "missing": [key for key in expected if key not in given],
        "unexpected": [key for key in given if key not in expected],
        "shape of": [
            f"{key} {shape(given[key])} where the model has {shape(expected[key])}"
            for key in expected
            if key in given and shape(given[key]) != shape(expected[key])
        ],
    }
    return "; ".join(
        f"{label} {', '.join(keys[:3])}" + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
        for label, keys in differences.items()
        if keys
    )


def save_checkpoint(run_name, keep, **state):
    """Writes a training checkpoint of the given state and removes all but the newest `keep` of them."""
    folder = f"runs/{run_name}/checkpoints"
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step-{state['global_step']:012d}.pt")
    numpy = np.random.get_state(legacy=False)
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy}
    numpy["state"]["key"] = numpy["state"]["key"].tolist()
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    save_atomically({**state, "run_name": run_name, "rng": rng}, path)
    for old in sorted(glob.glob(os.path.join(folder, "step-*.pt")))[:-keep]:
        os.remove(old)
    return path


class RolloutStopped(Exception):
    """A stop request, raised between two steps of a rollout: the rollout is dropped, and the model, the optimizer and
    the step count are still those of the last iteration."""


class StopSignals:
    """Turns SIGTERM and SIGINT into a request to stop, which the trainer answers at its next safe point: at once
    while a single process steps its envs (the rollout under way is dropped, see RolloutStopped), else when the
    iteration's update ends; it then writes a checkpoint. Another signal stops the run at once, unless it comes within
    a second of the first: launchers such as torchrun and timeout pass on to their children a signal that the
    children's whole process group got as well. last_checkpoint, (path, step) or None, says what that one loses."""

    def __init__(self):
        self.received, self.received_at, self.announce, self.last_checkpoint = None, None, True, None
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._request)

    def _request(self, signum, frame):
        name, again = signal.Signals(signum).name, "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        if self.received is None:
            self.received, self.received_at = name, time.monotonic()
            if self.announce:  # raw writes: a print here could land inside a print that the signal interrupted
                os.write(sys.stdout.fileno(), f"\nstopping at the next safe point; {again} again to stop at once\n".encode())
        elif time.monotonic() - self.received_at > 1.0:
            lost = "no checkpoint was written: all that this run trained is lost"
            if self.last_checkpoint:
                lost = "what was trained after the last checkpoint, {} (step {}), is lost".format(*self.last_checkpoint)
            os.write(sys.stderr.fileno(), f"stopped at once by a second {name}: {lost}\n".encode())
            raise SystemExit(128 + signum)


def init_distributed(args):
    """Joins torchrun's process group when there are several ranks (nccl on GPUs, gloo on CPUs).

    Returns the rank and the device. Every rank must run the same command: ranks whose flags differ stop.
    """
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and args.cuda
    if world_size() == 1:
        return 0, torch.device("cuda" if cuda else "cpu")
    if cuda and local_rank >= torch.cuda.device_count():
        fail(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} on this node): lower --nproc-per-node")
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    flags = [None] * world_size()
    dist.all_gather_object(flags, vars(args))
    for other_rank, other in enumerate(flags):
        differing = sorted(f"--{name.replace('_', '-')}" for name in other if other[name] != flags[0].get(name))
        if differing:
            fail(
                f"rank {other_rank}'s flags differ from rank 0's ({', '.join(differing)}): start every rank with the same command"
            )
    return rank, device


def launcher():
    """The command that starts this job again: python, or torchrun with as many nodes and processes per node."""
    if world_size() == 1:
        return "python"
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return f"torchrun --nnodes {world_size() // per_node} --nproc-per-node {per_node}"


def gather(obj):
    """Every rank's obj, in rank order (the obj alone in a single process)."""
    if world_size() == 1:
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def mean_over_ranks(tensor):
    if world_size() > 1:
        dist.all_reduce(tensor)
        tensor /= world_size()
    return tensor


def parameters_digest(agent):
    """A digest of the model's parameters and buffers, to check that all ranks hold the same model."""
    digest = hashlib.sha256()
    for tensor in agent.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def keep_freed_memory():
    """Lets glibc's malloc keep freed blocks of up to 64 MiB for reuse instead of handing them back to the system.

    Otherwise every large tensor, such as a minibatch's image activations, gets fresh pages from the system and
    pays a page fault for each on first write (its cost: benchmark/README.md, Speed devices). The plain code is
    none: malloc's defaults. Does nothing where malloc is not glibc's.
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None) if sys.platform.startswith("linux") else None
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    # a trim threshold alone would switch off malloc's adaptive mmap threshold, so it follows a granted one
    if mallopt and (mallopt(M_MMAP_THRESHOLD, 64 << 20) or mallopt(M_MMAP_THRESHOLD, 32 << 20)):
        mallopt(M_TRIM_THRESHOLD, 2**31 - 1)


def model_weights(agent):
    """The agent's state_dict with every tensor copied into its own contiguous storage, as published files hold them."""
    return {name: tensor.detach().clone(memory_format=torch.contiguous_format) for name, tensor in agent.state_dict().items()}


def linear_schedule(initial, final, anneal_steps, step):
    """initial, annealed linearly to final over anneal_steps steps, then final; initial throughout if anneal_steps is 0."""
    return initial + (final - initial) * min(step / anneal_steps, 1.0) if anneal_steps else initial


def banner(args, observation_space, action_space_shape, agent, device, run_name, checkpoint):
    """What the run is about to do, printed before its first iteration."""
    branches = list(action_space_shape)
    actions = f"Discrete({branches[0]})" if len(branches) == 1 else f"MultiDiscrete({branches})"
    cpu_fallback = " (CUDA requested but not available: using the CPU)" if args.cuda and device.type == "cpu" else ""
    transformer, iteration_steps = agent.transformer, args.batch_size * world_size()
    total_steps, ranks = args.num_iterations * iteration_steps, f" x {world_size()} ranks" if world_size() > 1 else ""
    memory = f"every step attends to up to {transformer.context} earlier steps of its episode"
    if transformer.context == 0:
        memory = "no memory, every step attends to nothing (the memoryless control)"
    if transformer.memory_length < args.trxl_memory_length:
        memory += (
            f" (--trxl-memory-length {args.trxl_memory_length} clipped to the episode limit {transformer.max_episode_steps})"
        )
    schedule = f"annealed over {args.anneal_steps:,} steps" if args.anneal_steps else "constant"
    lines = [
        f"env {args.env_id} | observations {observation_space} | actions {actions}",
        args.reset_params and f"task settings {args.reset_params} | episode limit {transformer.max_episode_steps}",
        f"device {device}{cpu_fallback} | model {sum(p.numel() for p in agent.parameters()):,} parameters",
        f"memory length {transformer.memory_length}: {memory}",
        f"{args.num_iterations:,} iteration{'s' if args.num_iterations > 1 else ''} x {iteration_steps:,} steps "
        f"({args.num_envs} envs x {args.num_steps} steps{ranks}) = {total_steps:,} steps | learning rate and entropy "
        f"coefficient {schedule}",
        total_steps != args.total_timesteps
        and f"--total-timesteps {args.total_timesteps:,} is rounded down to whole iterations: {total_steps:,} steps",
        checkpoint
        and f"resuming {checkpoint['path']} at step {checkpoint['global_step']:,} (iteration {checkpoint['iteration']} of "
        f"{args.num_iterations} done)",
        f"run directory runs/{run_name} | to watch it: tensorboard --logdir runs",
    ]
    return "\n".join(line for line in lines if line)


class Console:
    """What rank 0 prints while it trains: a line per iteration, or with progress a tqdm bar over the run's steps.
    Until the first line, every ten seconds or so, how far the rollout under way has come, and what the run would
    take at its rate."""

    def __init__(self, progress, batch_steps, total_steps, global_step):
        self.batch_steps, self.total_steps, self.global_step = batch_steps, total_steps, global_step
        self.bar = tqdm(total=total_steps, initial=global_step, unit="step", dynamic_ncols=True) if progress else None
        self.taken, self.started, self.noted, self.lines = 0, 0.0, 0.0, 0

    def rollout_step(self, steps):
        """steps more steps of the rollout under way, those of every env of every rank"""
        now = time.time()
        self.started, self.taken = self.started if self.taken else now, self.taken + steps
        done = self.taken == self.batch_steps
        if self.bar is not None:
            self.bar.update(steps)
        elif not self.lines and now - self.started >= 2 and (done or now - self.noted >= 10):
            rate, left = self.taken / (now - self.started), self.total_steps - self.global_step
            print(
                f"rollout {self.taken:,}/{self.batch_steps:,} steps at {rate:,.0f} steps/s: the run's {left:,} steps would "
                f"take {format_duration(left / rate)} at this rate, more with the updates{'; updating' if done else ''}",
                flush=True,
            )
            self.noted = now

    def iteration_done(self, iteration, num_iterations, global_step, sps, episodes):
        self.taken, self.global_step, self.lines = 0, global_step, self.lines + 1
        if self.bar is not None:
            self.bar.update(global_step - self.bar.n)
            self.bar.set_postfix_str(f"{sps} SPS | {episodes}")
        else:
            remaining = format_duration((self.total_steps - global_step) / max(sps, 1))
            print(
                f"iteration {iteration}/{num_iterations} | step {global_step}/{self.total_steps} | {sps} SPS | {episodes}"
                f" | remaining {remaining}",
                flush=True,
            )

    def close(self):
        if self.bar is not None:
            self.bar.close()


def format_duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


if __name__ == "__main__":
    args, checkpoint = parse_args()
    check_args(args)
    stop = StopSignals()  # from now on a Ctrl-C is a request, which the trainer answers at its next safe point
    keep_freed_memory()
    rank, device = init_distributed(args)
    stop.announce = rank == 0
    start_iteration = checkpoint["iteration"] + 1 if checkpoint else 1
    global_step = checkpoint["global_step"] if checkpoint else 0  # over all ranks
    if start_iteration > args.num_iterations:
        print(
            f"{checkpoint['path']} finished the run's {args.num_iterations} iterations ({global_step:,} steps): nothing is "
            "left to do; resume with a larger --total-timesteps to train on"
        )
        sys.exit(0)
    # the run's folder, named by the env id without the module that registers it, and rank 0's clock
    run_name = checkpoint["run_name"] if checkpoint else f"{args.env_id.rpartition(':')[2]}__{args.exp_name}__{args.seed}"
    run_name = gather(run_name if checkpoint else f"{run_name}__{int(time.time())}")[0]

    # Seeding: each rank samples and steps its envs with its own seeds
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)
    torch.backends.cudnn.deterministic = args.torch_deterministic

    # Environments (a resumed run starts fresh episodes, seeded apart from the ones before) and the agent
    envs, next_obs, observation_space, action_space_shape, max_episode_steps = make_envs(
        args, run_name, args.seed + global_step + rank * args.num_envs, capture_video=args.capture_video and rank == 0
    )
    agent = Agent(args, observation_space, action_space_shape, max_episode_steps).to(device)
    parameters = list(agent.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=args.init_lr, fused=True)
    if checkpoint:
        restore(agent, optimizer, args, checkpoint, restore_rng=rank == 0)
    saved_args = {**vars(args), "trxl_memory_length": agent.transformer.memory_length}
    # Under torchrun the update goes through DistributedDataParallel, which starts every rank from rank 0's
    # parameters and averages the gradients of every minibatch across ranks
    learner = agent if world_size() == 1 else DistributedDataParallel(agent, [device] if device.type == "cuda" else None)
    policy_step = rollout_step
    if args.compile:  # compiled at their first calls, the rollout step once more when its step index changes
        learner, policy_step = torch.compile(learner), compiled_rollout_step()
    rollout = Rollout(
        args, observation_space, len(action_space_shape), agent.transformer, device, is_minigrid_memory(args.env_id)
    )
    total_steps = args.num_iterations * args.batch_size * world_size()

    # Logging (rank 0): a resumed run continues its curves, hiding what was logged after its checkpoint
    wandb_id = checkpoint and checkpoint.get("wandb_id")
    if rank == 0:
        print(banner(args, observation_space, action_space_shape, agent, device, run_name, checkpoint), flush=True)
        console = Console(args.progress, args.batch_size * world_size(), total_steps, global_step)
        if args.track:
            import wandb

            where = dict(project=args.wandb_project_name, entity=args.wandb_entity, name=run_name, id=wandb_id, resume="allow")
            wandb_id = wandb.init(**where, config=saved_args, sync_tensorboard=True, save_code=True).id
        writer = SummaryWriter(f"runs/{run_name}", purge_step=global_step + 1 if checkpoint else None)
        if not checkpoint:
            writer.add_text(
                "hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in saved_args.items())
            )

    def write_checkpoint(iteration):
        """A training checkpoint of the run after iteration (rank 0): its path and step."""
        state = dict(model_weights=model_weights(agent), args=saved_args, optimizer=optimizer.state_dict(), wandb_id=wandb_id)
        path = save_checkpoint(run_name, args.keep_checkpoints, **state, global_step=global_step, iteration=iteration)
        return path, global_step

    def on_rollout_step(s):
        """After every step of a rollout: a single process drops the rollout for a stop request, as nothing else waits
        for it; rank 0 shows the rollout's progress."""
        if stop.received and world_size() == 1:
            raise RolloutStopped
        if rank == 0:
            console.rollout_step(args.num_envs * world_size())

    next_obs = torch.as_tensor(next_obs, device=device)
    next_episode_steps = torch.zeros(args.num_envs, dtype=torch.long, device=device)  # (E,) episode step of next_obs
    episode_infos = deque(maxlen=100)
    stopping = None  # the signal that all ranks agreed to stop on
    stop.last_checkpoint = checkpoint and (checkpoint["path"], global_step)
    start_time, start_step = time.time(), global_step
    checkpoint_time = start_time

    for iteration in range(start_iteration, args.num_iterations + 1):
        learning_rate = linear_schedule(args.init_lr, args.final_lr, args.anneal_steps, global_step)
        ent_coef = linear_schedule(args.init_ent_coef, args.final_ent_coef, args.anneal_steps, global_step)
        for param_group in optimizer.param_groups:
            param_group["lr"] = learning_rate

        try:
            next_obs, next_episode_steps, next_value, finished_episodes = collect_rollout(
                agent, envs, rollout, next_obs, next_episode_steps, policy_step, on_rollout_step
            )
        except RolloutStopped:  # the model, the optimizer and the step count are those of the last iteration
            stopping = stop.received
            if iteration > start_iteration:
                stop.last_checkpoint = write_checkpoint(iteration - 1)
            break
        global_step += args.batch_size * world_size()
        advantages = rollout.advantages(next_value, next_episode_steps, args.gamma, args.gae_lambda)
        returns = advantages + rollout.values

        # Update: every minibatch holds a chunk of every env's steps, drawn at random
        # (the first epoch also summarises the attention over the whole rollout, see attention_summary)
        metrics = {}  # name -> the minibatches' values
        for epoch in range(args.update_epochs):
            for mb in minibatches(args.num_envs, args.num_steps, args.num_minibatches, device):
                loss, mb_metrics = ppo_loss(args, ent_coef, learner, agent, rollout, mb, advantages, returns, epoch == 0)
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(parameters, args.max_grad_norm)
                optimizer.step()
                for name, value in mb_metrics.items():
                    metrics.setdefault(name, []).append(value)
            if args.target_kl is not None and mean_over_ranks(mb_metrics["losses/approx_kl"].clone()).item() > args.target_kl:
                break

        # Logging: the host reads the iteration's numbers once, here, averaged over minibatches and ranks
        with torch.no_grad():
            y_pred, y_true = rollout.values.flatten(), returns.flatten()
            metrics = {name: torch.stack(values).mean() for name, values in metrics.items()}
            metrics["episode/advantage_mean"], metrics["episode/value_mean"] = advantages.mean(), y_pred.mean()
            # 0 where the returns do not vary (a sparse reward before its first success): the value explains nothing
            variance = y_true.var()
            metrics["losses/explained_variance"] = torch.where(variance > 0, 1 - (y_true - y_pred).var() / variance, 0.0)
            scalars = dict(zip(metrics, mean_over_ranks(torch.stack(list(metrics.values()))).tolist()))
        if not (math.isfinite(scalars["losses/loss"]) and all(p.isfinite().all() for p in parameters)):
            envs.close()
            if rank == 0:
                writer.close()  # the earlier iterations' logs
            last = stop.last_checkpoint[0] if stop.last_checkpoint else "none (see --checkpoint-minutes)"
            fail(
                f"the loss or the parameters became non-finite at iteration {iteration} (step {global_step}); "
                f"nothing of it was saved. The last good checkpoint: {last}"
            )
        finished_by_rank, signals = zip(*gather((finished_episodes, stop.received)))
        for finished in finished_by_rank:
            episode_infos.extend(finished)
        stopping = next((name for name in signals if name), None)
        if rank == 0:
            sps = int((global_step - start_step) / (time.time() - start_time))
            scalars.update({"charts/SPS": sps, "charts/learning_rate": learning_rate, "charts/entropy_coefficient": ent_coef})
            episodes = "no episode finished yet"
            if episode_infos:
                r_mean, l_mean, t_mean, *cue_seen = (float(np.mean(column)) for column in zip(*episode_infos))
                scalars.update({"episode/r_mean": r_mean, "episode/l_mean": l_mean, "episode/t_mean": t_mean})
                scalars.update({"charts/episodic_return": r_mean, "charts/episodic_length": l_mean})
                if cue_seen:  # MiniGrid Memory: the fraction of the episodes whose view showed the cue at some step
                    scalars["episode/cue_seen"] = cue_seen[0]
                episodes = f"return {r_mean:.2f} | length {l_mean:.1f}"
            for name, scalar in scalars.items():
                writer.add_scalar(name, scalar, global_step)
            console.iteration_done(iteration, args.num_iterations, global_step, sps, episodes)
            due = args.checkpoint_minutes and time.time() - checkpoint_time >= 60 * args.checkpoint_minutes
            if stopping or due or (args.checkpoint_interval and iteration % args.checkpoint_interval == 0):
                stop.last_checkpoint, checkpoint_time = write_checkpoint(iteration), time.time()
        if stopping:
            break

    digests = gather(parameters_digest(agent))
    if world_size() > 1:
        print(f"rank {rank}: parameters {digests[rank]}\n", end="", flush=True)  # one write, so ranks' lines stay whole
        if len(set(digests)) > 1:
            fail(f"the ranks ended with different parameters ({', '.join(digests)}): their updates went apart")
    if rank == 0:
        console.close()
        if stopping and stop.last_checkpoint:
            resume = f"{launcher()} ppo_trxl.py --resume runs/{run_name}"
            print(f"stopped by {stopping} at step {stop.last_checkpoint[1]}; resume with: {resume}")
        elif stopping:
            print(f"stopped by {stopping} before the first iteration ended: nothing was trained or saved")
        elif args.save_model:
            model_path = f"runs/{run_name}/{args.exp_name}.cleanrl_model"
            save_atomically({"model_weights": model_weights(agent), "args": saved_args}, model_path)
            print(f"model saved to {model_path}")
        writer.close()
        if args.track:
            wandb.finish()
    envs.close()
    exit_code = 128 + signal.Signals[stopping] if stopping else 0  # 130 after SIGINT, 143 after SIGTERM, as shells tell
    if world_size() > 1:
        dist.destroy_process_group()
        leave_process_group(exit_code)
    sys.exit(exit_code)
