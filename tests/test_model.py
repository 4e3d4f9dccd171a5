"""The model against the published one, and the trainer's bookkeeping: the update sees what the rollout saw."""

import dataclasses
import types
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import ppo_trxl

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden" / "published_format_vector.pt"
TOLERANCE = dict(rtol=1e-5, atol=1e-5)
CUE_VARIANT = "benchmark.minigrid_cue:MiniGrid-MemoryS9Cue-v0"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# --encoder-dtype bfloat16 rounds the encoder's outputs to 8 bits, and where a batch's accumulation order tips a
# rounding, the log-probs and values move by about 1e-4 (measured on the default MortarMayhem-Grid model)
BFLOAT16_ENCODER_TOLERANCE = dict(rtol=1e-3, atol=1e-3)


@pytest.fixture(scope="module")
def golden():
    if not GOLDEN.exists():
        pytest.skip("the golden checkpoint is not beside this clone")
    return torch.load(GOLDEN, weights_only=True)


def on(device, tree):
    """golden's nested dicts and lists of tensors, moved to device"""
    if isinstance(tree, dict):
        return {key: on(device, value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [on(device, value) for value in tree]
    return tree.to(device) if isinstance(tree, torch.Tensor) else tree


def golden_agent(golden, device="cpu"):
    checkpoint, meta = golden["checkpoint"], golden["meta"]
    observation_space = gym.spaces.Box(-1.0, 1.0, tuple(meta["observation_space"]["shape"]), dtype=np.float32)
    agent = ppo_trxl.Agent(
        types.SimpleNamespace(**checkpoint["args"]),
        observation_space,
        tuple(meta["action_space_shape"]),
        meta["max_episode_steps"],
    )
    agent.load_state_dict(checkpoint["model_weights"], strict=True)
    return agent.eval().to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("part", ["batch", "single"])
@torch.no_grad()
def test_published_interface_matches_golden_outputs(golden, part, device):
    golden = on(device, golden)
    agent = golden_agent(golden, device)
    batch = golden["batch"]
    rows = slice(None) if part == "batch" else slice(golden["single"]["row"], golden["single"]["row"] + 1)
    inputs = [batch[key][rows] for key in ("obs", "memory_window", "memory_mask", "memory_indices")]
    expected = golden[part]["outputs"]

    _, log_probs, entropy, value, new_memory = agent.get_action_and_value(*inputs, batch["actions"][rows])
    torch.testing.assert_close(log_probs, expected["log_probs"], **TOLERANCE)
    torch.testing.assert_close(entropy, expected["entropy"], **TOLERANCE)
    torch.testing.assert_close(value, expected["value"], **TOLERANCE)
    torch.testing.assert_close(new_memory, expected["new_memory"], **TOLERANCE)
    torch.testing.assert_close(agent.get_value(*inputs), expected["get_value"], **TOLERANCE)
    out, _, _ = agent.window_pass(*inputs)
    hidden = agent.hidden_post_trxl(out)
    torch.testing.assert_close(hidden, expected["hidden_post_trxl"], **TOLERANCE)
    torch.testing.assert_close(agent.actor_branches[0](hidden), expected["logits"][0], **TOLERANCE)


def attention_as_published(layer, x, slots, mask):
    """One layer of the published model, written out: x (B, D) query; slots (B, M, D) the layer's cached inputs plus
    their positions; mask (B, M) bool. Keys and values of norm_kv(slots), scores over sqrt(D), masked with -1e20."""
    num_heads, (batch, memory_length, dim) = layer.attention.num_heads, slots.shape
    kv = layer.norm_kv(slots).view(batch, memory_length, num_heads, -1)
    queries = layer.attention.queries(layer.layer_norm_q(x).view(batch, 1, num_heads, -1))
    keys, values = layer.attention.keys(kv), layer.attention.values(kv)
    energy = torch.einsum("bqhd,bkhd->bhqk", queries, keys).masked_fill(~mask[:, None, None, :], -1e20)
    weights = torch.softmax(energy / dim**0.5, dim=3)
    x = x + layer.attention.fc_out(torch.einsum("bhqk,bkhd->bqhd", weights, values).reshape(batch, dim))
    return x + layer.fc_projection(layer.layer_norm_attn(x))


@pytest.mark.parametrize("encoding", ["absolute", "learned", "none"])
@torch.no_grad()
def test_attention_matches_the_published_formula(encoding):
    """window_pass computes what the published layers compute, a row without any allowed slot (t = 0) included."""
    torch.manual_seed(0)
    args = ppo_trxl.Args(trxl_dim=24, trxl_num_heads=3, trxl_num_layers=2, trxl_positional_encoding=encoding)
    agent = ppo_trxl.Agent(args, gym.spaces.Box(-1.0, 1.0, (5,), np.float32), (3,), 20)
    for layer in agent.transformer.transformer_layers:  # an affine far from LayerNorm's initial (1, 0)
        layer.norm_kv.weight.normal_(1.0, 0.5)
        layer.norm_kv.bias.normal_(0.0, 0.5)
    batch, memory_length = 4, 6
    obs = torch.randn(batch, 5)
    memory = torch.randn(batch, memory_length, args.trxl_num_layers, args.trxl_dim)
    indices = torch.arange(memory_length).expand(batch, -1) + torch.tensor([[0], [0], [3], [14]])
    mask = indices < torch.tensor([[0], [2], [7], [19]])  # episode steps 0, 2, 7 and 19
    out, _, _ = agent.window_pass(obs, memory, mask, indices)

    x = agent.encode(obs)
    positions = agent.transformer.positions(indices) if encoding != "none" else 0
    for i, layer in enumerate(agent.transformer.transformer_layers):
        x = attention_as_published(layer, x, memory[:, :, i] + positions, mask)
    torch.testing.assert_close(out, x, **TOLERANCE)


@pytest.mark.parametrize("device", DEVICES)
@torch.no_grad()
def test_trainer_paths_replay_the_golden_episode(golden, device):
    """The rollout's and the update's fast paths reproduce an episode played by the published model."""
    golden = on(device, golden)
    agent = golden_agent(golden, device)
    episode = golden["rollout"]
    args = types.SimpleNamespace(**golden["checkpoint"]["args"])
    length = episode["obs"].shape[0]
    timeline = ppo_trxl.Timeline(1, length, agent.transformer, torch.float32, device)
    context = timeline.context
    timeline.begin(agent.transformer)  # as collect_rollout begins
    values = []
    for t in range(length):
        episode_steps = torch.tensor([t], device=device)
        features = agent.encode(episode["obs"][t : t + 1])
        step = ppo_trxl.rollout_step(agent, timeline, features, episode_steps, t)
        timeline.record(agent.transformer, t, episode_steps, step.layer_inputs)
        values.append(step.value)
    expected = episode["per_step_outputs"]
    torch.testing.assert_close(torch.cat(values), expected["value"], **TOLERANCE)
    torch.testing.assert_close(timeline.memory[0, context:], episode["final_episode_memory"], **TOLERANCE)

    with torch.enable_grad():  # as the update evaluates
        evaluation = ppo_trxl.evaluate(
            agent,
            timeline,
            ppo_trxl.chunk_windows(timeline, (torch.tensor([[0]], device=device), torch.arange(length, device=device)[None])),
            episode["obs"][None],
            episode["actions"][None],
        )
    torch.testing.assert_close(evaluation.log_probs, expected["log_probs"], **TOLERANCE)
    torch.testing.assert_close(evaluation.entropy, expected["entropy"], **TOLERANCE)
    torch.testing.assert_close(evaluation.value, expected["value"], **TOLERANCE)


def published_window(timeline, env, slot, t):
    """The window that the published model is given at episode step t, for the step at a timeline slot, with the
    context C of the window rule (C = M - 1 as published).

    Its C + 1 slots are the episode steps [0..C] while t <= C, else [t-C..t]; those not yet played hold
    zeros; the mask allows the steps before t, whose memory stands t - step slots before this one.
    """
    context = ppo_trxl.context_length(timeline.memory_length)
    first = max(t - context, 0)
    device = timeline.memory.device
    memory = torch.zeros((context + 1,) + timeline.memory.shape[2:], device=device)
    indices = torch.arange(first, first + context + 1, device=device)
    mask = torch.zeros(context + 1, device=device)
    for i, step in enumerate(indices.tolist()):
        if step < t:
            memory[i] = timeline.memory[env, slot - (t - step)].float()
            mask[i] = 1.0
    return memory, mask, indices


CONFIGS = {
    "pom-absolute-1head": dict(env_id="ProofofMemory-v0", trxl_positional_encoding="absolute", trxl_num_heads=1),
    "pom-learned-bf16": dict(env_id="ProofofMemory-v0", trxl_positional_encoding="learned", memory_dtype="bfloat16"),
    "mortar-multidiscrete-none": dict(env_id="MortarMayhem-v0", trxl_positional_encoding="none", trxl_num_heads=4),
    "minigrid-bf16-encoder": dict(env_id="MiniGrid-MemoryS9-v0", encoder_dtype="bfloat16"),
    "mortar-grid-compiled": dict(env_id="MortarMayhem-Grid-v0", compile=True),
    "pom-rotary-gru-gate": dict(env_id="ProofofMemory-v0", trxl_positional_encoding="rotary", trxl_gate="gru"),
    "minigrid-segment-gradients": dict(
        env_id="MiniGrid-MemoryS9-v0", trxl_positional_encoding="learned", trxl_segment_gradients=True
    ),
    "pom-rotary-segment-compiled": dict(
        env_id="ProofofMemory-v0",
        trxl_positional_encoding="rotary",
        trxl_segment_gradients=True,
        trxl_gate="gru",
        compile=True,
    ),
}


@pytest.fixture
def full_float32():
    """GPUs run convolutions in TF32 by default, whose rounding depends on the batch size; the bookkeeping
    is checked in full float32."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "config",
    [
        # torch.compile builds its CPU kernels for about 3 minutes: with -m slow
        pytest.param(config, id=name, marks=[pytest.mark.slow] if config.get("compile") else [])
        for name, config in CONFIGS.items()
    ],
)
def test_update_sees_what_the_rollout_saw(config, device, full_float32):
    """Before any gradient step, the update's log-probs and values equal the rollout's for every sample,
    and both equal the published model given the window the published rule builds step by step. With
    --trxl-segment-gradients the update's slots of a chunk's own steps are the layer inputs of its own pass, under
    the current parameters: before any gradient step those are the rollout's."""
    torch.manual_seed(0)
    small = dict(
        num_envs=3, num_steps=24, num_minibatches=2, trxl_dim=16, trxl_num_layers=2, trxl_num_heads=2, trxl_memory_length=9
    )
    args = ppo_trxl.Args(**{**small, **config})
    tolerance = TOLERANCE if args.encoder_dtype == "float32" else BFLOAT16_ENCODER_TOLERANCE
    envs, next_obs, observation_space, action_space_shape, max_episode_steps = ppo_trxl.make_envs(args, "test", seed=3)
    agent = ppo_trxl.Agent(args, observation_space, action_space_shape, max_episode_steps).to(device)
    rollout = ppo_trxl.Rollout(args, observation_space, len(action_space_shape), agent.transformer, device)
    timeline, context = rollout.timeline, rollout.timeline.context
    next_obs = torch.as_tensor(next_obs, device=device)
    next_episode_steps = torch.zeros(args.num_envs, dtype=torch.long, device=device)
    learner, policy_step = agent, ppo_trxl.rollout_step
    if args.compile:  # as the trainer compiles them
        if not ppo_trxl.cpp_compiler():
            pytest.skip("torch.compile needs a C++ compiler")
        torch._dynamo.reset()
        learner, policy_step = torch.compile(agent), ppo_trxl.compiled_rollout_step()

    seen = dict(first_step=0, reaches_back=0, full_window=0, cut_chunk_window=0, whole_chunk_window=0)
    if rollout.obs.dtype == torch.uint8:  # minibatches that encode a repeated image once
        seen["repeated_images"] = 0
    for _ in range(3):
        next_obs, next_episode_steps, next_value, _ = ppo_trxl.collect_rollout(
            agent, envs, rollout, next_obs, next_episode_steps, policy_step
        )
        with torch.no_grad():
            steps = torch.arange(args.num_steps, device=device).expand(args.num_envs, -1)
            whole_rollout = (torch.arange(args.num_envs, device=device).unsqueeze(1), steps)
            covered = torch.zeros(args.num_envs, args.num_steps, dtype=torch.long, device=device)
            for mb in [whole_rollout, *ppo_trxl.minibatches(args.num_envs, args.num_steps, args.num_minibatches, device)]:
                covered[mb] += 1
                windows = ppo_trxl.chunk_windows(timeline, mb)
                cut = windows[1].shape[1] < context + mb[1].shape[1]
                seen["cut_chunk_window" if cut else "whole_chunk_window"] += 1
                if "repeated_images" in seen:
                    seen["repeated_images"] += ppo_trxl.distinct_images(rollout.obs[mb].flatten(0, 1))[1] is not None
                with torch.enable_grad():  # as the update evaluates
                    evaluation = ppo_trxl.evaluate(learner, timeline, windows, rollout.obs[mb], rollout.actions[mb])
                torch.testing.assert_close(evaluation.log_probs, rollout.logprobs[mb].flatten(0, 1), **tolerance)
                torch.testing.assert_close(evaluation.value, rollout.values[mb].flatten(), **tolerance)
            assert (covered == 2).all(), "the minibatches deal every step exactly once"

            for env in range(args.num_envs):
                for s in range(args.num_steps + 1):
                    slot = context + s
                    if s < args.num_steps:
                        obs, action = rollout.obs[env, s], rollout.actions[env, s]
                        expected_log_probs, expected_value = rollout.logprobs[env, s], rollout.values[env, s]
                        t = int(timeline.steps[env, slot])
                    else:  # the bootstrap value of the obs after the rollout
                        obs, action, expected_log_probs = next_obs[env], None, None
                        expected_value, t = next_value[env], int(next_episode_steps[env])
                    window = published_window(timeline, env, slot, t)
                    _, log_probs, _, value, _ = agent.get_action_and_value(
                        obs.unsqueeze(0),
                        *(part.unsqueeze(0) for part in window),
                        None if action is None else action.unsqueeze(0),
                    )
                    torch.testing.assert_close(value[0], expected_value, **tolerance)
                    if expected_log_probs is not None:
                        torch.testing.assert_close(log_probs[0], expected_log_probs, **tolerance)
                    seen["first_step"] += t == 0
                    seen["reaches_back"] += s < min(t, context)
                    seen["full_window"] += t > context
    assert all(count > 0 for count in seen.values()), seen
    if args.compile:  # the rollout step (static, then with a symbolic step index) and the update's forward
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 3, dict(torch._dynamo.utils.counters["stats"])


@torch.no_grad()
def test_image_encoder_matches_the_published_encoder():
    """Agent.encode takes the HWC uint8 images: from the same state_dict it computes what the published encoder
    computes on the images moved to CHW and scaled to [0, 1]."""
    torch.manual_seed(0)
    agent = ppo_trxl.Agent(ppo_trxl.Args(trxl_dim=32), gym.spaces.Box(0, 255, (84, 84, 3), np.uint8), (4,), 119)
    published = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 8, stride=4),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 4, stride=2),
        torch.nn.ReLU(),
        torch.nn.Conv2d(64, 64, 3, stride=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(64 * 7 * 7, 32),
        torch.nn.ReLU(),
    )
    published.load_state_dict(agent.encoder.state_dict(), strict=True)
    obs = torch.randint(0, 256, (5, 84, 84, 3), dtype=torch.uint8)
    torch.testing.assert_close(agent.encode(obs), published(obs.permute(0, 3, 1, 2).float() / 255.0), **TOLERANCE)


