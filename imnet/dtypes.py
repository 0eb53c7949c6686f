"""The one table from precision names to torch dtypes: config's precision.amp ("off": no autocast) and the
kernel tools' --dtypes."""

from __future__ import annotations

import torch

# in the order the tools list them by default
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def amp_dtype(amp: str) -> torch.dtype | None:
    """precision.amp -> the autocast dtype, None for "off"."""
    return None if amp == "off" else DTYPES[amp]
