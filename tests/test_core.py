"""Shared core: input errors name file and field, writes are atomic, config is typed."""
import dataclasses

import pytest

from pipeline.cli import COMMANDS, main
from pipeline.config import from_dict, load_section, parse_overrides
from pipeline.data.records import ImageStore, Record, read_records, write_records
from pipeline.io import InputError, atomic_dir, load_yaml, read_jsonl, stable_hash


@dataclasses.dataclass
class _Cfg:
    lr: float = 1e-3
    steps: int = 10
    mode: str = "auto"
    tags: list[str] = dataclasses.field(default_factory=list)


def test_config_types_unknown_keys_and_overrides(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("stage:\n  lr: 0.01\n  steps: 5\n")
    cfg = load_section(_Cfg, "stage", p, overrides=["steps=7", "tags=[a, b]"])
    assert cfg == _Cfg(lr=0.01, steps=7, mode="auto", tags=["a", "b"])
    with pytest.raises(InputError, match=r"params.yaml: stage.lrr: expected one of the known fields"):
        from_dict(_Cfg, {"lrr": 1}, p, "stage")
    with pytest.raises(InputError, match=r"stage.steps: expected an integer, got 'many'"):
        load_section(_Cfg, "stage", p, overrides=["steps=many"])
    assert parse_overrides(["a.b=1", "c=x"]) == {"a": {"b": 1}, "c": "x"}
    # YAML 1.1 reads 1e-4 (no dot) as a string: a float field takes it as the number everyone means
    assert load_section(_Cfg, "stage", p, overrides=["lr=1e-4"]).lr == 1e-4
    with pytest.raises(InputError, match=r"stage.lr: expected a number, got 'fast'"):
        load_section(_Cfg, "stage", p, overrides=["lr=fast"])


def test_yaml_is_safe_and_errors_name_the_file(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("x: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(InputError, match="p.yaml"):
        load_yaml(bad)
    broken = tmp_path / "q.yaml"
    broken.write_text("a: [1, 2\n")
    with pytest.raises(InputError, match=r"q.yaml: line \d+"):
        load_yaml(broken)


def test_atomic_dir_keeps_old_output_on_failure(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as d:
        (d / "w.bin").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as d:
            (d / "w.bin").write_text("half")
            raise RuntimeError("crash mid-write")
    assert (out / "w.bin").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp leftovers


def test_jsonl_truncated_line_is_named(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text('{"a": 1}\n{"a": 2\n')
    with pytest.raises(InputError, match=r"train.jsonl: line 2"):
        read_jsonl(p)


def test_records_and_image_store_round_trip(tmp_path):
    from PIL import Image

    with ImageStore(tmp_path, shard_size=2) as store:
        refs = [store.add(Image.new("RGB", (8, 8), (i * 40, 0, 0)), f"{i:03d}.png") for i in range(3)]
    assert len({r.rsplit("/", 1)[0] for r in refs}) == 2  # rotated to a second shard
    recs = [Record(id=str(i), task="clevr", split="train", query="q", answer="Case 0", images=[r])
            for i, r in enumerate(refs)]
    write_records(tmp_path / "train.jsonl", recs)
    assert read_records(tmp_path / "train.jsonl") == recs
    store = ImageStore(tmp_path)
    assert store.open(refs[2]).getpixel((0, 0)) == (80, 0, 0)
    with pytest.raises(InputError, match="expected a reference"):
        store.open("../../etc/passwd")
    with pytest.raises(InputError, match=r"record.label"):
        Record.from_dict(dict(recs[0].to_dict(), label="x"))


def test_stable_hash_ignores_key_order():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})


def test_cli_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for path in COMMANDS:
        assert " ".join(path) in out


def test_cli_does_not_import_heavy_libraries():
    import subprocess
    import sys

    code = ("import sys; from pipeline.cli import main; main(['--help']); "
            "print([m for m in ('torch','transformers','prefect','great_expectations','deepspeed') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("[]")


def test_cli_unknown_command_exits_2():
    assert main(["frobnicate"]) == 2


def test_unwritable_output_is_a_clear_error_and_keeps_old_output(tmp_path, capsys, monkeypatch):
    import os

    import pipeline.cli as cli

    out = tmp_path / "metrics.json"
    out.write_text("old")

    def configure_x(p):
        p.add_argument("--out")

    def run_x(args):
        from pipeline.io import atomic_write_json

        atomic_write_json(args.out, {"new": 1})

    import types

    mod = types.ModuleType("fake_stage")
    mod.configure_x, mod.run_x = configure_x, run_x
    monkeypatch.setitem(__import__("sys").modules, "fake_stage", mod)
    monkeypatch.setitem(cli.COMMANDS, ("fakex",), ("fake_stage:x", "test"))
    os.chmod(tmp_path, 0o500)
    try:
        if os.access(tmp_path, os.W_OK):  # root ignores permissions: simulate ENOSPC instead
            import errno

            def full(*a, **k):
                raise OSError(errno.ENOSPC, "No space left on device", str(out))
            monkeypatch.setattr("pipeline.io._tmp_sibling", full)
        rc = cli.main(["fakex", "--out", str(out)])
    finally:
        os.chmod(tmp_path, 0o700)
    assert rc == 2
    assert "previous outputs are intact" in capsys.readouterr().err
    assert out.read_text() == "old"


def test_an_unexpected_exception_exits_70_not_1(monkeypatch, capsys):
    """Exit 1 means 'a check failed' (gate, validation); a bug must not read as a verdict."""
    import pipeline.policy.cli as pc

    def boom(args):
        raise ZeroDivisionError("x")
    monkeypatch.setattr(pc, "run_list", boom)
    assert main(["policy", "list"]) == 70
    assert "unexpected ZeroDivisionError" in capsys.readouterr().err
