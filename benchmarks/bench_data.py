"""Scene rendering throughput and ClevrPolicy dataset generation time (one core).

    .venv/bin/python benchmarks/bench_data.py            # rendering + default-size generation
    .venv/bin/python benchmarks/bench_data.py --paper    # + paper scale for one policy (2K train + 2K test)

Rendering is timed on pre-sampled scenes (render only, then render + PNG encode, which is
what the builder pays per image). Generation builds into a temporary directory with
the default ``generate_clevr`` params (or paper sizes) and the committed default policies
(``--policies``); the paper-scale run uses the first policy only, with a depth-6 tree
sampled on the fly when ``--depth6`` is given (the paper's default complexity).
"""
from __future__ import annotations

import argparse
import io
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_section  # noqa: E402
from pipeline.data.clevr_policy import GenerateClevrConfig, build  # noqa: E402
from pipeline.scenes import render_scene, sample_scene  # noqa: E402
from pipeline.io import dump_yaml  # noqa: E402


def bench_render(n: int, image_size: int, object_scale: float, min_obj: int, max_obj: int) -> None:
    rng = random.Random(0)
    scenes = [sample_scene(rng, min_obj, max_obj, image_size, object_scale) for _ in range(n)]
    t = time.perf_counter()
    for s in scenes:
        render_scene(s, image_size, object_scale)
    dt = time.perf_counter() - t
    t = time.perf_counter()
    for s in scenes:
        render_scene(s, image_size, object_scale).save(io.BytesIO(), format="PNG")
    dt_png = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(n):
        sample_scene(rng, min_obj, max_obj, image_size, object_scale)
    dt_s = time.perf_counter() - t
    print(f"render   {image_size}px, {min_obj}-{max_obj} objects: {n / dt:8.0f} images/s "
          f"(+PNG encode: {n / dt_png:.0f}/s; scene sampling: {n / dt_s:.0f}/s)")


def bench_generate(label: str, policies: Path, cfg: GenerateClevrConfig) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        m = build(policies, Path(tmp) / "data", cfg, seed=0, progress=False)
        dt = time.perf_counter() - t
        size = sum(p.stat().st_size for p in (Path(tmp) / "data").rglob("*") if p.is_file())
    print(f"generate {label}: {dt:6.1f} s for {m['images']} images "
          f"({', '.join(f'{k} {v}' for k, v in m['files'].items())}), {size / 1e6:.1f} MB")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--policies", default="policies/clevr")
    ap.add_argument("--n", type=int, default=2000, help="images for the rendering benchmark")
    ap.add_argument("--paper", action="store_true", help="also time paper scale for one policy (2K train + 2K test)")
    ap.add_argument("--depth6", action="store_true", help="paper scale with a sampled depth-6 policy")
    args = ap.parse_args()
    cfg = load_section(GenerateClevrConfig, "generate_clevr", args.params)
    bench_render(args.n, cfg.image_size, cfg.object_scale, cfg.min_objects, cfg.max_objects)
    bench_render(max(args.n // 4, 50), 320, 0.08, 3, 10)  # CLEVR-like: up to 10 objects, larger image
    bench_generate(f"default ({args.policies}, params.yaml sizes)", Path(args.policies), cfg)
    if args.paper or args.depth6:
        with tempfile.TemporaryDirectory() as tmp:
            one = Path(tmp) / "clevr"
            one.mkdir()
            if args.depth6:
                from pipeline.policy.clevr import sample_policy

                pol = sample_policy(6, random.Random(0))
                (one / f"{pol.name}.yaml").write_text(dump_yaml(pol.to_spec()))
            else:
                first = sorted(Path(args.policies).glob("*.yaml"))[0]
                (one / first.name).write_text(first.read_text())
            paper = GenerateClevrConfig(**{**cfg.__dict__, "train_per_policy": 2000, "cot_per_policy": 250,
                                           "test_per_policy": 2000, "override_per_policy": 0})
            bench_generate("paper scale, one policy (2K train + 2K test)", one, paper)
    return 0


if __name__ == "__main__":
    sys.exit(main())
