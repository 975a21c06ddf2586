"""Sibling linear layers that read one input, run as one matrix product.

An attention block projects its input three times (queries, keys, values)
and a gated MLP twice (gate, up). At decoding sizes each product is one pass
over its weights, and small ones waste it: on the lent H100 the 8B shape's key
and value products (8 MB each, 60 rows) ran at about 1.2 TB/s with a split-K
reduction kernel after each, against 2.7 TB/s for the large products
(docs/perf/2026-11-23-h100-b). One product over the stacked weights reads
the same bytes in one kernel.

`fuse_sibling_linears` swaps such siblings, where they are stock `nn.Linear`s,
for `LinearPart`s of one `FusedLinear`. The model keeps its class and its
forward code. The first part called with an input computes the whole product;
the others take their slices when called with that same tensor object
(attention and MLP forwards pass one tensor to all of them), and a call that
does not follow this pattern computes a product of its own, so results do
not depend on the call pattern. (Slices are matched by tensor identity only:
dynamo cannot read a tensor's version counter, and hooks on the parent to
drop them would make it compile each layer apart. So a forward that calls
only some parts, or fails between them, leaves one product held until the
next call replaces it; and a caller that changed that same input tensor in
place between two part calls would get a slice of the old one: no model's
forward does either.) The state_dict keeps the stock keys (`q_proj.weight`,
...): hooks on the parent split the fused weights on saving and join them on
loading. What else differs: a part's output is a view of the fused product
(an in-place change of it under autograd is refused; `.view` can only split
its last dimension), and the parameters are named after the fused linear.
"""

from __future__ import annotations

import collections
import itertools

import torch
import torch.nn.functional as F
from torch import nn

# fused name -> the sibling linears it replaces, in the order their outputs are stacked
SIBLINGS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class FusedLinear(nn.Module):
    def __init__(self, linears: list[nn.Linear]):
        super().__init__()
        self.weight = nn.Parameter(torch.cat([lin.weight.detach() for lin in linears]), linears[0].weight.requires_grad)
        biases = [lin.bias for lin in linears]
        self.bias = None if biases[0] is None else nn.Parameter(torch.cat([b.detach() for b in biases]),
                                                                biases[0].requires_grad)
        self.sizes = [lin.out_features for lin in linears]
        self.starts = [0, *itertools.accumulate(self.sizes)]
        # (input, the slices of its product that parts have not taken yet)
        self._pending: tuple[torch.Tensor, list] | None = None

    def part(self, index: int, x: torch.Tensor) -> torch.Tensor:
        pending = self._pending
        if pending is None or pending[0] is not x or pending[1][index] is None:
            # The first part called with x (or called again): the whole product, the others' slices kept for them.
            pending = (x, list(F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)))
        out = pending[1][index]
        pending[1][index] = None
        # Kept until every part has its slice (or the next call replaces them), so in the stock
        # call pattern nothing outlives the parent's forward.
        self._pending = pending if any(s is not None for s in pending[1]) else None
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, sizes={self.sizes}, bias={self.bias is not None}"


