"""Where a training iteration's time goes: the rollout's envs, encoder, transformer and heads, and the update's
encoder, forward and backward, against everything else. Timed in one process on the trainer's own functions.

    python benchmark/phases.py                     # mmgrid: MortarMayhem-Grid-v0, 8 envs x 128 steps, 4 minibatches
    python benchmark/phases.py minigrid --iterations 6
    python benchmark/phases.py mmgrid -- --encoder-dtype bfloat16   # trainer flags on top of the config's

The configs are benchmark/throughput.py's. Each iteration runs as the trainer runs it: collect_rollout on the
real envs, the advantages (Rollout.advantages), then update_epochs passes over the minibatches, each through the
trainer's loss (ppo_loss, which gathers the minibatch and evaluates it), backward, gradient clipping and the
fused AdamW step. The learning rate and entropy coefficient stay at their initial values.
--compile is not supported: its compiled graphs hide the parts that are timed here.

How the parts are timed (wall clock; on a GPU every mark waits for the GPU first):
- the rollout: the envs' step, Agent.encode, the transformer, the heads (policy_and_value) and the timeline's
  caching of keys and values, each wrapped with a timer; "the rest" is what remains of collect_rollout
  (buffer writes, host transfers, the search for images seen before in the rollout, the bootstrap step's
  remainder);
- the update's encoder forward: Agent.encode, wrapped, which also counts the observations it takes (each distinct
  image of a minibatch once);
- the update's encoder backward: from the moment the loss's gradient reaches the encoder's output to the moment it
  reaches what Agent.forward computed before encoding (tensor hooks): the windows' keys and values. Autograd takes
  the encoder's operations in between;
- the update's transformer and heads: their forward passes, wrapped; "the rest" is what remains of the update:
  their backward passes, the losses, the advantages and the minibatches' gathering and search for repeated images
  and the windows' keys and values, forward and backward (with a reconstruction head also the decoder);
- the gradient clipping and the optimizer step, together.
The first iteration (start-up, first calls) is left out of the averages.
"""

import argparse
import os
import sys
import time
from collections import defaultdict
from contextlib import contextmanager

import torch
import tyro

BENCHMARK = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [BENCHMARK, os.path.dirname(BENCHMARK)]
import throughput  # noqa: E402

import ppo_trxl  # noqa: E402

ROLLOUT_PARTS = ("envs", "encoder", "transformer", "heads", "caching keys and values")
OPTIMIZER = "gradient clipping and optimizer step"
UPDATE_PARTS = ("encoder forward", "transformer", "heads", "encoder backward")


class Clock:
    """Seconds spent in named parts, summed; on CUDA each mark waits for the GPU's queued work."""

    def __init__(self, device):
        self.seconds = defaultdict(float)
        self.cuda = device.type == "cuda"
        self.phase = "rollout"
        self.marks = defaultdict(list)  # the times at which backward reached marked tensors
        self.encoded = []  # how many observations the update's encoder took, a minibatch

    def mark(self, tensor, name):
        """Records the time at which backward reaches tensor, under name."""
        tensor.register_hook(lambda grad: self.marks[name].append(self.now()))

    def now(self):
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextmanager
    def timing(self, part):
        start = self.now()
        yield
        self.seconds[self.phase, part] += self.now() - start

    def timed(self, part, function):
        """function, timed under part of the current phase whenever it is called."""

        def timed_function(*args, **kwargs):
            with self.timing(part):
                return function(*args, **kwargs)

        return timed_function


def iterate(args, agent, envs, rollout, parameters, optimizer, clock, state):
    """One training iteration, timed by clock; state = (next_obs, next_episode_steps), returned advanced."""
    clock.phase = "rollout"
    with clock.timing("total"):
        next_obs, next_episode_steps, next_value, _ = ppo_trxl.collect_rollout(agent, envs, rollout, *state)
    clock.phase = "update"
    with clock.timing("total"):
        advantages = rollout.advantages(next_value, next_episode_steps, args.gamma, args.gae_lambda)
        returns = advantages + rollout.values
        for _ in range(args.update_epochs):
            for mb in ppo_trxl.minibatches(args.num_envs, args.num_steps, args.num_minibatches, rollout.obs.device):
                loss = ppo_trxl.ppo_loss(args, args.init_ent_coef, agent, agent, rollout, mb, advantages, returns)[0]
                optimizer.zero_grad()
                clock.marks.clear()
                loss.backward()
                clock.seconds["update", "encoder backward"] += min(clock.marks["before encoding"]) - clock.marks["encoder"][0]
                with clock.timing(OPTIMIZER):
                    torch.nn.utils.clip_grad_norm_(parameters, args.max_grad_norm)
                    optimizer.step()
    return next_obs, next_episode_steps


