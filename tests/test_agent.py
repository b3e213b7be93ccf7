"""Agent integration: `skills install` into agent dirs, and the generated Claude Code marketplace."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from skillbook import agent, catalog, lint
from skillbook.cli import main
from skillbook.errors import SkillbookError

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
FIXTURE_SKILLS = sorted(p.name for p in catalog.skill_dirs(FIXTURES))


def install(tmp_path: Path, *args: str, root: Path = FIXTURES):
    return CliRunner().invoke(main, ["install", *args], env={"SKILLBOOK_ROOT": str(root)})


def lint_errors(path: Path) -> list[str]:
    return [str(f) for f in lint.lint_paths([path]) if f.severity == "error"]


def test_install_all_copies_lint_clean_skills_with_a_manifest(tmp_path: Path) -> None:
    dest = tmp_path / ".agents" / "skills"
    res = install(tmp_path, "--all", "--to", str(dest))
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in dest.iterdir()) == FIXTURE_SKILLS
    demo = dest / "example-demo"
    for rel in ("SKILL.md", "recipe.py", "recipe.yaml", "configs/long.yaml", "references/guide.md"):
        assert (demo / rel).read_bytes() == (FIXTURES / "skills" / "example-demo" / rel).read_bytes()
    manifest = json.loads((demo / agent.MANIFEST).read_text())
    assert manifest["mode"] == "copy" and set(manifest["files"]) == set(
        agent.skill_files(FIXTURES / "skills" / "example-demo")
    )
    assert lint_errors(dest) == []
    assert [line.split()[0] for line in res.output.splitlines() if line.strip() and "skill(s) in" not in line] == [
        "installed"
    ] * 3


def test_reinstall_refreshes_but_refuses_to_overwrite_user_changes(tmp_path: Path) -> None:
    dest = tmp_path / ".claude" / "skills"
    agent.install([], dest, all_skills=True, root=FIXTURES)
    assert {r["action"] for r in agent.install([], dest, all_skills=True, root=FIXTURES)} == {"unchanged"}

    edited = dest / "example-demo" / "SKILL.md"
    edited.write_text(edited.read_text() + "\nmy local note\n")
    (dest / "example-demo" / "recipe.yaml").unlink()  # deleted files are simply restored
    res = install(tmp_path, "example-demo", "--to", str(dest))
    assert res.exit_code == 2
    assert "refusing to overwrite 1 file(s) changed since they were installed" in res.output
    assert f"{edited} (modified since install)" in res.output and "--force" in res.output
    assert (
        "my local note" in edited.read_text() and not (dest / "example-demo" / "recipe.yaml").exists()
    )  # nothing written

    [result] = agent.install(["example-demo"], dest, force=True, root=FIXTURES)
    assert result["action"] == "updated"
    assert edited.read_bytes() == (FIXTURES / "skills" / "example-demo" / "SKILL.md").read_bytes()
    assert (dest / "example-demo" / "recipe.yaml").is_file()


def test_files_not_installed_by_skillbook_are_protected(tmp_path: Path) -> None:
    dest = tmp_path / "skills-dir"
    (dest / "example-demo").mkdir(parents=True)
    (dest / "example-demo" / "SKILL.md").write_text("someone else's skill\n")
    (dest / "example-demo" / "notes.txt").write_text("mine\n")
    with pytest.raises(SkillbookError, match="not installed by skillbook"):
        agent.install(["example-demo"], dest, root=FIXTURES)
    agent.install(["example-demo"], dest, force=True, root=FIXTURES)
    assert (dest / "example-demo" / "notes.txt").read_text() == "mine\n"  # files the skill lacks are left alone


def test_upstream_removals_are_applied(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    shutil.copytree(FIXTURES / "skills" / "example-demo", root / "skills" / "example-demo")
    dest = tmp_path / "dest"
    agent.install(["example-demo"], dest, root=root)
    (root / "skills" / "example-demo" / "configs" / "long.yaml").unlink()
    [result] = agent.install(["example-demo"], dest, root=root)
    assert result["action"] == "updated" and not (dest / "example-demo" / "configs" / "long.yaml").exists()


def test_link_mode_symlinks_and_protects_copies(tmp_path: Path) -> None:
    dest = tmp_path / ".agents" / "skills"
    results = agent.install(["example-demo", "stale-example"], dest, link=True, root=FIXTURES)
    assert [r["action"] for r in results] == ["linked", "linked"]
    link = dest / "example-demo"
    assert link.is_symlink() and link.resolve() == (FIXTURES / "skills" / "example-demo").resolve()
    assert agent.install(["example-demo"], dest, link=True, root=FIXTURES)[0]["action"] == "unchanged"
    # a copy over a link replaces the link; a link over an edited copy is refused
    agent.install(["example-demo"], dest, root=FIXTURES)
    assert not link.is_symlink() and (link / agent.MANIFEST).is_file()
    (link / "recipe.py").write_text("# edited\n")
    with pytest.raises(SkillbookError, match="recipe.py"):
        agent.install(["example-demo"], dest, link=True, root=FIXTURES)


def test_install_needs_names_or_all_and_known_names(tmp_path: Path) -> None:
    assert install(tmp_path, "--to", str(tmp_path)).exit_code == 2
    res = install(tmp_path, "example-dem", "--to", str(tmp_path))
    assert res.exit_code == 2 and "did you mean 'example-demo'" in res.output


def _findings(skills_dir: Path) -> set[tuple]:
    """Lint findings of every skill under a folder, with paths made relative to that folder."""
    out = set()
    for f in lint.lint_paths([skills_dir]):
        rel = (Path.cwd() / f.path).resolve().relative_to(skills_dir.resolve())  # lint paths are cwd-relative
        out.add((f.code, f.severity, str(rel), f.line))
    return out


def test_install_real_skills_lint_like_their_sources(tmp_path: Path) -> None:
    """Installed folders are self-contained: lint finds nothing there that it does not find in skills/."""
    if not catalog.skill_dirs(ROOT):
        pytest.skip("skills/ is empty in this checkout: nothing to install")
    dest = tmp_path / ".agents" / "skills"
    results = agent.install([], dest, all_skills=True, root=ROOT)
    assert len(results) == sum((p / "SKILL.md").is_file() for p in catalog.skill_dirs(ROOT))
    assert _findings(dest) <= _findings(ROOT / "skills")


# ---------------------------------------------------------------------------------------------
# .claude-plugin/marketplace.json
# ---------------------------------------------------------------------------------------------


def test_marketplace_json_is_up_to_date() -> None:
    """The drift check CI runs: regenerate with `skills marketplace` when skills are added or removed."""
    assert agent.marketplace_drift(ROOT) == []


def test_marketplace_lists_every_skill_as_one_plugin(tmp_path: Path) -> None:
    data = agent.marketplace(FIXTURES)
    assert data["name"] == "skillbook" and data["owner"]["name"]
    [plugin] = data["plugins"]
    assert plugin["source"] == "./" and plugin["strict"] is False
    assert plugin["skills"] == [f"./skills/{n}" for n in FIXTURE_SKILLS]
    assert all((FIXTURES / s / "SKILL.md").is_file() for s in plugin["skills"])


def test_marketplace_drift_names_the_missing_skill(tmp_path: Path) -> None:
    root = tmp_path
    shutil.copytree(FIXTURES / "skills" / "example-demo", root / "skills" / "example-demo")
    assert "is missing" in agent.marketplace_drift(root)[0]
    agent.write_marketplace(root)
    assert agent.marketplace_drift(root) == []
    shutil.copytree(FIXTURES / "skills" / "stale-example", root / "skills" / "stale-example")
    [drift] = agent.marketplace_drift(root)
    assert "./skills/stale-example" in drift and "skills marketplace" in drift
    res = CliRunner().invoke(main, ["marketplace", "--check"], env={"SKILLBOOK_ROOT": str(root)})
    assert res.exit_code == 1
    res = CliRunner().invoke(main, ["marketplace"], env={"SKILLBOOK_ROOT": str(root)})
    assert res.exit_code == 0 and agent.marketplace_drift(root) == []


def test_lint_rules_for_installable_skills(tmp_path: Path) -> None:
    from skillbook.lint import docs, repo

    shutil.copytree(FIXTURES / "skills" / "example-demo", tmp_path / "skills" / "example-demo")
    md = tmp_path / "skills" / "example-demo" / "SKILL.md"
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "speedrun.yaml").write_text("steps: []\n")
    md.write_text(md.read_text() + "\nSee [the pipeline](../../recipes/speedrun.yaml).\n")
    [finding] = docs.rule_links_stay_in_skills(catalog.load_skill(md.parent))
    assert finding.code == "SB208" and "speedrun.yaml" in finding.message and finding.severity == "warning"
    [drift] = repo.rule_marketplace(tmp_path)
    assert drift.code == "SB601" and "skills marketplace" in drift.message


def test_link_over_a_copy_protects_added_files_and_source_is_never_a_target(tmp_path: Path) -> None:
    dest = tmp_path / "agent-skills"
    agent.install(["example-demo"], dest, root=FIXTURES)
    (dest / "example-demo" / "my-notes.md").write_text("mine\n")
    with pytest.raises(SkillbookError, match="my-notes.md"):
        agent.install(["example-demo"], dest, link=True, root=FIXTURES)
    with pytest.raises(SkillbookError, match="own folder"):
        agent.install(["example-demo"], FIXTURES / "skills", root=FIXTURES)
