"""The few kinds of error chatpipe raises on bad input.

Each message names the file, row or key at fault and says what to do about it; the command line
prints it without a traceback.
"""


class ChatpipeError(Exception):
    """Base class: an error the user can fix from its message alone."""


class ConfigError(ChatpipeError):
    """A run config that fails validation: unknown key, wrong type, missing file."""


class DataError(ChatpipeError):
    """A dataset file or row that cannot be used."""


class ManifestError(ChatpipeError):
    """A run directory whose manifest is missing, torn, or names an input that is not usable."""


class RewardFunctionError(ChatpipeError):
    """A programmable reward (`ppo.reward.functions`) that raised, or returned a wrong count or a non-finite value."""
