"""A lint finding: a stable code, a severity, file:line and a message that says the fix."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Finding:
    code: str
    severity: str  # "error" | "warning"
    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.code} [{self.severity}] {self.message}"

    def as_dict(self) -> dict:
        return {
            "code": self.code,
            "severity": self.severity,
            "path": self.path,
            "line": self.line,
            "message": self.message,
        }


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def err(code: str, path: Path, line: int, message: str, severity: str = "error") -> Finding:
    return Finding(code, severity, _rel(path), max(line, 0), message)