def test_bfloat16_encoder_is_mixed_precision():
    """--encoder-dtype bfloat16 runs the encoder and the reconstruction decoder in bfloat16 and hands float32 on:
    close to float32 but not equal to it, with float32 parameters and gradients."""
    torch.manual_seed(0)
    observation_space = gym.spaces.Box(0, 255, (84, 84, 3), np.uint8)
    agents = {
        dtype: ppo_trxl.Agent(
            ppo_trxl.Args(trxl_dim=32, reconstruction_coef=0.1, encoder_dtype=dtype), observation_space, (4,), 119
        )
        for dtype in ("float32", "bfloat16")
    }
    agents["bfloat16"].load_state_dict(agents["float32"].state_dict())
    obs = torch.randint(0, 256, (5, 84, 84, 3), dtype=torch.uint8)
    features = {dtype: agent.encode(obs) for dtype, agent in agents.items()}
    images = {dtype: agent.reconstruct_observation(features[dtype]) for dtype, agent in agents.items()}
    for outputs in (features, images):
        assert outputs["bfloat16"].dtype == torch.float32
        assert not torch.equal(outputs["bfloat16"], outputs["float32"])
        torch.testing.assert_close(outputs["bfloat16"], outputs["float32"], rtol=0.05, atol=0.05)
    images["bfloat16"].sum().backward()
    parameters = dict(agents["bfloat16"].named_parameters())
    assert all(parameter.dtype == torch.float32 for parameter in parameters.values())
    for name in ("encoder.0.weight", "transposed_cnn.7.weight"):
        assert parameters[name].grad.dtype == torch.float32 and parameters[name].grad.abs().sum() > 0, name


