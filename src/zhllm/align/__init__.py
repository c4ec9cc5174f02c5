"""Alignment data: preference pairs made from a model's own answers (make-rejected); sits above data/ and infer/."""
