"""Shared by the bench scripts: insert result rows into BENCHMARKS.md below a section's marker line,
and the rows' common first columns on a GPU."""

import os

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
    import datetime

    import torch
    import triton

    from imnet.kernels.gn.plan import tuning

    tune = str(tuning()) if tune is None else tune
    tune = f", IMNET_GN_TUNE={tune}" if with_tuning and tune else ""
    return (f"{datetime.date.today()} | {torch.cuda.get_device_name()} | torch {torch.__version__}, "
            f"triton {triton.__version__}{tune}")
