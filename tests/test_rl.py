"""PolicyRollout GRPO/DAPO: the math pinned on a tiny random VLM with fixed seeds.

Tests (a)-(f) of issue 5. The engine here is a plain AdamW adapter with the DeepSpeed engine's
surface (``module``, ``__call__``, ``backward``, ``step``) so the math is tested without starting
DeepSpeed; the end-to-end test in test_rl_stage.py goes through the real engine.
"""
from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from pipeline.data.records import Record  # noqa: E402
from pipeline.policy import RenderedPolicy  # noqa: E402
from pipeline.train import rl  # noqa: E402
from pipeline.train.rl_config import RLConfig  # noqa: E402


class AdamEngine:
    """The slice of the DeepSpeed engine API the RL update uses."""

    def __init__(self, model, lr=1e-3):
        self.module = model
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    def __call__(self, **kw):
        return self.module(**kw)

    def backward(self, loss):
        loss.backward()

    def step(self):
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=False)
        return float(norm)


@pytest.fixture(scope="module")
def tiny():
    from pipeline.model.presets import build_tiny

    torch.set_num_threads(1)
    return build_tiny("tiny-xs", seed=0)


@pytest.fixture(scope="module")
def world(tiny):
    """One ClevrPolicy-like record with an input image and a multimodal policy (text + image)."""
    from PIL import Image

    _, proc = tiny
    img = Image.new("RGB", (64, 64), (200, 30, 30))
    pimg = Image.new("RGB", (56, 56), (20, 20, 200))
    rec = Record(id="r0", task="clevr", split="train", query="According to Policy: L2-Abc, what is the response?",
                 answer="Case 1", images=["images/shard-00000.zip/0.png"], policy="L2-Abc")
    policy = RenderedPolicy("L2-Abc", "v1", ["Policy: L2-Abc. If a red object exists go to ", pimg, " else Case 2."])

    class Store:
        def open(self, ref):
            return img

    class Pol:
        name, version = "L2-Abc", "v1"

        def render(self, multimodal=False):
            return policy

    cache = rl.PromptCache(proc, {"d": Store()}, {"L2-Abc": Pol()}, {"d": True})
    return {"rec": rec, "img": img, "policy": policy, "cache": cache, "item": ("d", rec)}


