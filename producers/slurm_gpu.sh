#!/bin/bash
# gpusmall on a SLURM GPU node: one MPI rank per GPU.
#   sbatch producers/slurm_gpu.sh producers/epix10k2m.yaml [--out /sdf/data/.../run0014.h5]
#
# S3DF-like GPU node (e.g. 4 x A100 per node on the ampere partition): --gpus-per-node and
# --ntasks-per-node equal, a few CPU cores per rank for the reader thread and HDF5 writing.
# Each rank takes GPU (local rank % visible GPUs) and writes <stem>.part<rank>.h5; rank 0 writes
# <stem>.h5 presenting every per-event dataset across the parts (HDF5 virtual datasets). Keep the
# master and its parts together. If the job is killed (time limit: SLURM sends SIGTERM first, see
# --signal below), every rank closes its part after the batch in hand; rank 0 writes the master
# when it can; otherwise run `gpusmall merge <output>` afterwards.
# A psana source given as exp/run is distributed by psana itself: ranks 0 and 1 read small data and build
# events, ranks 2.. reduce. Ask for two tasks more than GPUs (e.g. --ntasks-per-node=6 with 4 GPUs and no
# --gpu-bind): ranks 2..5 then take GPUs 2, 3, 0, 1 (local rank % GPUs), one reducing rank per GPU.
#SBATCH --job-name=gpusmall
#SBATCH --partition=ampere
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=4
#SBATCH --mem=0
#SBATCH --time=01:00:00
#SBATCH --signal=TERM@60
#SBATCH --output=gpusmall-%j.log
#  #SBATCH --account=lcls:<experiment>

set -euo pipefail
CONFIG=${1:?usage: sbatch slurm_gpu.sh CONFIG [gpusmall run options]}
shift

# environment: a conda env or venv with gpusmall, cupy-cuda12x, mpi4py
# source /sdf/group/lcls/ds/ana/sw/conda2/manage/bin/psconda.sh   # psana2 environment (optional)
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-4}
export HDF5_USE_FILE_LOCKING=FALSE   # parallel file systems (Lustre, WekaFS) and VDS readers

if command -v srun >/dev/null && [ -n "${SLURM_JOB_ID:-}" ]; then
    # srun gives each rank only its own GPU when --gpu-bind=single:1 (then local rank % 1 = 0)
    srun --mpi=pmix --gpu-bind=single:1 gpusmall run "$CONFIG" --quiet "$@"
else
    mpiexec -n "${NRANKS:-$(nvidia-smi -L 2>/dev/null | wc -l)}" gpusmall run "$CONFIG" --quiet "$@"
fi
