"""Block offload's instrumentation in the tests: which modules are on the compute device after each move, and the
small AnimateDiff video the offload tests sample. On the CPU, "cpu" plays the compute device and "cpu:1" storage
(torch keeps CPU tensors in one memory anyway: the moves are reported, not made)."""
from collections.abc import Callable

import torch
from kinema.models import pipelines
from kinema.models.offload import OffloadOptions

HW = 16  # at 8 the deepest level is 1x1 and its GroupNorm (2 values a group) amplifies fp32 rounding chaotically


class Residency:
    """An ``on_move`` that follows the moves: which modules are on the compute device (``on_compute(device)``;
    by default the index-less "cpu" of ``cpu_block_offload``), and the most at once."""

    def __init__(self, on_compute: Callable[[torch.device], bool] = lambda device: device.index is None):
        self.on_compute = on_compute
        self.on, self.most, self.moves = set(), 0, 0

    def __call__(self, module, device):
        self.moves += 1
        if self.on_compute(device):
            self.on.add(id(module))
        else:
            self.on.discard(id(module))
        self.most = max(self.most, len(self.on))


def cpu_block_offload(resident: int, watch: Residency) -> OffloadOptions:
    return OffloadOptions(mode="block", device="cpu", storage="cpu:1", resident=resident, on_move=watch)


def sample_small(model, cfg: float = 5.0) -> torch.Tensor:
    """4 frames at 16x16 latents, 2 Euler steps, a random prompt."""
    g = torch.Generator().manual_seed(3)
    pos, neg = torch.randn(1, 77, 64, generator=g), torch.randn(1, 77, 64, generator=g)
    with torch.no_grad():
        return pipelines.sample_video(model, pos, neg, torch.zeros(4, 4, HW, HW),
                                      pipelines.SampleOptions(seed=7, steps=2, cfg=cfg))