def manual_logprobs(model, proc, rec, img, policy, resp):
    """Independent scorer: full forward of prompt (+policy) + response, images re-encoded."""
    from pipeline.model.masking import encode
    from pipeline.model.prompts import build_messages

    enc = encode(proc, [build_messages(rec, [img], policy=policy)], add_generation_prompt=True)
    P = enc["input_ids"].shape[1]
    kw = dict(enc)
    kw["input_ids"] = torch.cat([enc["input_ids"], resp[None]], 1)
    kw["attention_mask"] = torch.ones_like(kw["input_ids"])
    kw["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], torch.zeros_like(resp[None])], 1)
    with torch.no_grad():
        logits = model(**kw).logits[0, P - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, resp[:, None])[:, 0]


def roll(tiny, world, cfg, reward_fn, seed):
    """One prompt's group, through the same path as training (rollout, then group advantages)."""
    model, proc = tiny
    torch.manual_seed(seed)
    (g,), info = rl.collect_groups(rl.PromptStream(1, 0), [world["item"]], 1,
                                   lambda b: rl.rollout(model, proc, b, world["cache"], cfg, reward_fn), cfg)
    return g


def varied_reward(record, text):
    return float(len(text) % 3 == 0), float(len(text) % 2)


def test_a_policy_aware_logprobs_in_loss_are_policy_free(tiny, world, monkeypatch):
    model, proc = tiny
    model = copy.deepcopy(model)
    cfg = RLConfig(group_size=3, max_response_len=10, micro_batch=4).resolved()
    g = roll((model, proc), world, cfg, varied_reward, seed=0)
    assert g.with_policy == [False] * 3 + [True] * 3

    seen = []
    real = rl.policy_loss

    def spy(logp, old_logp, adv, mask, *a, **k):
        seen.append((logp.detach().clone(), mask.clone()))
        return real(logp, old_logp, adv, mask, *a, **k)

    monkeypatch.setattr(rl, "policy_loss", spy)
    rl.update(AdamEngine(model, lr=0.0), [g], cfg)
    used = torch.cat([torch.nn.functional.pad(lp, (0, 10 - lp.shape[1])) for lp, _ in seen])
    assert used.shape[0] == 6
    for i, resp in enumerate(g.responses):
        n = resp.numel()
        free = manual_logprobs(model, proc, world["rec"], world["img"], None, resp)
        withp = manual_logprobs(model, proc, world["rec"], world["img"], world["policy"], resp)
        assert torch.allclose(used[i, :n], free, atol=1e-5), i
        if g.with_policy[i]:
            assert (used[i, :n] - withp).abs().max() > 1e-3  # the policy prefix really changes the scores
    # old log-probs recomputed for off-policy updates are also the policy-free ones
    rl.score_groups(model, [g], cfg, "old_logp")
    for i in range(3, 6):
        free = manual_logprobs(model, proc, world["rec"], world["img"], None, g.responses[i])
        assert torch.allclose(g.old_logp[i], free, atol=1e-5)


def test_b_advantages_normalized_over_all_2G(tiny, world):
    model, proc = tiny
    cfg = RLConfig(group_size=4, max_response_len=8).resolved()
    g = roll(tiny, world, cfg, varied_reward, seed=1)
    r = g.rewards
    assert len(r) == 8
    assert torch.allclose(g.adv, (r - r.mean()) / (r.std() + 1e-6))
    # free half all right, policy half all wrong: per-half normalization would give zeros, pooled does not
    adv = rl.group_advantages(torch.tensor([[1.0, 1, 1, 1, 0, 0, 0, 0]]))[0]
    assert torch.allclose(adv[:4], torch.full((4,), adv[0].item())) and adv[0] > 0.9 and adv[4] < -0.9
    assert abs(float(adv.sum())) < 1e-5


def test_c_equal_rewards_give_no_policy_gradient(tiny, world):
    model, proc = tiny
    model = copy.deepcopy(model)
    cfg = RLConfig(group_size=3, max_response_len=8, kl_beta=0.0).resolved()
    g = roll((model, proc), world, cfg, lambda rec, text: (1.0, 1.0), seed=2)
    assert torch.all(g.adv == 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = AdamEngine(model, lr=1e-2)
    grads = []
    engine.step = lambda: grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None]) or 0.0
    stats = rl.update(engine, [g], cfg)
    assert stats["loss"] == 0.0
    assert grads and all(torch.count_nonzero(t) == 0 for t in grads[0])
    # with GRPO's KL to an identical reference the gradient is still zero (k3 is flat at logp == ref)
    cfg_kl = RLConfig(group_size=3, max_response_len=8).resolved()
    rl.score_groups(model, [g], cfg_kl, "ref_logp")
    grads.clear()
    rl.update(engine, [g], cfg_kl)
    assert all(float(t.abs().max()) < 1e-6 for t in grads[0])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _fake_group(rewards):
    g = rl.Group(record=None, prompt={})
    g.rewards = torch.tensor(rewards, dtype=torch.float)
    g.adv = rl.group_advantages(g.rewards[None])[0]
    g.with_policy = [False] * len(rewards)
    return g


def test_d_dapo_drops_zero_variance_groups_and_honours_retry_cap():
    cfg = RLConfig(algorithm="dapo", max_retries=3).resolved()
    assert cfg.dynamic_sampling and cfg.kl_beta == 0.0
    pattern = iter([[1, 1], [0, 1], [0, 0], [1, 0], [1, 1], [0, 1]])
    calls = []

    def rollout_fn(batch):
        calls.append(len(batch))
        return [_fake_group(next(pattern)) for _ in batch]

    stream = rl.PromptStream(10, seed=0)
    kept, info = rl.collect_groups(stream, list(range(10)), 3, rollout_fn, cfg)
    assert [g.rewards.tolist() for g in kept] == [[0, 1], [1, 0], [0, 1]]
    # round 1: 3 prompts, 2 dropped; round 2 (retry 1): 2 prompts, 1 dropped; round 3 (retry 2): 1 prompt
    assert calls == [3, 2, 1] and info["retries"] == 2 and info["zero_var"] == 3 and not info["exhausted"]

    calls.clear()
    kept, info = rl.collect_groups(stream, list(range(10)), 2, lambda b: calls.append(1) or
                                   [_fake_group([0.5, 0.5]) for _ in b], cfg)
    assert info["exhausted"] and info["retries"] == 3 and len(calls) == 4 and kept == []
    # GRPO keeps zero-variance groups (no filtering, one round)
    grpo = RLConfig(algorithm="grpo").resolved()
    kept, info = rl.collect_groups(stream, list(range(10)), 2, lambda b: [_fake_group([1, 1]) for _ in b], grpo)
    assert len(kept) == 2 and info["retries"] == 0 and info["zero_var"] == 2


