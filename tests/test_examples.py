"""Executed examples: every runnable block of every skill runs, and a broken one says where it broke.

The parametrized test over skills/ is what CI relies on: one test id per skill, each block in a
fresh subprocess and temp dir, with the fixture variables (SKILLBOOK_MODEL, …) pointing at the
artifacts the session fixtures made. Heavy fixtures are requested only by skills whose blocks
mention them, so a skill with plain blocks never trains anything.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from skillbook import catalog
from skillbook.catalog import codeblocks, markdown
from skillbook.cli import main
from skillbook.run import examples, smoke

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
# CI runs skills/; the self-test below points this at tests/fixtures to prove a broken block fails the run.
SKILLS_ROOT = Path(os.environ.get("SKILLBOOK_EXAMPLES_ROOT", ROOT)).resolve()
REAL_SKILLS = [p.name for p in catalog.skill_dirs(SKILLS_ROOT)]


def fixture_skill(name: str) -> catalog.Skill:
    return catalog.load_skill(FIXTURES / "skills" / name)


def line_of(path: Path, marker: str) -> int:
    """1-based line of the first line containing `marker`."""
    return next(i for i, text in enumerate(path.read_text().splitlines(), 1) if marker in text)


def fixture_env(request: pytest.FixtureRequest, wanted: set[str]) -> dict[str, str]:
    """The fixture layer: SKILLBOOK_* variables from the conftest session fixtures, made on demand."""
    env = {}
    for var in sorted(wanted):
        fixture, output = examples.FIXTURE_VARS[var]
        value = request.getfixturevalue(fixture)
        env[var] = str(value if isinstance(value, Path) else Path(value["outputs"][output]["path"]))
    return env


def fixture_runs(request: pytest.FixtureRequest, skills: set[str]) -> dict[str, str]:
    """The `runs/<skill>/...` placeholders of `slow` blocks: skill -> the session fixture's run dir."""
    runs = {}
    for skill in sorted(skills):
        assert skill in examples.RUN_FIXTURES, f"no fixture run for runs/{skill}/... (examples.RUN_FIXTURES)"
        value = request.getfixturevalue(examples.RUN_FIXTURES[skill])
        runs[skill] = str(value.parent if isinstance(value, Path) else value["run_dir"])
    return runs


# ---------------------------------------------------------------------------------------------
# Every skill in skills/: what CI runs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", REAL_SKILLS)
def test_skill_examples_run(name: str, request: pytest.FixtureRequest) -> None:
    skill = catalog.load_skill(SKILLS_ROOT / "skills" / name)
    assert skill.text, f"skills/{name}/SKILL.md is missing or unreadable"
    blocks = examples.collect(skill)
    executed = [ex for ex in blocks if ex.executed]
    assert executed, f"skill '{name}' has no executed ```python/```bash block (lint SB206)"
    assert examples.syntax_errors(blocks, ROOT) == []
    env = examples.base_env(fixture_env(request, examples.needs(blocks)), SKILLS_ROOT)
    runs = fixture_runs(request, codeblocks.run_needs(blocks))
    failures = [r for r in (examples.run_example(ex, env, runs=runs) for ex in executed) if not r.ok]
    if failures:
        pytest.fail("\n\n".join(r.message(ROOT) for r in failures), pytrace=False)


# ---------------------------------------------------------------------------------------------
# The runner itself, on fixture skills that need no artifacts
# ---------------------------------------------------------------------------------------------


def test_good_fixture_runs_every_executed_block_in_a_fresh_dir() -> None:
    skill = fixture_skill("example-demo")
    assert codeblocks.counts(skill) == {
        "executed": 3,
        "marked": 2,
        "markers": {"fragment": 1, "gpu": 1},
        "smoke": 0,
    }
    results = examples.run_skill(skill, root=FIXTURES)
    assert [r.ok for r in results] == [True, True, True], "\n".join(r.message(FIXTURES) for r in results)
    # the quick-start block ran the fixture recipe through `skills run` (sum 1..3) ...
    assert results[0].stdout.strip() == "6"
    # ... the Python block started in an empty dir and saw its own runs dir ...
    assert "skillbook-example-demo-" in results[1].stdout
    # ... and the reference file's block ran too, at its own line.
    assert results[2].example.path.name == "guide.md" and results[2].stdout.strip() == "55"


def test_broken_example_names_skill_file_and_line() -> None:
    skill = fixture_skill("broken-example")
    results = examples.run_skill(skill, root=FIXTURES)
    assert [r.ok for r in results] == [True, False, False]
    skill_md = FIXTURES / "skills" / "broken-example" / "SKILL.md"
    more = FIXTURES / "skills" / "broken-example" / "references" / "more.md"

    py = results[1]
    assert py.returncode == 1 and py.error_line == line_of(skill_md, "BROKEN-PYTHON-LINE")
    msg = py.message(ROOT)
    assert "skill 'broken-example'" in msg
    assert f"tests/fixtures/skills/broken-example/SKILL.md:{line_of(skill_md, 'json.loads') - 3}" in msg  # the fence
    assert f"SKILL.md:{py.error_line}" in msg and "AttributeError" in msg and "load_string" in msg

    sh = results[2]
    assert sh.returncode == 1 and sh.error_line == line_of(more, "BROKEN-BASH-LINE")
    msg = sh.message(ROOT)
    assert "references/more.md" in msg and f"more.md:{sh.error_line}" in msg and "skill 'broken-example'" in msg


