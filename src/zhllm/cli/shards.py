"""Parsers for this area's commands; see cli/__init__.py."""


def register(root, groups) -> None:
    pass