def test_d_dapo_cap_stops_the_run_early(tiny, world):
    model, proc = tiny
    cfg = RLConfig(algorithm="dapo", group_size=2, max_response_len=4, rollout_batch=2, update_batch=2,
                   max_retries=2).resolved()
    row, stopped = rl.rl_step(AdamEngine(copy.deepcopy(model)), None, rl.PromptStream(1, 0), [world["item"]],
                              world["cache"], proc, cfg, step=0, seed=0, reward_fn=lambda r, t: (0.0, 0.0))
    assert stopped and row["retries"] == 2 and row["zero_var_frac"] == 1.0


def test_e_clipping_uses_configured_eps():
    assert (RLConfig().resolved().clip_low, RLConfig().resolved().clip_high) == (0.2, 0.3)
    assert RLConfig(algorithm="dapo").resolved().clip_high == 0.28
    mask = torch.ones(1, 1)

    def grad(ratio, adv, lo, hi):
        logp = torch.tensor([[float(torch.log(torch.tensor(ratio)))]], requires_grad=True)
        loss, st = rl.policy_loss(logp, torch.zeros(1, 1), torch.tensor([adv]), mask, lo, hi)
        loss.backward()
        return float(logp.grad), st["clipped"]

    # positive advantage: ratio 1.25 is inside 1 + 0.3 (GRPO) but outside 1 + 0.2
    assert grad(1.25, 1.0, 0.2, 0.3) == (pytest.approx(-1.25), 0.0)
    assert grad(1.25, 1.0, 0.2, 0.2) == (0.0, 1.0)
    # DAPO's 0.28: 1.29 clipped, 1.27 not
    assert grad(1.29, 1.0, 0.2, 0.28)[0] == 0.0 and grad(1.27, 1.0, 0.2, 0.28)[0] != 0.0
    # negative advantage: the low side, 1 - eps_low
    assert grad(0.75, -1.0, 0.2, 0.3) == (0.0, 1.0)
    assert grad(0.85, -1.0, 0.2, 0.3)[0] == pytest.approx(0.85)
    assert grad(0.85, -1.0, 0.1, 0.3) == (0.0, 1.0)


def test_f_rl_steps_raise_reward_on_learnable_toy(tiny, world):
    """Toy task whose answer is learnable by a random model: start the response with '-'
    (about half of the random samples do). 24 GRPO steps push it towards always."""
    model, proc = tiny
    model = copy.deepcopy(model)
    cfg = RLConfig(algorithm="grpo", group_size=4, max_response_len=4, rollout_batch=2, update_batch=2,
                   kl_beta=0.0).resolved()
    engine = AdamEngine(model, lr=1e-2)
    stream = rl.PromptStream(1, 0)
    rewards = []
    for step in range(24):
        row, stopped = rl.rl_step(engine, None, stream, [world["item"]], world["cache"], proc, cfg, step, 0,
                                  lambda rec, text: (float(text.startswith("-")), 0.0))
        assert not stopped and row["groups_kept"] == 2
        rewards.append(row["reward"])
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.2 and last > 0.7, [round(r, 2) for r in rewards]


def _second_item(world):
    """Another record of the same policy with a different image and query (prompts of other lengths)."""
    from PIL import Image

    rec = Record(id="r1", task="clevr", split="train", query="According to Policy: L2-Abc, which case applies here?",
                 answer="Case 2", images=["images/shard-00000.zip/1.png"], policy="L2-Abc")
    img2 = Image.new("RGB", (84, 56), (30, 200, 30))
    store = world["cache"].stores["d"]
    world["cache"].stores["d"] = type("Store2", (), {"open": lambda self, ref: img2 if ref.endswith("/1.png")
                                                     else store.open(ref)})()
    return ("d", rec)


