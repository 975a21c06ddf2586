"""Pre-allocated KV caches for the target model and the draft head.

Speculative decoding writes a whole draft tree into the cache, then keeps only
the accepted branch. Both caches therefore work on fixed buffers: new keys
and values are written after the committed prefix, and after verification the
accepted positions are gathered down onto the prefix (`keep`) instead of
re-allocating or concatenating tensors every step.

Two ways to write. `append` writes after `length`, a host integer (training,
tests, the GTO trainer). The decoding engine instead sets a write plan
(`write_plan`): new entries go to slots given by a device tensor and attention
sees a fixed `view` of the first slots, masked by the caller. Nothing then
depends on host-side lengths, so a decoding step has static shapes and can be
captured in a CUDA graph.

`TargetKVCache` implements transformers' `Cache` interface so that stock
`AutoModelForCausalLM` models write into it through their public forward.
Its layers keep their entries in one `KVStack` per device, so compacting
after a step is one gather and one scatter for all layers, not several small
ops per layer (on a GPU each is a kernel of its own).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


def _moves(start: int | torch.Tensor, indices: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Source and target slots of a compaction: start + indices -> start, start+1, ..."""
    offset = start.to(device) if torch.is_tensor(start) else start
    return indices.to(device) + offset, torch.arange(indices.shape[0], device=device) + offset


