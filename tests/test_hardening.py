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


# ----------------------------------------------------------------------------- 5. damaged shards, bad bytes


@pytest.fixture(scope="module")
def small_clevr(tmp_path_factory):
    """A small ClevrPolicy dataset (copied by the tests that damage it)."""
    root = tmp_path_factory.mktemp("hclevr")
    assert main(["generate", "clevr", "--policies", str(REPO / "policies/clevr"), "--out", str(root / "data"),
                 "--params", str(REPO / "params.yaml"), "--set", "train_per_policy=4", "--set", "cot_per_policy=2",
                 "--set", "test_per_policy=2", "--set", "override_per_policy=2", "--set", "override_count=1",
                 "--set", "image_size=32"]) == 0
    return root / "data"


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _flip_byte_in_member(shard: Path) -> str:
    """Flip one byte inside the first member's data (the zip directory stays valid)."""
    import zipfile

    with zipfile.ZipFile(shard) as z:
        info = z.infolist()[0]
    data = bytearray(shard.read_bytes())
    at = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 40
    data[at] ^= 0xFF
    shard.write_bytes(bytes(data))
    return info.filename


@pytest.mark.parametrize("damage", ["flipped byte", "cut shard"])
def test_validate_reports_a_damaged_shard_instead_of_crashing(damage, small_clevr, tmp_path, capsys):
    data = _copy(small_clevr, tmp_path / "data")
    shard = data / "images" / "shard-00000.zip"
    if damage == "flipped byte":
        member = _flip_byte_in_member(shard)
    else:
        shard.write_bytes(shard.read_bytes()[:200])
        member = None
    report = tmp_path / "validate.json"
    capsys.readouterr()
    rc = main(["validate", "--task", "clevr", "--data", str(data), "--policies", str(REPO / "policies/clevr"),
               "--report", str(report), "--params", str(REPO / "params.yaml")])
    assert rc == 1, capsys.readouterr()
    rep = json.loads(report.read_text())
    bad = next(c for c in rep["checks"] if c["name"] == "images exist and decode")
    assert not bad["success"] and bad["failing_rows"]
    text = json.dumps(bad["failing_rows"])
    assert "shard-00000.zip" in text and ("Bad CRC-32" in text if member else "intact zip shard" in text)
    if member:
        assert member in text

    from pipeline.data.records import ImageStore

    ref = json.loads((data / "train.jsonl").read_text().splitlines()[0])["images"][0]
    with pytest.raises(InputError, match=r"shard-00000\.zip.*expected an intact"):   # what trainers call
        for line in (data / "train.jsonl").read_text().splitlines():
            for r in json.loads(line)["images"]:
                ImageStore(data).open(r)
    assert ref


