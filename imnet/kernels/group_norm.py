"""Channels-last (NHWC) GroupNorm in Triton: forward, backward, fused ReLU and residual-add + ReLU.

The input is an (N, C, H, W) tensor in channels_last memory format, i.e. an (N, HW, C) buffer whose
rows are contiguous vectors of C channels. Group g of sample n is the CPG = C / G channels
[g*CPG, (g+1)*CPG) of the HW rows of sample n. Statistics and accumulation are float32 whatever the
input dtype (float32, bfloat16, float16); the output has the input's dtype and layout.

Forward, three launches:
  1. _fwd_stats   grid (N*S, C/BLOCK_C). Each program reads one spatial chunk of R rows of one
                  sample for BLOCK_C channels, tile by tile, and writes per-channel (mean, M2) of the
                  chunk. Within a tile: two passes in registers (mean, then sum of squared deviations
                  from it); tiles are merged with Chan et al.'s formula. No E[x^2] - E[x]^2 anywhere.
  2. _fwd_combine grid (N*G). Merges the S*CPG partials of a group (Chan again: pooled mean, then
                  M2 = sum M2_i + sum n_i (mean_i - mean)^2) into mean and rstd, saved for backward.
  3. _fwd_apply   grid (N*ceil(HW/BLOCK_HW), C/BLOCK_C): y = (x - mean) * (rstd*gamma) + beta over
                  tiles of contiguous channel vectors (coalesced in NHWC), with the fused epilogue.

Backward (mean_g is over the group's CPG channels x HW positions):
  dx = rstd * (dy*gamma - mean_g(dy*gamma) - xhat * mean_g(dy*gamma*xhat)),  xhat = (x - mean) * rstd
  dgamma_c = sum_{n,hw} dy*xhat,   dbeta_c = sum_{n,hw} dy
  1. _bwd_reduce  same grid as _fwd_stats: per-channel, per-chunk sum(dy) and sum(dy*xhat), xhat
                  recomputed from x and the saved mean/rstd (xhat is never stored). With a fused ReLU
                  dy is masked first (see the epilogues below).
  2. _bwd_combine grid (N*G + C/32): the first N*G programs c1 = rstd*mean_g(gamma*dy) and
                  c2 = rstd^2*mean_g(gamma*dy*xhat); the others dgamma, dbeta of 32 channels each,
                  sums of the same partials over (n, chunk), in a fixed order (deterministic, no
                  atomics), stored in the parameters' dtype.
  3. _bwd_apply   same grid as _fwd_apply: dx = rstd*gamma*dy - c1 - c2*(x - mean).

Epilogues (ACT): 0 none; 1 ReLU: y = relu(v), and backward recomputes v from x (already read) for
the mask v > 0, so fusing costs no extra bytes; 2 residual + ReLU: y = relu(v + r), backward masks by
the saved output y > 0 (y is the block output the next layer keeps anyway) and writes the masked
gradient once, which is the residual's gradient and what _bwd_apply reads instead of dy.

Scratch: the partials and the per-group values share one float32 (2, PLANE) buffer per direction
(see _forward): the forward's holds (mean, rstd), saved for backward; the backward's (c1, c2).

Memory traffic: forward reads x twice and writes y; backward reads x and dy twice and writes dx
(3 and 5 tensor passes; the least possible is 2 and 3). The apply kernels walk their tiles in the reverse order of the
reduction kernels, so their first reads hit what is still in L2; at 1-2 images per GPU the whole
tensor fits in L2 (50 MB on an H100). Per-(chunk, channel) partials are float32, 8 bytes x C per
chunk: small next to the tensor except for the 7x7 layers at N = 2, where everything is latency.

Local kernels (opt-in: IMNET_GN_TUNE="local=16"; not yet timed on a GPU): where N * C/16 programs
fill the GPU (large N), one program per (sample, block of whole groups, e.g. 16 channels) does it all:
  forward  _fwd_local: per-channel (mean, M2) over its HW rows (Chan, as _fwd_stats), the groups'
           statistics from its own lanes, then y over the same rows in reverse tile order. 1 launch.
  backward _bwd_local: sum(dy), sum(dy*xhat) per channel (stored for dgamma, dbeta), c1 and c2 of
           its groups, then dx over the same rows in reverse; + _bwd_combine's parameter programs
           for dgamma, dbeta (not needed: 1 launch). 2 launches.
Where one tile holds all HW rows (npow2(HW) x BLOCK_C <= tile: with local=16 at 256 images the 7x7
layers and the 14x14 ones up to 512 channels with the default tile, all 14x14 and 28x28 ones too
with tile=16384; tested), the program keeps x (and dy) in registers from its statistics to its
output (constexpr ONE): the least traffic, 2 and 3 tensor passes. Otherwise it reads x (and dy)
twice, the second read right after its own first: from L2, not DRAM, if the data of the programs
resident at once fits there. A 56x56 sample at 16 channels is 100 KB in bf16, so an H100 (132 SMs,
50 MB of L2) can hold about 3 resident programs per SM in the forward and 1 in the backward (x and
dy); the 112x112 stem is 4x larger. Registers decide residency: with tile=16384 a program has 16
warps, and at its 79-128 registers per thread (sm_90) only one fits an SM (65536).
Whether any of this is faster is what bench/gn_tune.py and bench/norm_kernels.py --tune measure on
a GPU.

Launch plan (plan()): BLOCK_C = min(C, 128) channels per program; tiles of 4096 elements (rows x
BLOCK_C); a GPU with `sms` SMs wants at least P = 4*sms programs per kernel. When the N * C/BLOCK_C
(sample, channel block) pairs are fewer than that, e.g. N = 1-2 images per GPU, the spatial rows are
cut into S chunks of R = floor(HW / ceil(P / (N * C/BLOCK_C))) rows, so the reduction grid has
>= P programs; otherwise S = 1. The apply kernels shrink their row tile until they have >= P
programs too. Both hold for every ResNet-50 norm shape at N = 2 on an H100 (132 SMs), see
tests/test_gn_kernels.py. The 128, 4096, 4 and the warps per program are the knobs of `Tuning`
(IMNET_GN_TUNE="programs_per_sm=2,tile=8192"; bench/gn_tune.py times the alternatives on a GPU: on an
H100, 4 programs per SM beat 2 and 8, see BENCHMARKS.md).

torch.compile: group_norm_checked calls the autograd Function in eager mode and, while Dynamo
traces, the custom ops imnet::group_norm_fwd / imnet::group_norm_bwd around the same launchers, so a
compiled model keeps its norms in one graph (tests/test_gn_kernels.py: no graph break, gradients
equal to eager's).

Interpreter: `triton.jit` picks the CPU interpreter or the compiler when it decorates a function,
from TRITON_INTERPRET at that moment. The kernels below and the helpers they call are plain
functions decorated on first use, once per mode (`_jit()`), so what TRITON_INTERPRET says when the
kernel runs decides, whatever was imported before.
"""

