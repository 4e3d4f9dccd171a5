"""Watch and evaluate trained PPO-TrXL agents: on screen, as a video that shows what they attend to, or as numbers.

Docs: README.md. Published agents come from the Hugging Face hub, your own from a run of `ppo_trxl.py`: its
`--save-model` file or, while it trains, its newest `--checkpoint-interval` checkpoint:

    python enjoy.py --hub --name Endless-MortarMayhem-v0_12.nn
    python enjoy.py --name runs/RUN --episodes 10 --deterministic --video agent.mp4

Beside every frame the video shows the value estimate over the episode and, for every transformer layer, the
attention over the memory window (mean over heads): the oldest step of the window at the left, the step just
before the current one at the right.
"""

import enum
import glob
import math
import os
import pickle
import random
import re
import socket
import sys
import threading
import types
import urllib.parse
import warnings
from dataclasses import dataclass
from typing import Optional

try:
    import cv2
    import numpy as np
    import torch
    import tyro
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
except ModuleNotFoundError as missing:
    from ppo_trxl import missing_package  # which stops with the same one line should ppo_trxl miss a package too

    missing_package(missing)

from ppo_trxl import (
    POSITIONAL_ENCODINGS,
    Agent,
    Timeline,
    VideoFile,
    action_branches,
    band_mask,
    episode_limit,
    episode_limit_under,
    fail,
    is_memory_gym,
    make_env,
    rollout_step,
    state_dict_mismatch,
    task_settings,
    watch_render_mode,
)

PUBLISHED = (
    "Endless-MortarMayhem-v0_12.nn",
    "Endless-MysterPath-v0_11.nn",
    "Endless-SearingSpotlights-v0_30.nn",
    "MiniGrid-MemoryS9-v0_10.nn",
    "ProofofMemory-v0_1.nn",
)
"""The agents published in LilHairdy/cleanrl_memory_gym (the MysterPath typo is the file's real name)."""
MODEL_ARGS = (
    "env_id",
    "trxl_num_layers",
    "trxl_num_heads",
    "trxl_dim",
    "trxl_memory_length",
    "trxl_positional_encoding",
    "reconstruction_coef",
)

TIMELINE_STEPS = 256
"""How many steps the player's timeline holds beside the C that it carries over."""
PANEL_WIDTH = 320
MARGIN = 10
LINE = 18
PLOT_HEIGHT = 70
STRIP_HEIGHT = 14
FONT = cv2.FONT_HERSHEY_SIMPLEX
TEXT_COLOR = (230, 230, 230)  # BGR, like every colour below
EMPTY_SLOT_COLOR = (60, 60, 60)
VALUE_COLOR = (80, 200, 255)


PUBLISHED_REPO = "LilHairdy/cleanrl_memory_gym"

DESCRIPTION = """Watch and evaluate a trained PPO-TrXL agent: on screen, as a video beside what it attends to, or as numbers.

Examples:
  python enjoy.py --hub --name Endless-MortarMayhem-v0_12.nn          # a published agent, on screen
  python enjoy.py --name runs/RUN --episodes 10 --deterministic      # your run: mean and std of the return
  python enjoy.py --name runs/RUN --video agent.mp4 --max-steps 2000  # without a display"""


@dataclass
class Args:
    name: str = "Endless-MortarMayhem-v0_12.nn"
    """the agent: a checkpoint file, a run directory (its saved model, else its newest checkpoint), or a --hub file"""
    hub: bool = False
    """download --name from the Hugging Face hub (into its local cache)"""
    repo_id: str = PUBLISHED_REPO
    """the hub model repo that --hub downloads from"""
    episodes: int = 1
    """the number of episodes to play"""
    max_steps: Optional[int] = None
    """end an episode after this many steps (the Endless envs have no limit of their own)"""
    seed: int = 1
    """seed of the environment and of the sampled actions"""
    reset_params: Optional[str] = None
    """Memory Gym task settings, a JSON object such as '{"command_count": [3]}'; unset: those the agent learnt on"""
    deterministic: bool = False
    """take the most likely action of every branch instead of sampling"""
    video: Optional[str] = None
    """write the episodes to this .mp4 file (no screen needed), with attention and value beside every frame"""
    render: bool = True
    """show the episodes on screen (`human` render) when a display exists and no --video is given"""
    cuda: bool = True
    """play on the GPU when one is available; --no-cuda plays on the CPU"""