def instrument(agent, envs, rollout, clock):
    """Wraps the timed parts with clock's timers: on the instances, the trainer's code is unchanged."""
    envs.step = clock.timed("envs", envs.step)
    agent.transformer.forward = clock.timed("transformer", agent.transformer.forward)
    agent.policy_and_value = clock.timed("heads", agent.policy_and_value)
    rollout.timeline.cache = clock.timed("caching keys and values", rollout.timeline.cache)
    encode, memory = agent.encode, agent.transformer.memory

    def timed_encode(obs):
        with clock.timing("encoder" if clock.phase == "rollout" else "encoder forward"):
            encoded = encode(obs)
        if encoded.requires_grad:  # in the update
            clock.mark(encoded, "encoder")
            clock.encoded.append(len(obs))
        return encoded

    def marked_memory(*args):
        layers = memory(*args)
        if layers[0].keys.requires_grad:  # in the update
            for layer in layers:
                clock.mark(layer.keys, "before encoding")
                clock.mark(layer.values, "before encoding")
        return layers

    agent.encode, agent.transformer.memory = timed_encode, marked_memory


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default="mmgrid", help=f"one of {', '.join(throughput.CONFIGS)} (default mmgrid)")
    parser.add_argument("--iterations", type=int, default=4, help="training iterations, the first left out (default 4)")
    parser.add_argument("--cuda", action="store_true", help="on the GPU (the trainer's --cuda)")
    own, extra = throughput.split_at_dashes(sys.argv[1:])
    options = parser.parse_args(own)
    if options.config not in throughput.CONFIGS:
        parser.error(f"unknown config {options.config}: choose from {', '.join(throughput.CONFIGS)}")
    if options.iterations < 2:
        parser.error("--iterations must be at least 2: the first one is left out")
    config = throughput.CONFIGS[options.config]
    args = tyro.cli(ppo_trxl.Args, args=throughput.trainer_flags(config, options.iterations, options.cuda, extra))
    if args.compile:
        parser.error("--compile is not supported: its compiled graphs hide the parts that are timed here")

    ppo_trxl.keep_freed_memory()
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    envs, next_obs, observation_space, branches, limit = ppo_trxl.make_envs(args, "phases", args.seed)
    agent = ppo_trxl.Agent(args, observation_space, branches, limit).to(device)
    parameters = list(agent.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=args.init_lr, fused=True)
    rollout = ppo_trxl.Rollout(args, observation_space, len(branches), agent.transformer, device)
    clock = Clock(device)
    instrument(agent, envs, rollout, clock)
    state = torch.as_tensor(next_obs, device=device), torch.zeros(args.num_envs, dtype=torch.long, device=device)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, device {device}")
    print(f"{config.description} {' '.join(extra)}: {args.batch_size:,} steps an iteration", flush=True)
    mean = defaultdict(float)  # over the iterations after the first; a part never called took no time
    encoded = []  # the observations that the update's encoder took, a minibatch, in the iterations after the first
    for iteration in range(1, options.iterations + 1):
        clock.seconds.clear()
        clock.encoded.clear()
        state = iterate(args, agent, envs, rollout, parameters, optimizer, clock, state)
        total = clock.seconds["rollout", "total"] + clock.seconds["update", "total"]
        print(f"iteration {iteration}: {total:.3f} s, {args.batch_size / total:,.0f} steps/s", flush=True)
        if iteration > 1:
            for key, seconds in clock.seconds.items():
                mean[key] += seconds / (options.iterations - 1)
            encoded += clock.encoded
    envs.close()

    total = mean["rollout", "total"] + mean["update", "total"]
    rows = [("rollout", part, mean["rollout", part]) for part in ROLLOUT_PARTS]
    rows.append(("rollout", "the rest", mean["rollout", "total"] - sum(seconds for *_, seconds in rows)))
    rows += [("update", part, mean["update", part]) for part in UPDATE_PARTS + (OPTIMIZER,)]
    rest = mean["update", "total"] - sum(seconds for phase, _, seconds in rows if phase == "update")
    rows.append(("update", "the rest: the transformer's and heads' backward, keys and values, losses, GAE", rest))
    print(
        f"\nMean over iterations 2-{options.iterations}: {total:.3f} s an iteration, {args.batch_size / total:,.0f} steps/s\n"
    )
    print("| phase | part | seconds an iteration | share |")
    print("| --- | --- | --- | --- |")
    for phase, part, seconds in rows:
        print(f"| {phase} | {part} | {seconds:.3f} | {seconds / total:.0%} |")
    for phase in ("rollout", "update"):
        print(f"| {phase} | total | {mean[phase, 'total']:.3f} | {mean[phase, 'total'] / total:.0%} |")
    print(
        f"\nThe update's encoder took {sum(encoded) / len(encoded):,.0f} of a minibatch's {args.minibatch_size:,} "
        f"observations on average ({min(encoded):,}-{max(encoded):,}): each distinct image once"
    )


if __name__ == "__main__":
    main()
