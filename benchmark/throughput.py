"""Steps per second and peak memory of ppo_trxl.py on named configurations, beside the earlier implementation.

    python benchmark/throughput.py                          # every configuration but endless, on the CPU
    python benchmark/throughput.py pom minigrid --iterations 6
    python benchmark/throughput.py minigrid --cuda          # on the GPU, with its peak memory
    python benchmark/throughput.py endless --cuda --iterations 2   # the full default Endless config
    python benchmark/throughput.py mmgrid -- --encoder-dtype bfloat16 --compile   # trainer flags for every config

`endless` (32 envs x 512 steps, memory 256: 16,384 steps an iteration) runs only when named. Trainer flags after
`--` go on top of every configuration's (the last of a repeated flag wins), and into the table's "what".

Each configuration runs the real trainer for a fixed number of iterations in its own child process, in a
scratch folder (its tensorboard logs are thrown away): 4, or with --iterations as many as asked; pom runs its
whole documented budget (12 iterations of 2,048 steps, a few seconds), because 3 of its iterations last
about a second, too short a time to measure on a shared machine.
- steps/s counts the iterations after the first: the steps between the first and the last iteration's
  console line over the time between their arrival. The first iteration holds the start-up (env creation,
  allocation, first calls), which the trainer's own SPS (steps over the time since the start) includes.
- peak RSS: the child's peak resident memory (os.wait4's rusage), Python, torch and the envs included.
- peak GPU (with --cuda): torch.cuda.max_memory_allocated and max_memory_reserved, which the child prints
  at exit; the trainer runs inside a small wrapper (runpy) for that, unchanged.
"""

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import ppo_trxl  # noqa: E402

TRAINER = os.path.join(ROOT, "ppo_trxl.py")
EXPERIMENTS = os.path.join(ROOT, "benchmark", "ppo_trxl.sh")
ITERATION_LINE = re.compile(r"^iteration (\d+)/\d+ \| step (\d+)/\d+ \| (\d+) SPS")
GPU_LINE = re.compile(r"^peak cuda memory: (\d+) allocated, (\d+) reserved")
# Runs the trainer as __main__ and prints torch's peak GPU memory when the process ends
WRAPPER = """
import atexit, os, runpy, sys
import torch

def report():
    if torch.cuda.is_initialized():
        allocated, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        print(f"peak cuda memory: {allocated} allocated, {reserved} reserved", flush=True)

atexit.register(report)
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@dataclass
class Config:
    env_id: str
    overrides: tuple
    """flags on top of the env's documented command in benchmark/ppo_trxl.sh"""
    description: str
    earlier_sps: float | None
    """the earlier implementation's steps per second on a 2-core CPU (REFERENCE.md section 5)"""
    by_default: bool = True
    """whether a run that names no config runs this one"""
    iterations: int = 4
    """how many training iterations to run without --iterations"""


CONFIGS = {
    "pom": Config("ProofofMemory-v0", (), "ProofofMemory-v0, documented config", 2000, iterations=12),
    "minigrid": Config("MiniGrid-MemoryS9-v0", (), "MiniGrid-MemoryS9-v0, documented config", 160),
    "mmgrid": Config(
        "MortarMayhem-Grid-v0",
        ("--num-envs", "8", "--num-steps", "128", "--num-minibatches", "4"),
        "MortarMayhem-Grid-v0, default model, 8 envs x 128 steps, 4 minibatches",
        170,
    ),
    "endless-small": Config(
        "Endless-MortarMayhem-v0",
        ("--num-envs", "4", "--num-steps", "128", "--num-minibatches", "4"),
        "Endless-MortarMayhem-v0, default model, memory 256, 4 envs x 128 steps, 4 minibatches",
        None,
    ),
    "endless": Config(
        "Endless-MortarMayhem-v0",
        (),
        "Endless-MortarMayhem-v0, default config: 32 envs x 512 steps, 8 minibatches, memory 256",
        None,
        by_default=False,
    ),
}


def documented_flags(env_id):
    """The trainer flags of env_id's documented experiment, as benchmark/ppo_trxl.sh runs it with seed 1."""
    dry_run = subprocess.run(
        ["bash", EXPERIMENTS, "--dry-run", "--envs", env_id, "--seeds", "1"], capture_output=True, text=True, check=True
    )
    command = shlex.split(dry_run.stdout.strip())
    return command[command.index("ppo_trxl.py") + 1 :]


