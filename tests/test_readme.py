"""The README's test command is the one CI runs, so a green CI proves what the README promises."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"Run the tests:\n\n```bash\n(.+)\n```", readme)
    assert block, "README.md has no 'Run the tests:' command block"
    command = block.group(1)
    assert command.startswith("bash tests/install-browser && ")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert ci[-1] == command
