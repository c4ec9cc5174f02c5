"""Evaluation: perplexity / bits per byte on token shards, exact-match accuracy on the demo tasks."""
