"""User-facing errors: the CLI prints these as one line and exits non-zero, never with a traceback."""


class ZhllmError(Exception):
    """A mistake in the user's input (config, paths, data) rather than a bug in zhllm."""


class ConfigError(ZhllmError):
    """A config file or override is wrong; the message names the key and the file."""
