"""NanReward-v0: a vector-observation env whose rewards turn to NaN once an env instance has taken NAN_AFTER steps.

It forces a non-finite loss in a real training run without touching the trainer. Episodes last EPISODE_LENGTH
steps; action 1 pays 0.1 and action 0 nothing, until the rewards become NaN for good.
"""

import gymnasium as gym
import numpy as np
from gymnasium import spaces

NAN_AFTER = 100
EPISODE_LENGTH = 8


class NanRewardEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, render_mode=None):
        self.observation_space = spaces.Box(-1.0, 1.0, (2,), dtype=np.float32)
        self.action_space = spaces.Discrete(2)
        self.render_mode = render_mode
        self.total_steps = 0  # over all episodes of this instance

    def _observation(self):
        return self.np_random.uniform(-1.0, 1.0, 2).astype(np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self._observation(), {}

    def step(self, action):
        self.total_steps += 1
        reward = float("nan") if self.total_steps > NAN_AFTER else 0.1 * int(action)
        return self._observation(), reward, False, False, {}


gym.register("NanReward-v0", entry_point=NanRewardEnv, max_episode_steps=EPISODE_LENGTH)