class LinearPart(nn.Module):
    """Stands where one of the fused linears stood. Its `weight` and `bias`
    are views of the fused parameters (code that reads `q_proj.weight.dtype`
    still works); it holds no parameters of its own."""

    def __init__(self, fused: FusedLinear, index: int):
        super().__init__()
        self.__dict__["fused"] = fused  # not a submodule: the parent holds it once, under its own name
        self.index = index
        self.in_features = fused.weight.shape[1]
        self.out_features = fused.sizes[index]

    def _rows(self, whole: torch.Tensor | None) -> torch.Tensor | None:
        start = self.fused.starts[self.index]
        return None if whole is None else whole[start : start + self.out_features]

    @property
    def weight(self) -> torch.Tensor:
        return self._rows(self.fused.weight)

    @property
    def bias(self) -> torch.Tensor | None:
        return self._rows(self.fused.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.part(self.index, x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, part {self.index} of a FusedLinear"


# Hooks a stock linear may carry that a part could not honour.
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
              "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def _fusable(parent: nn.Module, fused_name: str, linears: list, tied: set[int]) -> bool:
    """Stock linears with their weights at hand (no accelerate offload hook,
    no hooks of anyone's, not on the meta device, not a tensor subclass, not
    tied to another module's), alike in input size, dtype, device, bias and
    trainability."""
    if fused_name in parent._modules or hasattr(parent, fused_name):
        return False
    for lin in linears:
        if type(lin) is not nn.Linear or hasattr(lin, "_hf_hook") or any(getattr(lin, d, None) for d in HOOK_DICTS):
            return False
        params = [p for p in (lin.weight, lin.bias) if p is not None]
        if any(type(p.data) is not torch.Tensor or p.device.type == "meta" or id(p) in tied for p in params):
            return False
    first = linears[0]
    return all(
        lin.in_features == first.in_features and lin.weight.dtype == first.weight.dtype
        and lin.weight.device == first.weight.device and lin.weight.requires_grad == first.weight.requires_grad
        and (lin.bias is None) == (first.bias is None)
        and (lin.bias is None or (lin.bias.dtype, lin.bias.requires_grad) == (first.bias.dtype,
                                                                             first.bias.requires_grad))
        for lin in linears
    )


def fuse_sibling_linears(model: nn.Module) -> int:
    """Fuse the sibling groups of `SIBLINGS` in every module of `model` where
    they can be (`_fusable`); the others stay as they are. Fusing twice
    changes nothing. Returns how many groups were fused."""
    seen = collections.Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    tied = {key for key, count in seen.items() if count > 1}
    fused_groups = 0
    for parent in list(model.modules()):
        for fused_name, names in SIBLINGS.items():
            linears = [parent._modules.get(name) for name in names]
            if None in linears or not _fusable(parent, fused_name, linears, tied):
                continue
            fused = FusedLinear(linears)
            parent.add_module(fused_name, fused)
            for index, name in enumerate(names):
                setattr(parent, name, LinearPart(fused, index))  # the stock linear, and its weights, go
            parent.register_state_dict_post_hook(_SplitOnSave(fused_name, names))
            parent.register_load_state_dict_pre_hook(_JoinOnLoad(fused_name, names))
            fused_groups += 1
    return fused_groups


class _StockKeys:
    """State_dict hooks of a fused group's parent: the group's entries go
    under the stock names (`q_proj.weight`, ...) rather than the fused one.
    (Callable objects, not closures: a model with them still pickles.)"""

    def __init__(self, fused_name: str, names: tuple[str, ...]):
        self.fused_name, self.names = fused_name, names


class _SplitOnSave(_StockKeys):
    def __call__(self, module, state_dict, prefix, local_metadata) -> None:
        fused = module._modules[self.fused_name]
        for kind in ("weight", "bias"):
            whole = state_dict.pop(f"{prefix}{self.fused_name}.{kind}", None)
            if whole is not None:
                # Views of one storage, as each part's weight is; transformers' save_pretrained
                # clones disjoint views before writing safetensors.
                for name, piece in zip(self.names, whole.split(fused.sizes)):
                    state_dict[f"{prefix}{name}.{kind}"] = piece


class _JoinOnLoad(_StockKeys):
    """The stock keys' tensors become the fused one's; a missing or misshapen
    part is reported under its stock key, as the stock model would, and
    keeps its current rows."""

    def __call__(self, module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                 error_msgs) -> None:
        fused = module._modules[self.fused_name]
        for kind in ("weight", "bias"):
            keys = [f"{prefix}{name}.{kind}" for name in self.names]
            fused_key = f"{prefix}{self.fused_name}.{kind}"
            current = getattr(fused, kind)
            if current is None or (fused_key in state_dict and not any(key in state_dict for key in keys)):
                continue  # (parts' biases where the fused linear has none are reported as unexpected)
            pieces = []
            for key, rows in zip(keys, current.detach().split(fused.sizes)):
                given = state_dict.pop(key, None)
                if given is None:
                    missing_keys.append(key)
                elif given.shape != rows.shape:
                    error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(given.shape)} "
                                      f"from checkpoint, the shape in current model is {tuple(rows.shape)}.")
                else:
                    pieces.append(given.to(current.device))
                    continue
                pieces.append(rows)
            state_dict[fused_key] = torch.cat(pieces)
