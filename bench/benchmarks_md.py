"""Shared by the bench scripts: insert result rows into BENCHMARKS.md below a section's marker line,
the rows' common first columns on a GPU or a CPU, and alternating host-time rounds."""

import datetime
import os
import platform
import time

PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "BENCHMARKS.md")


def append_rows(marker: str, rows: list[str]) -> None:
    """Newest rows first, right under `marker`; a missing marker is an error (add the section first)."""
    with open(PATH) as f:
        text = f.read()
    if marker not in text:
        raise SystemExit(f"--write: no {marker} line in {PATH}; add the section first")
    with open(PATH, "w") as f:
        f.write(text.replace(marker, marker + "\n" + "\n".join(rows), 1))


def gpu_head(with_tuning: bool = True, tune: str | None = None) -> str:
    """"date | GPU | torch .., triton ..": a GPU row's first three cells, with the GroupNorm launch
    plan's IMNET_GN_TUNE (`tune`, or the one in use) appended to the versions when it is not the
    defaults (and with_tuning)."""
    import torch
    import triton

    from imnet.kernels.gn.plan import tuning

    tune = str(tuning()) if tune is None else tune
    tune = f", IMNET_GN_TUNE={tune}" if with_tuning and tune else ""
    return (f"{datetime.date.today()} | {torch.cuda.get_device_name()} | torch {torch.__version__}, "
            f"triton {triton.__version__}{tune}")


def cpu_head() -> str:
    """"date, CPU n cores (machine), torch ..": the start of a CPU row's setup cell."""
    import torch

    return f"{datetime.date.today()}, {_cpu()}, torch {torch.__version__}"


def cpu_cells() -> str:
    """"date | CPU n cores (machine), t threads | torch ..": a CPU row's first three cells (gpu_head's)."""
    import torch

    return f"{datetime.date.today()} | {_cpu()}, {torch.get_num_threads()} threads | torch {torch.__version__}"


def _cpu() -> str:
    return f"CPU {os.cpu_count()} cores ({platform.machine()})"


def alternating_rounds(fns: dict, rounds: int, iters: int, warmup: int = 20) -> dict[str, list[float]]:
    """Microseconds per call of each function, per round: every round times `iters` calls of each in
    turn, so drift of a shared machine hits all of them alike. `warmup` calls each first (compiles)."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(iters):
                f()
            times[k].append((time.perf_counter() - t0) / iters * 1e6)
    return times
