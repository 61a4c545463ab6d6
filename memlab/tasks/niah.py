"""Needle-in-a-haystack tasks for pretrained LMs, in the RULER style, at exact token lengths.

Variants (``variant``):
- ``passkey``: "The pass key is NNNNN. Remember it. NNNNN is the pass key." in the haystack;
  "What is the pass key?"
- ``single``: one needle "The secret code for the vault is NNNNN."; asked for that code.
- ``multikey``: ``n_keys`` needles with different keys (vault, locker, ...); asked for one.
  The other needles are distractors of the same form.
- ``multivalue``: ``n_values`` needles "One of the secret codes for the vault is NNNNN.";
  asked for all of them.
Haystacks (``haystack``): ``synthetic`` filler or ``real`` prose read from disk
(``memlab.data.haystack``). Needles sit between two sentences at a depth drawn uniformly in
[``depth_min``, ``depth_max``] (0: first sentence, 1: last).

A prompt is split in two: ``context_ids`` (chat-template head, instructions, haystack) and
``question_ids`` (the question, the template tail and an answer prefix such as "The secret code
for the vault is"), so that a KV policy can compress the context before the question arrives
(query-agnostic) or with it (query-aware). ``length`` is the exact token count of both together.

Scores: ``exact_match`` (every asked value appears in the greedy answer; allow >= 24 new tokens,
SmolLM2 writes one token per digit) and the teacher-forced log-likelihood of ``answer_ids``
(``memlab.kvcache.answer_logprob``), continuous and less noisy on small samples.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch

from memlab.data.haystack import token_stream
from memlab.tasks.base import IGNORE_INDEX, Task, TaskConfig, TokenData, check_num_examples, register_task

VARIANTS = ("passkey", "single", "multikey", "multivalue")
HAYSTACKS = ("synthetic", "real")
KEYS = ("vault", "locker", "safe", "garage", "cellar", "attic", "studio", "office", "shed", "gate")
MIN_HAYSTACK = 16  # tokens of filler a prompt must keep around its needles


@dataclass(kw_only=True)
class NiahConfig(TaskConfig):
    variant: str = "single"
    length: int = 1024  # prompt tokens: context + question
    haystack: str = "synthetic"
    depth_min: float = 0.0
    depth_max: float = 1.0
    digits: int = 5
    n_keys: int = 4
    n_values: int = 3
    tokenizer: str = "smollm2-135m"  # for make(): a packaged model name or a checkpoint folder
    chat: bool = True  # wrap in the tokenizer's chat template when it has one

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"niah variant={self.variant!r}; expected one of {VARIANTS}")
        if self.haystack not in HAYSTACKS:
            raise ValueError(f"niah haystack={self.haystack!r}; expected one of {HAYSTACKS}")
        for name in ("length", "digits", "n_keys", "n_values"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"niah {name}={value!r} must be a positive int")
        if self.n_keys > len(KEYS):
            raise ValueError(f"niah n_keys={self.n_keys} must be <= {len(KEYS)}")
        # Needle values are distinct numbers of exactly `digits` digits; asking for more of them
        # than exist would make samples() draw forever.
        n_needles = {"multikey": self.n_keys, "multivalue": self.n_values}.get(self.variant, 1)
        n_name = "n_keys" if self.variant == "multikey" else "n_values"
        if n_needles > 9 * 10 ** (self.digits - 1):
            raise ValueError(
                f"niah {n_name}={n_needles} needs that many distinct {self.digits}-digit values; "
                f"only {9 * 10 ** (self.digits - 1)} exist (raise digits)"
            )
        for name in ("depth_min", "depth_max"):
            value = getattr(self, name)
            # A string depth would fail below with a TypeError that names nothing.
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"niah {name}={value!r} must be a number in [0, 1]")
        if not 0.0 <= self.depth_min <= self.depth_max <= 1.0:
            raise ValueError(
                "niah depths must satisfy 0 <= depth_min <= depth_max <= 1, "
                f"got {self.depth_min}, {self.depth_max}"
            )


@dataclass
class NiahSample:
    """One prompt. Ids are 1D int64 tensors; ``needle_positions`` index ``context_ids``."""

    context_ids: torch.Tensor  # (Tc,)
    question_ids: torch.Tensor  # (Tq,)
    answer_ids: torch.Tensor  # (Ta,)
    answer: str
    values: list[str]
    depths: list[float]
    needle_positions: list[int]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_ids(self) -> torch.Tensor:
        return torch.cat([self.context_ids, self.question_ids])


def exact_match(text: str, sample: NiahSample) -> bool:
    """Every value the question asks for appears in the generated text."""
    return all(v in text for v in sample.values)


def _texts(variant: str, keys: list[str], asked: str, values: list[str], n_values: int) -> dict[str, Any]:
    if variant == "passkey":
        return {
            "intro": "There is an important pass key hidden inside a lot of irrelevant text. "
            "Find it and memorize it. I will quiz you about the pass key.",
            "needles": [f" The pass key is {values[0]}. Remember it. {values[0]} is the pass key."],
            "question": "What is the pass key?",
            "prefix": "The pass key is",
            "answer": values[0],
        }
    if variant == "multivalue":
        return {
            "intro": f"Below is a long text. Hidden in it are {n_values} secret codes for the {asked}. "
            "Read it carefully; you will be asked for all of them.",
            "needles": [f" One of the secret codes for the {asked} is {v}." for v in values],
            "question": f"What are all the secret codes for the {asked}?",
            "prefix": f"The secret codes for the {asked} are",
            "answer": ", ".join(values),
        }
    intro = (
        "Below is a long text. Somewhere in it is a secret code. "
        "Read it carefully; you will be asked for the code."
        if variant == "single"
        else "Below is a long text. Hidden in it are secret codes for several places. Read it carefully; "
        "you will be asked for one of them."
    )
    return {
        "intro": intro,
        "needles": [f" The secret code for the {k} is {v}." for k, v in zip(keys, values, strict=True)],
        "question": f"What is the secret code for the {asked}?",
        "prefix": f"The secret code for the {asked} is",
        "answer": values[keys.index(asked)],
    }


def _chat_parts(tokenizer: Any, chat: bool) -> tuple[str, str]:
    """The chat template's text before and after the user message (empty without a template)."""
    if not chat or getattr(tokenizer, "chat_template", None) is None:
        return "", "\n"
    marker = "\x00MEMLAB\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
    )
    head, tail = text.split(marker)
    return head, tail