import contextlib
import dataclasses
import functools
import os
import types
from typing import Optional

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.runtime import driver

from imnet.kernels.reference import check_act

COMBINE_BLOCK = 1024
PARAM_BLOCK_R, PARAM_BLOCK_C = 32, 32   # tile of _bwd_combine's parameter-gradient programs

ACT_CODES = {None: 0, "relu": 1, "residual_relu": 2}
LOCAL_MAX_C = 64   # most channels (lanes) per program of the local kernels


# ---------------------------------------------------------------------------------------------
# Kernels and their helpers (plain functions: see "Interpreter" above).
#
# Besides the helpers below, they use only Triton builtins. tl.sum and tl.zeros are themselves
# @triton.jit functions, decorated when triton is imported, so under the interpreter they fail
# ("Cannot call @triton.jit'd outside of the scope of a kernel") unless TRITON_INTERPRET was already
# set when triton was first imported, which a test process cannot promise. tl.reduce(x, 0,
# _sum_combine) is what tl.sum does for floats, and the interpreter recognizes that combine function
# and sums with numpy; tl.full replaces tl.zeros.
# ---------------------------------------------------------------------------------------------

_sum_combine = tl.standard._sum_combine


# Helpers the kernels call (decorated like them, see _jit; Triton inlines them).

def _chunk_program(S, C, BLOCK_C: tl.constexpr):
    # A reduction program of grid (N*S, C/BLOCK_C): its id n*S + s, sample n, chunk s, channels.
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return pid, pid // S, pid % S, cols, cols < C


def _apply_program(HW, C, HWB, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    # An apply program of grid (N*HWB, C/BLOCK_C), its tile: sample, channels, masks, offsets. The
    # programs run in reverse order of the reduction's: the data read last, likeliest still in L2,
    # is read first.
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    n = pid // HWB
    cols = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mask, off = _rows(C, cols, cmask, (pid % HWB) * BLOCK_HW, HW, BLOCK_HW)
    return n, cols, cmask, mask, n.to(tl.int64) * HW * C + off


def _local_program(CB, GC, C, CPG, BLOCK_C: tl.constexpr):
    # A local program of grid (N*CB,): sample n, its GC channels (whole groups) in BLOCK_C lanes, each
    # lane's group, and which lanes share a group (over the valid lanes).
    pid = tl.program_id(0)
    lane = tl.arange(0, BLOCK_C)
    cols = (pid % CB) * GC + lane
    cmask = (lane < GC) & (cols < C)
    grp = cols // CPG
    return pid // CB, cols, cmask, grp, (grp[:, None] == grp[None, :]) & cmask[None, :]


def _group_sum(v, same):
    # Per lane: the sum of v over the lanes of its group (`same` from _local_program).
    return tl.reduce(tl.where(same, v[None, :], 0.0), 1, _sum_combine)


def _group_stats(STATS, W, B, n, G, CPG, cols, cmask, PLANE, MOFF):
    # Per channel lane: its group's mean and rstd (saved by the forward), gamma and beta, float32.
    grp = STATS + MOFF + n * G + cols // CPG
    return (tl.load(grp, mask=cmask, other=0.0), tl.load(grp + PLANE, mask=cmask, other=0.0),
            tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32),
            tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32))


def _rows(C, cols, cmask, t, r1, BLOCK_HW: tl.constexpr):
    # The tile of rows [t, t + BLOCK_HW) (those below r1) of a sample: mask, and offsets within the
    # sample (int32, so half the registers of int64 ones: kernel_applies wants < 2**31 elements a sample).
    rows = t + tl.arange(0, BLOCK_HW)
    return (rows < r1)[:, None] & cmask[None, :], rows[:, None] * C + cols[None, :]


def _tile_moments(x, mask, nb):
    # Per-channel (mean, M2) of a float32 tile holding nb valid rows: two passes in registers.
    mb = tl.reduce(x, 0, _sum_combine) / nb
    d = tl.where(mask, x - mb[None, :], 0.0)
    return mb, tl.reduce(d * d, 0, _sum_combine)


