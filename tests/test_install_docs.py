"""The README's install by hand (issue 35) does what tools/_setup does, with the CPU torch
wheel's index named: every install that can pull torch takes PyTorch's CPU index as an extra
index and the constraints, and the packages tools/_setup removes are removed."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def readme_install() -> list[list[str]]:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"The same install by hand.*?```bash\n(.*?)```", readme, re.S)
    assert block, "README: no install-by-hand block"
    return [shlex.split(line) for line in block.group(1).splitlines() if line.strip()]


def setup_lines() -> list[list[str]]:
    text = (ROOT / "tools" / "_setup").read_text()
    return [shlex.split(m) for m in re.findall(r"^\s*pip (.*)$", text, re.M)]


def installs(cmds: list[list[str]], verb: str) -> list[str]:
    """What each `pip VERB` line names, options and their values left out."""
    out = []
    for c in cmds:
        args = c[c.index(verb) + 1 :] if verb in c else []
        out += [
            a
            for i, a in enumerate(args)
            if not a.startswith("-") and (i == 0 or args[i - 1] not in ("-c", "--extra-index-url"))
        ]
    return out


def test_every_install_names_the_cpu_index_and_the_constraints():
    lines = [c for c in readme_install() if "install" in c]
    assert len(lines) == 2, lines
    for cmd in lines:
        assert cmd[cmd.index("--extra-index-url") + 1] == CPU_INDEX, cmd
        assert cmd[cmd.index("-c") + 1] == "constraints.txt", cmd


def test_it_installs_and_removes_what_tools_setup_does():
    readme, setup = readme_install(), setup_lines()
    # tools/_setup adds the test extra and the real-model tests' GGUF package
    want = [t.replace(",test]", "]") for t in installs(setup, "install") if "smollm2" not in t]
    assert installs(readme, "install") == want == ["torch", ".[cpu,trackers]"]
    assert installs(readme, "uninstall") == installs(setup, "uninstall")
    assert installs(readme, "uninstall") == ["torchvision", "torchaudio", "torchcodec"]
