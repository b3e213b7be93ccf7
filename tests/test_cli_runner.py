"""The CLI and runner contract on a scaffolded skill in a throwaway repository."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from skillbook.catalog import scaffold
from skillbook.cli import main
from skillbook.errors import SkillbookError
from skillbook.run import recipe, runner


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    (tmp_path / "skills").mkdir()
    (tmp_path / "pyproject.toml").write_text("[project]\nname='x'\n")
    scaffold.new_skill("counter", description="Counts to N. Use when testing the runner.", stage="other", root=tmp_path)
    (tmp_path / "skills" / "counter" / "configs").mkdir()
    (tmp_path / "skills" / "counter" / "configs" / "big.yaml").write_text("steps: 50\n")
    monkeypatch.setenv("SKILLBOOK_ROOT", str(tmp_path))
    return tmp_path


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_run_writes_the_run_directory_contract(repo, tmp_path):
    res = invoke("run", "counter", "--json", "--runs-dir", str(tmp_path / "runs"), "--set", "steps=4")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    run_dir = Path(out["run_dir"])
    assert {
        "config.yaml",
        "metrics.jsonl",
        "log.txt" if (run_dir / "log.txt").exists() else "metrics.jsonl",
        "outputs.json",
        "env.json",
        "report.md",
    } <= {p.name for p in run_dir.iterdir()}
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["steps"] == 4
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and metrics[-1]["total"] == 10
    assert out["summary"] == {"total": 10}
    art = out["outputs"]["result"]
    assert art["kind"] == "file" and json.loads(Path(art["path"]).read_text()) == {"total": 10}
    assert json.loads((run_dir / "env.json").read_text())["python"]
    # runs/<skill>/latest: a relative link to the finished run, moved by the next one, never a run itself
    latest = tmp_path / "runs" / "counter" / "latest"
    assert latest.is_symlink() and latest.resolve() == run_dir.resolve() and not Path(latest.readlink()).is_absolute()
    again = json.loads(
        invoke("run", "counter", "--json", "--runs-dir", str(tmp_path / "runs"), "--set", "steps=3").stdout
    )
    assert latest.resolve() == Path(again["run_dir"]).resolve() != run_dir.resolve()
    listed = json.loads(invoke("runs", "--json", "--runs-dir", str(tmp_path / "runs")).stdout)
    assert sorted(Path(r["path"]).name for r in listed) == sorted([run_dir.name, Path(again["run_dir"]).name])


def test_resolution_order_defaults_yaml_preset_config_set(repo, tmp_path):
    rec = recipe.load(repo / "skills" / "counter")
    assert recipe.resolve(rec).steps == 10  # recipe.yaml
    assert recipe.resolve(rec, preset="big").steps == 50
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("steps: 7\n")
    assert recipe.resolve(rec, preset="big", config_file=cfg_file).steps == 7
    assert recipe.resolve(rec, preset="big", config_file=cfg_file, sets=["steps=3"]).steps == 3


def test_unknown_key_fails_with_did_you_mean_and_no_run_dir(repo, tmp_path):
    runs = tmp_path / "runs"
    res = CliRunner().invoke(main, ["run", "counter", "--set", "stepz=3", "--runs-dir", str(runs)])
    assert res.exit_code != 0
    assert "stepz" in res.output and "did you mean 'steps'" in res.output
    assert res.output.count("error:") == 1
    assert not runs.exists()


def test_bad_value_and_bad_preset_fail_before_running(repo, tmp_path):
    runs = tmp_path / "runs"
    res = CliRunner().invoke(main, ["run", "counter", "--set", "steps=-1", "--runs-dir", str(runs)])
    assert res.exit_code != 0 and "steps" in res.output and "greater than or equal to 1" in res.output
    res = CliRunner().invoke(main, ["run", "counter", "--preset", "bigg", "--runs-dir", str(runs)])
    assert res.exit_code != 0 and "did you mean 'big'" in res.output
    assert not runs.exists()


def test_dry_run_prints_config_and_outputs(repo, tmp_path):
    res = invoke("run", "counter", "--dry-run", "--json", "--set", "steps=2", "--runs-dir", str(tmp_path / "runs"))
    plan = json.loads(res.stdout)
    assert plan["config"]["steps"] == 2 and plan["outputs"] == {"result": "file"}
    assert not (tmp_path / "runs").exists()


def test_unknown_skill_suggests_the_closest(repo):
    res = CliRunner().invoke(main, ["show", "countr"])
    assert res.exit_code != 0 and "did you mean 'counter'" in res.output


def test_list_show_index_prompt(repo, tmp_path):
    listing = json.loads(invoke("list", "--json").stdout)
    assert [s["name"] for s in listing["skills"]] == ["counter"]
    assert "# Counter" in invoke("show", "counter").stdout
    invoke("index", "--out", str(tmp_path / "index.json"))
    assert json.loads((tmp_path / "index.json").read_text())["skills"][0]["presets"] == ["big"]
    xml = invoke("prompt").stdout
    assert "<available_skills>" in xml and "<name>counter</name>" in xml and "SKILL.md</location>" in xml


def test_prompt_budget_shortens_then_drops(repo):
    from skillbook.agent import estimate_tokens

    for i in range(5):
        desc = f"Does task {i} - " + "with detail. " * 40 + f"Use when the user asks for widget{i}."
        scaffold.new_skill(f"extra-{i}", description=desc, root=repo)
    full = invoke("prompt").stdout
    short = invoke("prompt", "--max-tokens", "600").stdout
    tiny = invoke("prompt", "--max-tokens", "200").stdout
    assert len(short) < len(full) and "shortened" in short and "upper bound" in short
    assert "Use when the user asks for widget3." in short  # the clause an agent chooses by survives
    assert estimate_tokens(short.strip()) <= 600 and estimate_tokens(tiny.strip()) <= 200
    kept = tiny.count("<skill>")
    assert "dropped" in tiny and kept < short.count("<skill>")
    named = tiny.split("):")[-1]  # every dropped skill is named, none silently
    assert sum(f"extra-{i}" in named for i in range(5)) + ("counter" in named) == 6 - kept
    focused = invoke("prompt", "--max-tokens", "200", "--for", "I need widget3 done").stdout
    assert "<name>extra-3</name>" in focused and "least relevant" in focused


def test_schema_check_detects_drift(repo):
    assert CliRunner().invoke(main, ["schema", "--check"]).exit_code == 1  # nothing written yet
    assert invoke("schema").exit_code == 0
    assert CliRunner().invoke(main, ["schema", "--check"]).exit_code == 0
    schema_file = repo / "schemas" / "counter.schema.json"
    schema_file.write_text(schema_file.read_text().replace("How many steps", "How many stepz"))
    res = CliRunner().invoke(main, ["schema", "--check"])
    assert res.exit_code == 1 and "counter.schema.json differs" in res.output


def test_new_skill_is_lint_clean_and_runs(repo, tmp_path):
    assert invoke("new", "fresh-skill").exit_code == 0
    res = CliRunner().invoke(main, ["lint"])  # the whole repo: schema and marketplace came with the skill
    assert res.exit_code == 0, res.output
    res = invoke("run", "fresh-skill", "--json", "--runs-dir", str(tmp_path / "runs"))
    assert json.loads(res.stdout)["summary"]["total"] == 55
    listed = invoke("lint", "--rules").stdout
    assert all(code in listed for code in ("SB100", "SB206", "SB305", "SB501", "SB601", "SB999"))
    bad = CliRunner().invoke(main, ["new", "Bad_Name"])
    assert bad.exit_code != 0 and "lowercase" in bad.output


def test_resume_auto_reuses_the_unfinished_run_dir(repo, tmp_path):
    class Cfg(recipe.RecipeConfig):
        resume: str = "never"
        steps: int = 3

    runs = tmp_path / "runs"
    first = runner.new_run_dir("x", Cfg(resume="auto"), runs)
    first.mkdir(parents=True)
    assert runner.new_run_dir("x", Cfg(resume="auto"), runs) == first  # unfinished: reused
    (first / "outputs.json").write_text("{}")
    assert runner.new_run_dir("x", Cfg(resume="auto"), runs) != first  # finished: a new one
    assert runner.new_run_dir("x", Cfg(resume="auto", steps=4), runs).name.split("-")[-1] != first.name.split("-")[-1]


def test_set_values_are_typed():
    assert recipe.parse_set("a.b=3") == (["a", "b"], 3)
    assert recipe.parse_set("lr=3e-4") == (["lr"], 3e-4)
    assert recipe.parse_set("flag=true") == (["flag"], True)
    assert recipe.parse_set("name=data/x.txt") == (["name"], "data/x.txt")
    assert recipe.parse_set("xs=[1, 2]") == (["xs"], [1, 2])


def test_torchrun_launcher_argv():
    argv = runner.Launcher("torchrun", 2).torchrun_argv(Path("/r"), Path("/s"))
    assert argv[1:4] == ["-m", "torch.distributed.run", "--nproc-per-node=2"]
    assert "--standalone" in argv and argv[-3:] == ["skillbook.run.worker", "/r", "/s"]
    multi = runner.Launcher("torchrun", 8, nnodes="2", rdzv_endpoint="host:29500").torchrun_argv(Path("/r"), Path("/s"))
    assert "--nnodes=2" in multi and "--rdzv-endpoint=host:29500" in multi and "--standalone" not in multi
    assert "--max-restarts=3" in runner.Launcher("torchrun", 2, max_restarts=3).torchrun_argv(Path("/r"), Path("/s"))
    assert not any(a.startswith("--max-restarts") for a in argv)  # 0: torchrun's default, not written


def test_accelerate_launcher_argv(tmp_path):
    argv = runner.Launcher("accelerate", 2).argv(Path("/r"), Path("/s"))
    assert argv[1:3] == ["-m", "accelerate.commands.launch"]
    flags = " ".join(argv)
    # no config file: N > 1 needs --multi_gpu (on a CPU too, else accelerate starts one process); the recipe's
    # precision block decides mixed precision; one node takes a free port (two runs on one machine)
    assert "--num_processes 2" in flags and "--multi_gpu" in argv and "--mixed_precision no" in flags
    assert "--num_machines 1" in flags and "--main_process_port 0" in flags and "--config_file" not in argv
    assert argv[-4:] == ["--module", "skillbook.run.worker", "/r", "/s"]
    assert "--multi_gpu" not in runner.Launcher("accelerate").argv(Path("/r"), Path("/s"))  # 1 process
    multi = runner.Launcher("accelerate", 8, nnodes="2", rdzv_endpoint="host:29500", max_restarts=3)
    flags = " ".join(multi.argv(Path("/r"), Path("/s")))
    assert "--num_processes 16 " in flags and "--num_machines 2 " in flags and "--rdzv_backend c10d" in flags
    assert "--main_process_ip host --main_process_port 29500" in flags and "--max_restarts 3" in flags
    # a config file decides the strategy and, unless --nproc-per-node is given, the process count
    cfg = tmp_path / "fsdp.yaml"
    cfg.write_text("distributed_type: FSDP\nnum_processes: 8\nnum_machines: 1\nmixed_precision: bf16\n")
    argv = runner.Launcher("accelerate", accelerate_config=cfg).argv(Path("/r"), Path("/s"))
    assert argv[3:5] == ["--config_file", str(cfg)] and "--num_processes" not in argv
    assert "--multi_gpu" not in argv and "--mixed_precision" not in argv  # the file's FSDP and bf16 hold
    argv = runner.Launcher("accelerate", 4, accelerate_config=cfg).argv(Path("/r"), Path("/s"))
    assert "--num_processes 4" in " ".join(argv) and "--multi_gpu" not in argv
    with pytest.raises(SkillbookError, match="accelerate takes a whole number"):
        runner.Launcher("accelerate", 2, nnodes="1:4")


def test_cli_startup_imports_no_torch():
    code = (
        "import sys; from skillbook.cli import main; import skillbook.catalog as c; c.index(); "
        "print(any(m in sys.modules for m in ('torch', 'transformers')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    res = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "skillbook.cli", "list"], capture_output=True, text=True
    )
    assert res.returncode == 0
    imported = {line.split("|")[-1].strip().split(".")[0] for line in res.stderr.splitlines() if "|" in line}
    assert not imported & {"torch", "transformers", "trl", "peft", "numpy"}


def test_missing_input_artifact_fails_before_a_run_dir(tmp_path, monkeypatch):
    class Cfg(recipe.RecipeConfig):
        corpus: str | None = None
        model: str | None = None

    rec = recipe.Recipe(
        "x", tmp_path / "recipe.py", Cfg, {}, {"corpus": "corpus", "model": "hf-model"}, lambda c, x: {}
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(recipe.ConfigError) as info:
        runner.run(rec, Cfg(corpus=str(tmp_path / "nope"), model="does/not-exist"), runs_dir=tmp_path / "runs")
    assert "corpus:" in str(info.value) and "model: 'does/not-exist'" in str(info.value)
    assert not (tmp_path / "runs").exists()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # online, a hub id is left to the recipe to fetch
    recipe.check_inputs(rec, Cfg(model="org/some-model"))


def test_an_unexpected_error_is_one_line_naming_the_traceback_file(repo, tmp_path, monkeypatch):
    """A bug no check anticipated still ends in one message (exit 1) pointing at error.txt, which
    `skills runs gc` later removes with the failed run dir; SKILLBOOK_TRACEBACK=1 re-raises it."""
    src = repo / "skills" / "counter" / "recipe.py"
    src.write_text(
        src.read_text().replace("def run(cfg", "def run(cfg, ctx):\n    raise KeyError('text')\n\n\ndef _old(cfg")
    )
    res = CliRunner().invoke(main, ["run", "counter", "--runs-dir", str(tmp_path / "runs")])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "error: unexpected KeyError: 'text' (traceback: " in res.output
    error_txt = Path(res.output.split("(traceback: ")[1].split(")")[0])
    assert error_txt.name == "error.txt" and "KeyError" in error_txt.read_text()
    monkeypatch.setenv("SKILLBOOK_TRACEBACK", "1")
    assert isinstance(
        CliRunner().invoke(main, ["run", "counter", "--runs-dir", str(tmp_path / "r2")]).exception, KeyError
    )
