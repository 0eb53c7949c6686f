"""The Triton GroupNorm, one concern per module (imported on first use by imnet.kernels):

    kernels.py  the @triton.jit code, as plain functions
    plan.py     grids, block sizes, arguments: the launch record of a call (no Triton)
    launch.py   decorating and starting the kernels: the only module on Triton internals
    ops.py      the drivers, the autograd Function and the torch.compile custom ops
"""
