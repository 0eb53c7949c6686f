import shutil

import pytest

from imnet import dist
from imnet.dist import detect, expand_nodelist, parse_nodelist

# the hostlist forms Slurm documents (ranges, lists of ranges, zero padding, several prefixes)
NODELISTS = [
    ("node1", ["node1"]),
    ("gpu[01-03,7],cpu1", ["gpu01", "gpu02", "gpu03", "gpu7", "cpu1"]),
    ("a[9-11]", ["a9", "a10", "a11"]),
    ("n1,n2", ["n1", "n2"]),
    ("node[1-3,5],gpu-[01-02]", ["node1", "node2", "node3", "node5", "gpu-01", "gpu-02"]),
    ("tux[1,3-5]", ["tux1", "tux3", "tux4", "tux5"]),
    ("lx[008-011]", ["lx008", "lx009", "lx010", "lx011"]),
]


@pytest.mark.parametrize("s,hosts", NODELISTS)
def test_parse_nodelist(s, hosts):
    assert parse_nodelist(s) == hosts


@pytest.mark.parametrize("s,hosts", NODELISTS)
def test_expand_nodelist_without_scontrol_parses(s, hosts, monkeypatch):
    """torchrun or submitit's local executor on a machine without Slurm: the own parser."""
    monkeypatch.setenv("PATH", "")
    assert expand_nodelist(s) == hosts


@pytest.mark.skipif(not shutil.which("scontrol"), reason="no scontrol on PATH (slurm/local/install.sh installs it)")
def test_expand_nodelist_asks_scontrol_on_a_slurm_node(tmp_path, monkeypatch):
    """scontrol show hostnames needs only a slurm.conf (no daemon): the answers are Slurm's own."""
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=imnet-test\nSlurmctldHost=localhost\nNodeName=n1 CPUs=1\nPartitionName=p Nodes=n1\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    monkeypatch.setattr(dist, "parse_nodelist", lambda s: pytest.fail(f"parsed {s!r} instead of asking scontrol"))
    for s, hosts in NODELISTS:
        assert expand_nodelist(s) == hosts
    assert expand_nodelist("") == []


def test_expand_nodelist_falls_back_where_scontrol_has_no_config(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "missing.conf"))
    assert expand_nodelist("gpu[01-02]") == ["gpu01", "gpu02"]


def test_detect_torchrun():
    assert detect({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == ("torchrun", 3, 4, 1)


def test_detect_submitit_job():
    """launch/submit.py's tasks export torch's variables too; submitit marks its jobs."""
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "SUBMITIT_EXECUTOR": "slurm", "SLURM_PROCID": "1",
           "SLURM_STEP_NUM_TASKS": "2"}
    assert detect(env) == ("submitit", 1, 2, 0)


def test_detect_srun_sets_master_from_first_node():
    env = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_STEP_NODELIST": "gpu[12-13]", "SLURM_JOB_ID": "4242"}
    assert detect(env) == ("slurm", 5, 8, 1)
    assert env["MASTER_ADDR"] == "gpu12"
    assert env["MASTER_PORT"] == str(20000 + 4242)


def test_detect_single_process_in_a_batch_script():
    # sbatch's batch step has SLURM_PROCID but no srun step: one process, no process group
    assert detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}) == ("single", 0, 1, 0)
    assert detect({}) == ("single", 0, 1, 0)


def _average_worker(rank, path):
    import os

    import torch
    import torch.distributed as tdist

    from imnet import dist, norm

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    tdist.init_process_group("gloo", init_method=f"file://{path}/rdzv", rank=rank, world_size=2)
    bn = norm.make("bn", 3)
    bn.running_mean.fill_(float(rank))        # 0 on rank 0, 1 on rank 1
    bn.running_var.fill_(1.0 + 2 * rank)      # 1 and 3
    dist.average_buffers(bn)
    total = dist.all_reduce(torch.tensor([float(rank + 1)]))
    torch.save({"mean": bn.running_mean, "var": bn.running_var, "n": bn.num_batches_tracked,
                "sum": total, "gathered": dist.all_gather_object(rank * 10)}, f"{path}/out{rank}.pt")
    tdist.barrier()
    tdist.destroy_process_group()


@pytest.mark.timeout(120)
def test_bn_buffers_averaged_over_ranks(tmp_path):
    import torch
    import torch.multiprocessing as mp

    mp.spawn(_average_worker, args=(str(tmp_path),), nprocs=2)
    for r in range(2):
        out = torch.load(tmp_path / f"out{r}.pt", weights_only=True)
        assert torch.equal(out["mean"], torch.full((3,), 0.5))
        assert torch.equal(out["var"], torch.full((3,), 2.0))
        assert out["n"].item() == 0  # counters are left alone
        assert out["sum"].item() == 3.0
        assert out["gathered"] == [0, 10]