def has_display():
    """Whether a `human` render can open a window: an X or Wayland display, or a desktop system."""
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")) or sys.platform in ("darwin", "win32")


def first_line(error):
    """The error's kind and the first sentence of its message, for a one-line report."""
    sentence = re.split(r"(?<=\.)\s|\n", str(error).strip())[0]
    return f"{type(error).__name__}: {sentence}"[:200] if sentence else type(error).__name__


def reachable(url, timeout=1.5):
    """Whether a connection to url's host opens within timeout seconds, name lookup included."""
    parts = urllib.parse.urlparse(url)
    address = (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    opened = []

    def connect():
        try:
            socket.create_connection(address, timeout).close()
            opened.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)  # a name lookup ignores the timeout: the thread is left behind
    thread.start()
    thread.join(timeout)
    return bool(opened)


def download(repo_id, filename):
    """The local path of filename from the hub repo repo_id, taken from huggingface_hub's cache or downloaded into it."""
    if repo_id == PUBLISHED_REPO and filename not in PUBLISHED:
        fail(f"'{filename}' is not a published agent: choose one of {', '.join(PUBLISHED)}")
    by_hand = (
        f"download it by hand (`hf download {repo_id} {filename} --local-dir .`, or from "
        f"https://huggingface.co/{repo_id}/tree/main) and run with --name {filename}"
    )
    try:
        return hf_hub_download(repo_id=repo_id, filename=filename, local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    # without a network the hub client would retry for half a minute: fail at once instead (unless behind a proxy)
    proxied = any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    if constants.HF_HUB_OFFLINE or not (proxied or reachable(constants.ENDPOINT)):
        hub = "is offline (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else "cannot be reached"
        fail(f"the Hugging Face hub {hub} and '{filename}' is not in its local cache: {by_hand}")
    try:
        return hf_hub_download(repo_id=repo_id, filename=filename)
    except LocalEntryNotFoundError:  # the connection broke off
        fail(f"the Hugging Face hub cannot be reached and '{filename}' is not in its local cache: {by_hand}")
    except RepositoryNotFoundError:
        fail(f"the hub has no model repo '{repo_id}' (or it is private): check --repo-id")
    except EntryNotFoundError:
        fail(f"the hub repo '{repo_id}' has no file '{filename}'; the published agents are {', '.join(PUBLISHED)}")
    except ValueError as error:  # an invalid repo id or file name
        fail(f"cannot download '{filename}' from the hub repo '{repo_id}': {first_line(error)}")
    except OSError as error:
        fail(f"cannot download '{filename}' from the hub repo '{repo_id}' ({first_line(error)}): {by_hand}")


def run_directory_agent(run_dir):
    """The agent file of a run directory: its --save-model file, else its newest training checkpoint."""
    saved = sorted(glob.glob(os.path.join(run_dir, "*.cleanrl_model")), key=os.path.getmtime)
    checkpoints = sorted(glob.glob(os.path.join(run_dir, "checkpoints", "step-*.pt")))
    if not saved + checkpoints:
        fail(
            f"the run directory '{run_dir}' holds no model: train with --save-model, or with --checkpoint-interval "
            "to watch it while it trains"
        )
    return (saved or checkpoints)[-1]


def load_checkpoint(path, device):
    """The model weights and the training args (a namespace) of a checkpoint `{"model_weights", "args"}`: a published
    file, a --save-model file or a training checkpoint."""
    not_ours = f"'{path}' is not a PPO-TrXL checkpoint"
    if not os.path.isfile(path):
        fail(
            f"no checkpoint file '{path}': pass one that `ppo_trxl.py --save-model` wrote, a run directory, or --hub --name NAME"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols before it fails on foreign files
            checkpoint = torch.load(path, map_location=device, weights_only=True)
    except (
        Exception
    ) as error:  # a foreign file can fail in pickle, zip or EOF checks alike, with messages such as "KeyError: 101"
        if isinstance(error, pickle.UnpicklingError) and "Unsupported global" in str(error):
            fail(f"{not_ours}: it holds Python objects besides tensors and plain values, which torch.load refuses here")
        fail(f"{not_ours}: torch.load cannot read it (a --save-model file, a training checkpoint or a published .nn file can)")
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("args"), dict):
        fail(f"{not_ours}: it holds no dict with 'model_weights' and 'args'")
    if not isinstance(checkpoint.get("model_weights"), dict):
        fail(f"{not_ours}: its 'model_weights' is not a state_dict")
    missing = [key for key in MODEL_ARGS if key not in checkpoint["args"]]
    if missing:
        fail(f"{not_ours}: its args lack {', '.join(missing)}")
    args = types.SimpleNamespace(**checkpoint["args"])
    if args.trxl_positional_encoding not in POSITIONAL_ENCODINGS + ("",):
        fail(f"{not_ours}: unknown trxl_positional_encoding '{args.trxl_positional_encoding}'")
    return checkpoint["model_weights"], args


class Player:
    """The agent acting in one env as the trainer acts in its rollouts (ppo_trxl.rollout_step), on a timeline of
    TIMELINE_STEPS steps that carries the last C over when it is full, so episodes of any length fit."""

    def __init__(self, agent, memory_dtype, device):
        self.agent = agent
        self.timeline = Timeline(1, TIMELINE_STEPS, agent.transformer, getattr(torch, memory_dtype), device)
        self.s = TIMELINE_STEPS  # the timeline slot of the next step, C + s: it begins anew at the first step

    @torch.inference_mode()
    def act(self, obs, t, deterministic):
        """The agent's step at episode step t: obs (*obs_shape) -> action (branches,), value () and every layer's
        attention over the C steps before this one (L, C), mean over heads, oldest first; NaN where it sees nothing."""
        if self.s == TIMELINE_STEPS:
            self.timeline.begin(self.agent.transformer)
            self.s = 0
        episode_steps = torch.tensor([t], device=obs.device)
        step = rollout_step(self.agent, self.timeline, self.agent.encode(obs[None]), episode_steps, self.s, need_weights=True)
        self.timeline.record(self.agent.transformer, self.s, episode_steps, step.layer_inputs)
        self.s += 1
        action = step.action
        if deterministic:
            hidden = self.agent.hidden_post_trxl(step.trxl_out)
            action = torch.stack([branch(hidden).argmax(-1) for branch in self.agent.actor_branches], 1)
        attention = torch.stack([weights[0, :, 0].mean(0) for weights in step.weights])  # (L, C)
        seen = band_mask(self.timeline.window_ages, episode_steps, self.timeline.memory_length)  # (C,)
        return action[0], step.value[0], torch.where(seen, attention, float("nan"))


def panel_height(num_layers):
    """Five lines of text, the value plot, a caption, then a label and a heat strip per layer and the age axis."""
    return MARGIN + 5 * LINE + PLOT_HEIGHT + LINE + num_layers * (LINE + STRIP_HEIGHT) + LINE + MARGIN


def action_names(env):
    """The names of a Discrete env's actions where the env gives them (get_action_meanings(), MiniGrid's Actions)."""
    unwrapped = env.unwrapped
    if hasattr(unwrapped, "get_action_meanings"):
        return list(unwrapped.get_action_meanings())
    actions = getattr(unwrapped, "actions", None)
    if isinstance(actions, type) and issubclass(actions, enum.Enum):
        return [action.name for action in actions]
    return None


def heat_strip(by_age, width):
    """(STRIP_HEIGHT, width, 3) BGR: a layer's weights by age (C,) through a colour map on a square-root scale
    (weight 1 is the brightest, and small weights stay visible); grey where nothing is attended."""
    if len(by_age) == 0:  # memory length 1: nothing to attend to
        return np.full((STRIP_HEIGHT, width, 3), EMPTY_SLOT_COLOR, dtype=np.uint8)
    attended = ~np.isnan(by_age)
    scaled = np.round(255 * np.sqrt(np.where(attended, by_age, 0.0))).astype(np.uint8)
    colors = cv2.applyColorMap(scaled[None], cv2.COLORMAP_INFERNO)  # (1, C, 3)
    colors[0, ~attended] = EMPTY_SLOT_COLOR
    interpolation = cv2.INTER_NEAREST if len(by_age) <= width else cv2.INTER_AREA
    return cv2.resize(colors, (width, STRIP_HEIGHT), interpolation=interpolation)


def draw_panel(height, header, step, episode_return, values, limit, decision=None):
    """The panel beside a frame, (height, PANEL_WIDTH, 3) BGR: the header's two lines (episode, env, file); a note
    that the frame is the env's ground truth; step and return; the value over the episode (x spans the episode limit,
    or the episode once it is longer); and the decision at this step, decision = (action as text, attention by age
    (L, C) numpy): the action, and the attention of every layer. None once the episode is over."""
    panel = np.full((height, PANEL_WIDTH, 3), 24, dtype=np.uint8)
    width = PANEL_WIDTH - 2 * MARGIN

    def text(string, x, y, scale=0.4):
        cv2.putText(panel, string, (x, y), FONT, scale, TEXT_COLOR, 1, cv2.LINE_AA)

    y = MARGIN + LINE - 6
    for line in header:
        text(line, MARGIN, y, 0.35)
        y += LINE
    text("left: the env's ground truth, not the agent's view", MARGIN, y, 0.35)
    y += LINE
    text(f"step {step}   return {episode_return:+.2f}", MARGIN, y)
    y += LINE
    text(f"value {values[-1]:+.3f}   action {decision[0]}" if decision else "episode over", MARGIN, y)

    top, plot_width = y + 8, width - 48  # the value range is written right of the plot
    low, high = min(values), max(values)
    span = max(high - low, 1e-6)
    xs = MARGIN + np.arange(len(values)) * (plot_width - 1) / max(limit - 1, len(values) - 1, 1)
    ys = top + (PLOT_HEIGHT - 1) * (high - np.asarray(values)) / span
    if low < 0 < high:
        zero = round(top + (PLOT_HEIGHT - 1) * high / span)
        cv2.line(panel, (MARGIN, zero), (MARGIN + plot_width - 1, zero), EMPTY_SLOT_COLOR, 1)
    cv2.rectangle(panel, (MARGIN, top), (MARGIN + plot_width - 1, top + PLOT_HEIGHT - 1), EMPTY_SLOT_COLOR, 1)
    points = np.stack([xs, ys], 1).round().astype(np.int32)  # (steps, 2) pixel coordinates
    cv2.polylines(panel, [points[:, None]], False, VALUE_COLOR, 1, cv2.LINE_AA)
    cv2.circle(panel, tuple(points[-1].tolist()), 2, VALUE_COLOR, -1, cv2.LINE_AA)
    text(f"{high:+.2f}", MARGIN + plot_width + 4, top + 10, 0.35)
    text(f"{low:+.2f}", MARGIN + plot_width + 4, top + PLOT_HEIGHT - 1, 0.35)

    y = top + PLOT_HEIGHT + LINE
    text("attention by age (mean of heads, sqrt scale)", MARGIN, y)
    if decision is None:
        return panel
    attention = decision[1]
    for layer, by_age in enumerate(attention):
        y += LINE
        peak = "nothing to attend yet"
        if not np.isnan(by_age).all():
            peak = f"peak t-{len(by_age) - np.nanargmax(by_age)} ({np.nanmax(by_age):.2f})"
        text(f"layer {layer}: {peak}", MARGIN, y)
        panel[y + 4 : y + 4 + STRIP_HEIGHT, MARGIN : MARGIN + width] = heat_strip(by_age, width)
        y += STRIP_HEIGHT
    text(f"t-{attention.shape[1]}", MARGIN, y + LINE, 0.35)
    text("t-1", MARGIN + width - 22, y + LINE, 0.35)
    return panel


class AnnotatedVideo:
    """Env frames with the panel beside them, written to an mp4 that appears under its name once closed."""

    def __init__(self, path, fps, frame_shape, num_layers):
        self.panel_height = max(frame_shape[0], panel_height(num_layers))
        width = frame_shape[1] + PANEL_WIDTH
        self.size = (width + width % 2, self.panel_height + self.panel_height % 2)  # (width, height), even for mp4
        self.file = VideoFile(path, fps)

    def write(self, frame, panel):
        """frame (h, w, 3) RGB from the env's render, panel (self.panel_height, PANEL_WIDTH, 3) BGR."""
        canvas = np.full(self.size[::-1] + (3,), 24, dtype=np.uint8)  # the panel's grey around a smaller frame
        canvas[: frame.shape[0], : frame.shape[1]] = cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)
        canvas[: panel.shape[0], frame.shape[1] : frame.shape[1] + PANEL_WIDTH] = panel
        self.file.write(canvas)

    def close(self):
        self.file.close()


