"""run.cuda_graph: the DDP engine's whole step (micro_batch_step's forwards, backwards and all-reduce,
then the optimizer update) captured once as a CUDA graph with torch.cuda.graph, after WARMUP eager
steps on a side stream (cuDNN autotuning, Triton compiles, lazy optimizer state), and replayed: the
host launches one graph a step instead of every kernel. What changes per step lives in static device
tensors the graph reads: the batch (copied in), the learning rate (fused SGD/AdamW take it as a tensor)
and the stop request. `reason_not(cfg, d)` says why the graph cannot apply to a run; the trainer then
prints it and runs eager. A batch whose shape differs from the captured one runs eager, with a
message the first time.

Why a whole-step torch.cuda.graph and not torch.compile(mode="reduce-overhead"): the step's optimizer
update and the all-reduce of its decisions must be inside the graph for the host to drop out, and the
Triton GroupNorm kernels are launched by imnet itself (they capture as plain kernel launches)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from imnet.engine.step import StepOut

WARMUP = 3   # eager steps before the capture


def reason_not(cfg, d) -> str | None:
    """Why run.cuda_graph cannot apply to this run (None: it applies, or it is off)."""
    if not cfg.run.cuda_graph:
        return None
    if d.device.type != "cuda":
        return f"needs a CUDA device (this run is on {d.device.type})"
    if cfg.dist.backend == "deepspeed":
        return "not with dist.backend=deepspeed (DeepSpeed steps its own optimizer)"
    if d.world > 1:
        return f"not yet with more than one process (this run has {d.world})"
    if cfg.model.compile:
        return "not with model.compile (choose one)"
    if cfg.precision.amp == "fp16":
        return "not with precision.amp=fp16 (GradScaler); bf16 and off capture"
    return None


def cuda_capture(fn: Callable[[], None]) -> Callable[[], None]:
    """Capture `fn` as a CUDA graph (recorded, not run); returns its replay."""
    graph = torch.cuda.CUDAGraph()
    # thread_local: the DataLoader's pin-memory thread may call CUDA while this thread captures
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        fn()
    return graph.replay


class GraphStep:
    """`train_step(micro_batches, lr, stop_requested) -> StepOut` of `eng` (a DDPEngine), replayed as
    one captured graph from step WARMUP + 1. The StepOut of a replay is the graph's own output tensor:
    read it (Meter.add queues its reads) before the next step overwrites it. `capture` is cuda_capture;
    the tests pass one that replays by calling the step again, to check the static-buffer plumbing on
    the CPU."""

    def __init__(self, eng, capture: Callable = cuda_capture, log: Callable[[str], None] = print):
        self.eng, self.capture, self.log = eng, capture, log
        self.cuda = eng.device.type == "cuda"
        self.steps = 0
        self.replay = None
        self.key = None        # the captured batches' shapes, strides and dtypes
        self.told = False      # a batch of another shape ran eager, and the run was told so

    def __call__(self, micro_batches: list, lr: float, stop_requested: bool = False) -> StepOut:
        self.steps += 1
        if self.replay is None and self.steps <= WARMUP:
            return self._eager(micro_batches, lr, stop_requested)
        key = _key(micro_batches)
        if self.replay is None:
            self._capture(micro_batches, key)
        elif key != self.key:
            if not self.told:
                self.told = True
                self.log(f"run.cuda_graph: step {self.steps} has batches of another shape than the captured "
                         f"graph's ({_describe(key)}, not {_describe(self.key)}): such steps run eager")
            return self._eager(micro_batches, lr, stop_requested)
        for (xs, ys), (x, y) in zip(self.static, micro_batches):
            xs.copy_(x, non_blocking=True)
            ys.copy_(y, non_blocking=True)
        self.lr.fill_(lr)
        self.stop.fill_(bool(stop_requested))
        self.eng.module.train()
        self.replay()
        return StepOut(self.traced["out"].stats)

    def _eager(self, micro_batches, lr, stop_requested) -> StepOut:
        if not self.cuda:
            return self.eng.train_step(micro_batches, lr, stop_requested)
        side, main = torch.cuda.Stream(), torch.cuda.current_stream()
        side.wait_stream(main)  # also orders this step after the reads of the previous step's outputs
        with torch.cuda.stream(side):
            out = self.eng.train_step(micro_batches, lr, stop_requested)
        main.wait_stream(side)
        return out

    def _capture(self, micro_batches, key) -> None:
        dev = self.eng.device
        self.key = key
        self.static = [(torch.empty_like(x), torch.empty_like(y)) for x, y in micro_batches]
        self.lr = torch.zeros((), device=dev)
        self.stop = torch.zeros((), dtype=torch.bool, device=dev)
        self.traced = {}  # the step's StepOut: under a CUDA graph, the same tensors at every replay

        def step():
            self.traced["out"] = self.eng.train_step(self.static, self.lr, self.stop)

        for g in self.eng.optimizer.param_groups:
            if "capturable" in g:  # AdamW refuses a capture without it (fused: the same kernel)
                g["capturable"] = True
        self.eng.optimizer.zero_grad(set_to_none=True)  # backward allocates the gradients in the graph's pool
        self.replay = self.capture(step)
        self.log(f"run.cuda_graph: step {self.steps} on is one captured CUDA graph ({_describe(key)})")


def _key(micro_batches) -> tuple:
    return tuple((tuple(x.shape), x.stride(), x.dtype, tuple(y.shape), y.dtype) for x, y in micro_batches)


def _describe(key: tuple) -> str:
    return " + ".join("x".join(map(str, k[0])) for k in key)
