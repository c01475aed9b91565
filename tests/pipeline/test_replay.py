"""SettledReplay on toy layers whose linear groups are *not* in forward order, where a
replay recorded too early would hand back a stale output."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neuqi.pipeline.replay import SettledReplay
from neuqi.pipeline.sequential import Batch, forward_until, layer_outputs


class Toy(nn.Module):
    """x → pre → block(a → b) → post, each step a linear plus a nonlinearity."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.pre = nn.Linear(width, width)
        self.block = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))
        self.post = nn.Linear(width, width)

    def forward(self, x):
        return self.post(torch.relu(self.block(torch.tanh(self.pre(x)))))


def run(order: list[str], replay: bool) -> tuple[list[torch.Tensor], int]:
    """Quantize the toy's linears in ``order`` (one group each: a pass up to it, then
    its weight rounded), as ``quantize_layers`` does; returns the layer's outputs."""
    torch.manual_seed(0)
    layer = Toy()
    batches = [Batch(torch.randn(3, 8), {}) for _ in range(2)]
    linears = [layer.get_submodule(n) for n in order]
    state = SettledReplay(layer, linears)
    if not replay:
        state._settled = lambda child: False
    with torch.no_grad(), state.active():
        for lin in linears:
            forward_until(layer, lin, batches, lambda args, kwargs: None)
            lin.weight.copy_(torch.round(lin.weight * 4) / 4)
            state.done([lin])
        # two more passes: the first records what is settled, the second replays it
        layer_outputs(layer, batches)
        out = [b.hidden for b in layer_outputs(layer, batches)]
    return out, state.replayed


@pytest.mark.parametrize("order", [
    ["pre", "block.0", "block.2", "post"],  # forward order
    ["pre", "block.0", "post", "block.2"],  # the block runs whole while block.2 is pending
    ["block.0", "post", "block.2", "pre"],  # ... and after pre, still pending, has run
    ["block.0", "block.2", "post", "pre"],  # the block is settled while pre, before it, is not
])
def test_replay_equals_recomputing(order):
    got, replayed = run(order, replay=True)
    want, none = run(order, replay=False)
    assert replayed > 0 and none == 0
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def test_a_pending_linear_before_a_settled_module_blocks_its_record():
    """Order 4 above: the block is settled after two groups, but ``pre`` still changes;
    a record made then would be stale once ``pre`` is quantized."""
    torch.manual_seed(0)
    layer = Toy()
    batches = [Batch(torch.randn(3, 8), {})]
    order = ["block.0", "block.2", "post", "pre"]
    linears = [layer.get_submodule(n) for n in order]
    state = SettledReplay(layer, linears)
    with torch.no_grad(), state.active():
        for lin in linears[:3]:
            forward_until(layer, lin, batches, lambda args, kwargs: None)
            lin.weight.copy_(torch.round(lin.weight * 4) / 4)
            state.done([lin])
        layer_outputs(layer, batches)
        assert not state._records  # pre ran first, still pending: nothing recorded
        state.done([linears[3]])
        layer_outputs(layer, batches)
        assert state._records and state.replayed == 0


def test_records_are_dropped_and_forwards_restored_on_exit():
    layer = Toy()
    state = SettledReplay(layer, [])
    batches = [Batch(torch.randn(3, 8), {})]
    with torch.no_grad(), state.active():
        layer_outputs(layer, batches)
        layer_outputs(layer, batches)
        assert state.replayed == 3  # pre, block and post: nothing is pending
    assert not state._records and "forward" not in layer.block.__dict__


def test_the_last_pass_hands_over_its_records():
    layer = Toy()
    state = SettledReplay(layer, [])
    batches = [Batch(torch.randn(3, 8), {}) for _ in range(2)]
    with torch.no_grad(), state.active():
        want = layer_outputs(layer, batches)
        assert len(state._records) == 6  # pre, block, post for each batch
        state.last_pass()
        got = layer_outputs(layer, batches)
        assert not state._records and state.replayed == 6
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g.hidden, w.hidden)
