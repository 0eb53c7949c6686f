"""Shared helpers: run the real CLI in subprocesses, multi-process ones inside a loopback-only
network namespace (torchrun's store listens on every address; here only `lo` exists); read a run
folder back (metrics, train steps and losses, the final checkpoint, weight differences); the
augmentation checks the dataset tests share. Test modules import them with `from conftest import ...`."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def isolated(cmd: list[str]) -> list[str]:
    """`cmd` inside a new network namespace whose only interface is loopback."""
    return ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *cmd]


def torchrun(nproc: int, *args: str) -> list[str]:
    return isolated([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
                     "--master_addr", "127.0.0.1", "--master_port", "29511", "-m", *args])


def single(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


def run(cmd: list[str], timeout: float = 240, check: bool = True, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=kw.pop("cwd", ROOT), env=kw.pop("env", child_env()), capture_output=True,
                       text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} exited {p.returncode}\nstdout:\n{p.stdout[-4000:]}\nstderr:\n{p.stderr[-6000:]}")
    return p


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once (torchrun starts workers in new sessions,
    so killing its process group would leave them running)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(d))
    todo, tree = [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def metrics(run_dir) -> list[dict]:
    """Every record of a run's metrics.jsonl (a missing file is an error, unlike imnet.log.read_metrics)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def train_steps(run_dir) -> list[int]:
    """The steps of the run's train records, in file order (a repeated or missing step shows)."""
    return [r["step"] for r in metrics(run_dir) if r["split"] == "train"]


def trajectory(run_dir) -> list[tuple[int, float]]:
    """(step, loss) of the run's train records, in file order: equal lists mean one trajectory, none twice."""
    return [(r["step"], r["loss"]) for r in metrics(run_dir) if r["split"] == "train"]


def train_losses(run_dir) -> dict[int, float]:
    """step -> loss of the run's train records."""
    return {r["step"]: r["loss"] for r in metrics(run_dir) if r["split"] == "train"}


def final_checkpoint(run_dir) -> dict:
    """The run's newest whole checkpoint (what `latest` names), loaded as a resume would; the folder is
    left as it is (is_main=False: no clean-up of temp files)."""
    from imnet.checkpoint import Checkpointer, load

    return load(Checkpointer(os.path.join(run_dir, "checkpoints"), is_main=False).latest())


def max_diff(a: dict, b: dict) -> float:
    """The largest absolute difference between two state dicts' floating-point tensors (in float64)."""
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def assert_same_weights(a: dict, b: dict) -> None:
    """Two checkpoints at the same step with bit-identical model tensors."""
    assert a["step"] == b["step"]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def cfg_for(tmp_path, name, *more):
    """A quick deterministic synthetic run's Config, for calling train.fit in this process."""
    from imnet import config

    return config.load(None, ["data.name=synthetic", "data.synthetic_size=64", "data.image_size=16",
                              "data.batch_size=8", f"run.out_dir={tmp_path}", f"run.name={name}",
                              "log.progress=false", "log.every_steps=1", "model.gn_groups=8",
                              "run.deterministic=true", *more])


def fit(cfg):
    from imnet import dist, train

    return train.fit(cfg, dist.setup(cfg.dist))


@pytest.fixture
def small_run(tmp_path):
    """Overrides for a quick synthetic run in tmp_path."""
    def make(name: str, *more: str) -> list[str]:
        return ["data.name=synthetic", "data.synthetic_size=260", "data.image_size=16", "data.batch_size=8",
                f"run.out_dir={tmp_path}", f"run.name={name}", "log.progress=false", "model.gn_groups=8",
                *more]
    return make


def deny(monkeypatch, *paths) -> None:
    """os.scandir and open raise PermissionError on `paths` (simulated: the tests may run as root)."""
    denied = {str(p) for p in paths}
    real_scandir, real_open = os.scandir, open

    def guard(real):
        def call(path, *args, **kw):
            if os.fspath(path) in denied:
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return real(path, *args, **kw)
        return call

    monkeypatch.setattr(os, "scandir", guard(real_scandir))  # os.walk lists folders through it too
    monkeypatch.setattr("builtins.open", guard(real_open))


# ------------------------------------------------------------------ augmentation checks (datasets)

def shifted_crops(img: torch.Tensor, pad: int) -> list[torch.Tensor]:
    """Every crop a `pad`-pixel zero-padded random crop can produce from a (C, H, W) image."""
    _, h, w = img.shape
    padded = F.pad(img, (pad, pad, pad, pad))
    return [padded[:, t : t + h, left : left + w] for t in range(2 * pad + 1) for left in range(2 * pad + 1)]


def contains(candidates: list[torch.Tensor], x: torch.Tensor) -> bool:
    return any(torch.equal(c, x) for c in candidates)


def check_determinism(ds, index: int = 1, seeds=range(20)) -> list[torch.Tensor]:
    """Same (i, seed) -> identical; some seeds differ; the global RNG is untouched."""
    state = torch.get_rng_state()
    outs = [ds[(index, s)][0] for s in seeds]
    assert torch.equal(torch.get_rng_state(), state), "dataset access changed the global RNG"
    for s, out in zip(seeds, outs):
        assert torch.equal(ds[(index, s)][0], out)
    assert any(not torch.equal(outs[0], o) for o in outs[1:]), "different seeds gave the same augmentation"
    return outs


@pytest.fixture
def tuned():
    """`tuned("knob=value,...")`: the GroupNorm launch plan's tuning for the test, the defaults after it."""
    from imnet.kernels.gn import plan

    yield lambda text: plan.set_tuning(plan.parse_tuning(text))
    plan.set_tuning(plan.Tuning())
