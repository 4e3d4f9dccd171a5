#!/usr/bin/env bash
# The PPO-TrXL experiments: the 8 documented Memory Gym configurations, MiniGrid-MemoryS9 (and its cue-at-start
# variant, benchmark/minigrid_cue.py) in the configuration that learns it, ProofofMemory, and the Memory Gym ladder
# of tasks that learn on two CPU cores, each rung beside its memoryless control; 3 seeds each, run locally N jobs at
# a time or submitted to Slurm as a job array (one GPU a job).
#
#   benchmark/ppo_trxl.sh --dry-run                                   # print every command
#   benchmark/ppo_trxl.sh --envs ProofofMemory-v0 --jobs 3 -- --no-cuda  # 3 seeds, locally
#   benchmark/ppo_trxl.sh --envs "MortarMayhem-Grid-3 MortarMayhem-Grid-3-control" --jobs 2   # a rung of the ladder
#   benchmark/ppo_trxl.sh --slurm --sbatch-args "--partition=gpu --time=2-00:00:00"
#   python benchmark/plot.py runs                                     # curves and the results table
#
# Flags after `--` are passed to every job (the last of a repeated flag wins in ppo_trxl.py), so a short
# smoke version is: benchmark/ppo_trxl.sh --jobs 2 -- --no-cuda --total-timesteps 10000
# Jobs run from the repository root and write tensorboard logs to runs/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# The documented configurations (REFERENCE.md section 3); Memory Gym ones go on top of the defaults. MiniGrid Memory
# runs without a positional encoding, with a constant learning rate 3.5e-4 and entropy bonus 3e-3, 5 epochs, clip 0.1,
# max grad norm 0.5 and GAE lambda 0.99 (gamma stays at its default 0.995): the documented MiniGrid-MemoryS9
# configuration ends in the memoryless trap, and so does this one with gamma 0.99 (README.md).
# MiniGrid-MemoryS9-segments adds the update's gradients through its chunks, MiniGrid-MemoryS9-gate GTrXL's gates,
# which learn S9 in half the budget, and MiniGrid-MemoryS9-gate-segments both, which learn it fastest (README.md,
# Beyond the published model).
MINIGRID="--num-envs 16 --num-steps 256 --trxl-num-layers 2 --trxl-num-heads 4 --trxl-dim 256 --trxl-memory-length 64
    --trxl-positional-encoding none --init-lr 3.5e-4 --final-lr 3.5e-4 --init-ent-coef 3e-3 --final-ent-coef 3e-3
    --update-epochs 5 --clip-coef 0.1 --max-grad-norm 0.5 --gae-lambda 0.99"
S9="--env-id MiniGrid-MemoryS9-v0 $MINIGRID"
# The Memory Gym ladder (README.md, Memory Gym on two CPU cores): MortarMayhem-Grid with fewer commands, and a model
# and batch sized for a CPU; one thread a run; each rung names its epochs (with 4, one seed of three of the
# three-command rung ends below 0.9 of the best). Its memoryless control (a name ending in -control) is the same command with
# --trxl-memory-length 1. A rung's task settings hold no spaces, so that the shell keeps them one word.
LADDER="--env-id MortarMayhem-Grid-v0 --num-envs 16 --num-steps 256 --num-minibatches 4
    --trxl-num-layers 2 --trxl-num-heads 4 --trxl-dim 256 --trxl-memory-length 64 --trxl-segment-gradients --norm-adv
    --init-lr 3.5e-4 --final-lr 3.5e-4 --init-ent-coef 1e-3 --final-ent-coef 1e-3"
