"""Starting the kernels: the only module that touches Triton beyond its public JIT.

A launch through Triton's JIT (`kernel[grid](*args)`) binds and specializes every argument and looks
the kernel up, tens of microseconds of host time each; a GroupNorm layer makes 3 to 6 launches, and
at small batches the GPU waits for the host. So the first run of a call (a launch record of
plan.Launches) goes through the JIT, which compiles and returns each CompiledKernel, and later runs
start those directly with `CompiledKernel.run` in the JIT's own argument order (`Replay`).

That fast path, and the float-sum combine function the kernels reduce with, rely on Triton internals.
`FAST_PATH_PROBLEM`, computed at import, says why they are not as expected in the installed Triton
(or is None); then every launch goes through the public JIT and the kernels sum with their own
combine function, after one warning naming the Triton version.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import types
import warnings

import torch
import triton
import triton.language as tl

try:  # what the fast path uses besides the compiled kernels; FAST_PATH_PROBLEM says when it is missing
    from triton import knobs
    from triton.runtime import driver
except ImportError:
    knobs = driver = None

from imnet.kernels.common import interpreting
from imnet.kernels.gn import kernels

# What CompiledKernel's own runner calls; Replay makes the same call (Triton 3.4 to 3.8 at least).
_RUN_CALL = ("self.run(grid[0], grid[1], grid[2], stream, self.function, self.packed_metadata, launch_metadata, "
             "knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *args)")


def _hooked() -> bool:
    """Whether a profiler (e.g. Triton's proton) has hooked Triton's launches. Triton >= 3.4 keeps
    the hooks in HookChain objects that are there even when empty."""
    return any(h is not None and getattr(h, "calls", True)
               for h in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook))


def _fast_path_problem() -> str | None:
    """Why the internals the fast path uses are not there in the expected shape, or None."""
    try:
        from triton.compiler.compiler import CompiledKernel
        from triton.runtime.jit import JITFunction

        _hooked()  # reads knobs.runtime's launch hooks
        runner = " ".join(inspect.getsource(CompiledKernel.__getitem__).split())
        combine = getattr(tl.standard, "_sum_combine", None)
    except Exception as e:  # an internal moved: its import or attribute fails
        return f"{type(e).__name__}: {e}"
    if _RUN_CALL not in runner:
        return "CompiledKernel's runner calls run() with other arguments"
    if not isinstance(combine, JITFunction) or combine.arg_names != ["a", "b"]:
        return "triton.language.standard._sum_combine is not a JIT function of (a, b)"
    return None


FAST_PATH_PROBLEM = _fast_path_problem()
_warned = False


def fast_path() -> bool:
    """Whether the direct launches and Triton's own sum combine are used (warns once where not)."""
    global _warned
    if FAST_PATH_PROBLEM is not None and not _warned:
        _warned = True
        warnings.warn(f"imnet GroupNorm: Triton {triton.__version__} is not what the kernels' fast launch path "
                      f"expects ({FAST_PATH_PROBLEM}); launching through Triton's JIT instead (same kernels, "
                      "more host time per launch)", RuntimeWarning, stacklevel=2)
    return FAST_PATH_PROBLEM is None


def _rebound(f, scope: dict):
    """f with `scope` as its globals (annotations kept: they mark the constexpr parameters)."""
    g = types.FunctionType(f.__code__, scope, f.__name__, f.__defaults__, f.__closure__)
    g.__annotations__ = dict(f.__annotations__)
    return g


@functools.lru_cache(maxsize=None)
def jit(interpret: bool, own_sum: bool = False) -> dict:
    """Kernel name -> the kernels decorated for the interpreter or the compiler, as asked, whatever
    TRITON_INTERPRET says now (triton.jit reads it while decorating). own_sum: reduce with
    kernels.add instead of Triton's own combine function (without the fast path)."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        # Each mode's kernels see that mode's helpers: copies of the functions whose globals are a
        # copy of kernels.py's, with the helpers' names bound to the decorated helpers.
        scope = dict(vars(kernels))
        scope.update({f.__name__: triton.jit(_rebound(f, scope)) for f in kernels.HELPERS})
        scope["sum_combine"] = scope["add"] if own_sum else tl.standard._sum_combine
        return {f.__name__: triton.jit(_rebound(f, scope)) for f in kernels.KERNELS}
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


def kernels_interpreted() -> bool:
    """True when the kernels that would run now are the CPU interpreter's (for the tests)."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(jit(interpreting(), not fast_path())["_fwd_apply"], InterpretedFunction)


class JitLaunch:
    """Launches through Triton's JIT; with `record`, keeps the compiled kernels for Replay."""

    def __init__(self, entry: list, fns: dict, record: bool):
        self.entry, self.fns = entry, fns
        self.compiled = [] if record else None

    def __call__(self, step, tensors: tuple):
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
            self.entry[1] = tuple(self.compiled)


class Replay:
    """Starts a call's compiled kernels directly (CompiledKernel.run, what the JIT itself ends with)
    on the current CUDA stream, with the arguments in the JIT's order. With launch hooks set, through
    the compiled kernel's own runner, which calls them. tests/test_gn_compile.py checks that these
    launches are identical to the JIT's."""

    def __init__(self, compiled: tuple):
        self.compiled, self.hooked = iter(compiled), _hooked()
        self.stream = driver.active.get_current_stream(driver.active.get_current_device())

    def __call__(self, step, tensors: tuple):
        name, kernel, run, function, packed, grid, rest = next(self.compiled)
        if name != step.name:
            raise RuntimeError(f"group_norm: launch {step.name} where {name} was compiled for this call")
        if self.hooked:
            kernel[grid](*tensors, *rest, stream=self.stream)
        else:
            run(grid[0], grid[1], grid[2], self.stream, function, packed, None, None, None, *tensors, *rest)

    def done(self):
        pass


def launcher(entry: list):
    """What issues a call's launches in order, `launch(step, tensors)`, then `launch.done()`. entry:
    [plan.Launches, compiled kernels or None], the call's cache entry (the JIT fills in the second)."""
    interpret, fast = interpreting(), fast_path()
    if entry[1] is not None and not interpret:
        return Replay(entry[1])
    return JitLaunch(entry, jit(interpret, not fast), record=fast and not interpret)


def on_device_of(x: torch.Tensor):
    """The context to launch x's kernels in: Triton (its JIT, and Replay) launches on the current CUDA
    device and stream, so for x on another GPU (cuda:1 while cuda:0 is current) that device is made
    current for the launches; a no-op otherwise (the trainer sets each rank's device)."""
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def issue(entry: list, x: torch.Tensor, tensors: dict) -> None:
    """Launches the call's steps in order on x's device, each with its tensors picked from `tensors`
    (role -> tensor)."""
    with on_device_of(x):
        launch = launcher(entry)
        for step in entry[0].steps:
            launch(step, step.pick(tensors))
        launch.done()
