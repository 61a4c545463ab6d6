"""The Mixer protocol: a causal map (B, T, d_model) -> (B, T, d_model) that carries a state.

Every mixer implements one function in two regimes:
- ``forward(x, state=None)`` on a whole sequence (the parallel or chunked training form);
- the same call with T=1 (or any T) and the state returned by an earlier call (decoding).
Both regimes must compute the same function: ``forward(x)`` equals running ``forward`` over
chunks of ``x`` while passing the state, and equals token-by-token decoding.

The state is a dict of tensors (and plain ints); its size is measured from the tensors
themselves (``state_nbytes``), never written down by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from memlab.registry import Registry, make_config

State = dict[str, Any]

MIXERS: Registry[type[Mixer]] = Registry("mixer")


@dataclass(kw_only=True)
class MixerConfig:
    """Options shared by all mixers. Subclasses add their own fields and checks."""

    d_model: int

    def __post_init__(self) -> None:
        check_positive(self, "d_model")


def check_positive(cfg: Any, *names: str) -> None:
    """Raise ValueError naming the field when an integer option is below 1."""
    for name in names:
        value = getattr(cfg, name)
        # bool is an int subclass: True would pass as 1 and later crash in tensor shapes
        # (e.g. torch.zeros(True, 3)) with a TypeError that names no option.
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{type(cfg).__name__}.{name} must be a positive int, got {value!r}")


def check_divides(cfg: Any, divisor_name: str, dividend_name: str) -> None:
    """Raise ValueError when ``getattr(cfg, dividend_name)`` is not a multiple of the divisor."""
    a, b = getattr(cfg, divisor_name), getattr(cfg, dividend_name)
    if b % a:
        raise ValueError(
            f"{type(cfg).__name__}.{divisor_name}={a} must divide {dividend_name}={b}"
        )


class Mixer(nn.Module):
    """Base class of every sequence mixer.

    Subclasses set ``Config`` (a kw_only dataclass) and implement ``forward`` and ``init_state``.
    ``constant_state`` says whether the state size is independent of the sequence length
    (recurrent mixers) or grows with it (attention caches).
    """

    Config: ClassVar[type[MixerConfig]] = MixerConfig
    name: ClassVar[str] = ""
    constant_state: ClassVar[bool] = True
    # Small options that still exercise every code path (chunk boundaries, windows) for the
    # shared invariance tests and smoke runs; d_model is chosen by the caller.
    test_config: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: MixerConfig) -> None:
        super().__init__()
        self.config = config
        self.d_model = config.d_model
        # Every mixer's state tensors lead with the batch dim; a state from another batch size
        # would otherwise fail deep inside (a torch.cat shape error that names nothing).
        self.register_forward_pre_hook(_check_state_batch, with_kwargs=True)

    def forward(self, x: torch.Tensor, *, state: State | None = None) -> tuple[torch.Tensor, State]:
        """x: (B, T, d_model) -> y: (B, T, d_model) and the state after the last token."""
        raise NotImplementedError

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> State:
        """The state before any token: what ``forward(x, state=None)`` starts from."""
        raise NotImplementedError

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError naming the tensor when x is not (B, T, d_model) floating point."""
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"x must have shape (B, T, d_model={self.d_model}), got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if x.shape[1] < 1:
            raise ValueError(f"x must hold at least one token, got T={x.shape[1]}")


def _first_batch_dim(state: Any) -> int | None:
    if isinstance(state, torch.Tensor):
        return state.shape[0] if state.dim() > 0 else None
    items = state.values() if isinstance(state, dict) else state if isinstance(state, (list, tuple)) else ()
    for v in items:
        b = _first_batch_dim(v)
        if b is not None:
            return b
    return None


def _check_state_batch(module: Mixer, args: tuple, kwargs: dict) -> None:
    state = kwargs.get("state")
    x = args[0] if args else kwargs.get("x")
    if state is None or not isinstance(x, torch.Tensor) or x.dim() != 3:
        return  # check_input names a bad x
    b = _first_batch_dim(state)
    if b is not None and b != x.shape[0]:
        raise ValueError(
            f"{type(module).__name__}: state holds batch size {b}, but x has batch size {x.shape[0]} "
            f"(x shape {tuple(x.shape)}); pass the state returned for this batch, or "
            f"init_state({x.shape[0]}, ...)"
        )


def register(name: str):
    """Class decorator: add a Mixer subclass to the registry under ``name``."""

    def deco(cls: type[Mixer]) -> type[Mixer]:
        cls.name = name
        return MIXERS.register(name)(cls)

    return deco


def build(name: str, *, d_model: int, **cfg: Any) -> Mixer:
    """Build mixer ``name`` with ``d_model`` and its options; unknown keys raise ValueError."""
    cls = MIXERS.get(name)
    config = make_config(cls.Config, f"mixer {name!r}", {"d_model": d_model, **cfg})
    return cls(config)


def names() -> list[str]:
    return MIXERS.names()


def state_nbytes(state: Any) -> int:
    """Bytes held by every tensor in a (nested) state; ints and None count zero."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_nbytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_nbytes(v) for v in state)
    return 0
