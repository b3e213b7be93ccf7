"""Skillbook: an executable knowledge library of LLM research skills."""

__version__ = "0.1.0"