# Every job saves its final model and a checkpoint every 100 iterations (--resume continues a job that was stopped)
SAVE="--save-model --checkpoint-interval 100"
EXPERIMENTS=(
    MortarMayhem-Grid-v0
    MortarMayhem-v0
    MysteryPath-Grid-v0
    MysteryPath-v0
    SearingSpotlights-v0
    Endless-MortarMayhem-v0
    Endless-MysteryPath-v0
    Endless-SearingSpotlights-v0
    MiniGrid-MemoryS9-v0
    benchmark.minigrid_cue:MiniGrid-MemoryS9Cue-v0
    MiniGrid-MemoryS9-segments
    MiniGrid-MemoryS9-gate
    MiniGrid-MemoryS9-gate-segments
    ProofofMemory-v0
    MortarMayhem-Grid-1
    MortarMayhem-Grid-1-control
    MortarMayhem-Grid-3
    MortarMayhem-Grid-3-control
)
declare -A CONFIG=(
    [MortarMayhem-Grid-v0]="--norm-adv --trxl-memory-length 119 --total-timesteps 100000000"
    [MortarMayhem-v0]="--reconstruction-coef 0.1 --trxl-memory-length 275"
    [MysteryPath-Grid-v0]="--trxl-memory-length 96 --total-timesteps 100000000"
    [MysteryPath-v0]="--trxl-memory-length 256"
    [SearingSpotlights-v0]="--reconstruction-coef 0.1 --trxl-memory-length 256"
    [Endless-MortarMayhem-v0]="--trxl-memory-length 256 --total-timesteps 350000000"
    [Endless-MysteryPath-v0]="--trxl-memory-length 256 --total-timesteps 350000000"
    [Endless-SearingSpotlights-v0]="--reconstruction-coef 0.1 --trxl-memory-length 256 --total-timesteps 350000000"
    [MiniGrid-MemoryS9-v0]="--total-timesteps 2048000 $MINIGRID"
    [benchmark.minigrid_cue:MiniGrid-MemoryS9Cue-v0]="--total-timesteps 1024000 $MINIGRID"
    [MiniGrid-MemoryS9-segments]="--total-timesteps 2048000 $S9 --trxl-segment-gradients"
    [MiniGrid-MemoryS9-gate]="--total-timesteps 1024000 $S9 --trxl-gate gru"
    [MiniGrid-MemoryS9-gate-segments]="--total-timesteps 1024000 $S9 --trxl-gate gru --trxl-segment-gradients"
    [ProofofMemory-v0]="--total-timesteps 25000 --num-envs 16 --num-steps 128 --num-minibatches 8 --update-epochs 4
        --trxl-num-layers 4 --trxl-num-heads 1 --trxl-dim 64 --trxl-memory-length 16 --trxl-positional-encoding none
        --vf-coef 0.1 --max-grad-norm 0.5 --init-lr 3e-4 --init-ent-coef 0.001 --clip-coef 0.2"
    [MortarMayhem-Grid-1]="--reset-params {\"command_count\":[1]} --total-timesteps 768000 $LADDER --update-epochs 4"
    [MortarMayhem-Grid-3]="--reset-params {\"command_count\":[3]} --total-timesteps 4096000 $LADDER --update-epochs 8"
)
for rung in MortarMayhem-Grid-1 MortarMayhem-Grid-3; do
    CONFIG[$rung-control]="${CONFIG[$rung]} --trxl-memory-length 1"
done

usage() {
    cat <<EOF
usage: benchmark/ppo_trxl.sh [options] [-- flags for every job]

  --envs "NAME ..."     experiments to run, by env id or rung name (default: all of them)
  --seeds "N ..."       seeds (default: "1 2 3")
  --jobs N              local: jobs at a time (default 1); slurm: array tasks at a time (default: no limit)
  --slurm               submit a job array with sbatch instead of running locally
  --sbatch-args "..."   extra options for sbatch, e.g. "--partition=gpu --time=2-00:00:00"
  --python PATH         the Python that runs ppo_trxl.py (default: \$PYTHON or python)
  --log-dir DIR         local: one log file per job; slurm: job script, commands file and logs
                        (default: runs/benchmark-logs, runs/slurm/<date-time>)
  --dry-run             print the commands (local) or the job script and commands file (slurm); run nothing
  -h, --help            this help

experiments: ${EXPERIMENTS[*]}
EOF
}

envs=("${EXPERIMENTS[@]}")
seeds=(1 2 3)
jobs=""
slurm=false
sbatch_args=""
python="${PYTHON:-python}"
log_dir=""
dry_run=false
extra_flags=()
while (($#)); do
    case "$1" in
        --envs) read -ra envs <<<"$2" && shift 2 ;;
        --seeds) read -ra seeds <<<"$2" && shift 2 ;;
        --jobs) jobs="$2" && shift 2 ;;
        --slurm) slurm=true && shift ;;
        --sbatch-args) sbatch_args="$2" && shift 2 ;;
        --python) python="$2" && shift 2 ;;
        --log-dir) log_dir="$2" && shift 2 ;;
        --dry-run) dry_run=true && shift ;;
        -h | --help) usage && exit 0 ;;
        --) shift && extra_flags=("$@") && break ;;
        *) echo "error: unknown option '$1' (flags for the jobs go after --)" >&2 && usage >&2 && exit 2 ;;
    esac