@pytest.mark.parametrize("poro", [True, False])
def test_g_shared_prefix_rollout_samples_exactly_the_unshared_tokens(tiny, world, poro, monkeypatch):
    """Issue 17: each prompt is prefilled once (the policy-aware prompts of a policy share the prefill
    of its text) and its G samples attend over one copy of its cache; under a fixed seed the sampled
    tokens (and so every reward and score) equal those of the plain path, where every sample
    prefilled its own copy of the prompt."""
    from pipeline.model import prefix as px

    model, proc = tiny
    items = [world["item"], _second_item(world)]
    cfg = RLConfig(policy_rollout=poro, group_size=3, max_response_len=12, generation_batch=2).resolved()
    runs, calls = {}, []
    real = px.prefill_one
    monkeypatch.setattr(px, "prefill_one", lambda m, e, prefix=None: calls.append(prefix is not None) or real(m, e, prefix))
    for share in (True, False):
        torch.manual_seed(5)
        runs[share] = rl.rollout(model, proc, items, world["cache"], cfg, varied_reward, share_prefix=share)
    # both records carry policy L2-Abc: its text (and policy image) prefilled once, then each record's tail
    assert calls == ([False, True, True] if poro else [])
    for a, b in zip(runs[True], runs[False]):
        assert a.with_policy == b.with_policy == [False] * 3 + ([True] * 3 if poro else [])
        assert len(a.responses) == len(b.responses)
        assert all(torch.equal(x, y) for x, y in zip(a.responses, b.responses))
        assert torch.equal(a.rewards, b.rewards)
    # the test has power: the samples are long and not all alike
    assert sum(int(r.numel()) for g in runs[True] for r in g.responses) > 0.5 * 12 * len(runs[True][0].responses) * 2
    assert len({tuple(r.tolist()) for g in runs[True] for r in g.responses}) > 3


def test_g_prefix_cache_logprobs_equal_a_full_prefill(tiny):
    """The sampling distribution of every step is the one a full prefill gives: mixed prompt lengths
    (left padding), images with mRoPE position deltas, a text-only prompt, repeats per prompt."""
    from PIL import Image

    from pipeline.model import prefix as px
    from pipeline.model.masking import encode, visual_token_ids
    from pipeline.train.rl_rollout import left_pad_cat

    model, proc = tiny
    tok = proc.tokenizer
    img, pimg = Image.new("RGB", (64, 64), (200, 30, 30)), Image.new("RGB", (56, 84), (20, 20, 200))

    def enc(text, imgs):
        e = encode(proc, [[{"role": "user", "content": [{"type": "image", "image": i} for i in imgs]
                            + [{"type": "text", "text": text}]}]], add_generation_prompt=True)
        return {k: v for k, v in e.items() if v is not None}

    kw = dict(do_sample=True, top_k=0, max_new_tokens=10, pad_token_id=tok.pad_token_id,
              eos_token_id=[tok.eos_token_id], suppress_tokens=visual_token_ids(tok),
              return_dict_in_generate=True, output_logits=True)
    for group in ([enc("What colour?", [img]), enc("A long policy. " * 12 + "Which case?", [pimg, img])],
                  [enc("A text-only question?", [])]):
        batch = left_pad_cat(group, tok.pad_token_id)
        torch.manual_seed(3)
        full = model.generate(**batch, num_return_sequences=3, **kw)
        torch.manual_seed(3)
        shared = px.generate_from(model, [px.prefill(model, e) for e in group], 3, **kw)
        assert torch.equal(full.sequences[:, batch["input_ids"].shape[1]:], shared.sequences[:, 1:])
        lp_full = torch.stack(full.logits, 1).log_softmax(-1)
        lp_shared = torch.stack(shared.logits, 1).log_softmax(-1)
        assert lp_full.shape == lp_shared.shape
        assert (lp_full - lp_shared).abs().max() < 1e-5
