"""`zhllm data inspect DIR`: what a shard directory holds, and one decoded document to eyeball."""
from __future__ import annotations

from pathlib import Path

from .shards import open_shard_dir


def inspect_shards(path: str | Path, sample: int = 0, max_chars: int = 300) -> str:
    """Header, per-split totals, and document number `sample` of each split decoded with the stored tokenizer."""
    from ..tokenizer.load import load_tokenizer

    d = open_shard_dir(path)
    m = d.meta
    lines = [f"{d.path}: {m['format']} v{m['version']}, {m['dtype']}, vocab {m['vocab_size']:,}, "
             f"eos id {m['eos_id']}, tokenizer sha256 {m['tokenizer_sha256'][:12]}"]
    for split, s in m["splits"].items():
        bpt = s["bytes"] / s["tokens"] if s["tokens"] else 0.0
        lines.append(f"  {split:<5} {s['shards']} shards, {s['documents']:,} docs, {s['tokens']:,} tokens, "
                     f"{s['bytes'] / 1e6:,.2f} MB text ({bpt:.2f} bytes/token)")
    bad = m.get("read_stats", {}).get("bad_total", 0)
    if bad:
        lines.append(f"  skipped {bad} bad input records: {m['read_stats'].get('bad')}")
    tokenizer = load_tokenizer(d.tokenizer_dir)
    for split in m["splits"]:
        if m["splits"][split]["documents"] > sample:
            ids = d.document(split, sample).tolist()
            text = tokenizer.decode(ids)
            more = "..." if len(text) > max_chars else ""
            lines.append(f"  {split} document {sample} ({len(ids)} tokens, last is EOS={ids[-1] == d.eos_id}):")
            lines.append("    " + text[:max_chars].replace("\n", "\n    ") + more)
    return "\n".join(lines)
