"""Issue 14: the registry under concurrent writers, hostile inputs, dropped connections, full disks.

One section per item of the issue (numbers match it). Each test failed before its fix; the
ones that need the real S3 server (SeaweedFS) are marked slow. Items whose natural home is an
existing test file are there instead, named in the section header.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.io import InputError

REPO = Path(__file__).resolve().parents[1]
TRIMPI = [sys.executable, "-m", "pipeline.cli"]


def child_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), **extra)
    return env


# ----------------------------------------------------------------------------- 4. alias bombs


def alias_bomb(levels: int, fanout: int = 9) -> str:
    """The issue's 529-byte document: each anchor is a list of ``fanout`` aliases of the previous one."""
    lines = ["a0: &a0 [x]"]
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * fanout) + "]")
    return "\n".join(lines) + "\n"


def test_yaml_alias_bomb_is_refused_by_the_loader(tmp_path):
    from pipeline.io import load_yaml, parse_yaml

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb(6))  # 531,441 leaves: already past the cap, cheap to build before the fix
    with pytest.raises(InputError, match=r"bomb\.yaml: document: expected at most 200,000 values once anchors"):
        load_yaml(bomb)
    # ordinary anchors (params.yaml may use them) still work, and so do shared subtrees
    assert parse_yaml("a: &x {k: 1}\nb: *x\nc: {<<: *x, j: 2}\n") == {"a": {"k": 1}, "b": {"k": 1},
                                                                     "c": {"k": 1, "j": 2}}
    with pytest.raises(InputError, match="recursive aliases"):
        parse_yaml("a: &x [*x]\n", "self.yaml")
    with pytest.raises(InputError, match="nested less deeply"):
        parse_yaml("[" * 100_000, "deep.yaml")


def test_policy_list_on_the_issues_alias_bomb_is_one_line(tmp_path, capsys):
    """Before: 91 s and 4.3 GB (input_error called repr() on the expanded value), then an error."""
    pdir = tmp_path / "policies" / "clevr"
    pdir.mkdir(parents=True)
    bomb = alias_bomb(8)
    assert len(bomb) < 600
    (pdir / "bomb.yaml").write_text("kind: clevr\nname: L1-Bomb\ndepth: 1\n" + bomb)
    assert main(["policy", "list", "--policies", str(tmp_path / "policies")]) == 2
    out = capsys.readouterr().out
    assert "bomb.yaml: document: expected at most 200,000 values" in out


def test_messages_never_repr_an_unbounded_value():
    from pipeline.io import input_error, preview

    shared: list = ["leaf"]
    for _ in range(60):  # 2**60 leaves once expanded: repr() would never return
        shared = [shared, shared]
    msg = str(input_error("f.yaml", "tree", "a list of conditions", shared))
    assert msg.startswith("f.yaml: tree: expected a list of conditions, got [[[[") and len(msg) < 400
    assert "..." in preview("x" * 10_000) and len(preview("x" * 10_000)) < 220
    assert preview({"a": 1}) == "{'a': 1}" and preview("fast") == "'fast'"


# ----------------------------------------------------------------------------- 7. full disk, not a directory

SAVE_CMD = '''
"""A stage that saves a model and a checkpoint like the trainers do (real torch/safetensors writers)."""
import torch


class Model:
    def save_pretrained(self, d, safe_serialization=True):
        from safetensors.torch import save_file
        save_file({"w": torch.zeros(1 << 18)}, f"{d}/model.safetensors")


class Processor:
    def save_pretrained(self, d):
        open(f"{d}/processor.json", "w").write("{}")


class DeepSpeedLike:
    def save_checkpoint(self, ckpt_dir, tag, client_state):
        import os
        os.makedirs(f"{ckpt_dir}/{tag}", exist_ok=True)
        torch.save({"w": torch.zeros(1 << 18)}, f"{ckpt_dir}/{tag}/mp_rank_00_model_states.pt")
        open(f"{ckpt_dir}/latest", "w").write(tag)


def configure_x(p):
    p.add_argument("what")
    p.add_argument("--out")


def run_x(args):
    from pathlib import Path
    from pipeline.io import atomic_dir
    from pipeline.model import save
    from pipeline.train.engine import Engine

    if args.what == "model":
        with atomic_dir(args.out) as tmp:
            save(Model(), Processor(), tmp)
    else:
        eng = Engine.__new__(Engine)
        eng.engine, eng.ckpt_dir, eng.rank, eng.fingerprint = DeepSpeedLike(), Path(args.out), 0, "fp"
        eng.engine.global_steps = 7
        eng.save_state({})
    return 0
'''

