"""DDP inside a Hydra sweep: the other ranks of a job run that job, not the sweep.

Lightning's DDP launcher (``_SubprocessScriptLauncher``, used where no cluster environment
starts the ranks: one machine, no SLURM or torchrun) starts ranks 1.. by running again the
process's own command, ``__main__`` with ``sys.argv``, plus ``hydra.run.dir`` set to Hydra's
run folder. That is right for one run, and wrong inside a sweep (``python train.py -m ...``):

- with Hydra's basic launcher, each child runs the whole sweep, job after job, and pairs with
  the parent's jobs only while both go through them in step; the parent also keeps the
  ``LOCAL_RANK`` Lightning set for the first job, so its later jobs start no ranks of their own;
- under submitit (``hydra/launcher=submitit_local``), ``__main__`` is submitit's worker, which
  rejects the arguments, and the job fails.

`ranks_run_this_job` makes the children's command this job alone (the entry module with the
job's own overrides and the sweep's Hydra flags and settings, in the job's folder) while
Lightning starts them, and afterwards clears what the launcher left in the process (the
rendezvous, the thread count), so that the next job of the sweep starts its own ranks as the
first did.
Lightning offers no setting for the command (as of 2.6), hence these few lines here.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Iterator

import torch
import torch.distributed
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf, read_write

import __main__

# What Lightning's launcher sets in the parent: the rendezvous (subprocess_script.py) and,
# where unset, the threads per process (_set_num_threads_if_needed).
LAUNCHER_ENVIRONMENT = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "OMP_NUM_THREADS")
# Hydra's command-line flags that a job keeps (the multirun flag it drops), with their values.
VALUE_FLAGS = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd")
# Hydra overrides of the sweep itself (launcher, sweeper, sweep folder, mode), and those that
# Lightning appends for each child (run.dir, job.name, output_subdir).
SWEEP_KEYS = ("hydra.mode", "hydra.sweep", "hydra/launcher", "hydra.launcher", "hydra/sweeper", "hydra.sweeper",
              "hydra.run.dir", "hydra.job.name", "hydra.output_subdir")


def job_argv(argv: list[str], hydra_overrides: list[str], task_overrides: list[str]) -> list[str]:
    """The command line of one job of a sweep: ``argv``'s program and Hydra flags (config path,
    name and folder) without the multirun flag, the Hydra overrides that are not the sweep's
    own, and the job's overrides (in place of the sweep's, e.g. ``lr=1e-4,2e-4``)."""
    program, flags, args = argv[0], [], iter(argv[1:])
    for arg in args:  # the sweep's overrides are left: the job's come from Hydra
        if arg in VALUE_FLAGS:
            flags += [arg, next(args, "")]
        elif arg.split("=", 1)[0] in VALUE_FLAGS:
            flags.append(arg)
    key = lambda override: override.lstrip("+~").split("=", 1)[0]  # noqa: E731
    kept = [o for o in hydra_overrides if not any(key(o) == k or key(o).startswith(k + ".") for k in SWEEP_KEYS)]
    return [program, *flags, *kept, *task_overrides]


@contextlib.contextmanager
def ranks_run_this_job(entry_module: str) -> Iterator[None]:
    """Inside a Hydra multirun job: DDP ranks that Lightning starts run ``python -m
    entry_module <this job's command line>`` (`job_argv`) in this job's folder; on the way
    out, the environment, the thread count, the process group, ``sys.argv`` and ``__main__``
    are as they were. Elsewhere (one run, no Hydra) it does nothing."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        yield
        return
    hydra_cfg = HydraConfig.instance().cfg.hydra
    saved_argv, saved_spec, saved_threads = sys.argv, __main__.__spec__, torch.get_num_threads()
    saved_run_dir = OmegaConf.to_container(hydra_cfg.run, resolve=False)["dir"]  # unresolved
    saved_environment = {name: os.environ.get(name) for name in LAUNCHER_ENVIRONMENT}
    try:
        sys.argv = job_argv(sys.argv, list(hydra_cfg.overrides.hydra), list(hydra_cfg.overrides.task))
        __main__.__spec__ = importlib.util.find_spec(entry_module)  # the children run `python -m entry_module`
        with read_write(hydra_cfg):
            hydra_cfg.run.dir = hydra_cfg.runtime.output_dir  # Lightning passes it as hydra.run.dir
        yield
    finally:
        sys.argv, __main__.__spec__ = saved_argv, saved_spec
        with read_write(hydra_cfg):
            hydra_cfg.run.dir = saved_run_dir
        for name, value in saved_environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        torch.set_num_threads(saved_threads)
        # Ranks started here end with the job, so the next job's form a new group. Ranks made
        # outside (torchrun, SLURM: LOCAL_RANK set before) go through the sweep together and
        # keep theirs, which Lightning reuses.
        started_here = saved_environment["LOCAL_RANK"] is None
        if started_here and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
