"""Distributed init from torchrun's variables and from SLURM's (srun without torchrun), two real processes."""
import subprocess
import sys

import pytest

from run_helpers import REPO, child_env, free_port
from util.dist import first_slurm_host, read_launch_env

PROBE = """
import torch, torch.distributed as dist
from util.dist import init_distributed
env = init_distributed()
t = torch.tensor([env.rank + 1.0])
dist.all_reduce(t)
print(f"launcher={env.launcher} rank={env.rank} world={env.world_size} backend={env.backend} sum={t.item()}")
dist.destroy_process_group()
"""


def _launch(envs):
    procs = [subprocess.Popen([sys.executable, "-c", PROBE], cwd=REPO, env=child_env(**e), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for e in envs]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    return sorted(o for o, _ in outs)


@pytest.mark.parametrize("launcher", ["torchrun", "slurm"])
def test_two_process_init(launcher):
    port = free_port()
    if launcher == "torchrun":
        envs = [dict(RANK=r, WORLD_SIZE=2, LOCAL_RANK=r, MASTER_ADDR="127.0.0.1", MASTER_PORT=port) for r in (0, 1)]
    else:
        envs = [dict(SLURM_PROCID=r, SLURM_NTASKS=2, SLURM_LOCALID=r, SLURM_NODELIST="localhost",
                     SLURM_JOB_ID=123, MASTER_PORT=port) for r in (0, 1)]
    outs = _launch(envs)
    for r, out in enumerate(outs):
        assert f"launcher={launcher} rank={r} world=2 backend=gloo sum=3.0" in out


def test_launch_env_precedence_and_nodelist():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    assert read_launch_env(env) == ("torchrun", 3, 8, 3)  # srun wrapping torchrun: torchrun's variables win
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_NODELIST": "gpu[007-008,010]"}
    assert read_launch_env(env) == ("slurm", 5, 16, 1)
    assert env["MASTER_ADDR"] == "gpu007" and env["RANK"] == "5" and env["WORLD_SIZE"] == "16"
    assert read_launch_env({}) == ("none", 0, 1, 0)
    assert first_slurm_host("node01") == "node01"
    assert first_slurm_host("a[1-2],b3") == "a1"
