"""For agents: the <available_skills> catalog (`prompt`), installs into agent skill folders (`install`), and the
Claude Code marketplace file (`marketplace`). Their public functions are re-exported here."""

from skillbook.agent.install import AGENT_DIRS, MANIFEST, install, skill_files
from skillbook.agent.marketplace import MARKETPLACE, marketplace, marketplace_drift, marketplace_text, write_marketplace
from skillbook.agent.prompt import estimate_tokens, prompt

__all__ = [
    "AGENT_DIRS",
    "MANIFEST",
    "MARKETPLACE",
    "estimate_tokens",
    "install",
    "marketplace",
    "marketplace_drift",
    "marketplace_text",
    "prompt",
    "skill_files",
    "write_marketplace",
]
