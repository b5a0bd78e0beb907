"""The commands the README's "Orchestration" section (and infra/) tell a user to paste actually work."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}


def orchestration_section() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    m = re.search(r"^## Orchestration\n(.*?)(?=^## )", text, re.S | re.M)
    assert m, "README.md has no '## Orchestration' section"
    return m.group(1)


def shell_lines(markdown: str) -> list[str]:
    """Commands in ```bash blocks: comments dropped, `a && b` split."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.S):
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                out += [part.strip() for part in line.split("&&")]
    return out


def _dvc(cwd, *args, check=True):
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True,
                          check=check, env=GIT_ENV)


def test_fresh_clone_pull_as_documented_works_when_a_stage_was_never_pushed(dvc_repo, tmp_path):
    """Issue 15: `dvc pull` in a fresh clone exits 1 ("Checkout failed") unless every stage was pushed."""
    pulls = [c for c in shell_lines(orchestration_section()) if c.startswith("dvc pull")]
    assert pulls, "the Orchestration section shows no `dvc pull` for a fresh clone"
    s3_doc = (REPO / "infra" / "s3.md").read_text(encoding="utf-8")
    pulls += re.findall(r"`git clone … && (dvc pull[^`]*)`", s3_doc)

    root = dvc_repo("""stages:
  pushed: {cmd: "echo a > a.txt", outs: [a.txt]}
  local_only: {cmd: "echo b > b.txt", deps: [a.txt], outs: [b.txt]}
""")
    _dvc(root, "repro")
    subprocess.run(["git", "add", "-A"], cwd=root, check=True, env=GIT_ENV)
    subprocess.run(["git", "commit", "-qm", "x"], cwd=root, check=True, env=GIT_ENV)
    _dvc(root, "push", "pushed")  # `local_only` was built but never pushed (e.g. `trimpi run --no-push`)

    bare = _dvc(_clone(root, tmp_path / "plain"), "pull", check=False)
    assert bare.returncode != 0, "plain `dvc pull` now succeeds: the README's flag may no longer be needed"
    for i, cmd in enumerate(pulls):
        clone = _clone(root, tmp_path / f"clone{i}")
        r = _dvc(clone, *shlex.split(cmd)[1:], check=False)
        assert r.returncode == 0, f"`{cmd}` in a fresh clone: {r.stdout[-1500:]}{r.stderr[-1500:]}"
        assert (clone / "a.txt").read_text() == "a\n" and not (clone / "b.txt").exists()


def _clone(src: Path, dst: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(src), str(dst)], check=True, env=GIT_ENV)
    return dst
