"""Errors the CLI turns into one clear message and a non-zero exit."""


class SkillbookError(Exception):
    """A user-facing error: the message names the problem and the fix."""


class ConfigError(SkillbookError):
    """A recipe or pipeline config that does not validate."""


class SkillNotFound(SkillbookError):
    """No skill or pipeline by that name."""