def play(player, env, args, video, render_by_hand, env_id, file_name):
    """Plays args.episodes episodes (each up to args.max_steps), yielding each one's (return, length). With a video,
    every step's frame is written with the decision taken there, and each episode's last frame after it."""
    device = next(player.agent.parameters()).device
    names = action_names(env)
    for episode in range(args.episodes):
        obs, _ = env.reset(seed=args.seed if episode == 0 else None)
        limit = min(episode_limit(env), args.max_steps or math.inf)
        header = [f"episode {episode + 1}/{args.episodes}   {env_id}", file_name[-48:]]
        values, episode_return, t, done = [], 0.0, 0, False
        while not done:
            if render_by_hand:
                env.render()
            action, value, attention = player.act(torch.as_tensor(obs, device=device), t, args.deterministic)
            values.append(value.item())
            env_action = action.cpu().numpy().reshape(env.action_space.shape)[()]  # a scalar for Discrete
            if video:
                action_text = names[env_action] if names else str(env_action)
                decision = (action_text, attention.cpu().numpy())
                video.write(env.render(), draw_panel(video.panel_height, header, t, episode_return, values, limit, decision))
            obs, reward, terminated, truncated, _ = env.step(env_action)
            episode_return += float(reward)
            t += 1
            done = terminated or truncated or t == args.max_steps
        if render_by_hand:
            env.render()
        if video:
            video.write(env.render(), draw_panel(video.panel_height, header, t, episode_return, values, limit))
        yield episode_return, t


