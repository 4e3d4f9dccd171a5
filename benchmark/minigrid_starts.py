"""What a MiniGrid Memory agent does from each start: whether it looks at the cue, and whether it then chooses right.

    python benchmark/minigrid_starts.py runs/MiniGrid-MemoryS9-v0__ppo_trxl__1__1700000000
    python benchmark/minigrid_starts.py runs/RUN --episodes 1200 --deterministic

It plays a trained agent (a run directory, a --save-model file or a training checkpoint, as enjoy.py takes them)
for --episodes episodes on its env and prints, for every start position x of the agent and whether the agent's
view showed the cue at some step, the number of episodes, the fraction it won and the mean length and return.
On MiniGrid-MemoryS9-v0 the cue is in view at reset only from x = 1: an agent in the memoryless trap wins about
half of the other starts without ever seeing the cue, while one that uses its memory wins the starts where the
cue was seen. Everything runs on the CPU.
"""

import argparse
import os
import sys
import warnings
from collections import defaultdict

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import enjoy  # noqa: E402
import ppo_trxl  # noqa: E402


def play_from_starts(player, env, episodes, seed, deterministic):
    """{(start x, cue seen): [(won, length, return)]} over episodes episodes, the first reset with seed."""
    outcomes = defaultdict(list)
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed if episode == 0 else None)
        start_x = int(env.unwrapped.agent_pos[0])
        seen, t, done, episode_return = env.cue_in_view(), 0, False, 0.0
        while not done:
            action, _, _ = player.act(torch.as_tensor(obs), t, deterministic)
            obs, reward, terminated, truncated, _ = env.step(int(action[0]))
            episode_return += float(reward)
            seen = seen or env.cue_in_view()
            t += 1
            done = terminated or truncated
        outcomes[start_x, seen].append((episode_return > 0, t, episode_return))
    return outcomes


def table(outcomes):
    lines = ["| start x | cue seen | episodes | won | length | return |", "| --- | --- | --- | --- | --- | --- |"]
    for (start_x, seen), results in sorted(outcomes.items()):
        won, length, episode_return = np.mean(results, axis=0)
        lines.append(
            f"| {start_x} | {'yes' if seen else 'no'} | {len(results)} | {won:.2f} | {length:.1f} | {episode_return:.3f} |"
        )
    won, length, episode_return = np.mean([result for results in outcomes.values() for result in results], axis=0)
    lines.append(f"| all | | {sum(map(len, outcomes.values()))} | {won:.2f} | {length:.1f} | {episode_return:.3f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=type("Formatter", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {}),
    )
    parser.add_argument("name", help="a run directory, a --save-model file or a training checkpoint")
    parser.add_argument("--episodes", type=int, default=600, help="the number of episodes to play")
    parser.add_argument("--seed", type=int, default=1, help="seed of the env and of the sampled actions")
    parser.add_argument("--deterministic", action="store_true", help="take the most likely action instead of sampling")
    args = parser.parse_args()
    if args.episodes < 1:
        parser.error("--episodes must be at least 1")
    torch.manual_seed(args.seed)
    path = enjoy.run_directory_agent(args.name) if os.path.isdir(args.name) else args.name
    weights, train_args = enjoy.load_checkpoint(path, "cpu")
    if not ppo_trxl.is_minigrid_memory(train_args.env_id):
        ppo_trxl.fail(f"{path} was trained on {train_args.env_id}: this tool reads MiniGrid Memory envs' cue")
    warnings.filterwarnings("ignore", message=".*to get variables from other wrappers is deprecated")
    env = ppo_trxl.make_env(train_args.env_id, 0, False, "")()
    env.reset(seed=args.seed)
    action_space_shape = ppo_trxl.action_branches(env.action_space)
    agent = ppo_trxl.Agent(train_args, env.observation_space, action_space_shape, ppo_trxl.episode_limit(env))
    agent.load_state_dict(weights)
    player = enjoy.Player(agent, getattr(train_args, "memory_dtype", "float32"), torch.device("cpu"))
    outcomes = play_from_starts(player, env, args.episodes, args.seed, args.deterministic)
    env.close()
    print(f"{train_args.env_id} | {path} | {'deterministic' if args.deterministic else 'sampled'} actions\n")
    print(table(outcomes))


if __name__ == "__main__":
    main()
