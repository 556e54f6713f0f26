"""The reference forward against the equations of DESIGN section 2."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import model.looplm as model_module
from engine import InvalidRequestError
from tests.helpers import make_model

SEMANTICS = [None, 0.3]  # exact, adaptive


@pytest.mark.parametrize("threshold", SEMANTICS)
def test_causality(tiny_model, threshold):
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(1))
    base = tiny_model.reference_forward(ids, halt_threshold=threshold)
    changed = ids.clone()
    changed[0, 15] = (changed[0, 15] + 7) % 256
    out = tiny_model.reference_forward(changed, halt_threshold=threshold)
    assert torch.equal(base.logits[:, :15], out.logits[:, :15])
    assert torch.equal(base.depths[:, :15], out.depths[:, :15])
    assert not torch.allclose(base.logits[:, 15:], out.logits[:, 15:])


def test_adaptive_with_zero_threshold_equals_exact(tiny_model):
    ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(2))
    exact = tiny_model.reference_forward(ids)
    adaptive = tiny_model.reference_forward(ids, halt_threshold=0.0)
    torch.testing.assert_close(adaptive.logits, exact.logits, rtol=0, atol=0)
    assert (adaptive.depths == tiny_model.config.max_loops).all()


def test_adaptive_really_halts_and_changes_logits(tiny_model):
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(3))
    exact = tiny_model.reference_forward(ids)
    adaptive = tiny_model.reference_forward(ids, halt_threshold=0.5)
    assert adaptive.depths.min() == 1 and adaptive.depths.max() == 3
    assert not torch.allclose(adaptive.logits, exact.logits)


def test_router_forced_to_halt_stops_every_token_at_step_one():
    model = make_model()
    with torch.no_grad():
        for block in model.layers:
            block.router.weight.zero_()
            block.router.bias.fill_(30.0)  # lam = 1 -> R_1 = 0 < eps
    ids = torch.randint(0, 256, (2, 12))
    out = model.reference_forward(ids, halt_threshold=0.01)
    assert (out.depths == 1).all()
    # halting at step 1 is the same as max_loops = 1
    torch.testing.assert_close(out.logits, model.reference_forward(ids, max_loops=1).logits)


@pytest.mark.parametrize("max_loops", [1, 2, 3])
@pytest.mark.parametrize("threshold", SEMANTICS)
def test_depths_respect_max_loops(tiny_model, max_loops, threshold):
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(4))
    out = tiny_model.reference_forward(ids, halt_threshold=threshold, max_loops=max_loops)
    assert out.depths.max() <= max_loops and out.depths.min() >= 1
    if threshold is None:
        assert (out.depths == max_loops).all()


@pytest.mark.parametrize("kwargs, param", [
    ({"halt_threshold": 1.0}, "halt_threshold"), ({"halt_threshold": -0.1}, "halt_threshold"),
    ({"max_loops": 0}, "max_loops"), ({"max_loops": 4}, "max_loops"),
])
def test_bad_loop_overrides_raise_typed_errors(tiny_model, kwargs, param):
    with pytest.raises(InvalidRequestError) as info:
        tiny_model.reference_forward(torch.zeros(1, 3, dtype=torch.long), **kwargs)
    assert info.value.param == param


def _record_attention_kv(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Capture the k/v every causal_attention call sees, in (layer, step) order."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = model_module.causal_attention

    def recording(q, k, v):
        seen.append((k.clone(), v.clone()))
        return real(q, k, v)

    monkeypatch.setattr(model_module, "causal_attention", recording)
    return seen


def test_kv_rule_halted_tokens_expose_their_last_step(tiny_model, monkeypatch):
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(5))
    seen = _record_attention_kv(monkeypatch)
    out = tiny_model.reference_forward(ids, halt_threshold=0.5)
    n = tiny_model.config.max_loops
    checked = 0
    for layer in range(tiny_model.config.n_layers):
        depth = out.depths[0, :, layer]  # [T]
        for step in range(2, n + 1):
            k, v = seen[layer * n + step - 1]
            for pos in torch.nonzero(depth < step).flatten().tolist():
                k_last, v_last = seen[layer * n + depth[pos].item() - 1]
                assert torch.equal(k[0, pos], k_last[0, pos])
                assert torch.equal(v[0, pos], v_last[0, pos])
                checked += 1
    assert checked > 10


def test_kv_rule_ignores_what_a_halted_token_would_have_computed(tiny_model, monkeypatch):
    """Perturb the k/v a halted token would compute after halting: no logit may change.
    Perturbing them at its last executed step instead must change later tokens."""
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(6))
    base = tiny_model.reference_forward(ids, halt_threshold=0.5)

    def run_with_noise(at_last_step: bool) -> torch.Tensor:
        block_index = {id(b): i for i, b in enumerate(tiny_model.layers)}
        calls: dict[int, int] = {}
        real = type(tiny_model.layers[0]).project_qkv

        def noisy(block, x, cos, sin):
            q, k, v = real(block, x, cos, sin)
            layer = block_index[id(block)]
            calls[layer] = step = calls.get(layer, 0) + 1
            depth = base.depths[..., layer]  # [B, T]
            target = (depth == step) & (depth < 3) if at_last_step else depth < step
            noise = target[..., None, None].float()
            return q, k + 5 * noise, v + 5 * noise

        monkeypatch.setattr(type(tiny_model.layers[0]), "project_qkv", noisy)
        try:
            return tiny_model.reference_forward(ids, halt_threshold=0.5).logits
        finally:
            monkeypatch.undo()

    torch.testing.assert_close(run_with_noise(at_last_step=False), base.logits, rtol=0, atol=0)
    assert not torch.allclose(run_with_noise(at_last_step=True), base.logits)


def _plain_transformer_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """An independent pre-norm transformer: h += s*Attn(norm h); h += s*MLP(norm h)."""
    cfg = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.norm_eps) * w

    seq = ids.shape[1]
    freqs = 1.0 / cfg.rope_base ** (torch.arange(0, cfg.head_dim, 2).double() / cfg.head_dim)
    ang = torch.arange(seq).double()[:, None] * freqs[None]  # [T, hd/2]

    def rope(x):  # x [B, T, heads, hd]
        a, b = x.chunk(2, dim=-1)
        c, s = ang.cos()[None, :, None], ang.sin()[None, :, None]
        return torch.cat([a * c - b * s, b * c + a * s], dim=-1)

    h = sd["embed.weight"][ids]
    mask = torch.full((seq, seq), -math.inf).triu(1).double()
    group = cfg.n_heads // cfg.n_kv_heads
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        scale = F.softplus(sd[p + "loop_scale"][0])
        wq, wk, wv = sd[p + "qkv.weight"].split([cfg.q_dim, cfg.kv_dim, cfg.kv_dim])
        x = rms(h, sd[p + "attn_norm.weight"])
        q = (x @ wq.T).unflatten(-1, (cfg.n_heads, cfg.head_dim))
        k = (x @ wk.T).unflatten(-1, (cfg.n_kv_heads, cfg.head_dim))
        v = (x @ wv.T).unflatten(-1, (cfg.n_kv_heads, cfg.head_dim))
        q = rope(rms(q, sd[p + "q_norm.weight"]))
        k = rope(rms(k, sd[p + "k_norm.weight"])).repeat_interleave(group, dim=2)
        v = v.repeat_interleave(group, dim=2)
        att = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(cfg.head_dim) + mask
        o = torch.einsum("bhqk,bkhd->bqhd", att.softmax(-1), v).flatten(2)
        h = h + scale * o @ sd[p + "attn_out.weight"].T
        gate, up = (rms(h, sd[p + "mlp_norm.weight"]) @ sd[p + "mlp.gate_up.weight"].T).chunk(2, -1)
        h = h + scale * (F.silu(gate) * up) @ sd[p + "mlp.down.weight"].T
    return rms(h, sd["final_norm.weight"]) @ sd["lm_head.weight"].T


@pytest.mark.parametrize("threshold", SEMANTICS)
def test_one_loop_without_memory_is_a_plain_transformer(threshold):
    model = make_model(max_loops=1, local_memory_slots=0, global_memory_slots=0)
    ids = torch.randint(0, 256, (2, 18), generator=torch.Generator().manual_seed(7))
    out = model.reference_forward(ids, halt_threshold=threshold)
    expected = _plain_transformer_logits(model, ids).float()
    torch.testing.assert_close(out.logits, expected, rtol=1e-4, atol=1e-4)


def test_memory_changes_the_output_and_reports_gates():
    model = make_model()
    ids = torch.randint(0, 256, (1, 10))
    out = model.reference_forward(ids)
    assert out.memory_gates.shape == (1, 10, 2, 2)
    assert ((out.memory_gates > 0) & (out.memory_gates < 1)).all()
    with torch.no_grad():
        for block in model.layers:
            block.memory.local_read.gate.bias.fill_(-60.0)
            block.memory.global_read.gate.bias.fill_(-60.0)
    closed = model.reference_forward(ids)
    assert closed.memory_gates.max() < 1e-12
    assert not torch.allclose(closed.logits, out.logits)


def test_training_loss_and_ponder_penalty(tiny_model):
    ids = torch.randint(0, 256, (2, 12))
    targets = ids.roll(-1, dims=1)
    plain = tiny_model(ids, targets)
    pondered = tiny_model(ids, targets, ponder_weight=0.5)
    assert 0.0 <= pondered.ponder.item() <= 1.0
    torch.testing.assert_close(pondered.loss, plain.loss + 0.5 * pondered.ponder)
    pondered.loss.backward()
    router_grad = tiny_model.layers[0].router.weight.grad
    assert router_grad is not None and router_grad.abs().sum() > 0


@pytest.mark.parametrize("bias", [-2.0, 0.0, 1.5])
def test_expected_steps_are_the_act_mixture_weights(tiny_model, bias):
    """A constant router lam = sig(b) gives p = (s, s(1-s), (1-s)^2) over N = 3 steps, so
    the expected number of steps is s + 2 s (1-s) + 3 (1-s)^2 in every layer."""
    with torch.no_grad():
        for block in tiny_model.layers:
            block.router.weight.zero_()
            block.router.bias.fill_(bias)
    out = tiny_model.reference_forward(torch.randint(0, 256, (1, 9)))
    s = torch.sigmoid(torch.tensor(bias)).item()
    expected = s + 2 * s * (1 - s) + 3 * (1 - s) ** 2
    torch.testing.assert_close(out.expected_steps, torch.full_like(out.expected_steps,
                                                                   expected))


def test_too_long_input_is_rejected(tiny_model):
    with pytest.raises(InvalidRequestError, match="exceeds max_position 256"):
        tiny_model.reference_forward(torch.zeros(1, 257, dtype=torch.long))