def main(args):
    if args.episodes < 1:
        fail("--episodes must be at least 1")
    if args.max_steps is not None and args.max_steps < 1:
        fail("--max-steps must be at least 1 (or left out: episodes end as the env ends them)")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if args.hub:
        path = download(args.repo_id, args.name)
    else:
        path = run_directory_agent(args.name) if os.path.isdir(args.name) else args.name
    weights, train_args = load_checkpoint(path, device)

    render_mode = None
    if args.video:
        render_mode = watch_render_mode(train_args.env_id)
    elif args.render and has_display():
        render_mode = "human"
    # gymnasium 0.29 warns when MiniGrid's wrappers reach through each other, and when it draws an env on screen for it
    warnings.filterwarnings("ignore", message=".*to get variables from other wrappers is deprecated")
    warnings.filterwarnings("ignore", message=".*The HumanRendering wrapper is being applied")
    # the agent plays the task settings it was trained on unless --reset-params overrides them (published agents have
    # none), and its model keeps the episode limit of its training settings, which sizes the positional encoding
    trained_params = getattr(train_args, "reset_params", None)
    reset_params = args.reset_params if args.reset_params is not None else trained_params
    trained_limit = episode_limit_under(train_args.env_id, task_settings(train_args.env_id, trained_params))
    env = make_env(train_args.env_id, 0, False, "", render_mode, task_settings(train_args.env_id, reset_params))()
    env.reset(seed=args.seed)  # rendered once to size the video
    agent = Agent(train_args, env.observation_space, action_branches(env.action_space), trained_limit).to(device)
    mismatch = state_dict_mismatch(agent.state_dict(), weights)
    if mismatch:
        fail(f"the weights in '{path}' do not fit the model that its args describe: {mismatch}")
    agent.load_state_dict(weights)
    player = Player(agent, getattr(train_args, "memory_dtype", "float32"), device)
    video = None
    if args.video:
        video = AnnotatedVideo(
            args.video, env.metadata.get("render_fps") or 30, env.render().shape, train_args.trxl_num_layers
        )
    render_by_hand = render_mode == "human" and is_memory_gym(train_args.env_id)  # Memory Gym draws only when asked

    actions = "deterministic actions" if args.deterministic else "sampled actions"
    settings = f" | task settings {reset_params}" if reset_params is not None else ""
    print(f"{train_args.env_id}{settings} | {path} | {device} | {actions}", flush=True)
    if render_mode is None and args.render:
        print("no display to show the episodes on: add --video agent.mp4 to watch them", flush=True)
    returns, lengths = [], []
    try:
        for episode_return, length in play(player, env, args, video, render_by_hand, train_args.env_id, path):
            returns.append(episode_return)
            lengths.append(length)
            print(f"episode {len(returns)}/{args.episodes}: return {episode_return:.3f}, length {length}", flush=True)
    except KeyboardInterrupt:
        print("interrupted")
    finally:
        env.close()
    if video:
        video.close()
        print(f"video written to {args.video}")
    if returns:
        print(
            f"{len(returns)} episode{'s' if len(returns) > 1 else ''}: return {np.mean(returns):.3f} +- {np.std(returns):.3f}, "
            f"length {np.mean(lengths):.1f} +- {np.std(lengths):.1f}"
        )


if __name__ == "__main__":
    main(tyro.cli(Args, description=DESCRIPTION))
