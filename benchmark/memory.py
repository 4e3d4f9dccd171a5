"""The memory that ppo_trxl.py holds for an update, buffer by buffer, beside the earlier implementation.

    python benchmark/memory.py                             # the default Endless config
    python benchmark/memory.py --memory-dtype bfloat16     # the cached memory in bf16
    python benchmark/memory.py --env-id ProofofMemory-v0 --num-envs 16 --num-steps 128 --trxl-dim 64

It takes the trainer's flags, with the default Endless config as defaults (Endless-MortarMayhem-v0: 32 envs x
512 steps, 8 minibatches, dim 384, 3 layers, 4 heads, memory 256); the env gives the observation and action
spaces and the episode limit, as in training. Everything runs on the CPU in a few seconds:
1. The rollout's buffers: the trainer's own Rollout, built on the meta device (shapes and dtypes, no data),
   and the model's parameters, gradients and AdamW state (flat, as the trainer keeps them).
2. One minibatch: the first one that ppo_trxl.minibatches yields, evaluated by ppo_trxl.evaluate on random
   observations and memory (one episode long enough to fill every window), then backpropagated.
   - attention inputs: captured by hooks on the transformer and its first attention module;
   - saved activations: every tensor that autograd saves for the backward pass, counted once per storage,
     parameters left out, attributed to the module that saved it;
   - peak: the most bytes live at once during forward and backward above what was live before (the CPU
     allocator's events as torch.profiler records them).
"""

import dataclasses
import math
import os
import sys
import time
from collections import defaultdict

import torch
import tyro
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ppo_trxl  # noqa: E402

ENDLESS_DEFAULTS = ppo_trxl.Args(env_id="Endless-MortarMayhem-v0", trxl_memory_length=256)


def size(num_bytes):
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= scale:
            return f"{num_bytes:>15,} B  {num_bytes / scale:8.2f} {unit}"
    return f"{num_bytes:>15,} B"


def tensor_bytes(tensor):
    return tensor.element_size() * tensor.nelement()


def describe(tensor):
    return f"{str(tuple(tensor.shape)):<28} {str(tensor.dtype).removeprefix('torch.'):<9}"


def print_rows(rows):
    """rows of (name, tensor or description, bytes); prints them and their total."""
    for name, what, num_bytes in rows:
        what = describe(what) if isinstance(what, torch.Tensor) else f"{what:<38}"
        print(f"  {name:<34} {what} {size(num_bytes)}")
    print(f"  {'total':<34} {'':<38} {size(sum(row[2] for row in rows))}")


def env_facts(args):
    """Observation space, action branches and episode limit T of args.env_id, read from one reset env."""
    env = ppo_trxl.make_env(args.env_id, 0, False, "memory", settings=ppo_trxl.task_settings(args.env_id, args.reset_params))()
    env.reset(seed=args.seed)
    observation_space, branches, limit = (
        env.observation_space,
        ppo_trxl.action_branches(env.action_space),
        ppo_trxl.episode_limit(env),
    )
    env.close()
    ppo_trxl.check_observation_space(observation_space, args.reconstruction_coef)
    return observation_space, branches, limit


class SavedTensors:
    """Counts the storages that autograd saves for the backward pass, once each, by the module saving them."""

    def __init__(self, agent):
        self.parameters = {parameter.untyped_storage().data_ptr() for parameter in agent.parameters()}
        self.seen = set()
        self.by_module = defaultdict(int)
        self.module_stack = ["outside any module"]
        for name, module in agent.named_modules():
            if name:
                module.register_forward_pre_hook(lambda *_, name=name: self.module_stack.append(self.group(name)))
                module.register_forward_hook(self.leave_module)

    def leave_module(self, *_):
        self.module_stack.pop()  # a forward hook that returned something would replace the module's output

    @staticmethod
    def group(module_name):
        parts = module_name.split(".")
        if parts[:2] == ["transformer", "transformer_layers"]:
            return f"transformer layer {parts[2]}"
        if parts[0] in ("hidden_post_trxl", "actor_branches", "critic"):
            return "heads (post-TrXL, actor, critic)"
        return parts[0]

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.seen and storage.data_ptr() not in self.parameters:
            self.seen.add(storage.data_ptr())
            self.by_module[self.module_stack[-1]] += storage.nbytes()
        return tensor

    @staticmethod
    def unpack(tensor):
        return tensor


def peak_allocated(prof):
    """The most CPU bytes live at once within the profiled region, from the allocator's memory events."""
    events = sorted(
        (event.start_ns(), event.nbytes()) for event in prof.profiler.kineto_results.events() if event.name() == "[memory]"
    )
    live = peak = 0
    for _, num_bytes in events:
        live += num_bytes
        peak = max(peak, live)
    return peak


