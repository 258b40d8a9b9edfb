"""Models larger than the device: decoder blocks live in host memory and visit the device one at a time.

Everything in this project already walks a model block by block (calibration, the level
database, the search's fitness and its dense reference, perplexity), so a model whose blocks do
not all fit on the accelerator can still be searched: the embeddings, final norm and head stay
on the device, every block's weights stay in (pinned) host memory, and a forward pre-hook copies
the block's parameters to the device just before it runs; the post-hook drops the copy. The
level database prunes the host weights in place, so the next visit carries the new level.

The device then holds one block, the head, the activations and the dense reference instead of
the whole model; the price is one host-to-device copy of each block per forward (see README's
cost model). The results are the same bits as a resident model's on the same device: the same
kernels run on the same values.

Not covered: backward passes (the Fisher sensitivity keeps every block's device copy alive for
autograd), so a model that needs offloading takes a seed that needs no gradients (uniform, OWL).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from evosparse.pruning.layers import block_list
from torch import nn


@dataclass
class OffloadedBlocks:
    """Handle of an offloaded model: how much was copied, and how to undo it."""

    device: torch.device
    blocks: list[nn.Module]
    handles: list[Callable[[], object]] = field(default_factory=list)
    bytes_copied: int = 0  # host-to-device bytes so far (the tests and the benchmark read it)
    visits: int = 0  # block forwards that went through the device copy

    def remove(self) -> None:
        """Stop offloading: the hooks go; the blocks stay in host memory."""
        for undo in self.handles:
            undo()
        self.handles.clear()


def _tensors(block: nn.Module) -> Iterator[torch.Tensor]:
    yield from block.parameters()
    yield from block.buffers()


def block_bytes(model: nn.Module) -> int:
    """Bytes of all decoder blocks' parameters and buffers."""
    _, blocks = block_list(model)
    return sum(t.numel() * t.element_size() for b in blocks for t in _tensors(b))


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def fits_on(model: nn.Module, device: torch.device, headroom: float = 0.8) -> bool:
    """Whether the whole model fits in ``headroom`` of the device's free memory (always, off CUDA)."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return model_bytes(model) <= headroom * free


@torch.no_grad()
def offload_blocks(model: nn.Module, device: str | torch.device) -> OffloadedBlocks:
    """Put ``model`` on ``device`` except its decoder blocks, which stay in host memory and are
    copied to the device for each forward. On a CPU ``device`` the copy is still made (so the
    path is the same one a GPU takes, and tests exercise it)."""
    device = torch.device(device)
    _, blocks = block_list(model)
    block_ids = {id(t) for b in blocks for t in _tensors(b)}
    for b in blocks:
        b.to("cpu")
    for module in model.modules():  # everything outside the blocks goes to the device
        for p in module.parameters(recurse=False):
            if id(p) not in block_ids:
                p.data = p.data.to(device)
        for name, buf in list(module.named_buffers(recurse=False)):
            if id(buf) not in block_ids:
                module._buffers[name] = buf.to(device)
    if device.type == "cuda":  # pinned host memory: the copies run at full link speed
        for b in blocks:
            for t in _tensors(b):
                t.data = t.data.pin_memory()
    handle = OffloadedBlocks(device=device, blocks=list(blocks))
    for b in blocks:
        _wrap_forward(b, handle)
    model._evosparse_offload = handle  # type: ignore[attr-defined]
    return handle


def _wrap_forward(block: nn.Module, handle: OffloadedBlocks) -> None:
    """The block's forward runs on device copies of its tensors; the host tensors are put back even
    when the forward raises (a hook pair would leave the copies in place, and a later in-place
    prune of the host weights would then be lost)."""
    inner = block.forward
    tensors = list(_tensors(block))

    def forward(*args: object, **kwargs: object) -> object:
        host = [t.data for t in tensors]
        try:
            for t, h in zip(tensors, host, strict=True):
                t.data = h.to(handle.device, non_blocking=True, copy=True)
                handle.bytes_copied += h.numel() * h.element_size()
            handle.visits += 1
            return inner(*args, **kwargs)
        finally:
            for t, h in zip(tensors, host, strict=True):
                t.data = h

    block.forward = forward
    handle.handles.append(lambda: block.__dict__.pop("forward", None))


def offload_of(model: nn.Module) -> OffloadedBlocks | None:
    """The offload handle of ``model``, if its blocks are offloaded."""
    return getattr(model, "_evosparse_offload", None)
