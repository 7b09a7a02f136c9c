"Cross-frame pseudo labels, the threshold, and the student / source losses (tps.losses)."
from collections import namedtuple
import pytest
import torch
import torch.nn.functional as F

from tps.losses import FUSION_FIELDS, masked_ce, seg_loss, tps_loss
from tps.teacher import cross_frame_pseudo_labels, apply_threshold

CUDA = torch.cuda.is_available()
FO = namedtuple('FO', FUSION_FIELDS)


def _teacher_labels(b, c, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    T = F.interpolate(torch.randn(b, c, h // 4, w // 4, generator=g), size=(h, w), mode='bilinear').argmax(1)
    P = F.one_hot(T, c).permute(0, 3, 1, 2).float() * 0.5 + 0.5 / c  # (B, C, h, w) peaked probabilities
    return T, P


def _sample(T, xs, ys):
    "T (B,h,w) at integer positions xs, ys (B,h,w), clamped like the warp's border."
    B, h, w = T.shape
    xs, ys = xs.clamp(0, w - 1), ys.clamp(0, h - 1)
    return T.reshape(B, -1).gather(1, (ys * w + xs).reshape(B, -1)).view(B, h, w)


@pytest.mark.parametrize('flow_scale', ['legacy', 'per_axis'])
def test_translation_pseudo_labels(flow_scale):
    h, w = 24, 40
    T, P = _teacher_labels(2, 6, h, w, 0)
    dx, dy = torch.tensor([3, -5]), torch.tensor([-2, 1])
    # flow at file resolution: 2x the score height; width 2x (same ratio) for 'legacy', 3x for 'per_axis'
    sw = 2 if flow_scale == 'legacy' else 3
    flow = torch.stack([dx.float() * sw, dy.float() * 2], 1).view(2, 2, 1, 1).expand(2, 2, 2 * h, sw * w)
    pl, conf = cross_frame_pseudo_labels(P, flow, flow_scale=flow_scale)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing='ij')
    expected = _sample(T, xx + dx.view(2, 1, 1), yy + dy.view(2, 1, 1))
    m = 6  # away from the borders
    assert torch.equal(pl[:, m:-m, m:-m], expected[:, m:-m, m:-m])
    assert torch.equal(pl, expected)  # integer shifts: exact everywhere, borders clamped
    assert torch.allclose(conf, torch.tensor(0.5 + 0.5 / 6))


def test_legacy_flip_order_differs_where_predicted():
    "Default: T(x + u(x,y), y + v(x,y)); reference: T(x - u(W-1-x,y), y + v(W-1-x,y)) for a flipped teacher pair."
    h, w = 20, 32
    T, P = _teacher_labels(2, 5, h, w, 1)
    g = torch.Generator().manual_seed(2)
    u = torch.randint(-4, 5, (2, h, w), generator=g)
    v = torch.randint(-3, 4, (2, h, w), generator=g)
    flow = torch.stack([u, v], 1).float()  # score resolution: resize is the identity
    flipped = torch.tensor([True, False])
    P_seen = torch.where(flipped.view(2, 1, 1, 1), P.flip(3), P)  # what the teacher sees
    pl_def, _ = cross_frame_pseudo_labels(P_seen, flow, flipped=flipped)
    pl_leg, _ = cross_frame_pseudo_labels(P_seen, flow, flipped=flipped, legacy=True)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing='ij')
    pred_def = _sample(T, xx + u, yy + v)
    um, vm = u.flip(2), v.flip(2)  # flow sampled at the mirrored position
    pred_leg = torch.where(flipped.view(2, 1, 1), _sample(T, xx - um, yy + vm), pred_def)
    assert torch.equal(pl_def, pred_def)
    assert torch.equal(pl_leg, pred_leg)
    assert torch.equal(pl_def != pl_leg, pred_def != pred_leg)
    assert (pl_def[0] != pl_leg[0]).float().mean() > 0.1 and torch.equal(pl_def[1], pl_leg[1])


def test_conf_threshold():
    T, P = _teacher_labels(1, 4, 16, 16, 3)
    pl, conf = cross_frame_pseudo_labels(P, None, conf_threshold=0.5)
    assert torch.equal(pl, T) and (conf > 0.5).all()
    assert (cross_frame_pseudo_labels(P, None, conf_threshold=0.99)[0] == 255).all()
    lab, c = torch.tensor([[1, 2, 3]]), torch.tensor([[0.2, 0.5, 0.9]])
    assert apply_threshold(lab, c, 0.5).tolist() == [[255, 2, 3]] and apply_threshold(lab, c, 0.0) is lab
    with pytest.raises(ValueError, match='flow_scale'):
        cross_frame_pseudo_labels(P, None, flow_scale='bad')


def _student(b=2, c=5, h=8, w=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return FO(torch.randn(b, c, h, w, generator=g).requires_grad_(), torch.randn(b, c, h, w, generator=g).requires_grad_(),
              None, None, None, None)


def test_all_ignore_gives_zero_loss_with_grad():
    s = _student()
    ign = torch.full((2, 16, 24), 255, dtype=torch.long)
    for r in (tps_loss(s, ign, ign, lambda_t=1.0), seg_loss(s.fused_main, s.fused_aux, ign.to(torch.uint8))):
        assert r['loss'].item() == 0 and r['loss'].requires_grad
    r = tps_loss(s, ign, ign, lambda_t=1.0)
    r['loss'].backward()
    for t in (s.fused_main, s.fused_aux):
        assert t.grad is not None and torch.isfinite(t.grad).all() and (t.grad == 0).all()
    # pseudo labels from a threshold nothing reaches
    s = _student(seed=1)
    pl, _ = cross_frame_pseudo_labels(torch.full((2, 5, 16, 24), 0.2), None, conf_threshold=0.9)
    r = tps_loss(s, pl, pl, lambda_t=1.0)
    r['loss'].backward()
    assert r['loss'].item() == 0 and torch.isfinite(s.fused_main.grad).all() and r['valid'] == 0


def test_tps_loss_matches_reference_formula():
    s = _student(h=10, w=14)
    T, _ = _teacher_labels(2, 5, 20, 28, 4)
    Ta = T.clone(); Ta[:, :3] = 255
    r = tps_loss(s, T, Ta, lambda_t=0.1)
    up = lambda x: F.interpolate(x, size=(20, 28), mode='bilinear', align_corners=True)
    ref = 0.1 * (F.cross_entropy(up(s.fused_main), T) + 0.1 * F.cross_entropy(up(s.fused_aux), Ta, ignore_index=255))
    assert torch.allclose(r['loss'], ref)
    assert set(r) >= {'loss', 'ce_main', 'ce_aux'} and not r['ce_main'].requires_grad
    # no aux head on the student
    r = tps_loss(s._replace(fused_aux=None), T, None, lambda_t=1.0)
    assert torch.allclose(r['loss'], F.cross_entropy(up(s.fused_main), T)) and r['ce_aux'] == 0


def test_masked_ce_shape_errors():
    with pytest.raises(ValueError, match='must match'):
        masked_ce(torch.randn(1, 3, 4, 4), torch.zeros(1, 5, 5, dtype=torch.long))


@pytest.mark.skipif(not CUDA, reason='needs a GPU')
def test_pseudo_labels_on_gpu_match_cpu():
    T, P = _teacher_labels(2, 5, 32, 48, 5)
    flow = torch.randn(2, 2, 64, 96) * 4
    flipped = torch.tensor([True, False])
    for legacy in (False, True):
        a = cross_frame_pseudo_labels(P, flow, flipped=flipped, legacy=legacy)
        b = cross_frame_pseudo_labels(P.cuda(), flow.cuda(), flipped=flipped.cuda(), legacy=legacy)
        assert (a[0] != b[0].cpu()).float().mean() < 1e-3 and torch.allclose(a[1], b[1].cpu(), atol=1e-4)
