"""EndlessCorridor-v0: a long-episode env registered without a step limit, so the trainer's episode limit T is 1024.

Every episode lasts exactly EPISODE_LENGTH = 3500 steps, more than three times T. The observation is
the fraction of the corridor walked so far; the last step pays 1.0, every other step pays nothing.
"""

import gymnasium as gym
import numpy as np
from gymnasium import spaces

EPISODE_LENGTH = 3500


class EndlessCorridorEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, render_mode=None):
        self.observation_space = spaces.Box(0.0, 1.0, (1,), dtype=np.float32)
        self.action_space = spaces.Discrete(2)
        self.render_mode = render_mode

    def _observation(self):
        return np.array([self._step_count / EPISODE_LENGTH], dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._step_count = 0
        return self._observation(), {}

    def step(self, action):
        self._step_count += 1
        terminated = self._step_count >= EPISODE_LENGTH
        return self._observation(), 1.0 if terminated else 0.0, terminated, False, {}


gym.register("EndlessCorridor-v0", entry_point=EndlessCorridorEnv)
