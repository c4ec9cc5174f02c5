"""Grow a checkpoint's embeddings for an extended tokenizer (`zhllm tokenizer extend --model`, `zhllm model resize`).

Each new token starts as the mean of the old embeddings of the pieces its text was split into under the OLD
tokenizer: the model then reads a new token roughly as it read the old piece sequence, which keeps the loss
of continued pretraining low from the first step (the approach of Chinese-LLaMA and of `transformers`'
mean-resizing, but per token rather than one global mean). The output head (when untied) is grown the same
way from its own rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ZhllmError
from .io import load_model, save_model


@dataclass
class ResizeReport:
    out_dir: Path
    old_rows: int
    new_rows: int
    initialised: int

    def __str__(self) -> str:
        return self.table()

    def table(self) -> str:
        return (f"embeddings  {self.old_rows:,} -> {self.new_rows:,} rows\n"
                f"new tokens  {self.initialised:,} initialised from old pieces\noutput      {self.out_dir}")


def resize_embeddings(model_dir: str | Path, new_tokenizer_dir: str | Path, out_dir: str | Path,
                      old_tokenizer_dir: str | Path | None = None, overwrite: bool = False,
                      command: str = "model resize", flag: str = "--out") -> ResizeReport:
    """Load `model_dir`, add rows for the tokens `new_tokenizer_dir` adds to the model's own tokenizer
    (or `old_tokenizer_dir`), and save the checkpoint with the new tokenizer to `out_dir`.
    `command` and `flag` name the caller in the output marker and in errors about `out_dir`."""
    from ..outputs import check_output_dir
    from ..tokenizer.load import load_tokenizer

    check_output_dir(out_dir, command, inputs=[model_dir, new_tokenizer_dir, old_tokenizer_dir],
                     overwrite=overwrite, flag=flag)

    old_tok = load_tokenizer(old_tokenizer_dir or model_dir)
    new_tok = load_tokenizer(new_tokenizer_dir)
    new_ids = new_token_ids(old_tok, new_tok)
    model = load_model(model_dir, train=True)
    old_rows = model.model.embed_tokens.weight.shape[0]
    rows = max(old_rows, len(new_tok), max(new_ids, default=-1) + 1)
    sources = {i: old_piece_ids(old_tok, new_tok, i) for i in new_ids}
    if any(p >= old_rows for pieces in sources.values() for p in pieces):
        raise ZhllmError(f"{model_dir}: the model has {old_rows} embedding rows but its tokenizer uses larger ids")
    with torch.no_grad():
        embed = grow_rows(model.model.embed_tokens.weight, rows, sources)
        model.model.embed_tokens = nn.Embedding.from_pretrained(embed, freeze=False)
        if model.config.tie_embeddings:
            model.lm_head = nn.Linear(embed.shape[1], rows, bias=False, device=embed.device, dtype=embed.dtype)
            model.lm_head.weight = model.model.embed_tokens.weight
        else:
            head = grow_rows(model.lm_head.weight, rows, sources)
            model.lm_head = nn.Linear(head.shape[1], rows, bias=False, device=head.device, dtype=head.dtype)
            model.lm_head.weight = nn.Parameter(head)
    model.config.vocab_size = rows
    save_model(model, out_dir, tokenizer=new_tokenizer_dir, command=command)
    return ResizeReport(Path(out_dir), old_rows, rows, len(new_ids))


def new_token_ids(old_tok, new_tok) -> list[int]:
    """Ids the new tokenizer adds; refuses a tokenizer that moved any old token."""
    old_vocab, new_vocab = old_tok.get_vocab(), new_tok.get_vocab()
    moved = [t for t, i in old_vocab.items() if new_vocab.get(t) != i]
    if moved:
        raise ZhllmError(f"the new tokenizer changes or drops {len(moved)} existing tokens (e.g. {moved[0]!r}); "
                         "embeddings can only be grown for an extension of the model's tokenizer")
    return sorted(i for t, i in new_vocab.items() if t not in old_vocab)


def old_piece_ids(old_tok, new_tok, new_id: int) -> list[int]:
    """Old-tokenizer ids of the text of new token `new_id`.

    A BPE token can be part of a character (byte-level BPE), so it has no text of its own: we run the old
    BPE model on the token's symbols directly. Added tokens (plain text) go through the old tokenizer."""
    from ..tokenizer.encode import encode_text

    token = new_tok.convert_ids_to_tokens(new_id)
    backend = old_tok.backend_tokenizer
    if new_id not in new_tok.added_tokens_decoder and type(backend.model).__name__ == "BPE":
        return [t.id for t in backend.model.tokenize(token)]
    return encode_text(old_tok, new_tok.convert_tokens_to_string([token]))


def grow_rows(weight: torch.Tensor, rows: int, sources: dict[int, list[int]]) -> torch.Tensor:
    """`weight` with `rows` rows; row i in `sources` = mean of the old rows it lists (all rows if none)."""
    out = torch.empty(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
    old = weight.shape[0]
    out[:old] = weight
    fallback = weight.float().mean(0)
    out[old:] = fallback.to(weight.dtype)  # padding rows no token uses
    for i, pieces in sources.items():
        out[i] = (weight[pieces].float().mean(0) if pieces else fallback).to(weight.dtype)
    return out
