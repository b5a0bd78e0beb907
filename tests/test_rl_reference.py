"""Our GRPO/DAPO loss is TRL's (issue 16 item 9): the reference implementation users know.

``pipeline/train/rl.py`` computes its own loss because PolicyRollout scores the policy-aware samples on
the policy-free prompt, which TRL's trainer cannot do. Without PolicyRollout the two must agree: the
same clipped surrogate, the same k3 KL to the reference, the same aggregation (GRPO: mean over tokens,
then over responses; DAPO: mean over every token of the batch). This test runs our optimizer path
(``rl.update``: micro-batches, ragged old/ref log-probs, the batch-wide normalizer) and TRL 1.x's
``GRPOTrainer._compute_loss`` (the trainer's own method, on a stand-in ``self`` whose model returns the
given log-probs) on the same tensors, and compares the loss and its gradient.
"""
from __future__ import annotations

import types
from collections import defaultdict

import pytest

torch = pytest.importorskip("torch")
grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")

from pipeline.train import rl  # noqa: E402
from pipeline.train.rl_config import RLConfig  # noqa: E402

TRL_LOSS = {"grpo": "grpo", "dapo": "dapo"}  # our algorithm -> TRL's loss_type with the same aggregation


def trl_loss(logp, old, ref, adv, mask, cfg: RLConfig):
    """TRL's loss for completions with per-token log-probs ``logp`` [n, L] (``old``/``ref`` likewise, or None)."""
    n, L = logp.shape
    accelerator = types.SimpleNamespace(num_processes=1, sync_gradients=True, gather=lambda x: x,
                                        gather_for_metrics=lambda x: x, reduce=lambda x, reduction="sum": x)
    trainer = types.SimpleNamespace(
        loss_type=TRL_LOSS[cfg.algorithm], epsilon_low=cfg.clip_low, epsilon_high=cfg.clip_high, beta=cfg.kl_beta,
        importance_sampling_level="token", top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        use_vllm=False, vllm_importance_sampling_correction=False, aux_loss_enabled=False,
        _entropy_bonus_enabled=False, current_gradient_accumulation_steps=1, accelerator=accelerator,
        model=types.SimpleNamespace(training=True), _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        args=types.SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None))
    inputs = {"prompt_ids": torch.zeros(n, 1, dtype=torch.long), "prompt_mask": torch.ones(n, 1),
              "completion_ids": torch.zeros(n, L, dtype=torch.long), "completion_mask": mask, "advantages": adv,
              "num_items_in_batch": mask.sum()}
    if old is not None:
        inputs["old_per_token_logps"] = old
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    return grpo_trainer.GRPOTrainer._compute_loss(trainer, None, inputs)


def pad(rows, L):
    return torch.stack([torch.nn.functional.pad(r, (0, L - r.numel())) for r in rows])


@pytest.mark.parametrize("algorithm", ["grpo", "dapo"])
@pytest.mark.parametrize("off_policy", [False, True])
def test_loss_and_gradient_equal_trl(algorithm, off_policy, monkeypatch):
    torch.manual_seed(0)
    cfg = RLConfig(algorithm=algorithm, policy_rollout=False, group_size=4, rollout_batch=2, update_batch=2,
                   micro_batch=3).resolved()  # micro-batches of 3 split each group of 4: 3 + 1
    lengths = [[5, 2, 7, 3], [4, 6, 1, 7]]
    groups, leaves = [], {}
    for lens in lengths:
        g = rl.Group(record=None, prompt={})
        g.responses = [torch.randint(0, 100, (k,)) for k in lens]
        for r in g.responses:  # sampled log-probs; old and ref differ enough that clipping binds both ways
            leaves[id(r)] = (-torch.rand(r.numel(), dtype=torch.float32) * 3).requires_grad_()
        g.rewards = torch.rand(len(lens), dtype=torch.float32)
        g.adv = rl.group_advantages(g.rewards[None])[0]
        if off_policy:
            g.old_logp = [leaves[id(r)].detach() + 0.5 * torch.randn(r.numel(), dtype=torch.float32)
                          for r in g.responses]
        if cfg.kl_beta:
            g.ref_logp = [leaves[id(r)].detach() + 0.3 * torch.randn(r.numel(), dtype=torch.float32)
                          for r in g.responses]
        groups.append(g)

    def scored(engine, prompt, responses, temperature):  # the model's log-probs, right-padded per micro-batch
        L = max(r.numel() for r in responses)
        mask = pad([torch.ones(r.numel(), dtype=torch.float32) for r in responses], L)
        return pad([leaves[id(r)] for r in responses], L), mask

    class Engine:
        def backward(self, loss):
            loss.backward()

        def step(self):
            return 0.0

    monkeypatch.setattr(rl, "response_logprobs", scored)
    ours = rl.update(Engine(), groups, cfg)["loss"]  # summed over the micro-batches of the update batch
    ours_grad = {k: v.grad.clone() for k, v in leaves.items()}

    resp = [r for g in groups for r in g.responses]
    L = max(r.numel() for r in resp)
    logp = pad([leaves[id(r)] for r in resp], L)
    mask = pad([torch.ones(r.numel(), dtype=torch.float32) for r in resp], L)
    old = pad([x for g in groups for x in g.old_logp], L) if off_policy else None
    ref = pad([x for g in groups for x in g.ref_logp], L) if cfg.kl_beta else None
    theirs = trl_loss(logp, old, ref, torch.cat([g.adv for g in groups]), mask, cfg)
    grads = torch.autograd.grad(theirs, [leaves[id(r)] for r in resp])

    # float32 as in training (the scored log-probs are kept as float32); only summation order differs
    torch.testing.assert_close(torch.tensor(ours), theirs.detach(), rtol=1e-5, atol=1e-7)
    for r, gr in zip(resp, grads):
        torch.testing.assert_close(ours_grad[id(r)], gr, rtol=1e-5, atol=1e-7)
    if off_policy:  # the ratio was clipped somewhere, so the comparison covered the clipped branch
        ratio = torch.exp(logp.detach() - old)[mask.bool()]
        assert ((ratio < 1 - cfg.clip_low) | (ratio > 1 + cfg.clip_high)).any()