def test_minibatches_deal_a_random_chunk_of_every_env():
    torch.manual_seed(0)
    num_envs, num_steps, num_minibatches = 16, 64, 8
    share = num_steps // num_minibatches
    chunk_of = []  # per minibatch: which chunk of its rollout every env gives
    for rows, steps in ppo_trxl.minibatches(num_envs, num_steps, num_minibatches, "cpu"):
        assert rows.flatten().tolist() == list(range(num_envs)) and steps.shape == (num_envs, share)
        assert (steps.diff(dim=1) == 1).all() and (steps[:, 0] % share == 0).all()
        chunk_of.append(steps[:, 0] // share)
    chunk_of = torch.stack(chunk_of)  # (minibatches, E)
    assert (chunk_of.sort(dim=0).values == torch.arange(num_minibatches).unsqueeze(1)).all()
    assert len({tuple(column) for column in chunk_of.T.tolist()}) > 1, "every env dealt its chunks in the same order"


def test_repeated_images_are_encoded_once():
    """The update encodes each distinct image of a minibatch once: it computes the outputs and gradients of encoding
    every step's image, and two images that differ in their last byte stay apart."""
    torch.manual_seed(0)
    args = ppo_trxl.Args(trxl_dim=32, trxl_num_heads=2, trxl_num_layers=2)
    agent = ppo_trxl.Agent(args, gym.spaces.Box(0, 255, (84, 84, 3), np.uint8), (3, 2), 64)
    pool = torch.randint(0, 256, (4, 84, 84, 3), dtype=torch.uint8)
    pool[3] = pool[2]
    pool[3, -1, -1, -1] ^= 1
    obs = pool[torch.tensor([[0, 0, 1, 2, 2], [3, 1, 1, 0, 3]])]  # 2 chunks of 5 steps; repeats within and across chunks
    images, image_index = ppo_trxl.distinct_images(obs.flatten(0, 1))
    assert len(images) == 4 and torch.equal(images[image_index], obs.flatten(0, 1))
    assert ppo_trxl.distinct_images(pool)[1] is None, "all distinct: encoded as they are"

    context, chunks, steps = agent.transformer.context, 2, 5
    actions = torch.stack([torch.randint(0, 3, (chunks, steps)), torch.randint(0, 2, (chunks, steps))], -1)
    episode_steps = torch.arange(context + steps).expand(chunks, -1)
    window = torch.randn(chunks, context + steps, args.trxl_num_layers, args.trxl_dim)

    def outputs_and_gradients(images, image_index):
        agent.zero_grad()
        outputs = agent(ppo_trxl.Chunks(images, image_index, actions, window, episode_steps))[:3]
        sum(output.sum() for output in outputs).backward()
        return outputs, [parameter.grad for parameter in agent.parameters()]

    once, each = outputs_and_gradients(images, image_index), outputs_and_gradients(obs.flatten(0, 1), None)
    for a, b in zip(once[0], each[0]):
        torch.testing.assert_close(a, b, **TOLERANCE)
    # a repeated image's gradients are summed before the encoder's backward, not after: the same sum in another order
    for (name, _), a, b in zip(agent.named_parameters(), once[1], each[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def images_that_share_a_hash():
    """Two different images with one hash. image_hashes is linear in an image's 8-byte words: adding c_k to word j
    and taking c_j from word k, where c_j and c_k are the hashes of images holding a single 1 in word j or k, keeps
    the hash."""
    unit = torch.zeros(2, 84 * 84 * 3 // 8, dtype=torch.int64)
    j, k = 5, 2000
    unit[0, j] = unit[1, k] = 1
    c_j, c_k = ppo_trxl.image_hashes(unit.view(torch.uint8).view(2, 84, 84, 3)).tolist()
    image = torch.randint(0, 256, (84, 84, 3), dtype=torch.uint8)
    words = image.flatten().view(torch.int64).clone()
    words[j] += c_k
    words[k] -= c_j
    twin = words.view(torch.uint8).view(84, 84, 3)
    assert ppo_trxl.image_hashes(torch.stack([image, twin])).unique().numel() == 1 and not torch.equal(image, twin)
    return image, twin


def test_images_that_share_a_hash_stay_apart():
    """distinct_images keeps two images with one hash apart."""
    torch.manual_seed(0)
    image, twin = images_that_share_a_hash()
    pair = torch.stack([image, twin, image])
    images, image_index = ppo_trxl.distinct_images(pair)
    assert image_index is None and torch.equal(images, pair), "two images with one hash were merged"


def test_the_rollout_encodes_each_image_once(monkeypatch):
    """While acting, an image seen before in the rollout keeps the features it got then and is not encoded again;
    an image whose hash came with another image is encoded."""
    torch.manual_seed(0)
    args = ppo_trxl.Args(trxl_dim=32, trxl_num_heads=2, trxl_num_layers=2)
    agent = ppo_trxl.Agent(args, gym.spaces.Box(0, 255, (84, 84, 3), np.uint8), (3,), 64)
    image, twin = images_that_share_a_hash()
    other = torch.randint(0, 256, (84, 84, 3), dtype=torch.uint8)
    steps = [[image, other], [other, twin], [twin, image], [other, image]]  # 2 envs, 4 steps
    encode, encoded = agent.encode, []

    def counted_encode(obs):
        encoded.append(len(obs))
        return encode(obs)

    monkeypatch.setattr(agent, "encode", counted_encode)
    rollout_encoder = ppo_trxl.RolloutEncoder(agent, remember_images=True)
    for step in steps:
        obs = torch.stack(step)
        torch.testing.assert_close(rollout_encoder(obs), encode(obs), **TOLERANCE)
    # twin shares image's hash: it is new at step 2, image again at step 3 (its hash last came with twin), none at step 4
    assert encoded == [2, 1, 1], encoded


def minigrid_rollouts(env_id, rollouts=2, **flags):
    """A tiny agent on a real MiniGrid Memory env after some rollouts of 16 steps (from the second on, windows reach
    back into the one before): args, agent, rollout, advantages and returns."""
    torch.manual_seed(0)
    small = dict(num_envs=3, num_steps=16, num_minibatches=2, trxl_dim=16, trxl_num_layers=2, trxl_num_heads=2)
    args = ppo_trxl.Args(env_id=env_id, trxl_memory_length=9, **small, **flags)
    envs, next_obs, observation_space, action_space_shape, max_episode_steps = ppo_trxl.make_envs(args, "test", seed=3)
    agent = ppo_trxl.Agent(args, observation_space, action_space_shape, max_episode_steps)
    cue = ppo_trxl.is_minigrid_memory(env_id)
    rollout = ppo_trxl.Rollout(args, observation_space, len(action_space_shape), agent.transformer, "cpu", cue)
    state = torch.as_tensor(next_obs), torch.zeros(args.num_envs, dtype=torch.long)
    for _ in range(rollouts):
        *state, next_value, _ = ppo_trxl.collect_rollout(agent, envs, rollout, *state)
    envs.close()
    advantages = rollout.advantages(next_value, state[1], args.gamma, args.gae_lambda)
    return args, agent, rollout, advantages, advantages + rollout.values


def minibatch_samples(rollout, mb):
    """Every sample of minibatch mb as (env, rollout step s, timeline slot, episode step t)."""
    rows, steps = mb
    context = rollout.timeline.context
    for env, s in zip(rows.expand_as(steps).flatten().tolist(), steps.flatten().tolist()):
        yield env, s, context + s, int(rollout.timeline.steps[env, context + s])


def test_ppo_loss_is_the_published_objective():
    """ppo_loss on a minibatch of a real MiniGrid rollout equals the published objective written out in plain torch
    on per-sample windows: the clipped surrogate with per-branch ratios, the clipped value loss without a factor 1/2,
    the entropy bonus, and the binary cross-entropy of the reconstruction decoded by reconstruct_observation() after
    each get_action_and_value, as published analysis scripts call it. The loss and every part agree."""
    flags = dict(reconstruction_coef=0.1, norm_adv=True, clip_coef=0.2)
    args, agent, rollout, advantages, returns = minigrid_rollouts("MiniGrid-MemoryS9-v0", **flags)
    ent_coef = 0.01
    with torch.no_grad():  # as after some gradient steps: ratios and values move past the clip range
        for parameter in agent.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    mb = next(ppo_trxl.minibatches(args.num_envs, args.num_steps, args.num_minibatches, "cpu"))
    loss, metrics = ppo_trxl.ppo_loss(args, ent_coef, agent, agent, rollout, mb, advantages, returns)

    new_logprobs, entropies, new_values, reconstructions = [], [], [], []
    for env, s, slot, t in minibatch_samples(rollout, mb):
        window = published_window(rollout.timeline, env, slot, t)
        _, logprob, entropy, value, _ = agent.get_action_and_value(
            rollout.obs[env, s : s + 1], *(part.unsqueeze(0) for part in window), rollout.actions[env, s : s + 1]
        )
        new_logprobs.append(logprob[0])
        entropies.append(entropy[0])
        new_values.append(value[0])
        reconstructions.append(agent.reconstruct_observation()[0])
    new_logprobs, entropies, new_values = torch.stack(new_logprobs), torch.stack(entropies), torch.stack(new_values)
    reconstructions = torch.stack(reconstructions)

    mb_advantages, mb_returns, mb_values = advantages[mb].flatten(), returns[mb].flatten(), rollout.values[mb].flatten()
    mb_advantages = ((mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)).unsqueeze(1)
    ratio = (new_logprobs - rollout.logprobs[mb].flatten(0, 1)).exp()
    clipped_ratio = ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)
    expected_pg_loss = torch.max(-mb_advantages * ratio, -mb_advantages * clipped_ratio).mean()
    clipped_values = mb_values + (new_values - mb_values).clamp(-args.clip_coef, args.clip_coef)
    expected_v_loss = torch.max((new_values - mb_returns) ** 2, (clipped_values - mb_returns) ** 2).mean()
    target = rollout.obs[mb].flatten(0, 1).float() / 255.0
    log_p, log_not_p = reconstructions.log().clamp(min=-100), (1 - reconstructions).log().clamp(min=-100)
    expected_r_loss = -(target * log_p + (1 - target) * log_not_p).mean()
    expected_loss = (
        expected_pg_loss
        - ent_coef * entropies.mean()
        + args.vf_coef * expected_v_loss
        + args.reconstruction_coef * expected_r_loss
    )
    assert ((ratio - 1).abs() > args.clip_coef).any() and ((new_values - mb_values).abs() > args.clip_coef).any()
    for actual, expected in [
        (metrics["losses/policy_loss"], expected_pg_loss),
        (metrics["losses/value_loss"], expected_v_loss),
        (metrics["losses/entropy"], entropies.mean()),
        (metrics["losses/reconstruction_loss"], expected_r_loss),
        (metrics["losses/loss"], expected_loss),
        (loss, expected_loss),
    ]:
        torch.testing.assert_close(actual, expected, **TOLERANCE)


@torch.no_grad()
def test_attention_summary_matches_the_published_windows():
    """The attention that the trainer logs for a minibatch (its first epoch's, before any gradient step) is what the
    published model's attention weights over each sample's window give: per layer, the mean age of the attended
    steps, the entropy, and the weight on the steps that showed the cue, averaged over heads and the samples at t >= 1.
    The first rollout's windows hold every episode's first step, which shows the cue on the cue-at-start variant."""
    args, agent, rollout, advantages, returns = minigrid_rollouts(CUE_VARIANT, rollouts=1)
    timeline = rollout.timeline
    assert timeline.cue_in_view[:, timeline.context].all()

    mb = next(ppo_trxl.minibatches(args.num_envs, args.num_steps, args.num_minibatches, "cpu"))
    with torch.enable_grad():  # as the update evaluates
        metrics = ppo_trxl.ppo_loss(args, 0.0, agent, agent, rollout, mb, advantages, returns, need_attention=True)[1]

    per_sample = []  # (L, 3) for each sample at t >= 1
    for env, s, slot, t in minibatch_samples(rollout, mb):
        if t == 0:
            continue
        memory, mask, indices = published_window(timeline, env, slot, t)
        _, _, weights = agent.window_pass(rollout.obs[env, s : s + 1], memory[None], mask[None], indices[None])
        ages = (t - indices).float()  # (M,)
        cue = torch.tensor(
            [bool(timeline.cue_in_view[env, slot - (t - step)]) if step < t else False for step in indices.tolist()]
        )
        rows = []
        for layer_weights in weights:  # (1, H, M)
            w = layer_weights[0]
            entropy = -(w * w.clamp(min=1e-30).log()).sum(-1)
            rows.append(torch.stack([(w * ages).sum(-1), entropy, (w * cue.float()).sum(-1)], -1).mean(0))
        per_sample.append(torch.stack(rows))
    expected = torch.stack(per_sample).mean(0)  # (L, 3)
    for layer, (mean_age, entropy, cue_weight) in enumerate(expected):
        torch.testing.assert_close(metrics[f"attention/layer{layer}_mean_age"], mean_age, **TOLERANCE)
        torch.testing.assert_close(metrics[f"attention/layer{layer}_entropy"], entropy, **TOLERANCE)
        torch.testing.assert_close(metrics[f"attention/layer{layer}_cue_weight"], cue_weight, **TOLERANCE)
        assert cue_weight > 0, "some attention on the cue's steps"


@pytest.mark.parametrize("env_id", ["MiniGrid-MemoryS9-v0", CUE_VARIANT])
def test_cue_in_view_reads_the_grid(env_id):
    """The cue lies at (1, 3) of MiniGrid-MemoryS9's start room: facing east at reset, the agent's 3x3 view shows it
    from x = 1 only, which the cue-at-start variant always starts at, and one step forward takes it out of view."""
    assert ppo_trxl.is_minigrid_memory(env_id) and not ppo_trxl.is_minigrid_memory("ProofofMemory-v0")
    envs = gym.vector.SyncVectorEnv([ppo_trxl.make_env(env_id, i, False, "test") for i in range(12)])
    envs.reset(seed=0)
    start_x = np.array([env.unwrapped.agent_pos[0] for env in envs.envs])
    assert (start_x == 1).any() and (env_id == CUE_VARIANT or (start_x > 1).any())
    assert np.array_equal(ppo_trxl.cue_in_view(envs), start_x == 1)
    forward = 2
    envs.step(np.full(12, forward))
    assert not ppo_trxl.cue_in_view(envs).any()
    envs.close()


def test_biases_keep_the_default_initialisation():
    """As in the published runs, layer_init sets orthogonal weights and leaves every bias to PyTorch's default:
    uniform in +-1/sqrt(fan_in), not zeros."""
    torch.manual_seed(0)
    args = ppo_trxl.Args(trxl_dim=32, trxl_num_heads=2, trxl_num_layers=2, reconstruction_coef=0.1)
    agent = ppo_trxl.Agent(args, gym.spaces.Box(0, 255, (84, 84, 3), np.uint8), (3, 2), 64)
    layers = [m for m in agent.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    initialised = [agent.encoder[0], agent.encoder[7], agent.hidden_post_trxl[0], agent.critic, *agent.actor_branches]
    initialised += [agent.transposed_cnn[0], agent.transposed_cnn[3], agent.transposed_cnn[7]]
    for layer in layers:
        if layer.bias is not None:
            fan_in = torch.nn.init._calculate_fan_in_and_fan_out(layer.weight)[0]  # as the layers' reset_parameters
            assert (layer.bias != 0).all() and layer.bias.abs().max() <= 1 / fan_in**0.5, layer
    for layer in initialised:  # orthogonal: the rows (or columns) of the flattened weight are orthogonal, of equal norm
        weight = layer.weight.flatten(1)
        gram = weight @ weight.T if weight.shape[0] <= weight.shape[1] else weight.T @ weight
        torch.testing.assert_close(gram, gram.diagonal().mean() * torch.eye(len(gram)), rtol=0, atol=1e-4)


@pytest.mark.parametrize("memory_length", [1, 2])
def test_memory_length_one_is_the_memoryless_control(memory_length):
    """With --trxl-memory-length 1 no step attends to anything: every step's policy and value are those that its
    observation gets at an episode's first step, whatever came before. With 2 they are not (the check can fail)."""
    torch.manual_seed(0)
    args = ppo_trxl.Args(
        env_id="ProofofMemory-v0",
        num_envs=3,
        num_steps=24,
        num_minibatches=2,
        trxl_dim=16,
        trxl_num_layers=2,
        trxl_num_heads=2,
        trxl_memory_length=memory_length,
    )
    envs, next_obs, observation_space, action_space_shape, max_episode_steps = ppo_trxl.make_envs(args, "test", seed=3)
    agent = ppo_trxl.Agent(args, observation_space, action_space_shape, max_episode_steps)
    rollout = ppo_trxl.Rollout(args, observation_space, len(action_space_shape), agent.transformer, "cpu")
    state = torch.as_tensor(next_obs), torch.zeros(args.num_envs, dtype=torch.long)
    for _ in range(2):
        *state, _, _ = ppo_trxl.collect_rollout(agent, envs, rollout, *state)
    envs.close()
    timeline = rollout.timeline
    whole_rollout = (torch.arange(args.num_envs).unsqueeze(1), torch.arange(args.num_steps).expand(args.num_envs, -1))
    obs, actions = rollout.obs[whole_rollout], rollout.actions[whole_rollout]
    with torch.no_grad():
        log_probs, _, value, *_ = ppo_trxl.evaluate(
            agent, timeline, ppo_trxl.chunk_windows(timeline, whole_rollout), obs, actions
        )
        torch.testing.assert_close(log_probs, rollout.logprobs.flatten(0, 1), **TOLERANCE)
        assert (timeline.steps > 0).any()
        timeline.steps.zero_()  # every step an episode's first
        first_log_probs, _, first_value, *_ = ppo_trxl.evaluate(
            agent, timeline, ppo_trxl.chunk_windows(timeline, whole_rollout), obs, actions
        )
    if memory_length == 1:
        torch.testing.assert_close(first_log_probs, log_probs, **TOLERANCE)
        torch.testing.assert_close(first_value, value, **TOLERANCE)
    else:
        assert not torch.allclose(first_value, value, **TOLERANCE)


def test_segment_gradients_reach_a_chunks_earlier_steps():
    """With --trxl-segment-gradients the value of a chunk's last step has a gradient with respect to the
    observations of the chunk's earlier steps in its episode and memory, through their slots as the update's pass
    computes them; without, the slots are the rollout's cache and only the step's own observation has one."""
    torch.manual_seed(0)
    args = ppo_trxl.Args(env_id="ProofofMemory-v0", trxl_dim=16, trxl_num_heads=2, trxl_num_layers=2, trxl_memory_length=6)
    chunk, queries = 10, 4  # one chunk of 10 steps of one episode, whose last step attends to the 5 before it
    steps = torch.arange(chunk).unsqueeze(0)
    slots = torch.randn(1, chunk, args.trxl_num_layers, args.trxl_dim)
    gradients = {}
    for segment in (False, True):
        agent = ppo_trxl.Agent(
            dataclasses.replace(args, trxl_segment_gradients=segment), gym.spaces.Box(-1.0, 1.0, (3,)), (2,), 16
        )
        obs = torch.randn(queries, 3, requires_grad=True)
        chunks = ppo_trxl.Chunks(obs, None, torch.zeros(1, queries, 1, dtype=torch.long), slots, steps)
        agent(chunks).value[-1].backward()
        gradients[segment] = obs.grad.abs().sum(-1)
    assert gradients[False][:-1].eq(0).all() and gradients[False][-1] > 0
    assert gradients[True].gt(0).all()


@pytest.mark.parametrize("encoding", ["rotary", "absolute"])
@torch.no_grad()
def test_rotary_attention_depends_on_the_distance_alone(encoding):
    """With --trxl-positional-encoding rotary every layer's attention stays the same when the query's and the slots'
    episode steps shift alike, here by three episode limits; with the absolute encoding it does not."""
    torch.manual_seed(0)
    args = ppo_trxl.Args(trxl_dim=16, trxl_num_heads=2, trxl_num_layers=2, trxl_positional_encoding=encoding)
    transformer = ppo_trxl.Agent(args, gym.spaces.Box(-1.0, 1.0, (3,)), (2,), 20).transformer
    x, slots = torch.randn(1, 1, 16), torch.randn(1, 6, 2, 16)
    slot_steps, query_steps = torch.arange(3, 9).unsqueeze(0), torch.tensor([[9]])
    allowed = torch.ones(1, 1, 6, dtype=torch.bool)
    weights = [
        transformer(x, query_steps + shift, transformer.memory(slots, slot_steps + shift), allowed, True).weights
        for shift in (0, 60)
    ]
    same = all(torch.allclose(a, b, **TOLERANCE) for a, b in zip(*weights))
    assert same == (encoding == "rotary")
