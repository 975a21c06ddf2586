"""Checks of the arguments a caller passes to the engine: token ids, counts,
sampling numbers and a random generator, each refused with what to pass instead."""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping

import torch


def token_ids(name: str, value) -> torch.Tensor:
    """`value` (a list, array or tensor of ids, or one id) as a tensor of integer token ids."""
    if isinstance(value, (str, bytes)):
        raise ValueError(f"{name} must be token ids, got a string: tokenize it first (model.tokenizer)")
    if isinstance(value, Mapping):  # a tokenizer's whole output (BatchEncoding)
        raise ValueError(f"{name} must be token ids, got a mapping with keys {list(value)}: pass its 'input_ids' "
                         "(model.tokenizer(text, return_tensors='pt').input_ids)")
    try:
        ids = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must hold integer token ids, got {value!r}") from None
    if ids.numel() and (ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool):
        raise ValueError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    return ids  # an empty one has a float dtype: callers report it as empty


def prompt_ids(input_ids, vocab_size: int) -> torch.Tensor:
    """One prompt, `input_ids` of shape [1, n] or [n], as a 1-D tensor of ids in [0, vocab_size)."""
    ids = token_ids("input_ids", input_ids)
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise ValueError(f"batch size {ids.shape[0]} is not supported: pass one sequence, input_ids of "
                             "shape [1, n]")
        ids = ids[0]
    elif ids.dim() != 1:
        raise ValueError(f"input_ids must have shape [1, n], got {list(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError("input_ids is empty: give at least one prompt token")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise ValueError(f"input_ids holds ids outside the vocabulary [0, {vocab_size})")
    return ids.to(torch.long)


def positive_int(name: str, value) -> int:
    """An int >= 1; integer types (numpy, 0-d tensors) pass, floats and bools do not."""
    try:
        number = operator.index(value)
    except TypeError:
        number = None
    if number is None or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if number < 1:
        raise ValueError(f"{name} must be >= 1, got {number}")
    return number


def real_number(name: str, value) -> float:
    """A finite float; ints and floats (numpy's, 0-d tensors) pass, strings, None and bools do not."""
    if isinstance(value, (bool, str, bytes)) or value is None:
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return number


def whole_number(name: str, value) -> int:
    """An int >= 0 given as an integer or an integral float (the reference's
    sampling top_k defaults to 0.0); 2.7, -1 and None are refused."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a whole number >= 0 (0 turns it off), got {value!r}") from None
    if number < 0 or isinstance(value, bool):
        raise ValueError(f"{name} must be a whole number >= 0 (0 turns it off), got {value!r}")
    return number


def check_generator_device(generator: torch.Generator, drawn_on: torch.device) -> None:
    """Tokens are drawn on the lm_head's device; a generator elsewhere fails at the first draw, in torch's words.
    (meta: weights not in memory, which the next generation refuses by name: `check_not_offloaded`.)"""
    if drawn_on.type != "meta" and generator.device != drawn_on:
        raise ValueError(f"the generator is on {generator.device}, but tokens are drawn on {drawn_on} (the "
                         f"base's lm_head): make it with torch.Generator(device={str(drawn_on)!r})")