def main():
    # tyro copies the derived fields (batch_size, ...) from the default instance; replace() derives them again
    args = dataclasses.replace(tyro.cli(ppo_trxl.Args, default=ENDLESS_DEFAULTS, description=__doc__))
    ppo_trxl.check_args(args)
    torch.manual_seed(args.seed)
    observation_space, branches, limit = env_facts(args)
    agent = ppo_trxl.Agent(args, observation_space, branches, limit)
    memory_length = agent.transformer.memory_length
    E, S, L, D = args.num_envs, args.num_steps, args.trxl_num_layers, args.trxl_dim
    print(
        f"{args.env_id}: obs {observation_space.shape} {observation_space.dtype}, action branches {branches}, "
        f"episode limit T {limit}\n{E} envs x {S} steps, {args.num_minibatches} minibatches of {args.minibatch_size}, "
        f"dim {D}, {L} layers, {args.trxl_num_heads} heads, memory {memory_length}, memory dtype {args.memory_dtype}"
    )

    print("\nRollout buffers (ppo_trxl.Rollout)")
    rollout = ppo_trxl.Rollout(args, observation_space, len(branches), agent.transformer, torch.device("meta"))
    rows = [(name, tensor, tensor_bytes(tensor)) for name, tensor in vars(rollout).items() if torch.is_tensor(tensor)]
    rows += [
        (f"timeline.{name}", tensor, tensor_bytes(tensor))
        for name, tensor in vars(rollout.timeline).items()
        if torch.is_tensor(tensor)
    ]
    print_rows(rows)

    parameter_bytes = sum(tensor_bytes(parameter) for parameter in agent.parameters())
    print(f"\nModel ({sum(parameter.numel() for parameter in agent.parameters()):,} parameters)")
    print_rows(
        [
            ("parameters", "float32", parameter_bytes),
            ("gradients", "float32", parameter_bytes),
            ("AdamW state (exp_avg, exp_avg_sq)", "float32", 2 * parameter_bytes),
        ]
    )

    print("\nThe earlier implementation's equivalents (REFERENCE.md section 5)")
    obs_elements = E * S * math.prod(observation_space.shape)
    print_rows(
        [
            (
                "observations in float32",
                f"({E}, {S}, {', '.join(map(str, observation_space.shape))}) float32",
                4 * obs_elements,
            ),
            (
                "one minibatch's episode copy",
                f"({args.minibatch_size}, {limit}, {L}, {D}) float32",
                4 * args.minibatch_size * limit * L * D,
            ),
        ]
    )

    # One real minibatch of the update, on random observations and memory: every slot in one long episode
    mb = next(ppo_trxl.minibatches(E, S, args.num_minibatches, torch.device("cpu")))
    queries = mb[1].shape[1]
    memory_dtype = getattr(torch, args.memory_dtype)
    timeline = ppo_trxl.Timeline(E, S, agent.transformer, memory_dtype, "cpu")
    timeline.memory.copy_(torch.randn(timeline.memory.shape))
    timeline.steps.copy_(limit + torch.arange(timeline.steps.shape[1]))
    if rollout.obs.dtype == torch.uint8:
        obs = torch.randint(0, 256, (E, queries) + observation_space.shape, dtype=torch.uint8)
    else:
        obs = torch.rand((E, queries) + observation_space.shape) * 2 - 1
    actions = torch.stack([torch.randint(0, n, (E, queries)) for n in branches], dim=-1)

    attention = {}
    agent.transformer.register_forward_pre_hook(lambda _, inputs: attention.update(memory=inputs[2], allowed=inputs[3]))
    saved = SavedTensors(agent)
    forward_backward = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            evaluation = ppo_trxl.evaluate(agent, timeline, ppo_trxl.chunk_windows(timeline, mb), obs, actions)
            loss = evaluation.log_probs.sum() + evaluation.entropy.sum() + evaluation.value.sum()
            if args.reconstruction_coef > 0:
                target = obs.flatten(0, 1).float() / 255.0
                reconstruction = agent.reconstruct_observation(evaluation.hidden)
                loss = loss + torch.nn.functional.binary_cross_entropy(reconstruction, target)
        loss.backward()
    forward_backward = time.perf_counter() - forward_backward

    print(
        f"\nOne minibatch: a chunk of {queries} consecutive steps of each of the {E} envs = {E * queries} samples, "
        f"each attending to a band of its chunk's window of {timeline.context + queries} timeline slots"
    )
    rows = [
        (f"{name}, layer {i}", tensor, tensor_bytes(tensor))
        for i, layer_memory in enumerate(attention["memory"])  # keys and values (G, H, R+Q, h) of every layer
        for name, tensor in (("keys", layer_memory.keys), ("values", layer_memory.values))
    ]
    allowed = attention["allowed"]
    rows += [("band (allowed)", allowed, tensor_bytes(allowed))]
    rows += [("mask (each layer)", f"{tuple(allowed.shape)} float32", 4 * allowed.numel())]
    print("  attention inputs (each layer's attention weights, kept for the backward pass, are among the saved activations)")
    print_rows(rows)
    print("  saved activations (autograd's saved tensors, once per storage, without parameters)")
    print_rows([(module, "", num_bytes) for module, num_bytes in saved.by_module.items()])
    print(f"  peak during forward + backward, above what was live before: {size(peak_allocated(prof)).strip()}")
    print(f"\n(forward + backward took {forward_backward:.1f} s on the CPU)")


if __name__ == "__main__":
    main()
