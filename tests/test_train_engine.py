"""Engine pieces without a model: DeepSpeed config resolution, LR schedule, deterministic sharded batches."""
import json

import pytest

from pipeline.io import InputError
from pipeline.train.engine import TrainConfig, ds_config, epoch_order, lr_lambda, micro_batch, plan


@pytest.mark.parametrize("name,stage", [("zero0", 0), ("zero2", 2), ("zero3", 3)])
def test_ds_config_resolves_every_auto(name, stage):
    cfg = TrainConfig(batch_size=3, grad_accum=2, lr=2e-4, weight_decay=0.1, max_grad_norm=0.5, deepspeed=name)
    ds = ds_config(cfg, world_size=4)
    assert "auto" not in json.dumps(ds)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 24 and ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["params"]["lr"] == 2e-4 and ds["optimizer"]["params"]["weight_decay"] == 0.1
    assert ds["optimizer"]["params"]["torch_adam"] is True           # no cpu_adam JIT build
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False   # CPU: fp32


def test_ds_config_bad_path(tmp_path):
    with pytest.raises(InputError, match="deepspeed"):
        ds_config(TrainConfig(deepspeed=str(tmp_path / "missing.json")), 1)
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(InputError, match="bad.json"):
        ds_config(TrainConfig(deepspeed=str(bad)), 1)


def test_lr_schedule_warmup_then_cosine_to_floor():
    f = lr_lambda(100, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.55, abs=0.01)
    assert f(100) == pytest.approx(0.1) and all(f(i) >= f(i + 1) for i in range(10, 100))
    const = lr_lambda(100, 0.0, schedule="constant")  # RL: no warm-up, no decay
    assert {const(i) for i in (0, 50, 100)} == {1.0}


def test_plan_and_batches_cover_each_epoch_once_per_rank():
    cfg = TrainConfig(batch_size=3, epochs=2.0, grad_accum=1)
    per_epoch, total = plan(10, cfg, world_size=2)
    assert per_epoch == 2 and total == 4
    seen = []
    for m in range(per_epoch):
        for rank in range(2):
            seen += micro_batch(10, 0, m, per_epoch, 3, rank, 2)
    assert sorted(set(seen)) == list(range(10))                       # every record in epoch 0
    assert micro_batch(10, 0, 0, per_epoch, 3, 0, 2) != micro_batch(10, 0, 2, per_epoch, 3, 0, 2)  # reshuffled
    assert micro_batch(10, 0, 1, per_epoch, 3, 1, 2) == micro_batch(10, 0, 1, per_epoch, 3, 1, 2)  # deterministic
    assert plan(10, TrainConfig(batch_size=3, epochs=2.0, max_steps=3), 1)[1] == 3
    with pytest.raises(InputError):
        plan(0, cfg, 1)


def test_size_classes_never_share_a_batch_and_every_example_is_seen():
    """SFT with a policy share: batches hold policy-in-context OR policy-free examples, never both."""
    n, batch = 400, 8
    kinds = [int(i % 10 < 3) for i in range(n)]  # 30 % long
    order = epoch_order(n, 0, 0, kinds, batch)
    assert sorted(order) == list(range(n))
    batches = [order[k:k + batch] for k in range(0, n, batch)]
    mixed = [b for b in batches if len({kinds[i] for i in b}) > 1]
    assert len(mixed) <= 2  # at most the batch where a window's two classes meet
    assert order != epoch_order(n, 0, 1, kinds, batch) and order == epoch_order(n, 0, 0, kinds, batch)
    assert epoch_order(n, 0, 0) == epoch_order(n, 0, 0, None, batch)  # no classes: the plain shuffle
