"""How `skills run` starts a recipe: in this process, under torchrun, or under `accelerate launch`.

Both multi-process launchers start N copies of `python -m skillbook.run.worker RUN_DIR SKILL_DIR`, which set
RANK / WORLD_SIZE / LOCAL_RANK (accelerate hands its processes to torch.distributed.run too). `accelerate`
also passes its config (a YAML from `accelerate config`, or the distributed-training skill's
launch/accelerate/*.yaml) to every process through the environment, where the Trainer-based recipes'
Accelerator reads it: DDP, FSDP, DeepSpeed ZeRO, mixed precision. Imports no torch.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from skillbook.errors import SkillbookError

KINDS = ("local", "torchrun", "accelerate")


@dataclass
class Launcher:
    """How to start the run: in-process, or N processes per node under torchrun or accelerate (restarted up to
    `max_restarts` times when one fails: elastic; a recipe with `resume=auto` continues from its checkpoint).

    `nproc_per_node` None means 1, except under accelerate with a config file, whose num_processes then counts.
    """

    kind: str = "local"
    nproc_per_node: int | None = None
    nnodes: str | None = None
    rdzv_endpoint: str | None = None
    max_restarts: int = 0
    accelerate_config: Path | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SkillbookError(f"--launcher {self.kind!r}: use one of {', '.join(KINDS)}")
        if self.nproc_per_node is not None and self.nproc_per_node < 1:
            raise SkillbookError("--nproc-per-node must be at least 1")
        if self.max_restarts < 0:
            raise SkillbookError("--max-restarts must be 0 or more")
        if self.accelerate_config is not None:
            self.accelerate_config = Path(self.accelerate_config)
            if self.kind != "accelerate":
                raise SkillbookError(
                    f"--accelerate-config is read by `accelerate launch`: add --launcher accelerate "
                    f"(got --launcher {self.kind})"
                )
            self._accelerate_settings()  # fails now, before any run directory exists
        if self.kind == "accelerate":
            self._nodes()

    def argv(self, run_dir: Path, skill_dir: Path) -> list[str]:
        """The command line that starts every process of this run (torchrun or accelerate)."""
        if self.kind == "torchrun":
            return self.torchrun_argv(run_dir, skill_dir)
        if self.kind == "accelerate":
            return self.accelerate_argv(run_dir, skill_dir)
        raise SkillbookError("--launcher local runs in this process: there is no command line")

    def torchrun_argv(self, run_dir: Path, skill_dir: Path) -> list[str]:
        argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={self.nproc_per_node or 1}"]
        argv += [f"--max-restarts={self.max_restarts}"] if self.max_restarts else []
        if self.nnodes:
            argv.append(f"--nnodes={self.nnodes}")
        if self.rdzv_endpoint:
            argv += ["--rdzv-backend=c10d", f"--rdzv-endpoint={self.rdzv_endpoint}"]
        else:
            argv.append("--standalone")
        return argv + ["-m", "skillbook.run.worker", str(run_dir), str(skill_dir)]

    def accelerate_argv(self, run_dir: Path, skill_dir: Path) -> list[str]:
        """`python -m accelerate.commands.launch ...`: the flags set here win over the config file's values.

        Without a config file, N > 1 processes need `--multi_gpu` (on a CPU box too: accelerate then runs
        DDP over gloo; without it, it starts one process). Mixed precision and dynamo are left to the recipe
        (`no` here; TrainingArguments' bf16/fp16 decide). One node takes a free port (like torchrun's
        --standalone); several meet at --rdzv-endpoint with c10d, the same line on every node."""
        settings = self._accelerate_settings()
        argv = [sys.executable, "-m", "accelerate.commands.launch"]
        if self.accelerate_config:
            argv += ["--config_file", str(self.accelerate_config)]
        nodes = self._nodes()
        if self.nproc_per_node is not None or not self.accelerate_config:
            total = (self.nproc_per_node or 1) * (nodes or 1)
            argv += ["--num_processes", str(total)]
            if not self.accelerate_config:
                argv += ["--multi_gpu"] if total > 1 else []
                argv += ["--mixed_precision", "no", "--dynamo_backend", "no"]
        if nodes is not None or not self.accelerate_config:
            argv += ["--num_machines", str(nodes or 1)]
        if self.rdzv_endpoint:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            argv += ["--rdzv_backend", "c10d", "--main_process_ip", host, "--main_process_port", port]
        elif (nodes or int(settings.get("num_machines") or 1)) == 1:
            argv += ["--main_process_port", "0"]  # a free port: two runs on one machine do not collide
        argv += ["--max_restarts", str(self.max_restarts)] if self.max_restarts else []
        return argv + ["--module", "skillbook.run.worker", str(run_dir), str(skill_dir)]

    def _nodes(self) -> int | None:
        """--nnodes as accelerate's --num_machines: a whole number (torchrun's elastic MIN:MAX does not map)."""
        if self.nnodes is None:
            return None
        if not str(self.nnodes).isdigit() or int(self.nnodes) < 1:
            raise SkillbookError(
                f"--nnodes {self.nnodes!r}: accelerate takes a whole number of machines "
                "(an elastic MIN:MAX range needs --launcher torchrun)"
            )
        return int(self.nnodes)

    def _accelerate_settings(self) -> dict:
        """The accelerate config file's mapping ({} without one); a missing or unreadable file fails here."""
        if self.accelerate_config is None:
            return {}
        import yaml

        path = self.accelerate_config
        if not path.is_file():
            what = "is a directory, not a YAML file" if path.is_dir() else "does not exist"
            raise SkillbookError(
                f"--accelerate-config {path} {what}; write one with `accelerate config`, or use the "
                "distributed-training skill's launch/accelerate/*.yaml"
            )
        try:
            data = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise SkillbookError(f"--accelerate-config {path} is not valid YAML: {str(exc)[:200]}") from None
        if not isinstance(data, dict) or "distributed_type" not in data:
            raise SkillbookError(
                f"--accelerate-config {path} is not an accelerate config (a mapping with distributed_type)"
            )
        return data