def _moments(X, C, cols, cmask, r0, r1, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    # Per-channel (mean, M2) of rows [r0, r1) of the sample at X: each tile's own (mean, M2),
    # tiles merged with Chan et al.'s formula.
    mean = tl.full([BLOCK_C], 0.0, tl.float32)
    m2 = tl.full([BLOCK_C], 0.0, tl.float32)
    for t in range(r0, r1, BLOCK_HW):
        mask, off = _rows(C, cols, cmask, t, r1, BLOCK_HW)
        nb = tl.minimum(r1 - t, BLOCK_HW).to(tl.float32)   # rows in this tile
        na = (t - r0) * 1.0                                 # rows merged so far (full tiles)
        mb, m2b = _tile_moments(tl.load(X + off, mask=mask, other=0.0).to(tl.float32), mask, nb)
        delta = mb - mean
        w = nb / (na + nb)
        mean += delta * w
        m2 += m2b + delta * delta * (na * w)
    return mean, m2


def _normalized(x, RES, off, mask, mean, a, beta, ACT: tl.constexpr):
    # The forward's output tile (float32) from the x tile: norm, affine, epilogue.
    v = (x - mean[None, :]) * a[None, :] + beta[None, :]
    if ACT == 2:
        v += tl.load(RES + off, mask=mask, other=0.0).to(tl.float32)
    if ACT != 0:
        v = tl.maximum(v, 0.0)
    return v


def _masked_dy(x, dy, Y, off, mask, mean, a, beta, ACT: tl.constexpr):
    # dy where the epilogue's ReLU passed the gradient: ReLU recomputes the forward's v from x (same
    # expression as _normalized), residual + ReLU reads the output y.
    if ACT == 1:
        v = (x - mean[None, :]) * a[None, :] + beta[None, :]
        dy = tl.where(v > 0.0, dy, 0.0)
    if ACT == 2:
        y = tl.load(Y + off, mask=mask, other=0.0).to(tl.float32)
        dy = tl.where(y > 0.0, dy, 0.0)
    return dy


def _tile_dy(X, DY, Y, DR, off, mask, mean, rstd, a, beta, ACT: tl.constexpr):
    # A tile's float32 x and dy, dy masked by the epilogue (and, for residual + ReLU, stored: it is
    # the residual's gradient), and its per-channel sum(dy), sum(dy * xhat).
    x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
    dy = _masked_dy(x, tl.load(DY + off, mask=mask, other=0.0).to(tl.float32), Y, off, mask, mean, a, beta, ACT)
    if ACT == 2:
        tl.store(DR + off, dy.to(DR.dtype.element_ty), mask=mask)
    xhat = (x - mean[None, :]) * rstd[None, :]
    return x, dy, tl.reduce(dy, 0, _sum_combine), tl.reduce(dy * xhat, 0, _sum_combine)


def _dy_sums(X, DY, Y, DR, C, cols, cmask, r0, r1, mean, rstd, a, beta,
             BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, ACT: tl.constexpr):
    # Per-channel sum(dy) and sum(dy * xhat) over rows [r0, r1) of the sample at X, DY, ... (see _tile_dy).
    sdy = tl.full([BLOCK_C], 0.0, tl.float32)
    sdyx = tl.full([BLOCK_C], 0.0, tl.float32)
    for t in range(r0, r1, BLOCK_HW):
        mask, off = _rows(C, cols, cmask, t, r1, BLOCK_HW)
        x, dy, s1, s2 = _tile_dy(X, DY, Y, DR, off, mask, mean, rstd, a, beta, ACT)
        sdy += s1
        sdyx += s2
    return sdy, sdyx


def _dx(x, dy, mean, a, c1, c2):
    return a[None, :] * dy - c1[None, :] - c2[None, :] * (x - mean[None, :])


# Kernels.

def _fwd_stats(X, PART, HW, C, S, R, PLANE,
               BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    pid, n, s, cols, cmask = _chunk_program(S, C, BLOCK_C)
    r0 = s * R
    mean, m2 = _moments(X + n.to(tl.int64) * HW * C, C, cols, cmask, r0, tl.minimum(r0 + R, HW), BLOCK_HW, BLOCK_C)
    out = PART + pid.to(tl.int64) * C + cols    # partial (n*S + s, c): plane 0 mean, plane 1 M2
    tl.store(out, mean, mask=cmask)
    tl.store(out + PLANE, m2, mask=cmask)


def _fwd_combine(PART, G, HW, C, S, R, CPG, PLANE, MOFF, eps,
                 BLOCK: tl.constexpr):
    pid = tl.program_id(0)                      # n * G + g
    n = pid // G
    g = pid % G
    K = S * CPG
    total = (HW * 1.0) * CPG   # float32 (HW, CPG may be the constant 1)
    base = PART + n.to(tl.int64) * S * C + g * CPG   # partial (s, j) at base + s*C + j
    acc = tl.full([BLOCK], 0.0, tl.float32)
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        m = k < K
        s = k // CPG
        cnt = tl.minimum(R, HW - s * R).to(tl.float32)
        mu = tl.load(base + s * C + k % CPG, mask=m, other=0.0)
        acc += tl.where(m, cnt * mu, 0.0)
    mean = tl.reduce(acc, 0, _sum_combine) / total
    acc = tl.full([BLOCK], 0.0, tl.float32)
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        m = k < K
        s = k // CPG
        cnt = tl.minimum(R, HW - s * R).to(tl.float32)
        off = s * C + k % CPG
        mu = tl.load(base + off, mask=m, other=0.0)
        m2 = tl.load(base + PLANE + off, mask=m, other=0.0)
        d = mu - mean
        acc += tl.where(m, m2 + cnt * d * d, 0.0)
    var = tl.reduce(acc, 0, _sum_combine) / total
    tl.store(PART + MOFF + pid, mean)
    tl.store(PART + PLANE + MOFF + pid, 1.0 / tl.sqrt(var + eps))


def _fwd_apply(X, Y, RES, STATS, W, B, HW, C, G, CPG, HWB, PLANE, MOFF,
               BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, ACT: tl.constexpr):
    n, cols, cmask, mask, off = _apply_program(HW, C, HWB, BLOCK_HW, BLOCK_C)
    mean, rstd, gamma, beta = _group_stats(STATS, W, B, n, G, CPG, cols, cmask, PLANE, MOFF)
    v = _normalized(tl.load(X + off, mask=mask, other=0.0).to(tl.float32), RES, off, mask, mean, rstd * gamma, beta,
                    ACT)
    tl.store(Y + off, v.to(Y.dtype.element_ty), mask=mask)


def _bwd_reduce(X, DY, Y, DR, STATS, W, B, PART, HW, C, G, CPG, S, R, PLANE, MOFF,
                BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, ACT: tl.constexpr):
    pid, n, s, cols, cmask = _chunk_program(S, C, BLOCK_C)
    r0 = s * R
    mean, rstd, gamma, beta = _group_stats(STATS, W, B, n, G, CPG, cols, cmask, PLANE, MOFF)
    base = n.to(tl.int64) * HW * C
    sdy, sdyx = _dy_sums(X + base, DY + base, Y + base, DR + base, C, cols, cmask, r0, tl.minimum(r0 + R, HW),
                         mean, rstd, rstd * gamma, beta, BLOCK_HW, BLOCK_C, ACT)
    out = PART + pid.to(tl.int64) * C + cols    # plane 0 sum(dy), plane 1 sum(dy*xhat)
    tl.store(out, sdy, mask=cmask)
    tl.store(out + PLANE, sdyx, mask=cmask)


def _bwd_combine(PART, STATS, W, DW, DB, G, HW, C, S, CPG, PLANE, MOFF, NG, ROWS,
                 BLOCK: tl.constexpr, PBLOCK_R: tl.constexpr, PBLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    if pid < NG:                                # n * G + g: c1, c2 of the group (NG = 0: dx not needed)
        n = pid // G
        g = pid % G
        K = S * CPG
        base = PART + n.to(tl.int64) * S * C + g * CPG
        a1 = tl.full([BLOCK], 0.0, tl.float32)
        a2 = tl.full([BLOCK], 0.0, tl.float32)
        for k0 in range(0, K, BLOCK):
            k = k0 + tl.arange(0, BLOCK)
            m = k < K
            j = k % CPG
            off = (k // CPG) * C + j
            gamma = tl.load(W + g * CPG + j, mask=m, other=0.0).to(tl.float32)
            a1 += gamma * tl.load(base + off, mask=m, other=0.0)
            a2 += gamma * tl.load(base + PLANE + off, mask=m, other=0.0)
        total = (HW * 1.0) * CPG   # float32 (HW, CPG may be the constant 1)
        rstd = tl.load(STATS + PLANE + MOFF + pid)
        tl.store(PART + MOFF + pid, rstd * (tl.reduce(a1, 0, _sum_combine) / total))          # c1
        tl.store(PART + PLANE + MOFF + pid, rstd * rstd * (tl.reduce(a2, 0, _sum_combine) / total))  # c2
    else:                                       # dbeta, dgamma of PBLOCK_C channels: sums over ROWS = N*S
        cols = (pid - NG) * PBLOCK_C + tl.arange(0, PBLOCK_C)
        cmask = cols < C
        s1 = tl.full([PBLOCK_R, PBLOCK_C], 0.0, tl.float32)
        s2 = tl.full([PBLOCK_R, PBLOCK_C], 0.0, tl.float32)
        for r0 in range(0, ROWS, PBLOCK_R):
            rows = r0 + tl.arange(0, PBLOCK_R)
            m = (rows < ROWS)[:, None] & cmask[None, :]
            off = rows[:, None].to(tl.int64) * C + cols[None, :]
            s1 += tl.load(PART + off, mask=m, other=0.0)
            s2 += tl.load(PART + PLANE + off, mask=m, other=0.0)
        tl.store(DB + cols, tl.reduce(s1, 0, _sum_combine).to(DB.dtype.element_ty), mask=cmask)
        tl.store(DW + cols, tl.reduce(s2, 0, _sum_combine).to(DW.dtype.element_ty), mask=cmask)


def _bwd_apply(X, DY, DX, STATS, PART, W, B, HW, C, G, CPG, HWB, PLANE, MOFF,
               BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, ACT: tl.constexpr):
    n, cols, cmask, mask, off = _apply_program(HW, C, HWB, BLOCK_HW, BLOCK_C)
    mean, rstd, gamma, beta = _group_stats(STATS, W, B, n, G, CPG, cols, cmask, PLANE, MOFF)
    a = rstd * gamma
    cgrp = PART + MOFF + n * G + cols // CPG
    c1 = tl.load(cgrp, mask=cmask, other=0.0)
    c2 = tl.load(cgrp + PLANE, mask=cmask, other=0.0)
    x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
    dy = _masked_dy(x, tl.load(DY + off, mask=mask, other=0.0).to(tl.float32), DY, off, mask, mean, a, beta, ACT)
    tl.store(DX + off, _dx(x, dy, mean, a, c1, c2).to(DX.dtype.element_ty), mask=mask)


# Local kernels (Tuning.local): a program owns whole groups of one sample (GC <= BLOCK_C channels,
# all HW rows), so it has its groups' statistics itself: one sweep over its rows for them, a second,
# in reverse order, to apply them. No partials, no combine launch, and the second sweep reads what
# the program itself has just read, from L2 when the programs resident at once read less than it
# holds (narrow blocks). Chosen only where these programs alone fill the GPU (large N).

def _fwd_local(X, Y, RES, STATS, W, B, HW, C, G, CPG, GC, CB, PLANE, MOFF, eps,
               BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, ACT: tl.constexpr, ONE: tl.constexpr):
    n, cols, cmask, grp, same = _local_program(CB, GC, C, CPG, BLOCK_C)
    base = n.to(tl.int64) * HW * C              # the sample's tensors from here on
    X, Y, RES = X + base, Y + base, RES + base
    if ONE:                                     # one tile holds all HW rows: x stays in registers
        mask, off = _rows(C, cols, cmask, 0, HW, BLOCK_HW)
        x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
        mean, m2 = _tile_moments(x, mask, HW * 1.0)
    else:
        mean, m2 = _moments(X, C, cols, cmask, 0, HW, BLOCK_HW, BLOCK_C)   # per channel, all rows
    # The groups' (mean, M2) from their channels' (all HW rows each), broadcast back to the lanes.
    cpg = CPG * 1.0
    gmean = _group_sum(mean, same) / cpg
    var = _group_sum(m2 + (HW * 1.0) * (mean - gmean) * (mean - gmean), same) / ((HW * 1.0) * cpg)
    rstd = 1.0 / tl.sqrt(var + eps)
    first = cmask & (cols % CPG == 0)
    tl.store(STATS + MOFF + n * G + grp, gmean, mask=first)
    tl.store(STATS + PLANE + MOFF + n * G + grp, rstd, mask=first)
    a = rstd * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    beta = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
    if ONE:
        tl.store(Y + off, _normalized(x, RES, off, mask, gmean, a, beta, ACT).to(Y.dtype.element_ty), mask=mask)
    else:
        nt = (HW + BLOCK_HW - 1) // BLOCK_HW
        for i in range(0, nt):                  # last tile read first: likeliest still cached
            mask, off = _rows(C, cols, cmask, (nt - 1 - i) * BLOCK_HW, HW, BLOCK_HW)
            v = _normalized(tl.load(X + off, mask=mask, other=0.0).to(tl.float32), RES, off, mask, gmean, a, beta,
                            ACT)
            tl.store(Y + off, v.to(Y.dtype.element_ty), mask=mask)


def _bwd_local(X, DY, Y, DR, DX, STATS, W, B, PART, HW, C, G, CPG, GC, CB, PLANE, MOFF,
               BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, ACT: tl.constexpr, NEED_DX: tl.constexpr,
               ONE: tl.constexpr):
    n, cols, cmask, grp, same = _local_program(CB, GC, C, CPG, BLOCK_C)
    mean, rstd, gamma, beta = _group_stats(STATS, W, B, n, G, CPG, cols, cmask, PLANE, MOFF)
    a = rstd * gamma
    base = n.to(tl.int64) * HW * C              # the sample's tensors from here on
    X, DY, Y, DR, DX = X + base, DY + base, Y + base, DR + base, DX + base
    if ONE:                                     # one tile: x and the masked dy stay in registers
        mask, off = _rows(C, cols, cmask, 0, HW, BLOCK_HW)
        x, dy, sdy, sdyx = _tile_dy(X, DY, Y, DR, off, mask, mean, rstd, a, beta, ACT)
    else:
        sdy, sdyx = _dy_sums(X, DY, Y, DR, C, cols, cmask, 0, HW, mean, rstd, a, beta, BLOCK_HW, BLOCK_C, ACT)
    out = PART + n.to(tl.int64) * C + cols      # per (sample, channel), for _bwd_combine's dgamma, dbeta
    tl.store(out, sdy, mask=cmask)
    tl.store(out + PLANE, sdyx, mask=cmask)
    if NEED_DX:
        total = (HW * 1.0) * CPG
        c1 = rstd * (_group_sum(gamma * sdy, same) / total)
        c2 = rstd * rstd * (_group_sum(gamma * sdyx, same) / total)
        if ONE:
            tl.store(DX + off, _dx(x, dy, mean, a, c1, c2).to(DX.dtype.element_ty), mask=mask)
        else:
            nt = (HW + BLOCK_HW - 1) // BLOCK_HW
            for i in range(0, nt):              # last tile read first, see _fwd_local
                mask, off = _rows(C, cols, cmask, (nt - 1 - i) * BLOCK_HW, HW, BLOCK_HW)
                x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
                # (residual + ReLU: the mask again from y, not the dr just stored: other threads wrote it)
                dy = _masked_dy(x, tl.load(DY + off, mask=mask, other=0.0).to(tl.float32), Y, off, mask, mean, a,
                                beta, ACT)
                tl.store(DX + off, _dx(x, dy, mean, a, c1, c2).to(DX.dtype.element_ty), mask=mask)


_HELPERS = (_chunk_program, _apply_program, _local_program, _group_sum, _group_stats, _rows, _tile_moments,
            _moments, _normalized, _masked_dy, _tile_dy, _dy_sums, _dx)
_KERNELS = (_fwd_stats, _fwd_combine, _fwd_apply, _bwd_reduce, _bwd_combine, _bwd_apply, _fwd_local, _bwd_local)


def _rebound(f, scope: dict):
    """f with `scope` as its globals (annotations kept: they mark the constexpr parameters)."""
    g = types.FunctionType(f.__code__, scope, f.__name__, f.__defaults__, f.__closure__)
    g.__annotations__ = dict(f.__annotations__)
    return g


def interpreting() -> bool:
    """TRITON_INTERPRET as Triton reads it: the kernels run on the CPU, in numpy."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=None)
def _jit(interpret: bool) -> dict:
    """The kernels decorated for the interpreter or the compiler, as asked, whatever TRITON_INTERPRET
    says now (triton.jit reads it while decorating)."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        # Each mode's kernels see that mode's helpers: copies of the functions whose globals are a
        # copy of this module's, with the helpers' names bound to the decorated helpers.
        scope = dict(globals())
        scope.update({f.__name__: triton.jit(_rebound(f, scope)) for f in _HELPERS})
        return {f.__name__: triton.jit(_rebound(f, scope)) for f in _KERNELS}
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


def _spec(t) -> tuple | None:
    """What Triton's JIT specializes a tensor argument on."""
    return None if t is None else (t.dtype, t.data_ptr() % 16 == 0)


def kernels_interpreted() -> bool:
    """True when the kernels that would run now are the CPU interpreter's (for the tests)."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(_jit(interpreting())["_fwd_apply"], InterpretedFunction)


# ---------------------------------------------------------------------------------------------
# Launch plan.
# ---------------------------------------------------------------------------------------------

def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv is a constexpr function: about 6 us a call on the host (measured here)


def _npow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Tuning:
    """The launch plan's knobs. Defaults: see the module docstring; bench/gn_tune.py times others.

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


def tuning() -> Tuning:
    """The knobs in use now."""
    return _tuning


def set_tuning(t: Tuning) -> None:
    """Use these knobs from the next call on (forgets the launch caches made so far)."""
    global _tuning
    _tuning = t
    _calls.clear()  # their keys do not hold the plan (_plan's do)


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
        return n * self.chunks * _cdiv(c, self.channels)

    def apply_programs(self, n: int, c: int, hw: int) -> int:
        if self.local:
            return self.reduce_programs(n, c)
        return n * _cdiv(hw, self.apply_block_hw) * _cdiv(c, self.block_c)


def plan(n: int, c: int, hw: int, groups: int, sms: int, rows_per_chunk: int | None = None) -> Plan:
    """Block sizes and the spatial split for an (n, c, hw) input with the current tuning (see the
    module docstring). rows_per_chunk forces the chunk size (the tests use it to exercise the split
    on small inputs)."""
    return _plan(n, c, hw, groups, sms, rows_per_chunk, _tuning)


@functools.lru_cache(maxsize=1024)
def _plan(n: int, c: int, hw: int, groups: int, sms: int, rows_per_chunk: int | None, t: Tuning) -> Plan:
    target = t.programs_per_sm * sms
    cpg = c // groups
    if t.local and rows_per_chunk is None and cpg <= LOCAL_MAX_C:
        channels = min(c, max(cpg, t.local // cpg * cpg))   # whole groups
        if n * _cdiv(c, channels) >= target:
            block_c = _npow2(channels)
            block_hw = max(1, min(_npow2(hw), t.tile // block_c))
            return Plan(block_c, hw, 1, block_hw, block_hw, min(_npow2(cpg), COMBINE_BLOCK),
                        _warps(t, block_hw * block_c), channels, local=True, one=block_hw >= hw)
    block_c = min(_npow2(c), t.block_c)
    cblocks = _cdiv(c, block_c)
    if rows_per_chunk is not None:
        rows = max(1, min(rows_per_chunk, hw))
    else:
        want = _cdiv(target, n * cblocks)   # chunks per (sample, channel block)
        rows = hw if want <= 1 else max(1, hw // want)
        tile_rows = max(1, t.tile // block_c)
        if t.align_rows and rows < hw:
            rows = rows // tile_rows * tile_rows if rows >= tile_rows else 1 << (rows.bit_length() - 1)
    chunks = _cdiv(hw, rows)
    block_hw = max(1, min(_npow2(rows), t.tile // block_c))
    apply_hw = max(1, min(_npow2(hw), t.tile // block_c))
    while apply_hw > 1 and n * _cdiv(hw, apply_hw) * cblocks < target:
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


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter runs programs one after another: fewest programs is fastest


# ---------------------------------------------------------------------------------------------
# Launchers.
# ---------------------------------------------------------------------------------------------

# One norm call (a forward, or a backward) is a few launches whose grids, integer arguments and
# constexprs follow from the call's key (shapes, dtypes, options); only the tensors change from step
# to step. _Call holds them, computed once per key, and, once the call has run through Triton's JIT,
# the compiled kernels to start directly next time (a launch then costs about 1 us of Python on this
# project's CPU machine, with the dry-run driver's no-op in place of the C launch; through the JIT,
# 26 us). So the key must determine everything the JIT specializes on: the
# dtype and 16-byte alignment of each tensor passed in (freshly allocated ones are always aligned),
# the device (and with it the SM count of the plan), every integer and float argument (they follow
# from the shapes and options), and which kernels the call launches.

@dataclasses.dataclass
class _Step:
    """One launch: kernel name, grid, the arguments after the tensors, constexprs, warps."""
    name: str
    grid: tuple
    scalars: tuple
    constexprs: dict
    num_warps: int


@dataclasses.dataclass
class _Call:
    plan: Plan
    plane: int           # PLANE: length of each of the 2 rows of the float32 scratch buffer
    moff: int            # MOFF = N*S*C: where the per-group values start in each row
    steps: tuple         # _Step, in launch order
    compiled: tuple | None = None   # per step: (name, kernel, run, function, packed metadata, grid, rest)


_calls: dict = {}        # key -> _Call (set_tuning empties it)


def _launcher(call: _Call):
    """The function that issues a call's launches in order, `launch(step, *tensors)`; `launch.done()`
    after the last one. precompile.record replaces this function to record launches instead."""
    interpret = interpreting()
    if call.compiled is not None and not interpret:
        return _Replay(call.compiled, hooked=_launch_hooked())
    return _JitLaunch(call, _jit(interpret), record=not interpret)


class _JitLaunch:
    """Launches through Triton's JIT (it binds and specializes every argument and looks the kernel up,
    about 25 us a launch on this project's CPU machine); with `record`, keeps the compiled kernels."""

    def __init__(self, call: _Call, fns: dict, record: bool):
        self.call, self.fns = call, fns
        self.compiled = [] if record else None

    def __call__(self, step: _Step, *tensors):
        fn = self.fns[step.name]
        args = tensors + step.scalars
        kernel = fn[step.grid](*args, num_warps=step.num_warps, **step.constexprs)
        if self.compiled is not None:
            # What the JIT passes on: every parameter, constexprs included, in the signature's order.
            rest = step.scalars + tuple(step.constexprs[a] for a in fn.arg_names[len(args):])
            self.compiled.append((step.name, kernel, kernel.run, kernel.function, kernel.packed_metadata,
                                  step.grid + (1,) * (3 - len(step.grid)), rest))

    def done(self):
        if self.compiled is not None:   # only a call that ran to its end is replayed
            self.call.compiled = tuple(self.compiled)


def _launch_hooked() -> bool:
    """Whether a profiler (e.g. Triton's proton) has hooked Triton's launches. Triton >= 3.4 keeps
    the hooks in HookChain objects that are there even when empty."""
    return any(h is not None and getattr(h, "calls", True)
               for h in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook))


class _Replay:
    """Starts the compiled kernels directly (CompiledKernel.run, what the JIT itself ends with) on the
    current CUDA stream, with the arguments in the JIT's order. With launch hooks set, through the
    compiled kernel's own runner, which calls them. tests/test_gn_compile.py checks that these
    launches are identical to the JIT's."""

    def __init__(self, compiled: tuple, hooked: bool):
        self.compiled, self.hooked = iter(compiled), hooked
        self.stream = driver.active.get_current_stream(driver.active.get_current_device())

    def __call__(self, step: _Step, *tensors):
        name, kernel, run, function, packed, grid, rest = next(self.compiled)
        if name != step.name:
            raise RuntimeError(f"group_norm: launch {step.name} where {name} was compiled for this call")
        if self.hooked:
            kernel[grid](*tensors, *rest, stream=self.stream)
        else:
            run(grid[0], grid[1], grid[2], self.stream, function, packed, None, None, None, *tensors, *rest)

    def done(self):
        pass


def _on_device_of(x: torch.Tensor):
    """The context to launch x's kernels in: Triton (its JIT, and _Replay) launches on the current CUDA
    device and stream, so for x on another GPU (cuda:1 while cuda:0 is current) that device is made
    current for the launches; a no-op otherwise (the trainer sets each rank's device)."""
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def _issue(call: _Call, x: torch.Tensor, tensors: dict) -> None:
    """Launches the call's steps in order, each with its tensors (tensors[step name]), on x's device."""
    with _on_device_of(x):
        launch = _launcher(call)
        for step in call.steps:
            launch(step, *tensors[step.name])
        launch.done()


def _fwd_call(n, c, hw, groups, eps, act, sms, rows_per_chunk) -> _Call:
    p = plan(n, c, hw, groups, sms, rows_per_chunk)
    cpg, cblocks = c // groups, _cdiv(c, p.channels)
    moff = n * p.chunks * c
    plane = -(-(moff + n * groups) // 16) * 16   # 64-byte aligned planes
    if p.local:
        return _Call(p, plane, moff, (
            _Step("_fwd_local", (n * cblocks,), (hw, c, groups, cpg, p.channels, cblocks, plane, moff, eps),
                  dict(BLOCK_HW=p.block_hw, BLOCK_C=p.block_c, ACT=ACT_CODES[act], ONE=p.one),
                  p.num_warps),))
    hwb = _cdiv(hw, p.apply_block_hw)
    return _Call(p, plane, moff, (
        _Step("_fwd_stats", (n * p.chunks, cblocks), (hw, c, p.chunks, p.rows, plane),
              dict(BLOCK_HW=p.block_hw, BLOCK_C=p.block_c), p.num_warps),
        _Step("_fwd_combine", (n * groups,), (groups, hw, c, p.chunks, p.rows, cpg, plane, moff, eps),
              dict(BLOCK=p.combine_block), 4),
        _Step("_fwd_apply", (n * hwb, cblocks), (hw, c, groups, cpg, hwb, plane, moff),
              dict(BLOCK_HW=p.apply_block_hw, BLOCK_C=p.block_c, ACT=ACT_CODES[act]), p.num_warps)))


def _bwd_call(n, c, hw, groups, act, fwd: _Call, need_dx, need_dparams) -> _Call:
    p, plane, moff = fwd.plan, fwd.plane, fwd.moff
    cpg, cblocks = c // groups, _cdiv(c, p.channels)
    code = ACT_CODES[act]
    if p.local:   # dx (with c1, c2) in the same launch
        steps = [_Step("_bwd_local", (n * cblocks,), (hw, c, groups, cpg, p.channels, cblocks, plane, moff),
                       dict(BLOCK_HW=p.block_hw, BLOCK_C=p.block_c, ACT=code, NEED_DX=need_dx, ONE=p.one),
                       p.num_warps)]
    else:
        steps = [_Step("_bwd_reduce", (n * p.chunks, cblocks), (hw, c, groups, cpg, p.chunks, p.rows, plane, moff),
                       dict(BLOCK_HW=p.block_hw, BLOCK_C=p.block_c, ACT=code), p.num_warps)]
    # One launch for the groups' c1, c2 (if dx is needed, split plan) and the parameter gradients (if needed).
    ng = n * groups if need_dx and not p.local else 0
    pblocks = _cdiv(c, PARAM_BLOCK_C) if need_dparams else 0
    if ng + pblocks:
        steps.append(_Step("_bwd_combine", (ng + pblocks,),
                           (groups, hw, c, p.chunks, cpg, plane, moff, ng, n * p.chunks),
                           dict(BLOCK=p.combine_block, PBLOCK_R=PARAM_BLOCK_R, PBLOCK_C=PARAM_BLOCK_C), 4))
    if need_dx and not p.local:
        hwb = _cdiv(hw, p.apply_block_hw)
        steps.append(_Step("_bwd_apply", (n * hwb, cblocks), (hw, c, groups, cpg, hwb, plane, moff),
                           dict(BLOCK_HW=p.apply_block_hw, BLOCK_C=p.block_c, ACT=1 if code == 1 else 0),
                           p.num_warps))
    return _Call(p, plane, moff, tuple(steps))


def _forward(x, weight, bias, groups, eps, act, residual, rows_per_chunk):
    """y, the float32 statistics buffer (2, PLANE) (mean_rstd() reads it) and the call, for backward.

    The buffer holds in each row the N*S*C per-(chunk, channel) partials, then at offset N*S*C the
    N*G per-group values: mean in row 0, rstd in row 1; the backward's buffer has the same layout
    with c1, c2. One allocation instead of three (each about 5 us of host time)."""
    N, C, H, W = x.shape
    key = (x.shape, x.device, _spec(x), _spec(weight), _spec(bias), _spec(residual), groups, eps, act,
           rows_per_chunk)
    call = _calls.get(key)
    if call is None:
        call = _calls[key] = _fwd_call(N, C, H * W, groups, eps, act, _sm_count(x.device), rows_per_chunk)
    stats = torch.empty((2, call.plane), device=x.device, dtype=torch.float32)
    y = torch.empty_like(x, memory_format=torch.channels_last)
    apply = (x, y, x if residual is None else residual, stats, weight, bias)
    tensors = {"_fwd_stats": (x, stats), "_fwd_combine": (stats,), "_fwd_apply": apply, "_fwd_local": apply}
    _issue(call, x, tensors)
    return y, stats, call, key


def mean_rstd(stats: torch.Tensor, call: _Call, n: int, groups: int) -> torch.Tensor:
    """The float32 mean (row 0) and rstd (row 1), (2, N, G), in the statistics buffer of the forward
    `call` (a view)."""
    return stats[:, call.moff:call.moff + n * groups].view(2, n, groups)


def _backward(dy, x, y, weight, bias, stats, groups, act, fwd: _Call, fwd_key, need_dx, need_dparams, need_dr):
    """fwd, fwd_key: what _forward returned for this call (x, weight, bias, shape and options)."""
    key = (fwd_key, _spec(dy), need_dx, need_dparams)
    call = _calls.get(key)
    if call is None:
        N, C, H, W = x.shape
        call = _calls[key] = _bwd_call(N, C, H * W, groups, act, fwd, need_dx, need_dparams)
    part = torch.empty_like(stats)   # row 0 sum(dy) partials then c1, row 1 sum(dy*xhat) then c2
    residual = act == "residual_relu"
    dr = torch.empty_like(x, memory_format=torch.channels_last) if residual else None
    dgamma = torch.empty_like(weight) if need_dparams else None
    dbeta = torch.empty_like(bias) if need_dparams else None
    dx = torch.empty_like(x, memory_format=torch.channels_last) if need_dx else None
    # Placeholders (x, weight, bias) where the epilogue or the gradients asked for need no tensor.
    y_, dr_ = (y, dr) if residual else (x, x)
    tensors = {"_bwd_reduce": (x, dy, y_, dr_, stats, weight, bias, part),
               "_bwd_local": (x, dy, y_, dr_, x if dx is None else dx, stats, weight, bias, part),
               "_bwd_combine": (part, stats, weight, weight if dgamma is None else dgamma, bias if dbeta is None else dbeta),
               # With the residual epilogue, dr is the masked dy: read it instead of dy and y.
               "_bwd_apply": (x, dr if residual else dy, dx, stats, part, weight, bias)}
    _issue(call, x, tensors)
    return dx, dgamma, dbeta, (dr if need_dr else None)


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


class GroupNormNHWC(torch.autograd.Function):
    """relu?(group_norm(x) (+ residual)) on channels-last x with the Triton kernels above.

    Saves x, the float32 statistics buffer (mean and rstd per (sample, group), see _forward), and
    (residual epilogue only) the output y.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, residual, groups, eps, act, rows_per_chunk):
        # (Inside forward autograd records nothing: the parameters go to the kernels as they are.)
        w, b = _affine(x, weight, bias)
        code = "residual_relu" if residual is not None else act
        y, stats, call, key = _forward(x, w, b, groups, eps, code, residual, rows_per_chunk)
        ctx.save_for_backward(x, w, b, stats, y if residual is not None else None)
        ctx.groups, ctx.act, ctx.call, ctx.key = groups, code, call, key
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, b, stats, y = ctx.saved_tensors
        need_dx, need_dw, need_db, need_dr = ctx.needs_input_grad[:4]
        if not (need_dx or need_dw or need_db or need_dr):
            return (None,) * 8
        need_dparams = (need_dw and ctx.has_weight) or (need_db and ctx.has_bias)
        dx, dw, db, dr = _backward(_channels_last(dy), x, y, w, b, stats,
                                   ctx.groups, ctx.act, ctx.call, ctx.key, need_dx, need_dparams, need_dr)
        dw = dw if need_dw and ctx.has_weight else None   # in the parameters' dtypes already
        db = db if need_db and ctx.has_bias else None
        return dx, dw, db, dr, None, None, None, None


def _affine(x, weight, bias):
    """weight and bias, gamma = 1 and beta = 0 (float32) in place of a missing one."""
    C = x.shape[1]
    return (weight if weight is not None else torch.ones(C, device=x.device, dtype=torch.float32),
            bias if bias is not None else torch.zeros(C, device=x.device, dtype=torch.float32))


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5, act: str | None = None,
               residual: torch.Tensor | None = None, rows_per_chunk: int | None = None) -> torch.Tensor:
    """relu?(group_norm(x) (+ residual)) for a channels-last (N, C, H, W) float32/bf16/fp16 tensor.

    act: None or "relu"; residual (same shape, needs act="relu"): relu(group_norm(x) + residual).
    The output is channels-last in x's dtype. rows_per_chunk forces the spatial split (tests).
    """
    if x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"group_norm: expected a channels-last 4-D tensor, got shape {tuple(x.shape)} "
                         f"with strides {x.stride()}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"group_norm: float32, bfloat16 or float16 input, got {x.dtype}")
    C = x.shape[1]
    if num_groups <= 0 or C % num_groups:
        raise ValueError(f"group_norm: {num_groups} groups do not divide {C} channels")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != (C,):
            raise ValueError(f"group_norm: {name} must have shape ({C},), got {tuple(t.shape)}")
    return group_norm_checked(x, num_groups, weight, bias, eps, act, residual, rows_per_chunk)


def group_norm_checked(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                       eps: float, act: str | None, residual: torch.Tensor | None,
                       rows_per_chunk: int | None = None) -> torch.Tensor:
    """group_norm() once x, the groups and the parameters' shapes are known to be right (the module:
    kernel_applies checked x, nn.GroupNorm the rest); checks act and the residual.

    Eager: the autograd Function GroupNormNHWC. Under torch.compile: the custom ops
    imnet::group_norm_fwd / imnet::group_norm_bwd (the same kernels, opaque to the compiler), so a
    compiled model has no graph break at its norms."""
    check_act(act, residual)
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"group_norm: residual shape {tuple(residual.shape)} != input shape {tuple(x.shape)}")
        # A copy only if it is not already like x (autograd casts the gradient back).
        residual = _channels_last(residual.to(x.dtype))
    if not torch.compiler.is_compiling():
        return GroupNormNHWC.apply(x, weight, bias, residual, num_groups, float(eps), act, rows_per_chunk)
    w, b = _affine(x, weight, bias)
    code = "residual_relu" if residual is not None else (act or "")
    return torch.ops.imnet.group_norm_fwd(x, w, b, residual, num_groups, float(eps), code, rows_per_chunk)[0]


# ---------------------------------------------------------------------------------------------
# torch.compile: custom ops around _forward / _backward. The forward returns y and the (2, N, G)
# float32 mean and rstd (copied out of the statistics buffer, so that the op's outputs have shapes
# the compiler can know without the launch plan); the backward puts them back into a buffer laid
# out as _forward's. act: "" (none), "relu" or "residual_relu".
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("imnet::group_norm_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: Optional[torch.Tensor],
            groups: int, eps: float, act: str, rows_per_chunk: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    y, stats, call, _ = _forward(x, weight, bias, groups, eps, act or None, residual, rows_per_chunk)
    return y, mean_rstd(stats, call, x.shape[0], groups).clone()


@_fwd_op.register_fake
def _(x, weight, bias, residual, groups, eps, act, rows_per_chunk):
    return (torch.empty_like(x, memory_format=torch.channels_last),
            x.new_empty((2, x.shape[0], groups), dtype=torch.float32))


@torch.library.custom_op("imnet::group_norm_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
            moments: torch.Tensor, groups: int, act: str, rows_per_chunk: Optional[int], need_dx: bool,
            need_dparams: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dgamma, dbeta, d residual); an empty tensor for each one not asked for (need_dx,
    need_dparams; d residual only with the residual epilogue). moments: group_norm_fwd's mean, rstd."""
    N, C, H, W = x.shape
    key = ("op", x.shape, x.device, _spec(x), _spec(weight), _spec(bias), groups, act, rows_per_chunk)
    fwd = _calls.get(key)
    if fwd is None:
        fwd = _calls[key] = _fwd_call(N, C, H * W, groups, 0.0, act or None, _sm_count(x.device), rows_per_chunk)
    stats = torch.empty((2, fwd.plane), device=x.device, dtype=torch.float32)
    mean_rstd(stats, fwd, N, groups).copy_(moments)
    dx, dw, db, dr = _backward(_channels_last(dy), x, y, weight, bias, stats, groups, act or None, fwd, key,
                               need_dx, need_dparams, True)
    return tuple(x.new_empty(0) if t is None else t for t in (dx, dw, db, dr))  # (distinct empties: no aliases)


@_bwd_op.register_fake
def _(dy, x, y, weight, bias, moments, groups, act, rows_per_chunk, need_dx, need_dparams):
    cl = torch.channels_last
    return (torch.empty_like(x, memory_format=cl) if need_dx else x.new_empty(0),
            torch.empty_like(weight) if need_dparams else x.new_empty(0),
            torch.empty_like(bias) if need_dparams else x.new_empty(0),
            torch.empty_like(x, memory_format=cl) if act == "residual_relu" else x.new_empty(0))


def _fwd_op_setup(ctx, inputs, output):
    x, weight, bias, residual, groups, eps, act, rows_per_chunk = inputs
    y, moments = output
    ctx.save_for_backward(x, weight, bias, moments, y if act == "residual_relu" else x)  # y: for its mask
    ctx.groups, ctx.act, ctx.rows_per_chunk = groups, act, rows_per_chunk


def _fwd_op_backward(ctx, dy, _dmoments):
    x, weight, bias, moments, y = ctx.saved_tensors
    need_dx, need_dw, need_db, need_dr = ctx.needs_input_grad[:4]
    dx, dw, db, dr = torch.ops.imnet.group_norm_bwd(dy, x, y, weight, bias, moments, ctx.groups, ctx.act,
                                                    ctx.rows_per_chunk, need_dx, need_dw or need_db)
    return (dx if need_dx else None, dw if need_dw else None, db if need_db else None,
            dr if need_dr else None, None, None, None, None)


_fwd_op.register_autograd(_fwd_op_backward, setup_context=_fwd_op_setup)