class KVStack:
    """The keys and values of several layers in one tensor [layers, 2,
    batch, kv_heads, capacity, head_dim], made on first use from the first
    entries written. Layers hold views into it (`views`)."""

    def __init__(self, size: int, capacity: int):
        self.size, self.capacity = size, capacity
        self.storage: torch.Tensor | None = None

    def views(self, index: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Layer `index`'s keys and values inside the stack, or None when its
        entries do not fit the stack (another device, dtype or shape)."""
        shape = (self.size, 2, key.shape[0], key.shape[1], self.capacity, key.shape[3])
        if value.shape != key.shape or value.dtype != key.dtype:
            return None
        if self.storage is None:
            self.storage = key.new_zeros(shape)
        if self.storage.shape != shape or self.storage.dtype != key.dtype or self.storage.device != key.device:
            return None
        return self.storage[index, 0], self.storage[index, 1]

    def write_and_view(self, index, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor,
                       view: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `index`'s `append` under a write plan, for compiled code: one
        scatter into the whole stack and views at an offset computed from
        `index`. Compiled code handed the layer's own views would compile once
        per layer (their offsets differ), and a write through
        `storage[index]` makes inductor copy the whole stack."""
        storage = self.storage
        layer = torch.full((1,), index, dtype=torch.long, device=storage.device)
        kind = torch.arange(2, device=storage.device)[:, None]  # keys, values
        new = torch.stack((key, value)).permute(0, 3, 1, 2, 4)  # [2, n, batch, kv_heads, head_dim]
        torch.ops.aten.index_put_.default(storage, [layer, kind, None, None, slots.to(storage.device)], new)
        size, stride = (storage.shape[2], storage.shape[3], view, storage.shape[5]), storage.stride()[2:]
        offset = index * storage.stride(0)
        return storage.as_strided(size, stride, offset), storage.as_strided(size, stride, offset + storage.stride(1))

    def keep(self, start: int | torch.Tensor, indices: torch.Tensor) -> None:
        """Move every layer's slots start + indices to start, start+1, ... (see `KVBuffer.keep`)."""
        if self.storage is not None:
            source, target = _moves(start, indices, self.storage.device)
            self.storage.index_copy_(4, target, self.storage.index_select(4, source))


class KVBuffer:
    """One attention layer's keys and values in buffers of `capacity` slots.

    Shapes: keys/values [batch=1, kv_heads, capacity, head_dim]. `length` is
    the number of valid slots; everything after it is scratch space. In a
    `stack` (at `index`), the buffers are views into the stack's storage and
    the stack moves the data when the cache is compacted.
    """

    def __init__(self, capacity: int, stack: KVStack | None = None, index: int = 0):
        self.capacity = capacity
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.length = 0
        self.plan: tuple[torch.Tensor, int] | None = None  # (slots [n], view) while a write plan is set
        self.stack, self.index = stack, index

    def _allocate(self, key: torch.Tensor, value: torch.Tensor) -> None:
        views = self.stack.views(self.index, key, value) if self.stack is not None else None
        if views is None:
            self.stack = None  # a layer that does not fit its stack keeps (and compacts) its own buffers
            shape = (key.shape[0], key.shape[1], self.capacity, key.shape[3])
            views = key.new_zeros(shape), value.new_zeros(shape[:3] + (value.shape[3],))
        self.keys, self.values = views

    def append(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `key`/`value` [1, kv_heads, n, head_dim] after the valid slots
        and return all valid keys and values, the new ones included. Under a
        write plan: write them at the plan's slots and return the view."""
        if self.keys is None:
            self._allocate(key, value)
        if self.plan is not None:
            slots, view = self.plan
            slots = slots.to(self.keys.device)
            self.keys.index_copy_(2, slots, key)
            self.values.index_copy_(2, slots, value)
            return self.keys[:, :, :view], self.values[:, :, :view]
        n = key.shape[2]
        end = self.length + n
        if end > self.capacity:
            raise RuntimeError(
                f"KV cache overflow: {end} positions needed, {self.capacity} allocated "
                "(raise max_length)"
            )
        self.keys[:, :, self.length : end] = key
        self.values[:, :, self.length : end] = value
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def keep(self, start: int | torch.Tensor, indices: torch.Tensor) -> None:
        """Move slots `start + indices` (ascending) to slots start, start+1, ...
        With an integer `start` the length becomes start + len(indices); a
        device-tensor `start` (the engine's) leaves lengths to the caller.
        The data of a buffer in a stack is moved by `KVStack.keep`."""
        if self.keys is not None and self.stack is None:
            source, target = _moves(start, indices, self.keys.device)
            # index_select makes a copy first, so overlapping source/target is safe.
            self.keys.index_copy_(2, target, self.keys.index_select(2, source))
            self.values.index_copy_(2, target, self.values.index_select(2, source))
        if not torch.is_tensor(start):
            self.length = start + indices.shape[0]


@contextmanager
def write_plan(buffers, slots: torch.Tensor, view: int):
    """Within the block, every buffer writes new entries at `slots` (device
    long [n]) and attention reads the first `view` slots."""
    for buffer in buffers:
        buffer.plan = (slots, view)
    try:
        yield
    finally:
        for buffer in buffers:
            buffer.plan = None


def visible_slots(start: int | torch.Tensor, view: int, block: torch.Tensor) -> torch.Tensor:
    """Bool [n, view]: slots before `start` visible to every row, then `block`
    [n, m] over slots start .. start+m-1, nothing after (scratch)."""
    n, m = block.shape
    columns = torch.arange(view, device=block.device)
    visible = (columns < start).expand(n, view).clone()
    return visible.scatter_(1, (columns[:m] + start).expand(n, m), block)


class _TargetLayer(CacheLayerMixin):
    """transformers cache layer backed by a `KVBuffer`."""

    is_sliding = False

    def __init__(self, buffer: KVBuffer):
        super().__init__()
        self.buffer = buffer

    def lazy_initialization(self, key_states, value_states) -> None:  # buffers are made on first append
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        self.is_initialized = True
        keys, values = self.buffer.append(key_states, value_states)
        self.keys, self.values = self.buffer.keys, self.buffer.values
        return keys, values

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        # Only consulted when transformers builds a mask itself; the engine always passes a 4-D mask.
        query_length = args[0] if args and isinstance(args[0], int) else 0
        return self.buffer.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.buffer.length

    def get_max_length(self) -> int:
        return self.buffer.capacity

    def reset(self) -> None:
        self.buffer.length = 0


class TargetKVCache(Cache):
    """KV cache of the base model: one `KVBuffer` per decoder layer, the
    layers of each device in one `KVStack`.

    Storage is made on the first write, on the device the entries come
    from, so a model sharded with `device_map="auto"` keeps each layer's
    cache beside the layer. `devices` (one per layer; default: all on one)
    says which layers share a stack.
    """

    def __init__(self, num_layers: int, capacity: int, devices: list | None = None):
        devices = [None] * num_layers if devices is None else [str(d) for d in devices]
        if len(devices) != num_layers:
            raise ValueError(f"{len(devices)} devices given for {num_layers} layers")
        members: dict = {}
        for layer, device in enumerate(devices):
            members.setdefault(device, []).append(layer)
        self.stacks = [KVStack(len(layers), capacity) for layers in members.values()]
        buffers: list[KVBuffer] = [None] * num_layers
        for stack, layers in zip(self.stacks, members.values()):
            for index, layer in enumerate(layers):
                buffers[layer] = KVBuffer(capacity, stack, index)
        super().__init__(layers=[_TargetLayer(buffer) for buffer in buffers])
        self.capacity = capacity
        self.stacked_plan: tuple[KVStack, torch.Tensor, int] | None = None  # (stack, slots, view), see write_plan

    @property
    def length(self) -> int:
        return self.layers[0].buffer.length

    def keep(self, start: int | torch.Tensor, indices: torch.Tensor) -> None:
        """Compact every layer: see `KVBuffer.keep`."""
        for stack in self.stacks:
            stack.keep(start, indices)
        for layer in self.layers:
            layer.buffer.keep(start, indices)  # lengths, and the data of layers outside a stack

    @contextmanager
    def write_plan(self, slots: torch.Tensor, view: int):
        """See `write_plan`; also notes whether every layer sits in one
        allocated stack (one device, after the prefill), for `update`."""
        stack = self.stacks[0] if len(self.stacks) == 1 else None
        whole = stack is not None and stack.storage is not None and \
            all(layer.buffer.stack is stack for layer in self.layers)
        self.stacked_plan = (stack, slots, view) if whole else None
        try:
            with write_plan([layer.buffer for layer in self.layers], slots, view):
                yield
        finally:
            self.stacked_plan = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """transformers' entry point. Traced by torch.compile (a compiled
        decoder layer) under a stacked write plan, it goes through the stack
        at `layer_idx` (`KVStack.write_and_view`): the index then stays a
        symbolic integer and one compiled graph serves every layer. Run
        eagerly, the per-layer views take fewer ops."""
        if self.stacked_plan is None or not torch.compiler.is_compiling():
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        stack, slots, view = self.stacked_plan
        return stack.write_and_view(layer_idx, key_states, value_states, slots, view)
