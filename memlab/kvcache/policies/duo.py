"""``duo``: DuoAttention (Xiao et al. 2024): retrieval heads keep everything, streaming heads keep
attention sinks plus a recent window.

Which KV heads are retrieval heads comes from per-head gates learned by memlab's own
optimisation on synthetic passkey data (``memlab.kvcache.calibrate.calibrate_duo``, CLI
``memlab calibrate duo --model M``, saved beside the model). The ``ratio`` budget is the paper's
knob: the fraction of (layer, KV head) pairs kept as retrieval heads, chosen by gate value over
the whole model. Retrieval and streaming heads of a layer live in separate storage, so streaming
heads hold a constant ``sinks + window`` rows per sequence: the memory is really freed, per head.
Streaming heads attend to their sinks and window only, in prefill and in decoding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from memlab.kvcache.policies.base import FixedKeepPolicy, Observation, check_nonneg_int, register

if TYPE_CHECKING:
    from memlab.kvcache.cache import KVCache

GATES_FILE = "duo_gates.safetensors"


def load_gates(path: str | Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """Read gates (n_layers, n_kv_heads) float32 and their training metadata."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"duo gates file {str(path)!r} does not exist; run `memlab calibrate duo --model M`")
    with safe_open(str(path), framework="pt") as f:
        gates = f.get_tensor("gates").float()
        meta = json.loads((f.metadata() or {}).get("memlab", "{}"))
    return gates, meta


def save_gates(path: str | Path, gates: torch.Tensor, meta: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"gates": gates.detach().float().cpu().contiguous()}
    save_file(tensors, str(path), metadata={"memlab": json.dumps(meta)})
    return path


def retrieval_heads(gates: torch.Tensor, ratio: float) -> torch.Tensor:
    """(n_layers, n_kv_heads) bool: the ``ratio`` share of heads with the largest gates."""
    n = gates.numel()
    k = min(n, max(0, round(ratio * n)))
    order = torch.argsort(gates.flatten().double(), descending=True, stable=True)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[:k]] = True
    return mask.view_as(gates)


@register("duo")
@dataclass(kw_only=True)
class DuoAttention(FixedKeepPolicy):
    """``gates``: a (n_layers, n_kv_heads) tensor or the path of a gates file."""

    gates: Any = None
    sinks: int = 16
    window: int = 64
    compress_decoding: bool = True

    def __post_init__(self) -> None:
        check_nonneg_int("policy 'duo'", sinks=self.sinks, window=self.window)
        if self.window < 1:
            raise ValueError(f"policy 'duo': window={self.window} must be >= 1")
        if self.tokens is not None:
            raise ValueError(
                f"policy 'duo': tokens={self.tokens} is not a DuoAttention budget; give ratio= (the fraction "
                "of KV heads kept as retrieval heads)"
            )
        r = self.ratio
        if r is None or isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= float(r) <= 1.0:
            raise ValueError(
                f"policy 'duo': ratio={r!r} must be in [0, 1], the fraction of KV heads kept as retrieval "
                "heads"
            )
        super().__post_init__()
        if self.gates is None:
            raise ValueError(
                "policy 'duo' needs head gates: gates=<tensor or file>; make them with "
                "`memlab calibrate duo --model M`"
            )
        if isinstance(self.gates, (str, Path)):
            self.gates, _ = load_gates(self.gates)
        gates = self.gates
        if not isinstance(gates, torch.Tensor) or gates.dim() != 2 or not bool(torch.isfinite(gates).all()):
            raise ValueError(
                f"policy 'duo': gates must be a finite (n_layers, n_kv_heads) tensor, got "
                f"{getattr(self.gates, 'shape', type(self.gates).__name__)}"
            )
        self._retrieval = retrieval_heads(self.gates, float(self.ratio))
        # Per layer, on the host: read at every decoding step of every layer.
        self._has_retrieval: list[bool] = self._retrieval.any(dim=1).tolist()

    def head_groups(self, layer: int, n_kv_heads: int) -> list[list[int]]:
        if self._retrieval.shape[0] <= layer or self._retrieval.shape[1] != n_kv_heads:
            raise ValueError(
                f"policy 'duo': gates of shape {tuple(self._retrieval.shape)} do not match layer {layer} "
                f"with {n_kv_heads} KV heads"
            )
        ret = [h for h in range(n_kv_heads) if self._retrieval[layer, h]]
        stream = [h for h in range(n_kv_heads) if not self._retrieval[layer, h]]
        return [g for g in (ret, stream) if g]

    def _is_streaming(self, layer: int, group: int) -> bool:
        return not self._has_retrieval[layer] or group == 1

    def group_budget(
        self, layer: int, n_layers: int, group: int, seen: torch.Tensor, cache: KVCache
    ) -> torch.Tensor | None:
        if not self._is_streaming(layer, group):
            return None
        return torch.full_like(seen, self.sinks + self.window)

    def attention_window(self, layer: int, group: int) -> tuple[int, int] | None:
        return (self.window, self.sinks) if self._is_streaming(layer, group) else None

    def score(self, obs: Observation) -> torch.Tensor:
        score = obs.positions.float()
        return score.masked_fill(obs.sinks(self.sinks), float("inf"))

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.pop("gates", None)
        out["retrieval_heads"] = int(self._retrieval.sum())
        out["heads"] = int(self._retrieval.numel())
        return out
