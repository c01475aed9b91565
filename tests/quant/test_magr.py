import torch

from neuqi.quant.magr import magr_objective, magr_preprocess, project_l1_ball

from ..conftest import random_hessian


def test_l1_projection_matches_its_definition():
    x = torch.randn(50, 7) * 3
    r = 2.0
    p = project_l1_ball(x, r)
    assert (p.abs().sum(1) <= r + 1e-5).all()
    # optimality: no random feasible point is closer
    for _ in range(200):
        y = torch.randn(50, 7)
        y = y / y.abs().sum(1, keepdim=True) * r * torch.rand(50, 1)
        assert ((x - p).norm(dim=1) <= (x - y).norm(dim=1) + 1e-5).all()


def direct_solver(w, H, alpha, group_size):
    """A different method for the same objective: for a fixed bound t on ‖w'‖∞ the
    problem is a box-constrained QP (projected gradient to convergence); the
    objective is convex in t, so a golden-section search over t finishes it."""
    Hn = H.double() / torch.linalg.eigvalsh(H.double()).max()
    w = w.double()

    def box_qp(t):
        x = w.clamp(-t, t)
        for _ in range(3000):
            x = (x - (x - w) @ Hn).clamp(-t, t)
        return x

    def total(t):
        x = box_qp(t)
        return magr_objective(x, w, H, group_size, alpha), x

    lo, hi = 0.0, float(w.abs().max())
    g = (5**0.5 - 1) / 2
    for _ in range(40):
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        if total(a)[0] < total(b)[0]:
            hi = b
        else:
            lo = a
    return total((lo + hi) / 2)


def test_magr_reaches_the_objective_of_a_direct_solver():
    torch.manual_seed(0)
    w = torch.randn(1, 6)
    H = random_hessian(6, seed=2)
    alpha = 0.05
    ours = magr_preprocess(w, H, -1, alpha=alpha, iters=2000)
    ref_obj, _ = direct_solver(w, H, alpha, -1)
    our_obj = magr_objective(ours.double(), w.double(), H, -1, alpha)
    assert our_obj <= ref_obj * (1 + 1e-4) + 1e-8


def test_magr_default_iterations_lower_the_objective_and_the_range():
    w = torch.randn(32, 64)
    H = random_hessian(64)
    out = magr_preprocess(w, H, 16, alpha=1e-2)
    assert magr_objective(out, w, H, 16, 1e-2) < magr_objective(w, w, H, 16, 1e-2)
    assert out.abs().amax() < w.abs().amax()
