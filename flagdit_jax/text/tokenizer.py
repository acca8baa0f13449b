"""Prompts -> token ids and masks from a `tokenizer.json` (the `tokenizers` library), with the
truncation and padding rules set here rather than those stored in the file.

Right padding to the batch's longest prompt rounded up to `pad_multiple` (Lumina-Next: `padding=True,
pad_to_multiple_of=8`); the mask is True on real tokens. Padded ids never reach a real token's
output (BERT masks pad keys; the decoders are causal with right padding and also mask pad keys),
so the pad id only has to be a valid embedding row.

Two truncation rules, both taken from the official code:
  * 'tokenizer': the tokenizers library's, which keeps the special tokens (HF `truncation=True,
    max_length=...`; Lumina-Next's Gemma, sentence-transformers' BERT);
  * 'slice': add the special tokens, then cut the tail (Lumina-T2I's LLaMA,
    `tokenizer.encode(text, truncation=False)[:max_words]`, so an over-long caption loses its EOS).
"""

from __future__ import annotations

import pathlib

import numpy as np
import tokenizers
from tokenizers.processors import TemplateProcessing

TRUNCATIONS = ("tokenizer", "slice")


def check_prompts(prompts) -> list[str]:
    """A non-empty list (or tuple) of str, else ValueError naming what was given."""
    if isinstance(prompts, str):
        raise ValueError(f"prompts must be a list of str, got a bare str {prompts[:40]!r}: wrap it in a list")
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of str, got {type(prompts).__name__} {prompts!r:.80}")
    bad = [(i, type(p).__name__) for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must all be str; items (index, type) {bad[:5]} are not")
    return list(prompts)


class Tokenizer:
    """`tokenizer.json` + our rules: `__call__(prompts) -> (ids int32 [B, S], mask bool [B, S])`.

    `bos_eos=(bos_id, eos_id)` replaces the file's post-processor by `BOS $A EOS` (Lumina-T2I's
    `AutoTokenizer.from_pretrained(..., add_bos_token=True, add_eos_token=True)`); otherwise the
    file's own special-token template is used (BERT: [CLS] $A [SEP]; Gemma: <bos> $A).
    """

    def __init__(self, file: str | pathlib.Path, *, max_length: int, pad_id: int = 0, pad_multiple: int = 8,
                 truncation: str = "tokenizer", bos_eos: tuple[int, int] | None = None):
        file = pathlib.Path(file)
        if not file.is_file():
            raise ValueError(f"{str(file)!r} is missing: the text encoder needs a tokenizer.json "
                             "(save one with tokenizer.save_pretrained or tokenizers.Tokenizer.save)")
        for name, value in (("max_length", max_length), ("pad_multiple", pad_multiple)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if truncation not in TRUNCATIONS:
            raise ValueError(f"truncation={truncation!r}; expected one of {TRUNCATIONS}")
        self.tokenizer = tokenizers.Tokenizer.from_file(str(file))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        if bos_eos is not None:
            bos, eos = (self.tokenizer.id_to_token(i) for i in bos_eos)
            if bos is None or eos is None:
                raise ValueError(f"bos/eos ids {bos_eos} are not in the vocabulary of {str(file)!r}")
            self.tokenizer.post_processor = TemplateProcessing(
                single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {bos} $B {eos}",
                special_tokens=[(bos, bos_eos[0]), (eos, bos_eos[1])])
        if truncation == "tokenizer":
            self.tokenizer.enable_truncation(max_length)
        self.max_length, self.pad_id, self.pad_multiple, self.truncation = max_length, pad_id, pad_multiple, truncation

    def __call__(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        prompts = check_prompts(prompts)
        rows = [e.ids[: self.max_length] for e in self.tokenizer.encode_batch(prompts)]
        longest = max(1, max(len(r) for r in rows))
        s = -(-longest // self.pad_multiple) * self.pad_multiple
        ids = np.full((len(rows), s), self.pad_id, np.int32)
        mask = np.zeros((len(rows), s), bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = r, True
        return ids, mask
