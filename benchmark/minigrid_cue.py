"""MiniGrid-MemoryS9Cue-v0: MiniGrid-MemoryS9-v0 with the cue in view at reset.

The agent always starts at x = 1 of the start room, facing east, where its 3x3 view holds the cue; everything
else is MiniGrid-MemoryS9-v0 (minigrid 2.3.1): the objects, the reward 1 - 0.9 * steps / 405, the 96-step limit
that ppo_trxl.py puts on MiniGrid ids. It asks for memory without asking the agent to find the cue first, so it
separates learning to remember from exploring. Train on it with

    python ppo_trxl.py --env-id benchmark.minigrid_cue:MiniGrid-MemoryS9Cue-v0 ...
"""

import gymnasium as gym
from minigrid.envs.memory import MemoryEnv


class CueInViewMemoryEnv(MemoryEnv):
    def _gen_grid(self, width, height):
        super()._gen_grid(width, height)
        self.agent_pos = (1, height // 2)


gym.register("MiniGrid-MemoryS9Cue-v0", entry_point=CueInViewMemoryEnv, kwargs={"size": 9})