def trainer_flags(config, iterations, cuda, extra=()):
    """The config's flags and the extra ones (a repeated flag: the last one wins), with total_timesteps set for
    `iterations`."""
    flags = documented_flags(config.env_id) + list(config.overrides) + list(extra) + ["--exp-name", "throughput"]
    flags.append("--cuda" if cuda else "--no-cuda")
    batch_size = tyro.cli(ppo_trxl.Args, args=flags).batch_size
    return flags + ["--total-timesteps", str(iterations * batch_size)]


def split_at_dashes(argv):
    """argv -> (the benchmark's own arguments, the trainer flags that follow --)."""
    split = argv.index("--") if "--" in argv else len(argv)
    return argv[:split], argv[split + 1 :]


def measure(flags):
    """Runs the trainer with flags in a child, echoing its iteration lines; returns them as
    [(arrival time, step, SPS)], its peak RSS in bytes and its peak GPU memory (allocated, reserved) or None."""
    env = {**os.environ, "SDL_VIDEODRIVER": "dummy", "SDL_AUDIODRIVER": "dummy", "MPLBACKEND": "Agg"}
    iterations, gpu, tail = [], None, deque(maxlen=20)
    with tempfile.TemporaryDirectory() as scratch:
        child = subprocess.Popen(
            [sys.executable, "-c", WRAPPER, TRAINER] + flags,
            cwd=scratch,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for line in child.stdout:
            arrival = time.perf_counter()
            tail.append(line.rstrip())
            if match := ITERATION_LINE.match(line):
                iterations.append((arrival, int(match[2]), int(match[3])))
                print(line, end="", flush=True)
            elif match := GPU_LINE.match(line):
                gpu = int(match[1]), int(match[2])
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit("error: the trainer failed:\n" + "\n".join(tail))
    return iterations, usage.ru_maxrss * 1024, gpu


def steps_per_second(iterations):
    """Steps per second over the iterations after the first; None with a single iteration."""
    if len(iterations) < 2:
        return None
    (first_time, first_step, _), (last_time, last_step, _) = iterations[0], iterations[-1]
    return (last_step - first_step) / (last_time - first_time)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", help=f"which of {', '.join(CONFIGS)} (default: all but endless)")
    parser.add_argument("--iterations", type=int, help="training iterations per configuration (at least 2; default 4, pom 12)")
    parser.add_argument("--cuda", action="store_true", help="train on the GPU (the trainer's --cuda)")
    own, extra = split_at_dashes(sys.argv[1:])
    args = parser.parse_args(own)
    if args.iterations is not None and args.iterations < 2:
        parser.error("--iterations must be at least 2: the first one is left out of steps/s")
    unknown = [name for name in args.configs if name not in CONFIGS]
    if unknown:
        parser.error(f"unknown config {', '.join(unknown)}: choose from {', '.join(CONFIGS)}")
    names = args.configs or [name for name, config in CONFIGS.items() if config.by_default]

    device = "cuda" if args.cuda else "cpu"
    if args.cuda and not torch.cuda.is_available():
        print("warning: no CUDA device here, the trainer falls back to the CPU")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, device {device}")
    rows = []
    for name in names:
        config = CONFIGS[name]
        num_iterations = args.iterations or config.iterations
        flags = trainer_flags(config, num_iterations, args.cuda, extra)
        print(f"\n== {name}: python ppo_trxl.py {shlex.join(flags)}", flush=True)
        iterations, peak_rss, gpu = measure(flags)
        sps = steps_per_second(iterations)
        earlier = config.earlier_sps
        speed_up = f"{sps / earlier:.1f}x" if earlier else "-"
        gpu_cell = f"{gpu[0] / 2**20:,.0f} / {gpu[1] / 2**20:,.0f}" if gpu else "-"
        rows.append(
            [
                name,
                " ".join([config.description, *extra]),
                f"2-{num_iterations}",
                f"{sps:,.0f}",
                f"{iterations[-1][2]:,}",
                f"{earlier:,}" if earlier else "-",
                speed_up,
                f"{peak_rss / 2**20:,.0f}",
                gpu_cell,
            ]
        )

    header = [
        "config",
        "what",
        "iterations measured",
        "steps/s",
        "trainer's SPS (all)",
        "earlier impl. steps/s",
        "speed-up",
        "peak RSS (MiB)",
        "peak GPU alloc. / reserved (MiB)",
    ]
    print(f"\nOn {device}; earlier implementation: 2-core CPU (REFERENCE.md)\n")
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
