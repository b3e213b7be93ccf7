"""The lock is the single record of tested versions: every skill's tested-with agrees with it."""

from __future__ import annotations

from conftest import ROOT
from skillbook import catalog
from skillbook.catalog import versions


def locked() -> dict[str, str]:
    out = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, ver = line.partition("==")
            out[name.lower().replace("_", "-")] = ver
    return out


def test_lock_pins_every_line_exactly():
    lines = [ln for ln in (ROOT / "requirements.lock").read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines and all("==" in ln and not any(c in ln for c in "<>~ ;") for ln in lines), lines
    assert {"torch", "transformers", "trl", "peft", "llama-cpp-python"} <= set(locked())


def test_tested_with_versions_are_the_locked_ones():
    lock = locked()
    drift = {
        s.name: {p: (v, lock[p]) for p, v in versions.recorded(s).items() if p in lock and v != lock[p]}
        for s in catalog.load_all(ROOT)
    }
    assert not {k: v for k, v in drift.items() if v}, "run `make lock` (or `skills doctor --update --no-run NAME`)"
