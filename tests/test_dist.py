import pytest

from imnet.dist import detect, expand_nodelist


@pytest.mark.parametrize("s,hosts", [
    ("node1", ["node1"]),
    ("gpu[01-03,7],cpu1", ["gpu01", "gpu02", "gpu03", "gpu7", "cpu1"]),
    ("a[9-11]", ["a9", "a10", "a11"]),
    ("n1,n2", ["n1", "n2"]),
])
def test_expand_nodelist(s, hosts):
    assert expand_nodelist(s) == hosts


def test_detect_torchrun():
    assert detect({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == ("torchrun", 3, 4, 1)


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