LIMITED = '''
import resource, signal, sys
sys.path.insert(0, sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # the kernel then fails the write with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
from pipeline import cli
cli.COMMANDS[("savex",)] = ("savecmd:x", "test stage")
sys.exit(cli.main(["savex", *sys.argv[2:]]))
'''


@pytest.mark.parametrize("what", ["model", "checkpoint"])
def test_a_write_that_runs_out_of_space_is_one_line_and_keeps_the_old_output(what, tmp_path):
    """A real short write (RLIMIT_FSIZE, the unprivileged stand-in for a full disk) inside
    safetensors and torch.save: before, SafetensorError / RuntimeError 'unexpected pos' tracebacks."""
    (tmp_path / "savecmd.py").write_text(SAVE_CMD)
    out = tmp_path / ("model" if what == "model" else "ckpt")
    if what == "model":
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"previous weights")
    else:
        (out / "step-0000003").mkdir(parents=True)
        (out / "latest").write_text("step-0000003")
        (out / "fingerprint.json").write_text(json.dumps({"fingerprint": "fp"}, indent=2) + "\n")
    before = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    r = subprocess.run([sys.executable, "-c", LIMITED, str(tmp_path), what, "--out", str(out)],
                       env=child_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith(f"error: cannot write {out}") and "previous outputs are intact" in err, r.stderr
    assert "Traceback" not in r.stderr
    after = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before                                         # no partial step-0000007, old weights kept
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_output_under_a_file_is_one_line(tmp_path, capsys):
    """`generate clevr --out <a file>/data` ended in FileExistsError."""
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    assert main(["generate", "clevr", "--policies", str(REPO / "policies/clevr"), "--out", str(blocker / "data"),
                 "--params", str(REPO / "params.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write {blocker}: ") and "a file is in the way" in err
    assert blocker.read_text() == "x"


def test_os_error_line_maps_the_errors_we_own():
    from pipeline.io import os_error_line

    assert os_error_line(OSError(errno.ENOSPC, "No space left on device", "m/x")) == (
        "cannot write m/x: No space left on device (nothing was half-written; previous outputs are intact)")
    assert "not a directory" in os_error_line(NotADirectoryError(errno.ENOTDIR, "Not a directory", "f/d"))
    assert os_error_line(OSError(errno.ECONNRESET, "reset")) is None   # not ours: a traceback is right


# ----------------------------------------------------------------------------- 12. umask, read vs write


def test_outputs_respect_the_umask(tmp_path):
    from pipeline.io import atomic_dir, atomic_write_json

    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "metrics" / "eval.json", {"a": 1})
        with atomic_dir(tmp_path / "models" / "rl") as tmp:
            (tmp / "sub").mkdir()
            fd = os.open(tmp / "model.safetensors", os.O_CREAT | os.O_WRONLY, 0o600)  # like a mkstemp writer
            os.close(fd)
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "metrics" / "eval.json") == 0o644
    assert mode(tmp_path / "models" / "rl") == 0o755 and mode(tmp_path / "models" / "rl" / "sub") == 0o755
    assert mode(tmp_path / "models" / "rl" / "model.safetensors") == 0o644


def test_registry_pointer_is_readable_by_others(tmp_path):
    from pipeline.storage import LocalStorage

    old = os.umask(0o022)
    try:
        LocalStorage(tmp_path / "reg").replace("m/aliases/production.json", b"{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "reg" / "m" / "aliases" / "production.json").stat().st_mode) == 0o644


def test_permission_denied_on_a_read_says_read(tmp_path, monkeypatch):
    from pipeline.io import os_error_line

    f = tmp_path / "eval.json"
    f.write_text("{}")
    monkeypatch.setattr(os, "access", lambda p, mode: mode != os.R_OK)  # root reads everything: pretend
    line = os_error_line(PermissionError(errno.EACCES, "Permission denied", str(f)))
    assert line == f"cannot read {f}: Permission denied"
