"""The trainer's per-step bookkeeping, kept on the device so that no step waits for it: the train
record's sums since the last log step, the current streak of skipped (non-finite) steps, and the step
at which that streak first reached dist.max_nonfinite. The host reads them at log and checkpoint steps
(`read`, `streak`). The stop flag is the one value the loop needs every step: `add` copies it to the
host without blocking, and `stop_before` reads the previous step's copy, one step late, which is the
same step on every rank because the flag was all-reduced."""

from __future__ import annotations

import torch

from imnet.engine.step import StepOut

# sums: loss sum and correct over the updated steps' images, those images, all images, skipped steps
_LOSS, _CORRECT, _KEPT, _IMAGES, _SKIPPED = range(5)


class Meter:
    def __init__(self, device: torch.device, max_nonfinite: int, step: int = 0, streak: int = 0):
        self.device, self.max_nonfinite, self.step = device, max_nonfinite, step
        f64 = {"dtype": torch.float64, "device": device}
        self.sums = torch.zeros(5, **f64)
        self.streak_t = torch.full((), float(streak), **f64)  # skipped steps in a row, up to now
        self.hit = torch.zeros((), **f64)                     # step where the streak reached the limit; 0: none
        # StepOut.stats = [non-finite, stop, loss sum, correct, images] -> [loss, correct, images, images, non-finite]
        self._pick = torch.tensor([2, 3, 4, 4, 0], device=device)
        cuda = device.type == "cuda"
        self._host = [torch.zeros(1, pin_memory=cuda) for _ in range(2)]  # stop flags of the last two steps
        self._flags = [h.numpy() for h in self._host]                      # read as numpy: no tensor call
        self._events = [torch.cuda.Event() for _ in range(2)] if cuda else None
        self.added = 0

    def add(self, out: StepOut) -> None:
        """Count one step (device work only; the stop flag's copy to the host does not block)."""
        s = out.stats.double()
        skip = (s[0] > 0).double()
        inc = s.index_select(0, self._pick)
        inc[:_IMAGES] *= 1.0 - skip
        inc[_SKIPPED] = skip
        self.sums += inc
        self.streak_t.add_(1.0).mul_(skip)
        self.step += 1
        self.hit.masked_fill_((self.hit == 0) & (self.streak_t >= self.max_nonfinite), float(self.step))
        slot = self.added % 2
        self._host[slot].copy_(out.stats[1:2], non_blocking=True)
        if self._events is not None:
            self._events[slot].record()
        self.added += 1

    def _stop_flag(self, slot: int) -> bool:
        if self._events is not None:
            self._events[slot].synchronize()  # that step's work, not the one queued after it
        return bool(self._flags[slot][0] > 0)

    def stop_before(self) -> bool:
        """Whether some rank asked to stop at the step before the last one added: every rank sees the same
        answer at the same step. It waits at most for that step to finish, never for the last one."""
        return self.added >= 2 and self._stop_flag(self.added % 2)

    def stop_now(self) -> bool:
        """The last step's stop flag (waits for that step: for the run's last step, where it ends anyway)."""
        return self.added >= 1 and self._stop_flag((self.added - 1) % 2)

    def streak(self) -> tuple[int, int]:
        """(skipped steps in a row now, the step at which the streak first reached max_nonfinite or 0):
        one read of the device."""
        streak, hit = torch.stack([self.streak_t, self.hit]).tolist()
        return int(streak), int(hit)

    def read(self) -> dict:
        """The window's record since the last read, and starts the next window: loss and top1 over the
        steps that updated the weights (nan if none did), images (all ranks, every step), skipped steps,
        the streak and its hit step. One read of the device."""
        v = torch.cat([self.sums, self.streak_t.view(1), self.hit.view(1)]).tolist()
        self.sums.zero_()
        kept = v[_KEPT]
        return {"loss": v[_LOSS] / kept if kept else float("nan"),
                "top1": v[_CORRECT] / kept if kept else float("nan"),
                "images": int(v[_IMAGES]), "skipped": int(v[_SKIPPED]), "streak": int(v[5]), "hit": int(v[6])}
