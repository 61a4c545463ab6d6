"""Command-line pieces of the KV-cache feature, for ``memlab/cli.py`` to mount.

- ``memlab kv generate --model smollm2-135m --policy duo --ratio 0.25 --prompt-file F``: prints
  the answer and the KV bytes held against the full cache.
- ``memlab calibrate duo --model M``: learns DuoAttention head gates and saves them beside the
  model.

``add_kv_parser(sub)`` and ``add_calibrate_parser(sub)`` add the sub-commands to an argparse
sub-parser group; each sets ``func`` to the command function, which takes the parsed arguments
and returns an exit code.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _option(text: str) -> tuple[str, Any]:
    """``key=value`` -> (key, JSON value or the raw string)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_kv_parser(sub: Any) -> argparse.ArgumentParser:
    kv = sub.add_parser("kv", help="KV-cache policies for Hugging Face models")
    kv_sub = kv.add_subparsers(dest="kv_command", required=True)
    gen = kv_sub.add_parser("generate", help="generate with a KV policy; print the answer and KV bytes")
    gen.add_argument("--model", default="smollm2-135m", help="packaged model name or local checkpoint folder")
    gen.add_argument("--policy", default="full", help="a registered KV policy (memlab list shows them)")
    budget = gen.add_mutually_exclusive_group()
    budget.add_argument("--ratio", type=float, help="fraction of the tokens kept, in (0, 1]")
    budget.add_argument("--tokens", type=int, help="tokens kept per layer and KV head")
    gen.add_argument("--prompt-file", type=Path, required=True, help="text file with the user message")
    gen.add_argument("--question-file", type=Path, help="optional question, appended after compression")
    gen.add_argument("--query-aware", action="store_true", help="compress with the question in the prefill")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--prefill-chunk", type=int, help="prefill in chunks of this many tokens")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                     help="a policy option, e.g. --option window=32")
    gen.set_defaults(func=generate_command)
    return kv


def add_calibrate_parser(sub: Any) -> argparse.ArgumentParser:
    cal = sub.add_parser("calibrate", help="calibration artifacts computed by memlab itself")
    cal_sub = cal.add_subparsers(dest="calibrate_command", required=True)
    duo = cal_sub.add_parser("duo", help="learn DuoAttention head gates on synthetic passkey prompts")
    duo.add_argument("--model", default="smollm2-135m")
    duo.add_argument("--steps", type=int, default=60)
    duo.add_argument("--prompts", type=int, default=8)
    duo.add_argument("--length", type=int, default=1024)
    duo.add_argument("--sinks", type=int, default=16)
    duo.add_argument("--window", type=int, default=64)
    duo.add_argument("--device", default="cpu")
    duo.add_argument("--out", type=Path, help="gates file (default: beside the model)")
    duo.set_defaults(func=calibrate_duo_command)
    return cal


def _chat_pieces(tok: Any, context: str, question: str | None) -> tuple[Any, Any]:
    """(context ids (1, Tc), question ids (1, Tq) or None) of one chat-template user message.

    The two pieces are tokenized apart, so the context can be compressed before the question.
    """
    import torch

    head, tail = "", ""
    if getattr(tok, "chat_template", None) is not None:
        marker = "\x00MEMLAB\x00"
        text = tok.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                       add_generation_prompt=True)
        head, tail = text.split(marker)

    def enc(text: str) -> Any:
        return torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])

    if question is None:
        return enc(head + context + tail), None
    return enc(head + context), enc(question + tail)


def generate_command(args: argparse.Namespace) -> int:
    """Generate with a KV policy; print the answer and the KV bytes held vs the full cache."""

    from memlab.kvcache import KVCache, generate, policies
    from memlab.models.pretrained import load

    if not args.prompt_file.is_file():
        raise ValueError(f"--prompt-file {str(args.prompt_file)!r} does not exist")
    options = dict(args.option)
    if args.policy == "duo" and "gates" not in options:
        from memlab.kvcache.calibrate import gates_path

        options["gates"] = str(gates_path(args.model))
    policy = policies.build(args.policy, ratio=args.ratio, tokens=args.tokens, query_aware=args.query_aware,
                            **options)
    model, tok = load(args.model, device=args.device)
    question_text = args.question_file.read_text() if args.question_file is not None else None
    ids, question = _chat_pieces(tok, args.prompt_file.read_text(), question_text)
    ids = ids.to(args.device)
    question = question.to(args.device) if question is not None else None
    cache = KVCache(model.config, policy=policy, prefill_chunk=args.prefill_chunk)
    out = generate(model, ids, cache, question_ids=question, max_new_tokens=args.max_new_tokens,
                   eos_token_id=tok.eos_token_id, chunk=args.prefill_chunk)
    print(tok.decode(out[0], skip_special_tokens=True).strip())
    held, full_bytes = cache.nbytes(), cache.full_nbytes()
    mode = "query-aware" if policy.query_aware else "query-agnostic"
    print(f"KV bytes held: {held:,} of {full_bytes:,} for the full cache ({held / max(full_bytes, 1):.1%}); "
          f"policy {policy.name} {mode}")
    return 0


def calibrate_duo_command(args: argparse.Namespace) -> int:
    """Learn DuoAttention gates for ``--model`` and save them beside it (or to ``--out``)."""
    from memlab.kvcache.calibrate import calibrate_duo, gates_path
    from memlab.kvcache.policies.duo import save_gates
    from memlab.models.pretrained import load

    model, tok = load(args.model, device=args.device)

    def log(step: int, loss: float, mean_gate: float) -> None:
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  distillation loss {loss:.4f}  mean gate {mean_gate:.3f}", flush=True)

    result = calibrate_duo(model, tok, steps=args.steps, num_prompts=args.prompts, length=args.length,
                           sinks=args.sinks, window=args.window, log=log)
    path = save_gates(args.out or gates_path(args.model), result.gates, {**result.meta, "model": args.model})
    print(f"saved {tuple(result.gates.shape)} gates to {path}")
    return 0
