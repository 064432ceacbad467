"""The engine's input slabs as a worker maps them (ipc/input_slabs.py), and a window's items taken
from them to the device.

Each slab is mapped once and, on CUDA, page-locked, so the items of a window go up in one
asynchronous copy per run of items adjacent in one slab, with no staging and no host allocation.
A dropped slab (its client left) is unmapped only once the windows started before the drop are
done: their copies may still be reading it.
"""

from __future__ import annotations

import ctypes
import logging
import mmap

import torch

from vitserve.ipc.input_slabs import InputSlab, aligned
from vitserve.ipc.worker_messages import MapInputs, WindowItem
from vitserve.ipc.outputs import read_only_tensor
from vitserve.ipc.slabs import SlabError

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "uint8": torch.uint8}


class WorkerInputs:
    def __init__(self, device: torch.device, engine_pid: int):
        self.device = device
        self.engine_pid = engine_pid  # holds the slabs' descriptors, which the worker opens through /proc
        self.slabs: dict[str, InputSlab] = {}
        self._retiring: list[tuple[int, str]] = []  # (windows started when the drop came, slab)

    def on_device(self, items: list[WindowItem]) -> list[torch.Tensor]:
        """The items' arrays on the device, in order: on CUDA in one device buffer laid out as in
        their slabs; on the CPU, views of the slabs."""
        hosts = []
        for item in items:
            slab = self.slabs.get(item.slab)
            if slab is None:
                raise RuntimeError(f"input slab {item.slab} is not mapped by this worker ({sorted(self.slabs)})")
            hosts.append(slab.array(item.offset, item.dtype, tuple(item.shape)))  # bounds checked
        if self.device.type != "cuda":
            return [read_only_tensor(array) for array in hosts]
        starts = [0]
        for array in hosts:
            starts.append(starts[-1] + aligned(array.nbytes))
        buffer = torch.empty(starts[-1], dtype=torch.uint8, device=self.device)  # (bytes,)
        first = 0
        for end in range(1, len(items) + 1):
            if end < len(items) and items[end].slab == items[first].slab and (
                    items[end].offset - items[first].offset == starts[end] - starts[first]):
                continue  # adjacent in its slab as in the buffer: the same copy takes it
            nbytes = starts[end - 1] - starts[first] + hosts[end - 1].nbytes
            source = torch.frombuffer(self.slabs[items[first].slab].mapping, dtype=torch.uint8, count=nbytes,
                                      offset=items[first].offset)  # (bytes,) page-locked
            buffer[starts[first]:starts[first] + nbytes].copy_(source, non_blocking=True)
            first = end
        return [buffer[start:start + array.nbytes].view(TORCH_DTYPES[item.dtype]).view(array.shape)
                for item, start, array in zip(items, starts, hosts)]

    def map(self, message: MapInputs) -> None:
        """Map (and on CUDA page-lock) an input slab of the engine's. A slab that cannot be mapped is
        logged; the windows that name it fail, and the worker goes on."""
        if message.slab in self.slabs:
            return
        try:
            slab = InputSlab.open_from(self.engine_pid, message.descriptor, message.slab, message.size)
        except SlabError as err:
            log.error("cannot map input slab: %s", err)
            return
        if self.device.type == "cuda":
            try:
                pin_for_cuda(slab.mapping)
            except RuntimeError as err:
                log.error("cannot page-lock input slab %s: %s", message.slab, err)
                slab.close()
                return
        self.slabs[message.slab] = slab

    def drop(self, slab: str, started: int) -> None:
        """Unmap a slab once the `started` windows started so far are done (see `retire`)."""
        self._retiring.append((started, slab))

    def retire(self, oldest_running: int | None) -> list[str]:
        """Unmap the slabs dropped before the oldest window still running (`oldest_running`, its
        sequence; None: none runs): no copy from them can be in flight. Returns their names."""
        done = [(mark, slab) for mark, slab in self._retiring if oldest_running is None or mark < oldest_running]
        if not done:
            return []
        self._retiring = [entry for entry in self._retiring if entry not in done]
        for _, name in done:
            slab = self.slabs.pop(name, None)
            if slab is not None:
                if self.device.type == "cuda":
                    unpin_for_cuda(slab.mapping)
                slab.close()
        return [name for _, name in done]

    def close(self) -> None:
        for slab in self.slabs.values():
            slab.close()
        self.slabs.clear()


def pin_for_cuda(mapping: mmap.mmap) -> None:
    """Register the pages with CUDA (page-locked), so copies between them and the device run asynchronously."""
    address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
    status = torch.cuda.cudart().cudaHostRegister(address, len(mapping), 0)
    if int(status) != 0:
        raise RuntimeError(f"cudaHostRegister of {len(mapping)} bytes of shared memory failed with status {status}")


def unpin_for_cuda(mapping: mmap.mmap) -> None:
    address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
    status = torch.cuda.cudart().cudaHostUnregister(address)
    if int(status) != 0:
        log.warning("cudaHostUnregister of an input slab failed with status %s", status)
