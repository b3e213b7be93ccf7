"""Shared fixtures: the real recipes produce the data, tokenizer and model later tests build on.

Session-scoped so the whole suite prepares data, trains a tokenizer and pretrains the tiny
model once; tests that need them ask for the fixture, and tests that only need the
catalog never pay for them. Under pytest-xdist (`make test` runs 2 workers) the first worker to ask builds
each of these runs and the others reuse it (`shared`), so nothing trains twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from filelock import FileLock

from skillbook import catalog
from skillbook.run import recipe, runner

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("SKILLBOOK_ROOT", str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub access in tests: everything is generated here
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread count for the whole suite (and the `skills run` subprocesses it starts): tests that compare
# two runs (resume, DDP parity, the pipeline cache) need both to add floats in the same order, and the
# runner would otherwise pick threads from the load of the moment. test_threads covers that choice.
# Under pytest-xdist each worker gets its share of the cores, so N workers never oversubscribe them. A value the
# user set is kept; the one this file set in the xdist controller (inherited by its workers) is not.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if os.environ.get("OMP_NUM_THREADS") in (None, os.environ.get("SKILLBOOK_SUITE_THREADS")):
    os.environ["OMP_NUM_THREADS"] = os.environ["SKILLBOOK_SUITE_THREADS"] = str(
        max(1, len(os.sched_getaffinity(0)) // _WORKERS)
    )


def run_skill(name: str, runs_dir: Path, sets: dict | None = None, preset: str | None = None) -> dict:
    """Run a skill through the library API (as `skills run` does) and return its result dict."""
    rec = recipe.load(ROOT / "skills" / name)
    cfg = recipe.resolve(rec, preset=preset, overrides=sets or {})
    return runner.run(rec, cfg, runs_dir=runs_dir, quiet=True)


def dtype_tolerance(summary: dict, fp32: float, bf16: float) -> float:
    """An exactness bound that follows the autocast dtype the run actually used (SKILLBOOK_AUTO_DTYPE=bfloat16
    or a native-bf16 CPU turn `dtype: auto` into bf16, whose 8-bit mantissa moves losses by ~1e-3)."""
    return bf16 if summary.get("dtype") == "bfloat16" else fp32


def tiny_model_dir(path: Path) -> Path:
    """A loadable 1-layer Llama dir without a tokenizer: passes the input check, so a test can reach the
    data check behind it."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


def output(result: dict, name: str) -> Path:
    return Path(result["outputs"][name]["path"])


def shared(tmp_path_factory: pytest.TempPathFactory, name: str, build):
    """build() once per test session: alone, that is this process; under pytest-xdist, the first worker to get
    the lock builds it and leaves its JSON result (paths into its own temp dir, which lives as long as the
    session) for the other workers."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return build()
    root = tmp_path_factory.getbasetemp().parent  # the session's temp dir, shared by its workers
    done = root / f"shared-{name}.json"
    with FileLock(str(root / f"shared-{name}.lock")):
        if done.is_file():
            return json.loads(done.read_text())
        value = build()
        done.write_text(json.dumps(value))
        return value


@pytest.fixture(scope="session")
def session_runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def prepared(session_runs, tmp_path_factory) -> dict:
    """data-preparation on the embedded synthetic world (seed 0)."""
    return shared(tmp_path_factory, "prepared", lambda: run_skill("data-preparation", session_runs))


@pytest.fixture(scope="session")
def tokenizer_dir(prepared, session_runs, tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer trained on the prepared corpus."""
    sets = {"corpus": str(output(prepared, "corpus"))}
    return output(
        shared(tmp_path_factory, "tokenizer", lambda: run_skill("tokenization", session_runs, sets)), "tokenizer"
    )


@pytest.fixture(scope="session")
def pretrained(prepared, tokenizer_dir, session_runs, tmp_path_factory) -> dict:
    """The tiny pretraining run (default config) on the prepared corpus."""
    sets = {"corpus": str(output(prepared, "corpus")), "tokenizer": str(tokenizer_dir)}
    return shared(tmp_path_factory, "pretrained", lambda: run_skill("pretraining", session_runs, sets))


