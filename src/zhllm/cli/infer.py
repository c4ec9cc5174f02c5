"""`zhllm generate` and `zhllm chat`: parsers only; the work is in zhllm.infer.chat (see cli/__init__.py)."""


def _sampling_arguments(p, temperature: float, max_new_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"default {max_new_tokens}")
    g.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default {temperature})")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off, default)")
    g.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (1 = off, default 0.9)")
    g.add_argument("--repetition-penalty", type=float, default=1.1, help="1 = off (default 1.1)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed, for reproducible answers")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    g.add_argument("--dtype", default="auto",
                   help="auto (bf16 on CUDA and on CPUs with native bf16, else fp32), float32, bfloat16, float16")
    g.add_argument("--quantize", choices=["none", "int8"], default="none",
                   help="int8: weight-only int8 matrices in the decode step, about 2x faster on a CPU (default none)")


def _sampling(a) -> dict:
    return dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                repetition_penalty=a.repetition_penalty, seed=a.seed, device=a.device, dtype=a.dtype,
                quantize=a.quantize)


def _chat_module():
    from ..infer import chat  # deferred: `zhllm --help` should not import torch
    return chat


def register(root, groups) -> None:
    p = root.add_parser("generate", help="continue a prompt with a model",
                        description="Stream the model's continuation of --prompt (plain text; with --chat, the "
                                    "prompt is a user message rendered with the chat template).")
    p.add_argument("dir", help="checkpoint directory")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--chat", action="store_true", help="treat the prompt as a user message in the chat template")
    _sampling_arguments(p, temperature=0.7, max_new_tokens=256)
    p.set_defaults(func=lambda a: _chat_module().print_generation(
        a.dir, a.prompt, chat_template=a.chat, **_sampling(a)))

    p = root.add_parser("chat", help="multi-turn chat in the terminal",
                        description="Chat with a model; answers stream as they are generated. "
                                    "Commands: /reset clears the conversation, /exit quits. When stdin is not a "
                                    "terminal, each input line is one user message, each answer ends with a "
                                    "newline and a blank line separates answers.")
    p.add_argument("dir", help="checkpoint directory")
    p.add_argument("--system", default=None, help="system message placed before the conversation")
    _sampling_arguments(p, temperature=0.7, max_new_tokens=512)
    p.set_defaults(func=lambda a: _chat_module().chat(a.dir, system=a.system, **_sampling(a)))
