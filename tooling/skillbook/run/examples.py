"""Executed examples: run every runnable code block of a skill's SKILL.md and references.

Each executed block (```python or ```bash without a fragment/gpu/hub/slow/no-run marker)
runs in a fresh subprocess, in a fresh temporary directory, with a timeout, and with the
fixture variables (SKILLBOOK_MODEL, SKILLBOOK_CORPUS, …) pointing at artifacts the real
recipes made with their tiny defaults. A failure names the skill, the file and the line.

A ```bash slow block runs as a smoke run: its working directory gets a `runs/` tree of symlinks
(`runs/<skill>/latest` and `runs/<skill>/<run>` -> the fixture run of that skill) so the placeholders
users copy resolve, `benchmarks/` points at the repository's, SKILLBOOK_SMOKE_STEPS caps every run it
starts (skillbook.run.smoke.smoke_cap, recorded in the run's summary and env.json), and the numeric
flags of `python benchmarks/...` lines are capped the same way.
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from skillbook import catalog
from skillbook.catalog import Skill
from skillbook.catalog.codeblocks import FIXTURE_VARS, Example, collect, display_path, needs, run_needs
from skillbook.run.smoke import SMOKE_ENV, SMOKE_STEPS, SMOKE_TIMEOUT, link_runs, smoke_code

DEFAULT_TIMEOUT = 120.0
FIXTURE_SKILLS = ("data-preparation", "tokenization", "pretraining")  # the recipes that make them, in order
TAIL_LINES = 25
# `runs/<skill>/...` placeholders of `slow` blocks -> the conftest session fixture whose run they resolve to.
RUN_FIXTURES = {
    "data-preparation": "prepared",
    "tokenization": "tokenizer_dir",
    "pretraining": "pretrained",
    "sft": "sft_run",
    "reward-modeling": "reward_model_run",
    "quantization": "quantized_run",
    "guardrails": "guardrails_smoke_run",
    "tool-use": "tool_use_smoke_run",
}


@dataclass
class Result:
    """What running one example did."""

    example: Example
    returncode: int | None  # None = timed out
    seconds: float
    stdout: str = ""
    stderr: str = ""
    timeout: float = DEFAULT_TIMEOUT
    error_line: int | None = None  # the file line the failure points at, when we can tell

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def message(self, root: Path | None = None) -> str:
        """One failure report: skill, file:line, what happened, and the tail of stderr."""
        ex = self.example
        what = (
            f"timed out after {self.timeout:.0f} s"
            if self.returncode is None
            else f"exited with status {self.returncode}"
        )
        head = f"{ex.where(root)}: {ex.kind} block of skill '{ex.skill}' {what}"
        if self.error_line is not None and self.error_line != ex.line:
            head += f" (failing line {display_path(ex.path, root)}:{self.error_line})"
        tail = "\n".join((self.stderr or self.stdout).rstrip().splitlines()[-TAIL_LINES:])
        return head + ("\n" + "\n".join("    " + ln for ln in tail.splitlines()) if tail else "")

    def as_dict(self, root: Path | None = None) -> dict:
        return {
            "skill": self.example.skill,
            "where": self.example.where(root),
            "ok": self.ok,
            "returncode": self.returncode,
            "seconds": round(self.seconds, 2),
            "error_line": self.error_line,
            "stderr_tail": self.stderr[-2000:],
        }


def syntax_errors(examples: list[Example], root: Path | None = None) -> list[str]:
    """Marked blocks still have to parse: Python with ast, shell with `bash -n`."""
    problems = []
    for ex in examples:
        if ex.kind == "python":
            try:
                ast.parse(ex.block.code)
            except SyntaxError as exc:
                problems.append(
                    f"{display_path(ex.path, root)}:{ex.line + (exc.lineno or 0)}: "
                    f"Python block does not parse: {exc.msg}"
                )
        else:
            res = subprocess.run(["bash", "-n"], input=ex.block.code, capture_output=True, text=True)
            if res.returncode != 0:
                problems.append(f"{ex.where(root)}: shell block does not parse: {res.stderr.strip()}")
    return problems


# ---------------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------------


def base_env(fixtures: dict[str, str] | None = None, root: Path | None = None) -> dict[str, str]:
    """The environment every block sees: offline hubs, the repo, the venv's `skills`, fixture vars."""
    env = dict(os.environ)
    env.update(
        {
            "SKILLBOOK_ROOT": str((root or catalog.repo_root()).resolve()),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "MPLBACKEND": "Agg",
            "PYTHONUNBUFFERED": "1",
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        }
    )
    env.update(fixtures or {})
    return env