@register_task("niah")
class Niah(Task):
    """Needle prompts for a pretrained tokenizer (``samples``) or as TokenData (``make``)."""

    Config = NiahConfig

    def samples(self, tokenizer: Any, num_examples: int, seed: int) -> list[NiahSample]:
        """Draw ``num_examples`` prompts of exactly ``config.length`` tokens."""
        check_num_examples(num_examples, seed)
        c = self.config
        stream = token_stream(tokenizer, c.haystack)
        head, tail = _chat_parts(tokenizer, c.chat)

        def enc(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        out = []
        for i in range(num_examples):
            rng = random.Random(f"niah-{c.variant}-{c.haystack}-{c.length}-{seed}-{i}")
            n_needles = {"passkey": 1, "single": 1, "multikey": c.n_keys, "multivalue": c.n_values}[c.variant]
            values = []
            while len(values) < n_needles:
                v = str(rng.randrange(10 ** (c.digits - 1), 10**c.digits))
                if v not in values:
                    values.append(v)
            keys = (
                ["vault"] if c.variant in ("passkey", "single", "multivalue") else rng.sample(KEYS, c.n_keys)
            )
            asked = keys[0] if c.variant != "multikey" else rng.choice(keys)
            t = _texts(c.variant, keys, asked, values, c.n_values)
            head_ids = enc(head + t["intro"] + "\n\n")
            question_ids = enc("\n\n" + t["question"] + tail + t["prefix"])
            needle_ids = [enc(n) for n in t["needles"]]
            n_hay = c.length - len(head_ids) - len(question_ids) - sum(len(n) for n in needle_ids)
            if n_hay < MIN_HAYSTACK:
                raise ValueError(
                    f"niah length={c.length} is too short for variant {c.variant!r}: instructions, needles "
                    f"and question take {c.length - n_hay} tokens"
                )
            hay, slots = stream.window(rng.randrange(len(stream.starts)), n_hay)
            depths = sorted(rng.uniform(c.depth_min, c.depth_max) for _ in needle_ids)
            # Each needle goes to the sentence start nearest its depth; several needles may share
            # a slot, in their order.
            cut = [min(slots, key=lambda s, d=d: abs(s - d * n_hay)) for d in depths]
            ids: list[int] = list(head_ids)
            positions = []
            prev = 0
            for pos, nid in zip(cut, needle_ids, strict=True):
                ids.extend(hay[prev:pos])
                positions.append(len(ids))
                ids.extend(nid)
                prev = pos
            ids.extend(hay[prev:])
            answer_ids = enc(" " + t["answer"])
            out.append(
                NiahSample(
                    context_ids=torch.tensor(ids, dtype=torch.int64),
                    question_ids=torch.tensor(question_ids, dtype=torch.int64),
                    answer_ids=torch.tensor(answer_ids, dtype=torch.int64),
                    answer=t["answer"],
                    values=[t["answer"]] if c.variant != "multivalue" else values,
                    depths=depths,
                    needle_positions=positions,
                    meta={
                        "haystack_source": stream.text.source,
                        "haystack_sha256": stream.text.sha256,
                        "asked": asked,
                    },
                )
            )
        return out

    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        from memlab.models.pretrained import checkpoint_dir

        return AutoTokenizer.from_pretrained(checkpoint_dir(self.config.tokenizer), local_files_only=True)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer())

    def make(self, num_examples: int, seed: int) -> TokenData:
        """Prompt + answer as token data; targets label the answer tokens (teacher forcing)."""
        samples = self.samples(self.tokenizer(), num_examples, seed)
        lengths = {len(s.answer_ids) for s in samples}
        if len(lengths) != 1:
            raise ValueError(
                f"answers tokenize to different lengths {sorted(lengths)}; use samples() instead"
            )
        rows, targets = [], []
        for s in samples:
            seq = torch.cat([s.prompt_ids, s.answer_ids])
            tgt = torch.full_like(seq, IGNORE_INDEX)
            n = len(s.answer_ids)
            tgt[-n - 1 : -1] = s.answer_ids
            rows.append(seq)
            targets.append(tgt)
        return TokenData(torch.stack(rows), torch.stack(targets))
