"""optim.Muon against torch's own Muon: the same updates, in float32 instead of bfloat16 on a CPU."""
import pytest
import torch

from novelgpt.optim import Muon


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48)])
def test_muon_moves_weights_as_torch_muon_does(shape):
    torch.manual_seed(0)
    start = torch.randn(shape)
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    mine = Muon([ours], lr=0.02, momentum=0.95, weight_decay=0.0)
    reference = torch.optim.Muon([theirs], lr=0.02, momentum=0.95, weight_decay=0.0, nesterov=True,
                                 adjust_lr_fn="original")
    for _ in range(3):
        grad = torch.randn(shape)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        mine.step()
        reference.step()
    moved, expected = (ours - start).detach(), (theirs - start).detach()
    # torch orthogonalises in bfloat16 (about 1% apart from float32); a wrong scale or orientation is far off
    assert (moved - expected).norm() / expected.norm() < 0.03
    assert expected.norm() > 0.01
