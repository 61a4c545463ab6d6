"""DuoAttention head gates, learned by memlab's own optimisation on synthetic passkey data.

As in DuoAttention (Xiao et al. 2024): every (layer, KV head) gets a gate alpha in [0, 1]; the
model runs with each head's attention output mixed as

    alpha * full_causal_attention + (1 - alpha) * streaming_attention(sinks, window),

all model weights frozen. The gates minimise the distance between the final hidden states of
this mixed model and of the unchanged model on the positions of the answer of passkey prompts
(where retrieving from far back matters), plus an L1 penalty that pushes gates towards 0
(streaming). Heads whose gates stay high are the retrieval heads. The prompts are memlab's own
``niah`` tasks (several needles for the vault, asked for all of them), so nothing is downloaded.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from memlab.kvcache.policies.duo import GATES_FILE, save_gates

TRAIN_ATTN = "memlab_duo_train"
_GATES = threading.local()


def _mixed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Gate-mixed full and streaming attention. query (B, H, T, D); key, value (B, Hkv, T, D)."""
    gates: torch.Tensor = _GATES.gates  # (n_layers, Hkv)
    sinks, window = _GATES.sinks, _GATES.window
    b, h, t, d = query.shape
    hkv = key.shape[1]
    k = key.repeat_interleave(h // hkv, dim=1)
    v = value.repeat_interleave(h // hkv, dim=1)
    full = F.scaled_dot_product_attention(query, k, v, is_causal=True, scale=scaling)
    pos = torch.arange(t, device=query.device)
    qpos, kpos = pos[:, None], pos[None, :]
    stream_mask = (kpos <= qpos) & ((kpos > qpos - window) | (kpos < sinks))
    stream = F.scaled_dot_product_attention(query, k, v, attn_mask=stream_mask, scale=scaling)
    alpha = gates[module.layer_idx].repeat_interleave(h // hkv)[None, :, None, None].to(query.dtype)
    out = alpha * full + (1 - alpha) * stream
    return out.transpose(1, 2), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(TRAIN_ATTN, _mixed_attention)
    AttentionMaskInterface.register(TRAIN_ATTN, lambda *a, attention_mask=None, **k: None)


_register()


@dataclass
class DuoCalibration:
    gates: torch.Tensor  # (n_layers, n_kv_heads) in [0, 1]
    losses: list[float]  # distillation loss per step
    meta: dict[str, Any]


def calibrate_duo(
    model: Any,
    tokenizer: Any,
    *,
    steps: int = 60,
    num_prompts: int = 8,
    length: int = 1024,
    sinks: int = 16,
    window: int = 64,
    lr: float = 0.02,
    l1: float = 0.05,
    seed: int = 0,
    prompts: list[torch.Tensor] | None = None,
    answer_lengths: list[int] | None = None,
    log: Any = None,
) -> DuoCalibration:
    """Learn one gate per (layer, KV head). Returns the gates, the loss curve and metadata.

    ``prompts`` (1D id tensors) and ``answer_lengths`` (tokens of answer at the end of each)
    replace the default passkey prompts (tests use tiny models without a tokenizer).
    """
    for name, value, lo in (("steps", steps, 1), ("num_prompts", num_prompts, 1), ("sinks", sinks, 0),
                            ("window", window, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValueError(f"calibrate_duo: {name}={value!r} must be an int >= {lo}")
    if prompts is None:
        from memlab.tasks.niah import Niah, NiahConfig

        task = Niah(NiahConfig(variant="multivalue", length=length, n_values=4, haystack="synthetic"))
        samples = task.samples(tokenizer, num_prompts, seed)
        prompts = [torch.cat([s.prompt_ids, s.answer_ids]) for s in samples]
        answer_lengths = [len(s.answer_ids) for s in samples]
    if answer_lengths is None or len(answer_lengths) != len(prompts):
        raise ValueError("calibrate_duo: answer_lengths must give one length per prompt")
    text = model.config.get_text_config(decoder=True)
    n_layers = text.num_hidden_layers
    n_kv = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    device = next(model.parameters()).device
    base = model.model if hasattr(model, "model") else model.base_model
    previous = model.config._attn_implementation
    for p in model.parameters():
        p.requires_grad_(False)

    # Targets: the unchanged model's final hidden states at the answer positions.
    model.config._attn_implementation = "sdpa"
    targets = []
    with torch.no_grad():
        for ids, n_ans in zip(prompts, answer_lengths, strict=True):
            hs = base(input_ids=ids[None].to(device)).last_hidden_state[0]
            targets.append(hs[-n_ans - 1 : -1].float())

    gates = torch.ones(n_layers, n_kv, device=device, requires_grad=True)
    opt = torch.optim.Adam([gates], lr=lr)
    _GATES.sinks, _GATES.window = sinks, window
    model.config._attn_implementation = TRAIN_ATTN
    losses = []
    gen = torch.Generator().manual_seed(seed)
    start = time.time()
    try:
        for step in range(steps):
            i = int(torch.randint(len(prompts), (1,), generator=gen))
            _GATES.gates = gates
            hs = base(input_ids=prompts[i][None].to(device)).last_hidden_state[0]
            n_ans = answer_lengths[i]
            pred = hs[-n_ans - 1 : -1].float()
            distill = ((pred - targets[i]) ** 2).sum(dim=-1).mean() / targets[i].pow(2).sum(dim=-1).mean()
            loss = distill + l1 * gates.abs().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                gates.clamp_(0.0, 1.0)
            losses.append(float(distill.detach()))
            if log is not None:
                log(step, losses[-1], float(gates.detach().mean()))
    finally:
        model.config._attn_implementation = previous
        _GATES.gates = None
    meta = {
        "method": "duo gate optimisation (distillation L2 on answer positions + L1)",
        "steps": steps, "prompts": len(prompts), "length": length, "sinks": sinks, "window": window,
        "lr": lr, "l1": l1, "seed": seed, "seconds": round(time.time() - start, 1),
        "final_loss": losses[-1],
    }
    return DuoCalibration(gates.detach().cpu(), losses, meta)


def gates_path(model_name_or_path: str) -> Path:
    """Where the gates of a model live: ``<checkpoint>/memlab/duo_gates.safetensors``."""
    from memlab.models.pretrained import checkpoint_dir

    return checkpoint_dir(model_name_or_path) / "memlab" / GATES_FILE


def calibrate_and_save(model_name_or_path: str, **kwargs: Any) -> Path:
    """Load a model, learn its DuoAttention gates and save them beside it."""
    from memlab.models.pretrained import load

    model, tok = load(model_name_or_path)
    result = calibrate_duo(model, tok, **kwargs)
    return save_gates(gates_path(model_name_or_path), result.gates, result.meta)
