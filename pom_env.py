"""Proof of Memory (ProofofMemory-v0): the smallest task that an agent without memory cannot solve.

A 1-D track runs from -1 to 1 in steps of 0.2. One end holds a good goal (+1), the other a bad one (-1),
their sides drawn at random each episode. For the first two steps the agent is frozen and sees the goals;
after that the goal entries read 0, so it has to remember which side was good.

    observation: [left goal, position, right goal]    action: 0 = left, 1 = right

Reaching an end terminates the episode with +-1.6 by that goal's sign; every other move costs -0.1.
The best expected return is 1.2 (7 steps on average); a uniformly random policy gets about -1.1.
"""

import gymnasium as gym
import numpy as np
from gymnasium import spaces

STEP = 0.2
TRACK_END = 5  # positions are integers in [-5, 5], scaled by STEP
START_POSITIONS = np.arange(-2, 3)  # -0.4 ... 0.4
FROZEN_STEPS = 2
MOVE_REWARD = -0.1
GOAL_REWARD = 1.0 + 6 * 0.1


class ProofofMemoryEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(self, render_mode=None):
        self.observation_space = spaces.Box(-1.0, 1.0, (3,), dtype=np.float32)
        self.action_space = spaces.Discrete(2)
        self.render_mode = render_mode

    def _observation(self):
        shown = self._step_count < FROZEN_STEPS
        left, right = self._goals if shown else (0.0, 0.0)
        return np.array([left, self._position * STEP, right], dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._goals = (1.0, -1.0) if self.np_random.integers(2) == 0 else (-1.0, 1.0)
        self._position = int(self.np_random.choice(START_POSITIONS))
        self._step_count = 0
        return self._observation(), {}

    def step(self, action):
        reward, terminated = 0.0, False
        if self._step_count >= FROZEN_STEPS:
            self._position += 1 if action == 1 else -1
            if abs(self._position) == TRACK_END:
                reward, terminated = GOAL_REWARD * self._goals[self._position > 0], True
            else:
                reward = MOVE_REWARD
        self._step_count += 1
        return self._observation(), reward, terminated, False, {}

    def get_action_meanings(self):
        return ["left", "right"]

    def render(self):
        """The track as 11 cells of 48 pixels: the goals in green (good) and red (bad), the agent as a white disc."""
        cell = 48
        track = np.full((2 * cell, (2 * TRACK_END + 1) * cell, 3), 40, dtype=np.uint8)
        track[cell // 2 : 3 * cell // 2, :] = 70
        track[:, ::cell] = 40  # a line between cells, so that each can be counted
        for end, goal in ((0, self._goals[0]), (2 * TRACK_END, self._goals[1])):
            track[cell // 2 : 3 * cell // 2, end * cell + 4 : (end + 1) * cell - 4] = (0, 200, 0) if goal > 0 else (200, 0, 0)
        rows, columns = np.ogrid[: 2 * cell, : track.shape[1]]
        center = ((self._position + TRACK_END) * cell + cell // 2, cell)
        track[(columns - center[0]) ** 2 + (rows - center[1]) ** 2 <= (cell // 3) ** 2] = 255
        return track


gym.register("ProofofMemory-v0", entry_point=ProofofMemoryEnv, max_episode_steps=16)