@pytest.fixture(scope="session")
def pretrained_model(pretrained) -> Path:
    return output(pretrained, "model")


@pytest.fixture(scope="session")
def sft_run(prepared, pretrained_model, session_runs, tmp_path_factory) -> dict:
    """The default sft run on the session's pretrained model: test_sft checks it, and dpo, grpo and
    reward-modeling start from its merged model. Session-scoped, so it trains once per session."""
    sets = {
        "model": str(pretrained_model),
        "data": str(output(prepared, "sft_data")),
        "eval_data": str(output(prepared, "eval_data")),
    }
    return shared(tmp_path_factory, "sft", lambda: run_skill("sft", session_runs, sets))


@pytest.fixture(scope="session")
def sft_model(sft_run) -> Path:
    return output(sft_run, "model")


@pytest.fixture(scope="session")
def reward_model_run(prepared, sft_model, session_runs, tmp_path_factory) -> dict:
    """The default reward-modeling run on the session's sft model: test_reward_modeling checks it, and rlhf
    scores its policy with it. Session-scoped, so it trains once per session."""
    sets = {"model": str(sft_model), "data": str(output(prepared, "preference_data"))}
    return shared(tmp_path_factory, "reward-model", lambda: run_skill("reward-modeling", session_runs, sets))


@pytest.fixture(scope="session")
def guardrails_smoke_run(prepared, sft_model, session_runs, tmp_path_factory) -> dict:
    """A few-step guardrails run on the sft model: the `runs/guardrails/latest/...` of the docs' smoke-run
    `slow` blocks (serve the model behind the guard). Its numbers mean nothing; test_guardrails has its own."""
    sets = {"model": str(sft_model), "data": str(output(prepared, "sft_data")), "guard_steps": 4, "steps": 4}
    return shared(
        tmp_path_factory, "guardrails-smoke", lambda: run_skill("guardrails", session_runs, {**sets, "eval_limit": 8})
    )


@pytest.fixture(scope="session")
def tool_use_smoke_run(pretrained_model, session_runs, tmp_path_factory) -> dict:
    """A few-step tool-use run on the pretrained model: the `runs/tool-use/latest/model` of the docs' smoke-run
    `slow` blocks. Its numbers mean nothing; test_tool_use trains its own."""
    sets = {"model": str(pretrained_model), "steps": 4, "arithmetic": 16, "lookups": 8, "eval_requests": 4}
    return shared(tmp_path_factory, "tool-use-smoke", lambda: run_skill("tool-use", session_runs, sets))


@pytest.fixture(scope="session")
def quantized_run(prepared, sft_model, session_runs, tmp_path_factory) -> dict:
    """F32 + Q8_0 GGUFs of the sft model, small checks: the `runs/quantization/latest/gguf/model-Q8_0.gguf` of the
    docs' smoke-run `slow` blocks (the file stem is the model dir's name, `model`)."""
    sets = {"model": str(sft_model), "corpus": str(output(prepared, "corpus")), "types": ["F32", "Q8_0"]}
    sets = {**sets, "eval_docs": 4, "decode_tokens": 8, "torch_int8": False}
    return shared(tmp_path_factory, "quantized", lambda: run_skill("quantization", session_runs, sets))


@pytest.fixture
def repo_root() -> Path:
    return catalog.repo_root(ROOT)


@pytest.fixture(scope="session")
def family_model(tokenizer_dir, tmp_path_factory):
    """A factory: family name -> a tiny random-init model dir of that family (built once per session) that
    carries the session's byte-level BPE tokenizer. See tests/families.py."""
    from families import build_family_model

    built: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("families")

    def get(family: str) -> Path:
        if family not in built:
            made = shared(
                tmp_path_factory,
                f"family-{family}",
                lambda: str(build_family_model(family, tokenizer_dir, root / family)),
            )
            built[family] = Path(made)
        return built[family]

    return get


