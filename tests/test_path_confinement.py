"""Paths confined: skill names are names, installs stay inside --to, recipe output names stay inside the run dir,
pipelines are found by name or by an explicit .yaml path, and checkpoints load with weights_only=True."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from click.testing import CliRunner

from skillbook import agent, catalog
from skillbook.cli import main
from skillbook.errors import SkillbookError, SkillNotFound
from skillbook.run import recipe as recipe_mod

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
DEMO = FIXTURES / "skills" / "example-demo"


def cli(*args: str, root: Path = FIXTURES):
    return CliRunner().invoke(main, list(args), env={"SKILLBOOK_ROOT": str(root)})


def files_under(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*")} if path.exists() else set()


# ---- skill names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        str(DEMO / "references" / ".."),  # resolves to a real skill folder, but its last part is '..'
        str(DEMO),  # any absolute dir that holds a SKILL.md
        "example-demo/references/..",
        "../fixtures/skills/example-demo",
        "example-demo/",
        "..",
        ".",
        "",
    ],
)
def test_skill_names_are_names_not_paths(name: str) -> None:
    with pytest.raises(SkillNotFound, match="not a skill name"):
        catalog.find(name, FIXTURES)


def test_a_plain_name_still_resolves() -> None:
    assert catalog.find("example-demo", FIXTURES).path == DEMO


@pytest.mark.parametrize("mode", [[], ["--link", "--force"], ["--force"]])
@pytest.mark.parametrize("name", [str(DEMO / "references" / ".."), str(DEMO), "example-demo/.."])
def test_install_of_a_path_writes_nothing_and_deletes_nothing(tmp_path: Path, name: str, mode: list[str]) -> None:
    x = tmp_path / "X"
    x.mkdir()
    (x / "precious.txt").write_text("the user's file")
    res = cli("install", name, "--to", str(x / "agent"), *mode)
    assert res.exit_code == 2, res.output
    assert "not a skill name" in res.output and "Traceback" not in res.output
    assert files_under(x) == {"precious.txt"}
    assert (x / "precious.txt").read_text() == "the user's file"


@pytest.mark.parametrize("mode", [[], ["--link"]])
def test_install_writes_only_the_skill_folder_inside_to(tmp_path: Path, mode: list[str]) -> None:
    x = tmp_path / "X"
    x.mkdir()
    (x / "precious.txt").write_text("keep")
    res = cli("install", "example-demo", "--to", str(x / "agent"), *mode)
    assert res.exit_code == 0, res.output
    assert {p.name for p in x.iterdir()} == {"precious.txt", "agent"}
    assert [p.name for p in (x / "agent").iterdir()] == ["example-demo"]


def test_a_tampered_manifest_cannot_delete_outside_the_skill_folder(tmp_path: Path) -> None:
    dest = tmp_path / "agent"
    agent.install(["example-demo"], dest, root=FIXTURES)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    manifest = dest / "example-demo" / ".skillbook-install.json"
    data = json.loads(manifest.read_text())
    data["files"]["../../victim.txt"] = "0" * 64  # 'removed upstream' entries get unlinked on refresh
    data["files"][str(victim)] = "0" * 64
    manifest.write_text(json.dumps(data))
    agent.install(["example-demo"], dest, force=True, root=FIXTURES)
    assert victim.read_text() == "keep"


def test_install_refuses_to_write_through_a_symlinked_subfolder(tmp_path: Path) -> None:
    dest = tmp_path / "agent"
    agent.install(["example-demo"], dest, root=FIXTURES)
    outside = tmp_path / "outside"
    outside.mkdir()
    refs = dest / "example-demo" / "references"
    for p in refs.iterdir():
        p.unlink()
    refs.rmdir()
    refs.symlink_to(outside, target_is_directory=True)
    (dest / "example-demo" / "SKILL.md").write_text("edited")  # would be restored if the copy had started
    with pytest.raises(SkillbookError, match="resolves outside"):
        agent.install(["example-demo"], dest, force=True, root=FIXTURES)
    assert files_under(outside) == set()
    assert (dest / "example-demo" / "SKILL.md").read_text() == "edited"


# ---- recipe output names ----------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["../../../../x", "a/b", "a\\b", "..", ".hidden", "/abs", "", "x..y"])
def test_safe_name_refuses_separators_and_dots(bad: str) -> None:
    with pytest.raises(ValueError, match="not a safe file name"):
        recipe_mod.safe_name(bad)


@pytest.mark.parametrize("good", ["tiny", "tiny-llama_v2.1", "Qwen2.5-0.5B", "m+q"])
def test_safe_name_accepts_file_stems(good: str) -> None:
    assert recipe_mod.safe_name(good) == good


def test_quantization_name_cannot_escape_the_run_dir(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    res = cli("run", "quantization", "--set", "name=../../../../x", "--runs-dir", str(runs), root=ROOT)
    assert res.exit_code == 2, res.output
    assert "name" in res.output and "not a safe file name" in res.output and "Traceback" not in res.output
    assert files_under(runs) == set() and not (tmp_path / "x-Q8_0.gguf").exists()


# ---- pipeline lookup --------------------------------------------------------------------------

PIPE = "name: {name}\ndescription: One step.\nsteps:\n  - id: a\n    skill: example-demo\n"


def test_an_absolute_path_is_not_silently_a_pipeline(tmp_path: Path) -> None:
    (tmp_path / "x.yaml").write_text(PIPE.format(name="x"))
    res = cli("run", str(tmp_path / "x"), "--dry-run", "--runs-dir", str(tmp_path / "runs"))
    assert res.exit_code == 2, res.output
    assert "not a skill name" in res.output and "known pipelines" in res.output
    assert not (tmp_path / "runs").exists()


def test_a_relative_path_under_recipes_is_not_a_pipeline_name(tmp_path: Path) -> None:
    res = cli("run", "../recipes/x", "--dry-run", "--runs-dir", str(tmp_path / "runs"))
    assert res.exit_code == 2 and "not a skill name" in res.output, res.output


def test_an_explicit_yaml_path_must_exist(tmp_path: Path) -> None:
    res = cli("run", str(tmp_path / "missing.yaml"), "--dry-run", "--runs-dir", str(tmp_path / "runs"))
    assert res.exit_code == 2 and "does not exist" in res.output, res.output


def test_an_explicit_existing_yaml_path_runs_as_a_pipeline(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(PIPE.format(name="mine"))
    res = cli("run", str(path), "--dry-run", "--json", "--runs-dir", str(tmp_path / "runs"))
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["pipeline"] == "mine"


# ---- checkpoints ------------------------------------------------------------------------------


class _Planted:
    def __reduce__(self):
        return (print, ("code ran while loading a checkpoint",))


def test_checkpoints_load_with_weights_only_and_resume_rng_exactly(tmp_path: Path) -> None:
    import numpy as np
    import torch

    from skillbook.ml.training import checkpoints

    random.seed(1)
    np.random.seed(2)
    np.random.randn()  # a cached gaussian in numpy's state
    torch.manual_seed(3)
    path = checkpoints.save_checkpoint({"rng": checkpoints.rng_state(), "step": 7}, tmp_path, 7, keep=2)
    before = (random.random(), float(np.random.randn()), torch.rand(3).tolist())
    ck = checkpoints.load_checkpoint(path)
    checkpoints.set_rng_state(ck["rng"])
    assert (random.random(), float(np.random.randn()), torch.rand(3).tolist()) == before
    assert ck["step"] == 7


def test_a_checkpoint_with_pickled_code_is_refused(tmp_path: Path) -> None:
    import pickle

    import torch

    from skillbook.ml.training import checkpoints

    bad = tmp_path / "step_000001.pt"
    torch.save({"step": 1, "payload": _Planted()}, bad)
    with pytest.raises(pickle.UnpicklingError):
        checkpoints.load_checkpoint(bad)