def _script(example: Example, scripts: Path, code: str | None = None) -> tuple[list[str], Path]:
    """Write the block to a file and return the command that runs it."""
    code = example.block.code if code is None else code
    if example.kind == "python":
        path = scripts / "block.py"
        path.write_text(code)
        return [sys.executable, str(path)], path
    path = scripts / "block.sh"
    # The ERR trap reports the failing line (minus this one) since `set -e` exits silently.
    trap = "trap 'echo \"skillbook-example: block line $((LINENO-1)) exited with $?\" >&2' ERR\n"
    path.write_text(trap + code)
    return ["bash", "-euo", "pipefail", str(path)], path


def _error_line(example: Example, stderr: str, script: Path) -> int | None:
    """Map the failing line inside the block back to a line of the Markdown file."""
    if example.kind == "python":
        hits = re.findall(rf'File "{re.escape(str(script))}", line (\d+)', stderr)
        hits = hits or re.findall(r'File "<string>", line (\d+)', stderr)
    else:
        hits = re.findall(r"skillbook-example: block line (\d+)", stderr)
        hits = hits or [str(int(n) - 1) for n in re.findall(rf"{re.escape(str(script))}: line (\d+)", stderr)]
    return example.line + int(hits[-1]) if hits else None


def run_example(
    example: Example,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    runs: dict[str, str] | None = None,
) -> Result:
    """Run one block in a fresh subprocess and a fresh temp dir; kill its process group on timeout.

    A `slow` block runs as a smoke run: `runs` (skill -> fixture run dir) become its runs/ placeholders and
    SKILLBOOK_SMOKE_STEPS caps what it starts."""
    default = SMOKE_TIMEOUT if example.smoke else DEFAULT_TIMEOUT
    timeout = timeout or float(os.environ.get("SKILLBOOK_EXAMPLE_TIMEOUT", default))
    env = dict(env if env is not None else base_env())
    text = example.block.code
    if example.smoke:
        env[SMOKE_ENV] = env.get(SMOKE_ENV) or str(SMOKE_STEPS)
        text = smoke_code(text, int(env[SMOKE_ENV]))
    with tempfile.TemporaryDirectory(prefix=f"skillbook-{example.skill}-") as tmp:
        work, scripts = Path(tmp) / "work", Path(tmp) / "script"
        work.mkdir()
        scripts.mkdir()
        env["SKILLBOOK_RUNS"] = str(work / "runs")
        if example.smoke:
            link_runs(
                work,
                {s: d for s, d in (runs or {}).items() if s in example.run_skills()},
                Path(env.get("SKILLBOOK_ROOT") or catalog.repo_root()),
            )
        argv, script = _script(example, scripts, text)
        started = time.perf_counter()
        proc = subprocess.Popen(
            argv,
            cwd=work,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
            code: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            code = None
        seconds = time.perf_counter() - started
    res = Result(example, code, seconds, out, _translate(example, err, script), timeout)
    if not res.ok:
        res.error_line = _error_line(example, err, script)
    return res


def _translate(example: Example, stderr: str, script: Path) -> str:
    """Point tracebacks at the Markdown file and line instead of the temporary script."""
    doc = display_path(example.path)
    stderr = re.sub(
        rf'File "{re.escape(str(script))}", line (\d+)',
        lambda m: f'File "{doc}", line {example.line + int(m.group(1))}',
        stderr,
    )
    stderr = re.sub(
        r"skillbook-example: block line (\d+) exited with (\d+)",
        lambda m: f"{doc}:{example.line + int(m.group(1))}: command exited with status {m.group(2)}",
        stderr,
    )
    return re.sub(
        rf"{re.escape(str(script))}: line (\d+)", lambda m: f"{doc}: line {example.line + int(m.group(1)) - 1}", stderr
    )


def run_skill(
    skill: Skill,
    fixtures: dict[str, str] | None = None,
    timeout: float | None = None,
    root: Path | None = None,
    runs: dict[str, str] | None = None,
) -> list[Result]:
    """Run every executed block of one skill, in file order (`runs`: skill -> fixture run dir for `slow` ones)."""
    env = base_env(fixtures, root)
    return [run_example(ex, env, timeout, runs) for ex in collect(skill) if ex.executed]


# ---------------------------------------------------------------------------------------------
# The fixture layer outside pytest (`skills examples`, `skills doctor --update`)
# ---------------------------------------------------------------------------------------------


@dataclass
class Fixtures:
    """Artifacts the recipes' tiny defaults make once and cache under .skillbook-cache/examples."""

    cache: Path
    env: dict[str, str] = field(default_factory=dict)

    @staticmethod
    def key() -> str:
        """Hash of the fixture recipes and their defaults: a changed recipe rebuilds the cache."""
        import hashlib

        h = hashlib.sha256()
        for skill in FIXTURE_SKILLS:
            for name in ("recipe.py", "recipe.yaml"):
                path = catalog.repo_root() / "skills" / skill / name
                h.update(path.read_bytes() if path.is_file() else b"-")
        return h.hexdigest()[:16]

    def _load(self) -> None:
        index = self.cache / "fixtures.json"
        try:
            data = json.loads(index.read_text())
        except (OSError, ValueError):
            return
        if isinstance(data, dict) and data.get("key") == self.key():
            self.env = {k: v for k, v in data.get("env", {}).items() if Path(v).exists()}

    def _save(self) -> None:
        self.cache.mkdir(parents=True, exist_ok=True)
        data = {"key": self.key(), "env": self.env}
        (self.cache / "fixtures.json").write_text(json.dumps(data, indent=2) + "\n")

    def ensure(self, wanted: set[str], log=print) -> dict[str, str]:
        """Make the artifacts behind `wanted` (and what they depend on) unless cached."""
        from skillbook.run import recipe, runner

        self._load()
        runs = self.cache / "runs"
        order = ["prepared", "tokenizer_dir", "pretrained_model"]
        depth = max((order.index(FIXTURE_VARS[v][0]) for v in wanted if v in FIXTURE_VARS), default=-1)

        def step(skill: str, sets: dict) -> dict:
            log(f"fixture layer: running {skill} (tiny default) into {runs}")
            rec = recipe.load(catalog.repo_root() / "skills" / skill)
            return runner.run(rec, recipe.resolve(rec, overrides=sets), runs_dir=runs, quiet=True)["outputs"]

        if depth >= 0 and "SKILLBOOK_CORPUS" not in self.env:
            outs = step("data-preparation", {})
            for var, (fix, name) in FIXTURE_VARS.items():
                if fix == "prepared":
                    self.env[var] = outs[name]["path"]
            self._save()
        if depth >= 1 and "SKILLBOOK_TOKENIZER" not in self.env:
            outs = step("tokenization", {"corpus": self.env["SKILLBOOK_CORPUS"]})
            self.env["SKILLBOOK_TOKENIZER"] = outs["tokenizer"]["path"]
            self._save()
        if depth >= 2 and "SKILLBOOK_MODEL" not in self.env:
            outs = step(
                "pretraining", {"corpus": self.env["SKILLBOOK_CORPUS"], "tokenizer": self.env["SKILLBOOK_TOKENIZER"]}
            )
            self.env["SKILLBOOK_MODEL"] = outs["model"]["path"]
            self._save()
        return {k: v for k, v in self.env.items() if k in FIXTURE_VARS}

    def ensure_runs(self, skills: set[str], log=print) -> dict[str, str]:
        """Fixture runs (skill -> run dir) for the `runs/<skill>/...` placeholders of `slow` blocks: the
        chain's own runs, and smoke-capped runs of sft, reward-modeling, quantization, guardrails, tool-use."""
        from skillbook.run import recipe, runner

        unknown = sorted(skills - set(RUN_FIXTURES))
        if unknown:
            raise ValueError(f"no fixture run for runs/{unknown[0]}/...: add it to RUN_FIXTURES and tests/conftest.py")
        env = self.ensure({"SKILLBOOK_MODEL"} if skills else set(), log=log)
        runs = self.cache / "runs"
        made = {s: self.env[f"run:{s}"] for s in skills if f"run:{s}" in self.env}  # _load dropped gone ones

        def step(skill: str, sets: dict) -> str:
            if skill not in made:
                log(f"fixture layer: running {skill} (smoke-capped) into {runs}")
                rec = recipe.load(catalog.repo_root() / "skills" / skill)
                saved = os.environ.get(SMOKE_ENV)
                os.environ[SMOKE_ENV] = saved or str(SMOKE_STEPS)
                try:
                    res = runner.run(rec, recipe.resolve(rec, overrides=sets), runs_dir=runs, quiet=True)
                finally:
                    if saved is None:
                        del os.environ[SMOKE_ENV]
                made[skill] = self.env[f"run:{skill}"] = res["run_dir"]
                self._save()
            return made[skill]

        def model_of(skill: str) -> str:
            return str(Path(step(skill, sets_for(skill))) / "model")

        def sets_for(skill: str) -> dict:
            data = {"data": env["SKILLBOOK_SFT_DATA"]}
            if skill == "sft":
                return {"model": env["SKILLBOOK_MODEL"], **data, "eval_data": env["SKILLBOOK_EVAL_DATA"]}
            if skill == "reward-modeling":
                return {"model": model_of("sft"), "data": env["SKILLBOOK_PREFERENCE_DATA"]}
            if skill == "quantization":
                return {"model": model_of("sft"), "corpus": env["SKILLBOOK_CORPUS"], "types": ["F32", "Q8_0"]}
            if skill == "guardrails":
                return {"model": model_of("sft"), **data}
            return {"model": env["SKILLBOOK_MODEL"]}  # tool-use

        chain = {"data-preparation": "SKILLBOOK_CORPUS", "tokenization": "SKILLBOOK_TOKENIZER"}
        chain["pretraining"] = "SKILLBOOK_MODEL"
        out = {}
        for skill in sorted(skills):
            if skill in chain:  # the fixture chain's own run: the parent of its output
                out[skill] = str(Path(env[chain[skill]]).parent)
            else:
                out[skill] = step(skill, sets_for(skill))
        return out


def default_cache(root: Path | None = None) -> Path:
    return (root or catalog.repo_root()) / ".skillbook-cache" / "examples"


def run_skills(names: list[str], timeout: float | None = None, root: Path | None = None, log=print) -> list[Result]:
    """`skills examples NAME…`: build the fixtures the blocks need, then run them."""
    root = root or catalog.repo_root()
    skills = [catalog.find(n, root) for n in names] if names else catalog.load_all(root)
    wanted = set().union(*(needs(collect(s)) for s in skills)) if skills else set()
    wanted_runs = set().union(*(run_needs(collect(s)) for s in skills)) if skills else set()
    cache = Fixtures(default_cache(root))
    fixtures = cache.ensure(wanted, log=log) if wanted else {}
    runs = cache.ensure_runs(wanted_runs, log=log) if wanted_runs else {}
    results = []
    for skill in skills:
        results += run_skill(skill, fixtures, timeout, root, runs)
    return results