@pytest.fixture(scope="session")
def family_quantized(family_model, prepared, tmp_path_factory):
    """A factory: family -> (model dir, result) of one `skills run quantization` (F32 + Q8_0, one llama.cpp
    converter run) on that family's tiny model; the GGUF checks and the served-GGUF tests share it."""
    runs = tmp_path_factory.mktemp("gguf-families")
    done: dict[str, tuple[Path, dict]] = {}

    def get(family: str) -> tuple[Path, dict]:
        if family not in done:
            model_dir = family_model(family)
            sets = {
                "model": str(model_dir),
                "corpus": str(output(prepared, "corpus")),
                "types": ["F32", "Q8_0"],
                "eval_docs": 4,
                "decode_tokens": 8,
                "torch_int8": False,
            }
            done[family] = (
                model_dir,
                shared(tmp_path_factory, f"gguf-{family}", lambda: run_skill("quantization", runs, sets)),
            )
        return done[family]

    return get


@pytest.fixture(scope="session")
def family_gguf(family_quantized):
    """A factory: family -> the Q8_0 GGUF of its tiny model (from family_quantized)."""
    return lambda family: output(family_quantized(family)[1], "gguf")


# ---------------------------------------------------------------------------------------------
# The support table: every `family_matrix` test records its (skill, family) cell; with SKILLBOOK_SUPPORT_OUT set,
# the session writes them there (see skillbook.catalog.support). A test that asserts a refusal records the
# message with `record_property("support_reason", message)`, which turns its cell into "refused".
# ---------------------------------------------------------------------------------------------

_support_cells: dict[str, dict[str, dict]] = {}


def _support_cell(item, report) -> tuple[str, str] | None:
    marker = item.get_closest_marker("family_matrix")
    family = getattr(item, "callspec", None) and item.callspec.params.get("family")
    if marker is None or not family:
        return None
    skill = marker.args[0] if marker.args else item.originalname.removeprefix("test_").removesuffix("_on_family")
    skill = skill.replace("_", "-")
    backend = item.callspec.params.get("backend")  # serving: one row per backend
    return (f"{skill} ({backend})" if backend else skill), family


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    where = _support_cell(item, report)
    if where is None or (report.when != "call" and not report.failed and not report.skipped):
        return
    skill, family = where
    reason = next((v for k, v in item.user_properties if k == "support_reason"), None)
    if report.skipped:
        cell = {"status": "skip", "reason": str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else ""}
    elif report.failed:
        cell = {"status": "fail"}
    else:
        cell = {"status": "refused", "reason": reason} if reason else {"status": "pass"}
        values = next((v for k, v in item.user_properties if k == "support_values"), None)
        if values and not reason:  # what the cell measured, rendered by `skills support --write`
            cell.update(values=values, machine=_machine())
    if _support_cells.get(skill, {}).get(family, {}).get("status") != "fail":  # a failed setup/teardown sticks
        _support_cells.setdefault(skill, {})[family] = cell


def pytest_sessionfinish(session, exitstatus):
    out = os.environ.get("SKILLBOOK_SUPPORT_OUT")
    if not out or not _support_cells:
        return
    from families import FAMILIES
    from skillbook.catalog import support

    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):  # each xdist worker merges its own cells into the one file
        old = support.load(path) if path.is_file() else {}
        merged = support.merge(old, _support_cells, list(FAMILIES), _machine())
        path.write_text(json.dumps(merged, indent=2) + "\n", encoding="utf-8")


def _machine() -> str:
    """The CPU and autocast dtype a support cell was measured with."""
    return f"{_cpu_name()}, {os.environ.get('SKILLBOOK_AUTO_DTYPE', 'fp32 (tiny models: `dtype: auto` picks fp32)')}"


def _cpu_name() -> str:
    """'AMD EPYC, family 25 model 1 (avx2, no native bf16) (2 cores)': the CPU kind a support cell was measured
    on (fp32 kernels, and so the tiny models' digits, differ between CPU kinds)."""
    from skillbook.run import environment

    return f"{environment.cpu_info()} ({len(os.sched_getaffinity(0))} cores)"
