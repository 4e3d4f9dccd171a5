"""SignalGroup-v0: EndlessCorridor-v0 (tests/endless_env.py), which signals its whole process group once, mid-rollout.

It brings a terminal's Ctrl-C (SIGINT) or Slurm's scancel (SIGTERM) at a known step, while the envs must still be
stepped, without a race against the clock. The signal is named by the env var SIGNAL_GROUP_WITH (SIGINT or SIGTERM);
the first env instance to take its SIGNAL_AT-th step sends it, once per folder: it leaves a file there to say so.
"""

import os
import signal

import gymnasium as gym

from tests.endless_env import EndlessCorridorEnv

SIGNAL_AT = 40
SENT = "signal-sent"


class SignalGroupEnv(EndlessCorridorEnv):
    def step(self, action):
        result = super().step(action)
        if self._step_count == SIGNAL_AT:
            try:
                os.close(os.open(SENT, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                pass  # another instance has sent it
            else:
                os.killpg(os.getpgid(0), signal.Signals[os.environ["SIGNAL_GROUP_WITH"]])
        return result


gym.register("SignalGroup-v0", entry_point=SignalGroupEnv)
