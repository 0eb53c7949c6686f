"""The launch plan: for a norm call's shapes and options, which kernels run, on what grids, with what
integer arguments, constexprs and warps, and which tensors each takes (a launch record, `Launches`).
Pure Python: no Triton, no tensors, so precompile and the tests can read it for any GPU.

Block sizes: BLOCK_C = min(C, 128) channels per program; tiles of 4096 elements (rows x BLOCK_C); a
GPU with `sms` SMs wants at least P = 4*sms programs per kernel. When the N * C/BLOCK_C (sample,
channel block) pairs are fewer than that, e.g. N = 1-2 images per GPU, the spatial rows are cut into
S chunks of R = floor(HW / ceil(P / (N * C/BLOCK_C))) rows, so the reduction grid has >= P programs;
otherwise S = 1. The apply kernels shrink their row tile until they have >= P programs too. The 128,
4096, 4 and the warps per program are the knobs of `Tuning` (IMNET_GN_TUNE="programs_per_sm=2,tile=8192";
bench/gn_tune.py times the alternatives on a GPU, BENCHMARKS.md has its results).
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import os

from imnet.kernels.common import Act

COMBINE_BLOCK = 1024
PARAM_BLOCK_R, PARAM_BLOCK_C = 32, 32   # tile of _bwd_combine's parameter-gradient programs
LOCAL_MAX_C = 64   # most channels (lanes) per program of the local kernels


def cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv is a constexpr function, far slower on the host


def _npow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Tuning:
    """The launch plan's knobs (defaults: see the module docstring; bench/gn_tune.py times others).

    Set for a process with the environment variable IMNET_GN_TUNE (read when this module is first
    imported, e.g. IMNET_GN_TUNE="programs_per_sm=2,tile=8192"), or with set_tuning().
    """
    tile: int = 4096            # elements per (rows x channels) tile: 32 float32 registers per thread at 4 warps
    block_c: int = 128          # most channels per program: 256 contiguous bytes of a bf16 row
    programs_per_sm: int = 4    # each kernel's grid aims at no fewer programs than this x SMs
    warps: int = 0              # warps per program; 0: from the tile (see _warps: 4 at 4096 elements)
    align_rows: int = 0         # 1: split chunks of whole tiles (rows a multiple of the tile's rows, or a
                                # power of 2 below it), so no tile of a chunk runs partly empty
    local: int = 0              # >0: the local kernels (_fwd_local, _bwd_local) with this many channels per
                                # program (rounded to whole groups, at most 64) where their grid alone has the
                                # programs wanted; 0: never

    def __str__(self) -> str:
        """The IMNET_GN_TUNE string of the knobs that differ from the defaults ("" for the defaults)."""
        default = Tuning()
        return ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                        if getattr(self, f.name) != getattr(default, f.name))


_TUNING_RANGES = {"tile": (64, 65536), "block_c": (16, 512), "programs_per_sm": (1, 64), "warps": (0, 16),
                  "align_rows": (0, 1), "local": (0, LOCAL_MAX_C)}


def parse_tuning(text: str) -> Tuning:
    """Tuning from "knob=value,knob=value" (IMNET_GN_TUNE's format); "" gives the defaults."""
    values = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in _TUNING_RANGES:
            raise ValueError(f"IMNET_GN_TUNE: {item!r} is not knob=value with a knob among {', '.join(_TUNING_RANGES)}")
        try:
            v = int(value)
        except ValueError:
            raise ValueError(f"IMNET_GN_TUNE: {name}={value!r} is not an integer") from None
        lo, hi = _TUNING_RANGES[name]
        power_of_2 = name != "programs_per_sm" and v > 0
        if not lo <= v <= hi or (power_of_2 and v & (v - 1)):
            kind = "a power of 2 " if name != "programs_per_sm" else ""
            raise ValueError(f"IMNET_GN_TUNE: {name}={v} must be {kind}in [{lo}, {hi}]"
                             + (" (0: from the tile)" if name == "warps" else ""))
        values[name] = v
    t = Tuning(**values)
    if t.block_c > t.tile:
        raise ValueError(f"IMNET_GN_TUNE: block_c={t.block_c} is larger than tile={t.tile}")
    return t


_tuning = parse_tuning(os.environ.get("IMNET_GN_TUNE", ""))
_on_set_tuning: list = []   # callables run by set_tuning (ops forgets its launch caches)


def tuning() -> Tuning:
    """The knobs in use now."""
    return _tuning


def set_tuning(t: Tuning) -> None:
    """Use these knobs from the next call on."""
    global _tuning
    _tuning = t
    for f in _on_set_tuning:
        f()


def on_set_tuning(f) -> None:
    """Have set_tuning call f() (for caches whose keys do not hold the tuning)."""
    _on_set_tuning.append(f)


@dataclasses.dataclass(frozen=True)
class Plan:
    block_c: int         # channel lanes per program, all kernels
    rows: int            # R: rows per spatial chunk of _fwd_stats / _bwd_reduce
    chunks: int          # S = ceil(HW / R); 1: no split
    block_hw: int        # rows per tile of _fwd_stats / _bwd_reduce
    apply_block_hw: int  # rows per tile of _fwd_apply / _bwd_apply
    combine_block: int   # partials per step of the combine kernels
    num_warps: int
    channels: int        # channels per program: block_c, or the local kernels' whole groups (<= block_c)
    local: bool = False  # the local kernels (S = 1, one tile size)
    one: bool = False    # local, and one tile holds all HW rows (the kernels' ONE: x, dy kept in registers)

    def reduce_programs(self, n: int, c: int) -> int:
        return n * self.chunks * cdiv(c, self.channels)

    def apply_programs(self, n: int, c: int, hw: int) -> int:
        if self.local:
            return self.reduce_programs(n, c)
        return n * cdiv(hw, self.apply_block_hw) * cdiv(c, self.block_c)


def plan(n: int, c: int, hw: int, groups: int, sms: int, rows_per_chunk: int | None = None,
         tuning: Tuning | None = None) -> Plan:
    """Block sizes and the spatial split for an (n, c, hw) input on a GPU with `sms` SMs, with `tuning`
    (default: the current one). rows_per_chunk forces the chunk size (the tests use it to exercise
    the split on small inputs)."""
    return _plan(n, c, hw, groups, sms, rows_per_chunk, _tuning if tuning is None else tuning)


@functools.lru_cache(maxsize=1024)
def _plan(n: int, c: int, hw: int, groups: int, sms: int, rows_per_chunk: int | None, t: Tuning) -> Plan:
    target = t.programs_per_sm * sms
    cpg = c // groups
    if t.local and rows_per_chunk is None and cpg <= LOCAL_MAX_C:
        channels = min(c, max(cpg, t.local // cpg * cpg))   # whole groups
        if n * cdiv(c, channels) >= target:
            block_c = _npow2(channels)
            block_hw = max(1, min(_npow2(hw), t.tile // block_c))
            return Plan(block_c, hw, 1, block_hw, block_hw, min(_npow2(cpg), COMBINE_BLOCK),
                        _warps(t, block_hw * block_c), channels, local=True, one=block_hw >= hw)
    block_c = min(_npow2(c), t.block_c)
    cblocks = cdiv(c, block_c)
    if rows_per_chunk is not None:
        rows = max(1, min(rows_per_chunk, hw))
    else:
        want = cdiv(target, n * cblocks)   # chunks per (sample, channel block)
        rows = hw if want <= 1 else max(1, hw // want)
        tile_rows = max(1, t.tile // block_c)
        if t.align_rows and rows < hw:
            rows = rows // tile_rows * tile_rows if rows >= tile_rows else 1 << (rows.bit_length() - 1)
    chunks = cdiv(hw, rows)
    block_hw = max(1, min(_npow2(rows), t.tile // block_c))
    apply_hw = max(1, min(_npow2(hw), t.tile // block_c))
    while apply_hw > 1 and n * cdiv(hw, apply_hw) * cblocks < target:
        apply_hw //= 2
    combine = min(_npow2(chunks * (c // groups)), COMBINE_BLOCK)
    return Plan(block_c, rows, chunks, block_hw, apply_hw, combine, _warps(t, max(block_hw, apply_hw) * block_c),
                block_c)


def _warps(t: Tuning, tile: int) -> int:
    """Warps per program for a tile of `tile` elements: the knob, else one per 1024 elements from 4096
    (at most 16: 32 float32 registers per thread and tile up to 16384), 4 from 2048, 2 from 512, else 1."""
    if t.warps:
        return t.warps
    return min(16, tile // 1024) if tile >= 4096 else 4 if tile >= 2048 else 2 if tile >= 512 else 1


@dataclasses.dataclass(frozen=True)
class Step:
    """One launch: kernel name, grid, the tensors it takes (by role: x, y, residual, stats, weight,
    bias, dy, dr, dx, part, dgamma, dbeta), the arguments after the tensors, constexprs, warps."""
    name: str
    grid: tuple
    tensors: tuple
    scalars: tuple
    constexprs: dict
    num_warps: int
    pick: object = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        # role -> tensor dict to the launch's tensor tuple, in C (one call a launch on the host)
        get = operator.itemgetter(*self.tensors)
        object.__setattr__(self, "pick", get if len(self.tensors) > 1 else (lambda d: (get(d),)))


@dataclasses.dataclass(frozen=True)
class Launches:
    """The launch record of one norm call (a forward, or a backward). The float32 scratch buffer is
    (2, plane): per row the N*S*C per-(chunk, channel) partials, then at offset moff = N*S*C the N*G
    per-group values (the forward's: mean, rstd; the backward's: c1, c2)."""
    plan: Plan
    plane: int
    moff: int
    steps: tuple


def layout(n: int, c: int, hw: int, groups: int, sms: int, rows_per_chunk: int | None = None,
           tuning: Tuning | None = None) -> tuple[Plan, int, int]:
    """(plan, plane, moff) of a call: see Launches."""
    p = plan(n, c, hw, groups, sms, rows_per_chunk, tuning)
    moff = n * p.chunks * c
    return p, -(-(moff + n * groups) // 16) * 16, moff   # 64-byte aligned planes


def forward(n: int, c: int, hw: int, groups: int, eps: float, act: Act, sms: int,
            rows_per_chunk: int | None = None, tuning: Tuning | None = None) -> Launches:
    """The launches of a forward with epilogue `act` (RESIDUAL_RELU reads the residual)."""
    p, plane, moff = layout(n, c, hw, groups, sms, rows_per_chunk, tuning)
    cpg, cblocks = c // groups, cdiv(c, p.channels)
    apply = ("x", "y", "residual" if act == Act.RESIDUAL_RELU else "x", "stats", "weight", "bias")
    if p.local:
        return Launches(p, plane, moff, (
            Step("_fwd_local", (n * cblocks,), apply, (hw, c, groups, cpg, p.channels, cblocks, plane, moff, eps),
                 dict(BLOCK_HW=p.block_hw, BLOCK_C=p.block_c, ACT=int(act), ONE=p.one), p.num_warps),))
    hwb = cdiv(hw, p.apply_block_hw)
    return Launches(p, plane, moff, (
        Step("_fwd_stats", (n * p.chunks, cblocks), ("x", "stats"), (hw, c, p.chunks, p.rows, plane),
             dict(BLOCK_HW=p.block_hw, BLOCK_C=p.block_c), p.num_warps),
        Step("_fwd_combine", (n * groups,), ("stats",), (groups, hw, c, p.chunks, p.rows, cpg, plane, moff, eps),
             dict(BLOCK=p.combine_block), 4),
        Step("_fwd_apply", (n * hwb, cblocks), apply, (hw, c, groups, cpg, hwb, plane, moff),
             dict(BLOCK_HW=p.apply_block_hw, BLOCK_C=p.block_c, ACT=int(act)), p.num_warps)))


def backward(n: int, c: int, hw: int, groups: int, act: Act, sms: int, rows_per_chunk: int | None,
             need_dx: bool, need_dparams: bool, tuning: Tuning | None = None) -> Launches:
    """The launches of the backward of forward(n, c, hw, groups, ..., act, sms, rows_per_chunk):
    dx if need_dx, dgamma and dbeta if need_dparams, d residual always with RESIDUAL_RELU."""
    p, plane, moff = layout(n, c, hw, groups, sms, rows_per_chunk, tuning)
    cpg, cblocks = c // groups, cdiv(c, p.channels)
    residual = act == Act.RESIDUAL_RELU
    # Placeholders (x, weight, bias) where the epilogue or the gradients asked for need no tensor.
    y, dr = ("y", "dr") if residual else ("x", "x")
    if p.local:   # dx (with c1, c2) in the same launch
        steps = [Step("_bwd_local", (n * cblocks,),
                      ("x", "dy", y, dr, "dx" if need_dx else "x", "stats", "weight", "bias", "part"),
                      (hw, c, groups, cpg, p.channels, cblocks, plane, moff),
                      dict(BLOCK_HW=p.block_hw, BLOCK_C=p.block_c, ACT=int(act), NEED_DX=need_dx, ONE=p.one),
                      p.num_warps)]
    else:
        steps = [Step("_bwd_reduce", (n * p.chunks, cblocks), ("x", "dy", y, dr, "stats", "weight", "bias", "part"),
                      (hw, c, groups, cpg, p.chunks, p.rows, plane, moff),
                      dict(BLOCK_HW=p.block_hw, BLOCK_C=p.block_c, ACT=int(act)), p.num_warps)]
    # One launch for the groups' c1, c2 (if dx is needed, split plan) and the parameter gradients (if needed).
    ng = n * groups if need_dx and not p.local else 0
    pblocks = cdiv(c, PARAM_BLOCK_C) if need_dparams else 0
    if ng + pblocks:
        steps.append(Step("_bwd_combine", (ng + pblocks,),
                          ("part", "stats", "weight", "dgamma" if need_dparams else "weight",
                           "dbeta" if need_dparams else "bias"),
                          (groups, hw, c, p.chunks, cpg, plane, moff, ng, n * p.chunks),
                          dict(BLOCK=p.combine_block, PBLOCK_R=PARAM_BLOCK_R, PBLOCK_C=PARAM_BLOCK_C), 4))
    if need_dx and not p.local:
        hwb = cdiv(hw, p.apply_block_hw)
        # With the residual epilogue dr is the masked dy: read it instead of dy (and y).
        steps.append(Step("_bwd_apply", (n * hwb, cblocks),
                          ("x", "dr" if residual else "dy", "dx", "stats", "part", "weight", "bias"),
                          (hw, c, groups, cpg, hwb, plane, moff),
                          dict(BLOCK_HW=p.apply_block_hw, BLOCK_C=p.block_c,
                               ACT=int(Act.RELU if act == Act.RELU else Act.NONE)), p.num_warps))
    return Launches(p, plane, moff, tuple(steps))
