"""What `zhllm tokenizer ...` runs: call the library, print its summary. The parsers live in cli/tokenizer.py."""
from __future__ import annotations

from pathlib import Path

from ..errors import ZhllmError


def train_command(inputs: list[str], out: str, vocab_size: int, max_chars: int, field: str | None,
                  backend: str, num_reserved: int, seed: int, strict: bool, progress: bool = True,
                  overwrite: bool = False) -> None:
    from .train import train_tokenizer

    report = train_tokenizer(inputs, out, vocab_size, max_chars=max_chars, field=field, backend=backend,
                             num_reserved=num_reserved, seed=seed, strict=strict, show_progress=progress,
                             overwrite=overwrite)
    print(report.table())


def extend_command(base: str, inputs: list[str], add: int, out: str, max_chars: int, field: str | None,
                   seed: int, strict: bool, model: str | None = None, model_out: str | None = None,
                   progress: bool = True, overwrite: bool = False) -> None:
    from ..outputs import check_output_dir
    from .extend import EXTEND_COMMAND, extend_tokenizer

    if (model is None) != (model_out is None):
        raise ZhllmError("--model and --model-out go together: the checkpoint to resize and where to write it")
    if model is not None and Path(model).resolve() == Path(model_out).resolve():
        raise ZhllmError("--model-out must differ from --model (the original checkpoint is kept)")
    if model is not None:  # before the slow part: the resize would refuse it only after the extension
        a, b = Path(out).resolve(), Path(model_out).resolve()
        if a == b or a.is_relative_to(b) or b.is_relative_to(a):
            raise ZhllmError("--out and --model-out must be separate directories, neither inside the other")
        check_output_dir(model_out, EXTEND_COMMAND, inputs=[model, base, *inputs], overwrite=overwrite,
                         flag="--model-out")
    report = extend_tokenizer(base, inputs, add, out, max_chars=max_chars, field=field, seed=seed, strict=strict,
                              show_progress=progress, overwrite=overwrite)
    print(report.table())
    if model is not None:
        from ..model.resize import resize_embeddings
        print(resize_embeddings(model, out, model_out, old_tokenizer_dir=base, overwrite=overwrite,
                                command=EXTEND_COMMAND, flag="--model-out").table())


def eval_command(tokenizer: str, inputs: list[str], compare: list[str], field: str | None,
                 max_docs: int | None) -> None:
    from .evaluate import evaluate_tokenizers, stats_table

    print(stats_table(evaluate_tokenizers([tokenizer, *compare], inputs, field=field, max_docs=max_docs)))
