import copy

import torch
from torch import nn

from vitcompress.layers.moe_linear import MoELinear, balance_loss, expert_shares
from vitcompress.layers.shift_linear import ShiftLinear


def _moe(**kwargs) -> tuple[nn.Linear, MoELinear]:
    torch.manual_seed(0)
    linear = nn.Linear(32, 48)
    return linear, MoELinear.from_linear(copy.deepcopy(linear), levels=7, **kwargs)


def test_forced_experts_equal_their_layers_in_train_and_eval():
    linear, moe = _moe()
    x = torch.randn(3, 10, 32)
    moe.force = 0
    for mode in (True, False):
        moe.train(mode)
        torch.testing.assert_close(moe(x), linear(x), rtol=0, atol=0)
    moe.force = 1
    torch.testing.assert_close(moe(x), ShiftLinear.from_linear(linear)(x), rtol=0, atol=0)


def test_routing_mixes_both_experts_token_by_token():
    linear, moe = _moe()
    moe.eval()
    x = torch.randn(4, 25, 32)
    logits, chosen = moe.route(x.reshape(-1, 32))
    assert 0 < chosen.float().mean() < 1, "a fresh router should send tokens to both experts"
    expected = torch.where((chosen == 0)[:, None], linear(x.reshape(-1, 32)),
                           ShiftLinear.from_linear(linear)(x.reshape(-1, 32)))
    torch.testing.assert_close(moe(x).reshape(-1, 48), expected, rtol=0, atol=1e-6)


def test_where_and_gather_dispatch_agree():
    _, gather = _moe(dispatch="gather")
    where = copy.deepcopy(gather)
    where.dispatch = "where"
    x = torch.randn(2, 30, 32)
    torch.testing.assert_close(gather.eval()(x), where.eval()(x), rtol=0, atol=1e-6)


def test_router_receives_gradients_and_balance_loss_is_stored():
    _, moe = _moe()
    moe.train()
    x = torch.randn(4, 20, 32)
    moe(x).pow(2).mean().backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
    moe.zero_grad()
    moe(x)
    assert moe.aux_loss is not None and moe.aux_loss.requires_grad
    moe.aux_loss.backward()
    assert moe.router.weight.grad.abs().sum() > 0, "the balance loss alone moves the router"


def test_balance_loss_is_minimal_where_token_counts_are_inversely_proportional_to_latency():
    """CV²(Imp)+CV²(Load) = 0 when α_0·n_0 = α_1·n_1, i.e. the dense share is α_1 (= 1/α_0 ∝ normalised)."""
    alpha = torch.tensor([0.6, 0.4])
    tokens = 4000
    margin = torch.randn(tokens, generator=torch.Generator().manual_seed(0))
    losses, shares = [], []
    for shift in torch.linspace(-3, 3, 601):
        logits = torch.stack([(margin + shift) * 4, torch.zeros(tokens)], -1)
        losses.append(balance_loss(logits, alpha, noise_std=0.5).item())
        shares.append((logits.argmax(-1) == 0).float().mean().item())
    best = int(torch.tensor(losses).argmin())
    assert abs(shares[best] - 0.4) < 0.02, f"minimum at dense share {shares[best]:.3f}, expected 0.4"
    assert losses[best] < 0.01 * max(losses)


def test_expert_shares_count_eval_routing():
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU())
    torch.manual_seed(0)
    model[0] = MoELinear.from_linear(model[0], levels=7)
    model[0].force = 1
    shares = expert_shares(model.eval(), [torch.randn(5, 8), torch.randn(3, 8)])
    assert shares == {"overall": {"dense": 0.0, "shift": 1.0}, "layers": {"0": {"dense": 0.0, "shift": 1.0}}}
    assert expert_shares(nn.Linear(2, 2), []) is None


def _shift_share_after_balancing(alpha: tuple[float, float]) -> float:
    """Train only the router of a fresh MoE layer on the latency-aware balance loss; the shift expert's share
    of 1,000 tokens (eval routing) after 100 Adam steps."""
    torch.manual_seed(0)
    moe = MoELinear.from_linear(nn.Linear(16, 8), levels=7, alpha=alpha, balance_weight=1.0).train()
    tokens = torch.randn(1000, 16)
    optimizer = torch.optim.Adam(moe.router.parameters(), lr=0.1)
    for _ in range(100):
        optimizer.zero_grad()
        moe(tokens)
        moe.aux_loss.backward()
        optimizer.step()
    with torch.no_grad():
        return (moe.eval().route(tokens)[1] == 1).float().mean().item()


def test_latency_weights_move_the_shares_as_the_balance_loss_says():
    """The balance loss is 0 at α_dense·n_dense = α_shift·n_shift: the shift share goes to α_dense (the faster
    expert takes more tokens), from the even split of a fresh router, one way or the other with the weights."""
    assert abs(_shift_share_after_balancing((0.5, 0.5)) - 0.5) < 0.08
    assert abs(_shift_share_after_balancing((0.75, 0.25)) - 0.75) < 0.08
    assert abs(_shift_share_after_balancing((0.25, 0.75)) - 0.25) < 0.08