done

for name in "${envs[@]}"; do
    if [[ -z "${CONFIG[$name]+set}" ]]; then
        echo "error: '$name' is not one of the experiments; choose from: ${EXPERIMENTS[*]}" >&2
        exit 2
    fi
done
if [[ -n "$jobs" && ! "$jobs" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: --jobs takes a positive number, not '$jobs'" >&2
    exit 2
fi
# Jobs run from the repository root: relative paths given here are relative to where this was called
if [[ -n "$log_dir" && "$log_dir" != /* ]]; then
    log_dir="$PWD/$log_dir"
fi
if [[ "$python" == */* && "$python" != /* ]]; then
    python="$PWD/$python"
fi

# One shell-quoted command line per (experiment, seed), experiment by experiment; an experiment named by an env id
# runs that env, a rung names its env and its exp_name in its flags
commands=()
names=()
for name in "${envs[@]}"; do
    read -ra config <<<"${CONFIG[$name]//$'\n'/ }"
    own=(--env-id "$name")
    if [[ " ${config[*]} " == *" --env-id "* ]]; then
        own=(--exp-name "$name")
    fi
    for seed in "${seeds[@]}"; do
        command=("$python" ppo_trxl.py "${own[@]}" --seed "$seed" "${config[@]}" $SAVE "${extra_flags[@]}")
        command_line="$(printf '%q ' "${command[@]}")"
        commands+=("${command_line% }")
        names+=("${name}__${seed}")
    done
done

run_local() {
    local dir="${log_dir:-runs/benchmark-logs}"
    if $dry_run; then
        printf '%s\n' "${commands[@]}"
        return
    fi
    cd "$ROOT"
    mkdir -p "$dir"
    # Jobs side by side share the cores rather than each starting a thread per core
    if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
        local cores
        cores="$(nproc)"
        export OMP_NUM_THREADS=$((cores / ${jobs:-1} > 1 ? cores / ${jobs:-1} : 1))
    fi
    echo "${#commands[@]} jobs, ${jobs:-1} at a time, $OMP_NUM_THREADS threads each, logs in $dir/"
    # xargs gets (log file, command) pairs and runs each command through run_job; it exits non-zero if any failed
    local i
    for i in "${!commands[@]}"; do
        printf '%s\0%s\0' "$dir/${names[i]}.log" "${commands[i]}"
    done | xargs -0 -n 2 -P "${jobs:-1}" bash -c '
        log="$1" command="$2"
        echo "start  $log"
        if bash -c "$command" >"$log" 2>&1; then echo "done   $log"; else echo "FAILED $log (exit $?)"; exit 1; fi
    ' run_job
}

job_script() {
    local dir="$1"
    local throttle="${jobs:+%$jobs}"
    cat <<EOF
#!/usr/bin/env bash
#SBATCH --job-name=ppo_trxl
#SBATCH --array=0-$((${#commands[@]} - 1))$throttle
#SBATCH --gres=gpu:1
#SBATCH --output=$dir/%A_%a.log
# Array task i runs line i + 1 of the commands file.
set -euo pipefail
cd $(printf '%q' "$ROOT")
command="\$(sed -n "\$((SLURM_ARRAY_TASK_ID + 1))p" $(printf '%q' "$dir/commands.txt"))"
echo "\$command"
bash -c "\$command"
EOF
}

run_slurm() {
    local dir="${log_dir:-$ROOT/runs/slurm/$(date +%Y%m%d-%H%M%S)}"
    if $dry_run; then
        echo "# $dir/job.sbatch"
        job_script "$dir"
        echo "# $dir/commands.txt"
        printf '%s\n' "${commands[@]}"
        return
    fi
    # Every submission gets its own folder: a pending array reads its commands file when each task starts
    mkdir -p "$dir"
    printf '%s\n' "${commands[@]}" >"$dir/commands.txt"
    job_script "$dir" >"$dir/job.sbatch"
    read -ra sbatch_options <<<"$sbatch_args"
    sbatch "${sbatch_options[@]}" "$dir/job.sbatch"
    echo "${#commands[@]} array tasks submitted; job script, commands and logs in $dir/"
}

if $slurm; then
    run_slurm
else
    run_local
fi
