"""The GroupNorm kernels for channels-last (NHWC) input, as plain Python functions.

launch.jit decorates them with `triton.jit` for the compiler or the CPU interpreter (triton.jit
picks one when it decorates, from TRITON_INTERPRET at that moment, so each mode gets its own
copies). plan.py decides their grids and block sizes, ops.py calls them.

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

Epilogues (the ACT constexpr, an imnet.kernels.common.Act value): NONE; RELU: y = relu(v), and
backward recomputes v from x (already read) for the mask v > 0, so fusing costs no extra bytes;
RESIDUAL_RELU: y = relu(v + r), backward masks by the saved output y > 0 (y is the block output the
next layer keeps anyway) and writes the masked gradient once, which is the residual's gradient and
what _bwd_apply reads instead of dy.

Scratch: the partials and the per-group values share one float32 (2, PLANE) buffer per direction
(see ops.forward): the forward's holds (mean, rstd), saved for backward; the backward's (c1, c2).

Memory traffic: forward reads x twice and writes y; backward reads x and dy twice and writes dx
(3 and 5 tensor passes; the least possible is 2 and 3). The apply kernels walk their tiles in the
reverse order of the reduction kernels, so their first reads hit what is still in L2; at 1-2 images
per GPU the whole tensor fits in L2 (50 MB on an H100).

Local kernels (opt-in, IMNET_GN_TUNE="local=16"): where N * C/16 programs fill the GPU (large N),
one program per (sample, block of whole groups) does it all:
  forward  _fwd_local: per-channel (mean, M2) over its HW rows (Chan, as _fwd_stats), the groups'
           statistics from its own lanes, then y over the same rows in reverse tile order. 1 launch.
  backward _bwd_local: sum(dy), sum(dy*xhat) per channel (stored for dgamma, dbeta), c1 and c2 of
           its groups, then dx over the same rows in reverse; + _bwd_combine's parameter programs
           for dgamma, dbeta (not needed: 1 launch). 2 launches.
Where one tile holds all HW rows (constexpr ONE), the program keeps x (and dy) in registers from its
statistics to its output: 2 and 3 tensor passes. Otherwise it reads x (and dy) twice, the second
read right after its own first, from L2 if the data of the programs resident at once fits there.

Besides the helpers below, the kernels use only Triton builtins. tl.sum and tl.zeros are themselves
@triton.jit functions, decorated when triton is imported, so under the interpreter they fail
("Cannot call @triton.jit'd outside of the scope of a kernel") unless TRITON_INTERPRET was already
set when triton was first imported, which a test process cannot promise. So sums are
tl.reduce(x, axis, sum_combine), which launch.jit binds to Triton's own float-sum combine function
(the interpreter recognizes it and sums with numpy) or, on a Triton without it, to `add` below; and
tl.full replaces tl.zeros.
"""

import triton.language as tl

from imnet.kernels.common import Act

NO_ACT = tl.constexpr(int(Act.NONE))
RELU = tl.constexpr(int(Act.RELU))
RESIDUAL_RELU = tl.constexpr(int(Act.RESIDUAL_RELU))


def add(a, b):
    # The combine function of a sum (tl.reduce); launch.jit binds `sum_combine` to it or Triton's own.
    return a + b


sum_combine = add

# Helpers the kernels call (decorated like them by launch.jit; Triton inlines them).

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


def _partials(K, CPG, C, R, HW, k0, BLOCK: tl.constexpr):
    # Partials k0 .. k0+BLOCK of a group's K = S*CPG (chunk s, channel j = k // CPG, k % CPG): which are
    # valid, the rows of each one's chunk (float32), and each one's offset in a plane of the scratch buffer.
    k = k0 + tl.arange(0, BLOCK)
    s = k // CPG
    return k < K, tl.minimum(R, HW - s * R).to(tl.float32), s * C + k % CPG


def _group_sum(v, same):
    # Per lane: the sum of v over the lanes of its group (`same` from _local_program).
    return tl.reduce(tl.where(same, v[None, :], 0.0), 1, sum_combine)


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
    mb = tl.reduce(x, 0, sum_combine) / nb
    d = tl.where(mask, x - mb[None, :], 0.0)
    return mb, tl.reduce(d * d, 0, sum_combine)


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
    if ACT == RESIDUAL_RELU:
        v += tl.load(RES + off, mask=mask, other=0.0).to(tl.float32)
    if ACT != NO_ACT:
        v = tl.maximum(v, 0.0)
    return v


def _masked_dy(x, dy, Y, off, mask, mean, a, beta, ACT: tl.constexpr):
    # dy where the epilogue's ReLU passed the gradient: ReLU recomputes the forward's v from x (same
    # expression as _normalized), residual + ReLU reads the output y.
    if ACT == RELU:
        v = (x - mean[None, :]) * a[None, :] + beta[None, :]
        dy = tl.where(v > 0.0, dy, 0.0)
    if ACT == RESIDUAL_RELU:
        y = tl.load(Y + off, mask=mask, other=0.0).to(tl.float32)
        dy = tl.where(y > 0.0, dy, 0.0)
    return dy


def _tile_dy(X, DY, Y, DR, off, mask, mean, rstd, a, beta, ACT: tl.constexpr):
    # A tile's float32 x and dy, dy masked by the epilogue (and, for residual + ReLU, stored: it is
    # the residual's gradient), and its per-channel sum(dy), sum(dy * xhat).
    x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
    dy = _masked_dy(x, tl.load(DY + off, mask=mask, other=0.0).to(tl.float32), Y, off, mask, mean, a, beta, ACT)
    if ACT == RESIDUAL_RELU:
        tl.store(DR + off, dy.to(DR.dtype.element_ty), mask=mask)
    xhat = (x - mean[None, :]) * rstd[None, :]
    return x, dy, tl.reduce(dy, 0, sum_combine), tl.reduce(dy * xhat, 0, sum_combine)


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
        m, cnt, off = _partials(K, CPG, C, R, HW, k0, BLOCK)
        mu = tl.load(base + off, mask=m, other=0.0)
        acc += tl.where(m, cnt * mu, 0.0)
    mean = tl.reduce(acc, 0, sum_combine) / total
    acc = tl.full([BLOCK], 0.0, tl.float32)
    for k0 in range(0, K, BLOCK):
        m, cnt, off = _partials(K, CPG, C, R, HW, k0, BLOCK)
        mu = tl.load(base + off, mask=m, other=0.0)
        m2 = tl.load(base + PLANE + off, mask=m, other=0.0)
        d = mu - mean
        acc += tl.where(m, m2 + cnt * d * d, 0.0)
    var = tl.reduce(acc, 0, sum_combine) / total
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
        tl.store(PART + MOFF + pid, rstd * (tl.reduce(a1, 0, sum_combine) / total))          # c1
        tl.store(PART + PLANE + MOFF + pid, rstd * rstd * (tl.reduce(a2, 0, sum_combine) / total))  # c2
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
        tl.store(DB + cols, tl.reduce(s1, 0, sum_combine).to(DB.dtype.element_ty), mask=cmask)
        tl.store(DW + cols, tl.reduce(s2, 0, sum_combine).to(DW.dtype.element_ty), mask=cmask)


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


HELPERS = (add, _chunk_program, _apply_program, _local_program, _partials, _group_sum, _group_stats, _rows,
           _tile_moments, _moments, _normalized, _masked_dy, _tile_dy, _dy_sums, _dx)
KERNELS = (_fwd_stats, _fwd_combine, _fwd_apply, _bwd_reduce, _bwd_combine, _bwd_apply, _fwd_local, _bwd_local)