def test_trainer_names_a_non_utf8_line(small_clevr, tmp_path, capsys):
    data = _copy(small_clevr, tmp_path / "data")
    lines = (data / "cot.jsonl").read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b"Case", b"Ca\xffse", 1)
    (data / "cot.jsonl").write_bytes(b"".join(lines))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    capsys.readouterr()
    assert main(["train", "sft", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "out"),
                 "--params", str(REPO / "params.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {data / 'cot.jsonl'}: line 2: expected UTF-8 text") and "Traceback" not in err
    from validation.expectations import read_lenient

    _, bad = read_lenient(data / "cot.jsonl")
    assert [b["line"] for b in bad] == [2]


def test_empty_training_file_is_named(small_clevr, tmp_path, capsys):
    """Issue item 15: an empty training file was reported as `<input>: data: ...`."""
    data = _copy(small_clevr, tmp_path / "data")
    (data / "cot.jsonl").write_text("")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    capsys.readouterr()
    assert main(["train", "sft", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "out"),
                 "--params", str(REPO / "params.yaml")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {data / 'cot.jsonl'}: expected at least one training record")
    from pipeline.train.engine import TrainConfig, plan

    with pytest.raises(InputError, match=r"^data/x\.jsonl: expected at least one training record"):
        plan(0, TrainConfig(), 1, source="data/x.jsonl")


# ----------------------------------------------------------------------------- 6. non-finite numbers


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_profile_values_are_refused(value, capsys):
    assert main(["policy", "resolve", "--policy", str(REPO / "policies/gta"), "--tool", "OCR",
                 "--profile", f'{{"account_type":"B","credits":{value},"age":30}}']) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --profile: expected finite numbers only") and "Traceback" not in err


def test_non_finite_values_from_python_and_yaml_are_refused(tmp_path):
    from pipeline.io import read_jsonl
    from pipeline.policy import load_policy
    from pipeline.policy.gta import load_gta_policy

    pol = load_gta_policy(REPO / "policies/gta")
    for field in ("age", "credits"):
        profile = {"account_type": "B", "credits": 600, "age": 30, field: float("nan")}
        with pytest.raises(InputError, match=rf"profile\.{field}: expected an integer|profile\.{field}: expected a finite"):
            pol.resolve(profile, "OCR")
    spec = (REPO / "policies/gta/gtapolicy.yaml").read_text()
    for before, after, field in (("min: 0, max: 120", "min: .nan, max: 120", "min"),
                                 ("credits: {le: 250}", "credits: {le: .inf}", "le")):
        assert before in spec
        (tmp_path / "p.yaml").write_text(spec.replace(before, after))
        with pytest.raises(InputError, match=rf"{field}: expected a finite number"):
            load_policy(tmp_path / "p.yaml")
    (tmp_path / "r.jsonl").write_text('{"id": "a"}\n{"id": "b", "x": NaN}\n')
    with pytest.raises(InputError, match=r"r\.jsonl: line 2: expected finite numbers only"):
        read_jsonl(tmp_path / "r.jsonl")


# ----------------------------------------------------------------------------- 13. .yml files, duplicate names

POLICY = "kind: clevr\nname: {name}\ndepth: 1\ntree:\n- {{id: '1', attribute: shape, value: cube, if_true: Case 0, if_false: Case 1}}\n"


def test_yml_policies_are_read_and_duplicate_names_fail_list(tmp_path, capsys):
    from pipeline.policy import load_policies

    pdir = tmp_path / "policies" / "clevr"
    pdir.mkdir(parents=True)
    (pdir / "a.yaml").write_text(POLICY.format(name="L1-Aaa"))
    (pdir / "b.yml").write_text(POLICY.format(name="L1-Bbb"))
    assert sorted(load_policies(tmp_path / "policies")) == ["L1-Aaa", "L1-Bbb"]
    assert main(["policy", "list", "--policies", str(tmp_path / "policies")]) == 0
    assert "L1-Bbb" in capsys.readouterr().out
    (pdir / "c.yml").write_text(POLICY.format(name="L1-Aaa"))
    assert main(["policy", "list", "--policies", str(tmp_path / "policies")]) == 2      # generate refuses too
    out = capsys.readouterr().out
    assert "INVALID" in out and "c.yml: name: expected a name unique across policies/" in out
    with pytest.raises(InputError, match="unique"):
        load_policies(tmp_path / "policies")


# ----------------------------------------------------------------------------- 14. CLEVR splits, importer

FIXTURE = REPO / "tests" / "fixtures" / "clevr" / "CLEVR_v1.0"


def test_clevr_source_keeps_test_and_override_images_apart(tmp_path):
    from pipeline.data.clevr_policy import GenerateClevrConfig, build
    from pipeline.data.records import ImageStore, read_records
    from validation.clevr import validate

    pdir = tmp_path / "policies"
    pdir.mkdir()
    (pdir / "a.yaml").write_text(POLICY.format(name="L1-Aaa"))
    cfg = GenerateClevrConfig(train_per_policy=4, cot_per_policy=2, test_per_policy=4, override_per_policy=4,
                              override_count=1, balance=False, source="clevr", clevr_root=str(FIXTURE))
    out = tmp_path / "d"
    build(pdir, out, cfg, seed=0, progress=False)
    store = ImageStore(out)
    by_split = {s: {store.read_bytes(r.images[0]) for r in read_records(out / f"{s}.jsonl")}
                for s in ("train", "test", "override")}
    assert by_split["test"] and by_split["override"]
    assert not by_split["test"] & by_split["override"] and not by_split["train"] & by_split["test"]
    results = {r.name: r for r in validate(out, pdir)}
    assert results["train, test and override images pairwise disjoint (content hash)"].success

    # the validator checks the test/override pair too (it looked at train only)
    test0 = json.loads((out / "test.jsonl").read_text().splitlines()[0])
    lines = (out / "override.jsonl").read_text().splitlines()
    row = json.loads(lines[0])
    row["images"] = test0["images"]
    (out / "override.jsonl").write_text("\n".join([json.dumps(row), *lines[1:]]) + "\n")
    results = {r.name: r for r in validate(out, pdir)}
    check = results["train, test and override images pairwise disjoint (content hash)"]
    assert not check.success and check.failing_rows[0].get("test") == test0["id"]


def test_clevr_importer_checks_that_images_are_images(tmp_path):
    import shutil

    from pipeline.data.clevr_policy import GenerateClevrConfig, build
    from pipeline.scenes import import_clevr

    root = tmp_path / "CLEVR_v1.0"
    shutil.copytree(FIXTURE, root)
    (root / "images" / "val" / "CLEVR_val_000002.png").write_text("this is not an image")
    with pytest.raises(InputError, match=r"scenes\[2\]\.image_filename: expected an image file \(PNG/JPEG\)"):
        import_clevr(root, "val")
    # a PNG whose header is fine but whose data is cut: caught when the builder takes it
    shutil.copy(FIXTURE / "images" / "val" / "CLEVR_val_000002.png", root / "images" / "val" / "CLEVR_val_000002.png")
    cut = root / "images" / "train" / "CLEVR_train_000003.png"
    cut.write_bytes(cut.read_bytes()[:100])
    pdir = tmp_path / "policies"
    pdir.mkdir()
    (pdir / "a.yaml").write_text(POLICY.format(name="L1-Aaa"))
    cfg = GenerateClevrConfig(train_per_policy=10, cot_per_policy=2, test_per_policy=2, override_per_policy=0,
                              override_count=0, balance=False, source="clevr", clevr_root=str(root))
    with pytest.raises(InputError, match=r"CLEVR_train_000003\.png: image_filename: expected a decodable image"):
        build(pdir, tmp_path / "d", cfg, seed=0, progress=False)
    assert not (tmp_path / "d").exists()


# ----------------------------------------------------------------------------- 15. messages


def test_depth_beyond_the_maximum_says_what_the_maximum_is(tmp_path, capsys):
    assert main(["policy", "new", "clevr", "--depth", "40", "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --depth: expected at most 11: every condition must leave both answers possible")
    assert "colour 8" in err and not (tmp_path / "p").exists()
    assert main(["policy", "new", "clevr", "--depth", "11", "--out", str(tmp_path / "p")]) == 0


# ----------------------------------------------------------------------------- 8. linear answer parsing


def _lines_run(fn, *args) -> int:
    """Python lines executed inside pipeline/model/prompts.py during fn(*args): an operation count."""
    import pipeline.model.prompts as prompts

    count = 0
    target = prompts.__file__

    def tracer(frame, event, arg):
        nonlocal count
        if frame.f_code.co_filename != target:
            return None
        if event == "line":
            count += 1
        return tracer

    sys.settrace(tracer)
    try:
        fn(*args)
    finally:
        sys.settrace(None)
    return count


def test_parse_answer_work_grows_linearly_with_unclosed_boxes():
    """1,000 unclosed `\\boxed{` took 1.5 s and 4,000 took ~30 s: the work was quadratic."""
    from pipeline.model.prompts import format_ok, parse_answer

    def text(n):
        return "<think>r</think>" + "\\boxed{ {" * n + "\\boxed{Case 3}"

    small, large = _lines_run(parse_answer, text(150)), _lines_run(parse_answer, text(600))
    assert large < 5 * small, (small, large)          # quadratic work would be ~16x
    assert parse_answer(text(4000)) == "Case 3"        # the one complete box, inside unclosed ones
    assert parse_answer("\\boxed{" * 4000 + "} \\boxed{Case 1}") == "Case 1"
    assert format_ok("<think>r</think>\\boxed{" + "{" * 4000) is False


# ----------------------------------------------------------------------------- 1. concurrent promoters

PASSED = {"passed": True, "checks": []}


def _weights(root: Path, name: str, payload: bytes) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(payload)
    (d / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl", "name": name}))
    return d


def _race(make_registry, models: list[Path], monkeypatch) -> list[dict]:
    """Promote ``models`` from threads that all list the registry before any claims a number:
    the interleaving that gave both promoters "v5" (the old code took max+1 and wrote)."""
    import threading

    from pipeline.registry import Registry

    barrier = threading.Barrier(len(models), timeout=60)
    listed = threading.local()
    real = Registry._version_dirs

    def version_dirs(self):
        out = real(self)
        if not getattr(listed, "done", False):
            listed.done = True
            barrier.wait()
        return out

    monkeypatch.setattr(Registry, "_version_dirs", version_dirs)
    results, errors = [None] * len(models), []

    def go(i):
        try:
            results[i] = make_registry().promote(models[i], {"main": {"score": i}}, PASSED,
                                                 {"source_dir": str(models[i])})
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(models))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    monkeypatch.setattr(Registry, "_version_dirs", real)
    assert not errors, errors
    return results


def _check_every_version_holds_its_cards_weights(reg, tmp_path, models):
    seen = set()
    for v in reg.versions():
        card, manifest = reg.card(v), reg.manifest(v)
        fetched = reg.fetch(v, tmp_path / f"fetched-{v}")
        src = Path(card["source_dir"])
        assert (fetched / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes(), v
        assert (fetched / "config.json").read_text() == (src / "config.json").read_text(), v
        assert card["content"] == manifest["content"] == reg._read_json(v, "intent.json")["content"]
        seen.add(str(src))
    assert seen == {str(m) for m in models}                      # every model registered, once


def test_concurrent_promotes_into_a_local_registry_get_distinct_versions(tmp_path, monkeypatch):
    from pipeline.registry import Registry
    from pipeline.storage import LocalStorage

    root = tmp_path / "registry"
    Registry(LocalStorage(root), "m").promote(_weights(tmp_path, "base", b"0" * 64), {}, PASSED,
                                                {"source_dir": str(tmp_path / "base")})
    models = [_weights(tmp_path, name, name.encode() * 4096) for name in ("A", "B", "C")]
    results = _race(lambda: Registry(LocalStorage(root), "m"), models, monkeypatch)
    assert sorted(r["version"] for r in results) == ["v2", "v3", "v4"] and all(r["uploaded"] for r in results)
    reg = Registry(LocalStorage(root), "m")
    _check_every_version_holds_its_cards_weights(reg, tmp_path, [tmp_path / "base", *models])
    # promoting one of them again changes nothing: it is registered under its own number
    again = reg.promote(models[1], {}, PASSED, {"source_dir": str(models[1])})
    assert again["uploaded"] is False and again["version"] == results[1]["version"]


def test_local_create_is_exclusive_and_a_lost_reply_still_counts(tmp_path):
    from pipeline.storage import LocalStorage

    s = LocalStorage(tmp_path)
    assert s.create("m/v1/intent.json", b"mine") is True
    assert s.create("m/v1/intent.json", b"theirs") is False and s.get_bytes("m/v1/intent.json") == b"mine"
    assert s.create("m/v1/intent.json", b"mine") is True          # a retry of a create that landed
    assert [p.name for p in (tmp_path / "m" / "v1").iterdir()] == ["intent.json"]   # no temp files left


def test_moto_honours_if_none_match_and_the_fallback_still_registers(tmp_path, moto_endpoint, monkeypatch):
    import boto3

    import pipeline.registry as registry
    from pipeline.registry import Registry
    from pipeline.storage import open_storage

    for k, v in {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket="cond")
    store = open_storage("s3://cond/r", endpoint_url=moto_endpoint, retries=2, backoff=0.01)
    assert store.conditional_writes() is True
    assert store.create("k", b"a") is True and store.create("k", b"b") is False and store.get_bytes("k") == b"a"
    assert not [k for k in store.list() if ".trimpi-probe" in k]
    # an endpoint that ignores If-None-Match: create-then-verify
    monkeypatch.setattr(registry, "SETTLE_S", 0.01)
    monkeypatch.setattr(type(store), "conditional_writes", lambda self: False)
    reg = Registry(store, "m")
    a, b = _weights(tmp_path, "A", b"A" * 100), _weights(tmp_path, "B", b"B" * 100)
    assert reg.promote(a, {}, PASSED, {"source_dir": str(a)})["version"] == "v1"
    assert reg.promote(b, {}, PASSED, {"source_dir": str(b)})["version"] == "v2"
    _check_every_version_holds_its_cards_weights(reg, tmp_path, [a, b])


def test_an_object_overwritten_by_another_promoter_is_not_completed(tmp_path, moto_endpoint, monkeypatch):
    """The re-check after upload: a weight whose metadata names another content sends the promoter
    to a new number instead of writing COMPLETE.json over mixed files."""
    import boto3

    from pipeline.registry import Registry
    from pipeline.storage import S3Storage, open_storage

    for k, v in {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket="mixed")
    store = open_storage("s3://mixed/r", endpoint_url=moto_endpoint, retries=2, backoff=0.01)
    reg = Registry(store, "m")
    intruder = _weights(tmp_path, "X", b"X" * 100)
    real = S3Storage.put_file
    hit = {"n": 0}

    def put_file(self, key, path, metadata=None):
        real(self, key, path, metadata=metadata)
        if key.endswith("v1/model/model.safetensors") and not hit["n"]:
            hit["n"] += 1   # another promoter (content "other") writes the same key right after us
            real(self, key, intruder / "model.safetensors", metadata={"trimpi-content": "other"})

    monkeypatch.setattr(S3Storage, "put_file", put_file)
    a = _weights(tmp_path, "A", b"A" * 100)
    res = reg.promote(a, {}, PASSED, {"source_dir": str(a)})
    assert res["version"] == "v1" and hit["n"] == 1   # v1 re-uploaded (still its claim), then completed
    _check_every_version_holds_its_cards_weights(reg, tmp_path, [a])


@pytest.mark.slow
def test_concurrent_promotes_on_the_real_s3_server(tmp_path, s3_server, monkeypatch):
    from pipeline.registry import RegistryConfig, open_registry

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    cfg = RegistryConfig(root=f"s3://trimpi-test/{tmp_path.name}", model="m", retries=3, backoff_s=0.05)
    open_registry(cfg).promote(_weights(tmp_path, "base", b"0" * 64), {}, PASSED, {"source_dir": str(tmp_path / "base")})
    models = [_weights(tmp_path, name, name.encode() * (1 << 16)) for name in ("A", "B", "C")]
    results = _race(lambda: open_registry(cfg), models, monkeypatch)
    assert sorted(r["version"] for r in results) == ["v2", "v3", "v4"]
    reg = open_registry(cfg)
    assert reg.s.conditional_writes() is True
    _check_every_version_holds_its_cards_weights(reg, tmp_path, [tmp_path / "base", *models])


@pytest.mark.slow
def test_two_promote_processes_on_the_real_s3_server(tmp_path, s3_server):
    """The issue's reproduction: `trimpi promote --model A & trimpi promote --model B`, two workspaces."""
    from pipeline.registry import RegistryConfig, open_registry

    env = child_env(**s3_server.env())
    root = f"s3://trimpi-test/{tmp_path.name}"
    procs = []
    for name in ("A", "B"):
        ws = tmp_path / f"ws-{name}"
        ws.mkdir()
        model = _weights(ws, "model", name.encode() * (1 << 18))
        (ws / "params.yaml").write_text(f"registry: {{root: '{root}', model: m, retries: 3, backoff_s: 0.1}}\n")
        (ws / "eval.json").write_text('{"main": {"score": 50}}')
        (ws / "gate.json").write_text(json.dumps(PASSED))
        procs.append(subprocess.Popen([*TRIMPI, "promote", "--model", str(model), "--metrics", "eval.json", "--gate",
                                       "gate.json", "--policies", "none", "--out", "promote.json"],
                                      cwd=ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    versions = {json.loads((tmp_path / f"ws-{n}" / "promote.json").read_text())["version"] for n in "AB"}
    assert versions == {"v1", "v2"}
    for k, v in s3_server.env().items():
        os.environ.setdefault(k, v)
    reg = open_registry(RegistryConfig(root=root, model="m"))
    for v in reg.versions():
        src = Path(reg.card(v)["source_dir"])
        assert (reg.fetch(v, tmp_path / f"f-{v}") / "model.safetensors").read_bytes() == \
            (src / "model.safetensors").read_bytes()


# ----------------------------------------------------------------------------- 2. rollback twice


def test_rollback_twice_walks_back_the_promotion_log(tmp_path):
    from pipeline.registry import Registry
    from pipeline.storage import LocalStorage

    reg = Registry(LocalStorage(tmp_path / "registry"), "m")
    for i in range(1, 5):
        reg.promote(_weights(tmp_path, f"m{i}", bytes([i]) * 32), {}, PASSED, {})
    assert reg.resolve("production") == "v4"
    assert reg.rollback()["version"] == "v3"
    assert reg.rollback()["version"] == "v2"            # was v4 again: the pointer's `previous`
    assert reg.rollback()["version"] == "v1"
    with pytest.raises(InputError, match="an earlier production version that was not rolled back from"):
        reg.rollback()
    assert reg.rollback(to="v3")["version"] == "v3"     # --to stays (moving forward retires nothing)
    assert reg.rollback()["version"] == "v1"            # v2 and v4 were rolled back from, v1 was not
    reg.promote(tmp_path / "m4", {}, PASSED, {})         # re-promoting v4 makes it a candidate again
    assert reg.resolve("production") == "v4" and reg.rollback()["version"] == "v1"


def test_rollback_cli_twice(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(f"registry: {{root: '{tmp_path / 'registry'}', model: m}}\n")
    from pipeline.registry import Registry
    from pipeline.storage import LocalStorage

    reg = Registry(LocalStorage(tmp_path / "registry"), "m")
    for i in range(1, 4):
        reg.promote(_weights(tmp_path, f"m{i}", bytes([i]) * 32), {}, PASSED, {})
    capsys.readouterr()
    assert main(["registry", "rollback", "--params", str(params)]) == 0
    assert main(["registry", "rollback", "--params", str(params)]) == 0
    assert capsys.readouterr().out.splitlines() == ["rollback: production -> v2", "rollback: production -> v1"]


# ----------------------------------------------------------------------------- 9. dropped connections


def _big(tmp_path: Path, mib: int = 9) -> Path:
    f = tmp_path / "model.safetensors"
    f.write_bytes(os.urandom(mib << 20))  # over boto3's 8 MiB multipart threshold
    return f


def _drop_connection(store, times: int, op: str = "UploadPart"):
    from botocore.exceptions import ConnectionClosedError

    state = {"left": times}

    def drop(request, **kw):
        if state["left"] > 0:
            state["left"] -= 1
            raise ConnectionClosedError(endpoint_url=request.url)

    store.client.meta.events.register(f"before-send.s3.{op}", drop)
    return state


def _open_uploads(endpoint: str, bucket: str) -> list:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint).list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def test_connection_dropped_mid_upload_is_retried_and_leaves_no_open_upload(tmp_path, moto_endpoint, monkeypatch):
    import boto3

    from pipeline.storage import open_storage

    for k, v in {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket="drop")
    f = _big(tmp_path)
    store = open_storage("s3://drop/p", endpoint_url=moto_endpoint, retries=3, backoff=0.01)
    state = _drop_connection(store, times=1)
    store.put_file("m/w.safetensors", f)                        # before: ConnectionClosedError, exit 2, no retry
    assert state["left"] == 0
    assert store.get_bytes("m/w.safetensors") == f.read_bytes()
    assert _open_uploads(moto_endpoint, "drop") == []


def test_connection_down_for_the_whole_budget_is_transient_exit_75(tmp_path, moto_endpoint, monkeypatch, capsys):
    import boto3

    from pipeline.io import TransientError
    from pipeline.storage import S3Storage, StorageUnavailable

    for k, v in {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket="down")
    model = tmp_path / "model"
    model.mkdir()
    _big(model)
    (model / "config.json").write_text("{}")
    params = tmp_path / "params.yaml"
    params.write_text(f"registry: {{root: 's3://down/r', model: m, endpoint_url: '{moto_endpoint}', "
                      "retries: 3, backoff_s: 0.01}\n")
    (tmp_path / "eval.json").write_text('{"main": {"score": 1}}')
    (tmp_path / "gate.json").write_text(json.dumps(PASSED))
    real_client = S3Storage.client

    def client(self):
        c = real_client.fget(self)
        if not getattr(c, "_dropping", False):
            c._dropping = True
            _drop_connection(type("S", (), {"client": c})(), times=10 ** 6)
        return c

    monkeypatch.setattr(S3Storage, "client", property(client))
    assert issubclass(StorageUnavailable, TransientError) and not issubclass(StorageUnavailable, InputError)
    capsys.readouterr()
    rc = main(["promote", "--params", str(params), "--model", str(model), "--metrics", str(tmp_path / "eval.json"),
               "--gate", str(tmp_path / "gate.json"), "--policies", str(tmp_path / "none"),
               "--out", str(tmp_path / "promote.json")])
    err = capsys.readouterr().err
    assert rc == 75, err                                         # before: 2, "bad input", never retried
    assert "upload failed after 3 attempts (last error: ConnectionClosedError)" in err and "transient" in err
    assert _open_uploads(moto_endpoint, "down") == []            # aborted before each retry and at the end
    assert not (tmp_path / "promote.json").exists()


@pytest.mark.slow
def test_s3_server_killed_mid_multipart_promote_then_rerun(tmp_path, monkeypatch):
    """The issue's reproduction on SeaweedFS: the server dies during a large weight upload."""
    from pipeline.registry import RegistryConfig, open_registry
    from s3server import S3Server
    from pipeline.storage import StorageUnavailable

    server = S3Server(data_dir=tmp_path / "s3", buckets=["big"]).start()
    try:
        for k, v in server.env().items():
            monkeypatch.setenv(k, v)
        model = tmp_path / "model"
        model.mkdir()
        _big(model, 24)
        (model / "config.json").write_text("{}")
        cfg = RegistryConfig(root="s3://big/reg", model="m", retries=3, backoff_s=0.05)
        reg = open_registry(cfg)
        parts = {"n": 0}

        def stop_after_two_parts(**kw):
            parts["n"] += 1
            if parts["n"] == 3:
                server.stop()

        reg.s.client.meta.events.register("before-send.s3.UploadPart", stop_after_two_parts)
        with pytest.raises(StorageUnavailable, match="upload failed after 3 attempts"):
            reg.promote(model, {}, PASSED, {})
        server = S3Server(data_dir=tmp_path / "s3", buckets=["big"], port=server.port).start()
        assert server.client().list_multipart_uploads(Bucket="big").get("Uploads"), "the outage left an upload open"
        res = open_registry(cfg).promote(model, {}, PASSED, {})
        assert res["version"] == "v1" and res["uploaded"]
        assert server.client().list_multipart_uploads(Bucket="big").get("Uploads", []) == []
        fetched = open_registry(cfg).fetch("production", tmp_path / "f")
        assert (fetched / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
    finally:
        server.stop()


# ----------------------------------------------------------------------------- 3. a failed stage keeps its old outputs

TRAIN_PY = """
import os, sys, time
params = open("params.yaml").read()
mode = params.split("mode:")[1].split()[0].strip(",}")
version = params.split("v:")[1].split()[0].strip(",}")
if mode == "sleep":
    open("started", "w").write(str(os.getpid()))
    time.sleep(600)
if mode == "fail":
    sys.exit(70)  # a crash (trimpi's exit code for an unexpected exception)
os.makedirs("models/m", exist_ok=True)
os.makedirs("metrics", exist_ok=True)
os.makedirs("reports/preds", exist_ok=True)
open("metrics/m.json", "w").write('{"v": %s}' % version)
open("reports/preds/p.jsonl", "w").write("pred " + version)
if mode == "check":
    sys.exit(1)  # a failed check (gate, validation) after writing its report
open("models/m/model.safetensors", "w").write("weights " + version)
"""

RESTORE_DVC = """stages:
  train:
    cmd: python train.py
    deps: [train.py]
    params: [train.mode, train.v]
    outs:
      - models/m
      - reports/preds: {cache: false}
    metrics:
      - metrics/m.json: {cache: false}
"""


def _outputs(ws: Path) -> dict:
    return {p.relative_to(ws).as_posix(): p.read_bytes() for d in ("models", "metrics", "reports")
            for p in sorted((ws / d).rglob("*")) if p.is_file() and p.name != ".gitignore"}


@pytest.fixture
def restore_ws(dvc_repo):
    from flows import runner

    ws = dvc_repo(RESTORE_DVC, "train: {mode: ok, v: 1}\n")
    (ws / "train.py").write_text(TRAIN_PY)
    assert runner.repro_stage(ws, "train", lambda line: None).status == "ran"
    before = _outputs(ws)
    assert set(before) == {"models/m/model.safetensors", "metrics/m.json", "reports/preds/p.jsonl"}
    return ws, before


def test_failed_or_timed_out_stage_gets_its_previous_outputs_back(restore_ws):
    from flows import runner

    ws, before = restore_ws
    (ws / "params.yaml").write_text("train: {mode: fail, v: 2}\n")
    lines = []
    with pytest.raises(runner.StageFailed) as e:
        runner.repro_stage(ws, "train", lines.append)
    assert not e.value.transient
    assert _outputs(ws) == before                     # before: DVC had deleted all three
    assert "restored the previous outputs of train" in lines
    assert not (ws / ".trimpi" / "restore" / "train").exists()

    (ws / "params.yaml").write_text("train: {mode: sleep, v: 2}\n")
    with pytest.raises(runner.StageTimeout):
        runner.repro_stage(ws, "train", lambda line: None, timeout=10)
    assert (ws / "started").exists()                  # it was killed while running
    assert _outputs(ws) == before


def test_a_failed_check_keeps_its_report_and_restores_the_rest(restore_ws):
    """Exit 1 is a verdict (a refused gate): the report it wrote is why the run stopped, so it stays;
    cached outputs (models) still come back."""
    from flows import runner

    ws, before = restore_ws
    (ws / "params.yaml").write_text("train: {mode: check, v: 3}\n")
    with pytest.raises(runner.StageFailed) as e:
        runner.repro_stage(ws, "train", lambda line: None)
    assert e.value.check_failed and not e.value.transient
    after = _outputs(ws)
    assert after["metrics/m.json"] == b'{"v": 3}' and after["reports/preds/p.jsonl"] == b"pred 3"
    assert after["models/m/model.safetensors"] == before["models/m/model.safetensors"]


RUN_STAGE = """
import sys
from flows import runner
runner.repro_stage(sys.argv[1], "train", print)
"""


def test_runner_killed_mid_stage_kills_the_stage_and_the_next_run_restores(restore_ws):
    """SIGKILL of the runner: its stage group dies with it (item 10), DVC has already deleted the
    outputs, and the next run of the stage puts them back before DVC decides (item 3)."""
    from flows import runner

    ws, before = restore_ws
    (ws / "params.yaml").write_text("train: {mode: sleep, v: 2}\n")
    parent = subprocess.Popen([sys.executable, "-c", RUN_STAGE, str(ws)], env=child_env(), cwd=ws,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = ws / "started"
    deadline = time.monotonic() + 120
    while not started.exists() and time.monotonic() < deadline and parent.poll() is None:
        time.sleep(0.1)
    assert started.exists(), "the stage never started"
    trainer = int(started.read_text())
    rec = json.loads((ws / ".trimpi" / "stage.json").read_text())
    parent.kill()
    parent.wait()
    assert _gone(trainer), "the stage outlived its runner"           # before: it ran on for 600 s
    assert _gone_group(rec["pgid"])
    assert not (ws / "models" / "m").exists()                        # DVC removed it before running
    (ws / "params.yaml").write_text("train: {mode: ok, v: 1}\n")     # back to what dvc.lock records
    res = runner.repro_stage(ws, "train", lambda line: None)
    assert res.status == "unchanged" and _outputs(ws) == before      # restored, so nothing to re-run


def _gone(pid: int, wait: float = 60.0) -> bool:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # a zombie of an exited child counts as gone
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except OSError:
            return True
        time.sleep(0.1)
    return False


def _gone_group(pgid: int, wait: float = 30.0) -> bool:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


# ----------------------------------------------------------------------------- 10. stage lifetime follows the runner


def test_a_live_orphan_stage_keeps_the_workspace_busy(tmp_path):
    from pipeline.lock import LockBusy, WorkspaceLock, live_stage, record_stage

    orphan = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        record_stage(tmp_path, orphan.pid, "python -m dvc repro --single-item rl")
        with pytest.raises(LockBusy, match=rf"still running: process group {orphan.pid} .*dvc repro --single-item rl"):
            WorkspaceLock(tmp_path).acquire()
    finally:
        orphan.kill()
        orphan.wait()
    assert live_stage(tmp_path) is None and not (tmp_path / ".trimpi" / "stage.json").exists()
    with WorkspaceLock(tmp_path):                                    # a dead record is cleaned up
        pass


def test_terminate_all_stops_running_stage_groups(tmp_path):
    import threading

    from flows import runner

    pidfile = tmp_path / "pid"
    script = f"import os,time; open({str(pidfile)!r},'w').write(str(os.getpid())); time.sleep(300)"
    result = {}
    t = threading.Thread(target=lambda: result.update(
        rc=runner.run_streamed([sys.executable, "-c", script], tmp_path, lambda line: None)[0]))
    t.start()
    deadline = time.monotonic() + 60
    while not pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    runner.terminate_all()
    t.join(60)
    assert not t.is_alive() and result["rc"] != 0 and _gone(int(pidfile.read_text()))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killing_trimpi_run_stops_its_stage(sig, dvc_repo, tmp_path):
    """The issue's reproduction: `kill` (or `kill -9`) of `trimpi run` while a stage trains."""
    ws = dvc_repo(RESTORE_DVC, "train: {mode: sleep, v: 1}\norchestrate: {pull: false, push: false, retries: 0}\n")
    (ws / "train.py").write_text(TRAIN_PY)
    env = child_env(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180", DO_NOT_TRACK="1")
    env.pop("PREFECT_API_URL", None)
    run = subprocess.Popen([*TRIMPI, "run", "--workspace", str(ws), "--force"], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 400
        while not (ws / "started").exists() and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.2)
        assert (ws / "started").exists(), "the stage never started"
        trainer = int((ws / "started").read_text())
        run.send_signal(sig)
        run.wait(timeout=120)
        assert _gone(trainer), "the stage outlived `trimpi run`"
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()


# ----------------------------------------------------------------------------- 11. make s3 stopped with SIGTERM


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, ValueError, IndexError):
                continue
    return out


@pytest.mark.slow
def test_s3server_stopped_with_sigterm_stops_weed(tmp_path):
    from s3server import free_ports

    port = free_ports(1)[0]
    proc = subprocess.Popen([sys.executable, str(REPO / "infra" / "s3server.py"), "--dir", str(tmp_path / "s3"), "--port",
                             str(port)], env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    weed: list[int] = []
    try:
        assert proc.stdout.readline().startswith("S3 server (SeaweedFS) at"), "the server did not start"
        weed = _children(proc.pid)
        assert weed, "no weed child found"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert all(_gone(pid) for pid in weed), "weed still running after SIGTERM"   # before: still listening
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in weed:  # never leave a server behind, whatever happened above
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