def test_cli_examples_fails_with_location() -> None:
    res = CliRunner().invoke(main, ["examples", "broken-example"], env={"SKILLBOOK_ROOT": str(FIXTURES)})
    assert res.exit_code == 1
    assert "broken-example/SKILL.md:" in res.output and "AttributeError" in res.output
    assert "1 passed, 2 failed" in res.output


def test_slow_block_runs_as_a_smoke_run_against_the_fixture_runs(tmp_path: Path) -> None:
    fixture_run = tmp_path / "20260101-000000-abcd1234"
    (fixture_run / "model").mkdir(parents=True)
    (fixture_run / "model" / "marker").write_text("the fixture sft model\n")
    code = "cat runs/sft/latest/model/marker\necho steps=$SKILLBOOK_SMOKE_STEPS\n"
    ex = examples.Example(
        "smoke-skill", FIXTURES / "skills" / "example-demo" / "SKILL.md", markdown.CodeBlock("bash", ("slow",), code, 3)
    )
    assert ex.executed and ex.smoke and ex.run_skills() == {"sft"}
    res = examples.run_example(ex, examples.base_env(root=FIXTURES), runs={"sft": str(fixture_run), "dpo": "/nowhere"})
    assert res.ok, res.message(FIXTURES)
    assert res.stdout.split("\n")[:2] == ["the fixture sft model", f"steps={smoke.SMOKE_STEPS}"]


def test_smoke_code_cuts_benchmark_lines_only() -> None:
    code = "python benchmarks/pretrain_throughput.py --steps 8 --rounds 3 --configs tiny,small-25m\necho --steps 8\n"
    assert smoke.smoke_code(code, 4) == (
        "python benchmarks/pretrain_throughput.py --steps 4 --rounds 1 --configs tiny\necho --steps 8\n"
    )
    assert smoke.smoke_code("python benchmarks/decode_speed.py --tokens 128 --threads 2", 4).endswith(
        "--tokens 8 --threads 2"
    )


def test_smoke_cap_caps_steps_intervals_and_eval_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    from skillbook.run import recipe

    rec = recipe.load(ROOT / "skills" / "serving")
    cfg = recipe.resolve(rec, overrides={"model": "m"})
    assert smoke.smoke_cap(cfg) == (cfg, {})  # unset: the config as it was
    monkeypatch.setenv(smoke.SMOKE_ENV, "4")
    capped, caps = smoke.smoke_cap(cfg)
    assert capped.smoke is True and caps["smoke"] == [False, True]
    rec = recipe.load(ROOT / "skills" / "pretraining")
    capped, caps = smoke.smoke_cap(recipe.resolve(rec))
    assert capped.max_steps == 4 and caps["max_steps"][1] == 4
    assert all(new <= 8 for name, (_, new) in caps.items() if not isinstance(new, bool)), caps


def test_timeout_kills_the_block_and_says_so() -> None:
    block = markdown.CodeBlock("bash", (), "sleep 30 &\nsleep 30\n", 7)
    ex = examples.Example("slow-skill", FIXTURES / "skills" / "example-demo" / "SKILL.md", block)
    res = examples.run_example(ex, examples.base_env(root=FIXTURES), timeout=1)
    assert res.returncode is None and not res.ok
    assert res.seconds < 20  # the whole process group was killed, background job included
    assert "timed out after 1 s" in res.message(FIXTURES)


def test_fixture_variables_reach_blocks() -> None:
    code = "import os\nprint(os.environ['SKILLBOOK_MODEL'], os.environ['HF_HUB_OFFLINE'])\n"
    ex = examples.Example(
        "x", FIXTURES / "skills" / "example-demo" / "SKILL.md", markdown.CodeBlock("python", (), code, 1)
    )
    res = examples.run_example(ex, examples.base_env({"SKILLBOOK_MODEL": "/models/tiny"}, FIXTURES))
    assert res.ok and res.stdout.split() == ["/models/tiny", "1"]
    assert ex.needs() == {"SKILLBOOK_MODEL"}


def test_marked_blocks_must_still_parse() -> None:
    assert examples.syntax_errors(examples.collect(fixture_skill("example-demo"))) == []
    path = FIXTURES / "skills" / "example-demo" / "SKILL.md"
    bad_py = examples.Example("x", path, markdown.CodeBlock("python", ("gpu",), "def f(:\n", 10))
    bad_sh = examples.Example("x", path, markdown.CodeBlock("bash", ("hub",), "if true; then\n", 20))
    problems = examples.syntax_errors([bad_py, bad_sh])
    assert len(problems) == 2 and "SKILL.md:11" in problems[0] and "does not parse" in problems[1]


def test_examples_module_does_not_import_torch() -> None:
    code = (
        "import sys, skillbook.run.examples, skillbook.catalog.versions, skillbook.cli.agent, skillbook.cli.quality; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_ci_run_fails_on_the_broken_fixture_skill() -> None:
    """The CI test itself, pointed at tests/fixtures: the broken skill fails it with file and line."""
    env = {**os.environ, "SKILLBOOK_EXAMPLES_ROOT": str(FIXTURES)}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(Path(__file__)),
            "-q",
            "-p",
            "no:cacheprovider",
            "-k",
            "test_skill_examples_run",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert "1 failed, 2 passed" in out
    assert "test_skill_examples_run[broken-example]" in out
    broken = FIXTURES / "skills" / "broken-example"
    assert f"tests/fixtures/skills/broken-example/SKILL.md:{line_of(broken / 'SKILL.md', 'BROKEN-PYTHON-LINE')}" in out
    assert f"broken-example/references/more.md:{line_of(broken / 'references' / 'more.md', 'BROKEN-BASH-LINE')}" in out
