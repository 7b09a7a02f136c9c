"Paired strong augmentation, histogram matching and the paired flip (tps.augment)."
import math
import numpy as np
import pytest
import torch
from skimage.exposure import match_histograms as sk_match

from tps.augment import (to_input, from_input, match_histograms, draw_aug_params, scaled_size,
                         strong_augment, flip_pair, gaussian_blur, blur_matrix, adjust_hue,
                         to_device_async)
from tps.warp import flow_warp
from oracles import legacy_augment_reference

CUDA = torch.cuda.is_available()
DEVICES = ['cpu'] + (['cuda'] if CUDA else [])


def _images(n, h, w, seed):
    "Smooth-ish random uint8 RGB images (B,3,H,W)."
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(n, 3, h // 4, w // 4, generator=g), size=(h, w), mode='bilinear')
    return (x * 230 + 20 * torch.rand(n, 3, h, w, generator=g)).clamp(0, 255).to(torch.uint8)


def _no_blur(p):
    return {**p, 'blur': [False] * len(p['blur'])}


@pytest.mark.parametrize('legacy', [False, True])
def test_same_draw_hits_both_frames(legacy):
    d = _images(3, 32, 48, 0)
    p = draw_aug_params(3, torch.Generator().manual_seed(1), legacy=legacy)
    p.update(jitter=[True] * 3, gray=[False, True, False])
    if legacy: p = _no_blur(p)  # the reference blurs the stacked pair: the frames bleed into each other at the seam
    else: p['blur'] = [True] * 3
    do, co, _ = strong_augment(d, d.clone(), params=p, legacy=legacy)
    assert torch.equal(do, co)
    # applying the draw to two copies of the pair gives the same result for both copies
    d2, c2 = _images(3, 32, 48, 1), _images(3, 32, 48, 2)
    a = strong_augment(d2, c2, params=p, legacy=legacy)
    b = strong_augment(d2.clone(), c2.clone(), params=p, legacy=legacy)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_independent_draws_per_pair_and_reproducible():
    d = _images(1, 32, 48, 0).expand(4, -1, -1, -1).contiguous()  # four identical pairs
    do, _, p = strong_augment(d, d, torch.Generator().manual_seed(3))
    assert len(set(p['brightness'])) == 4
    assert not torch.equal(do[0], do[1])
    do2, _, p2 = strong_augment(d, d, torch.Generator().manual_seed(3))
    assert p == p2 and torch.equal(do, do2)


def test_draw_distribution_matches_probabilities():
    n = 2000
    p = draw_aug_params(n, torch.Generator().manual_seed(1234))

    def within(frac, q):
        return abs(frac - q) <= 3 * math.sqrt(q * (1 - q) / n)

    assert within(np.mean(p['blur']), 0.6)
    assert within(np.mean(p['jitter']), 0.8)
    assert within(np.mean(p['gray']), 0.2)
    for r in (5, 7, 9):
        assert within(np.mean(np.array(p['radius']) == r), 1 / 3)
    assert set(p['radius']) == {5, 7, 9}
    for k, lo, hi in (('brightness', 0.2, 1.8), ('contrast', 0.2, 1.8), ('saturation', 0.2, 1.8), ('hue', -0.2, 0.2)):
        v = np.array(p[k])
        assert v.min() >= lo and v.max() < hi
        assert abs(v.mean() - (lo + hi) / 2) <= 3 * (hi - lo) / math.sqrt(12 * n)
    # the order of the jitter operations is a uniform permutation: each op first 1/4 of the time
    first = np.array([o[0] for o in p['order']])
    for k in range(4):
        assert within(np.mean(first == k), 0.25)
    # the rescale factor: one per call, U[0.8, 1.2)
    g = torch.Generator().manual_seed(99)
    r = np.array([draw_aug_params(1, g)['scale'] for _ in range(n)])
    assert r.min() >= 0.8 and r.max() < 1.2
    assert abs(r.mean() - 1.0) <= 3 * 0.4 / math.sqrt(12 * n)
    assert abs(r.var() - 0.4 ** 2 / 12) < 0.1 * 0.4 ** 2 / 12
    # legacy: the reference's randint(80, 120) / 100 grid
    rl = np.array([draw_aug_params(1, g, legacy=True)['scale'] for _ in range(500)])
    assert np.allclose(rl * 100, np.round(rl * 100)) and rl.min() >= 0.8 and rl.max() <= 1.19


def test_rescaled_sizes_multiple_of_8():
    g = torch.Generator().manual_seed(5)
    for r in np.linspace(0.8, 1.2, 41)[:-1]:
        h, w = scaled_size(512, 1024, r)
        assert h % 8 == 0 and w % 8 == 0 and 0.8 * 512 - 4 <= h < 1.2 * 512 + 4 and 0.8 * 1024 - 4 <= w < 1.2 * 1024 + 4
        assert (h, w) == (round(512 * r / 8) * 8, round(1024 * r / 8) * 8)
    d = _images(2, 64, 128, 3)
    for legacy in (False, True):
        for _ in range(3):
            do, co, p = strong_augment(d, d, g, legacy=legacy)
            assert 0.8 <= p['scale'] < 1.2
            assert do.shape[2:] == co.shape[2:] == scaled_size(64, 128, p['scale'])
            assert do.shape[2] % 8 == 0 and do.shape[3] % 8 == 0
    assert strong_augment(d, d, g, rescale=False)[0].shape == (2, 3, 64, 128)


def test_default_mode_range_and_identity():
    d = _images(2, 32, 48, 4)
    do, co, p = strong_augment(d, d, torch.Generator().manual_seed(0))
    rgb = from_input(do)
    assert rgb.min() >= -1e-3 and rgb.max() <= 255 + 1e-3  # network convention, real image range
    off = {**p, 'blur': [False] * 2, 'jitter': [False] * 2, 'gray': [False] * 2}
    assert torch.allclose(strong_augment(d, d, params=off, rescale=False)[0], to_input(d), atol=1e-4)
    gray = strong_augment(d, d, params={**off, 'gray': [True] * 2}, rescale=False)[0]
    g = from_input(gray)
    assert torch.allclose(g[:, 0], g[:, 1], atol=1e-3) and torch.allclose(g[:, 1], g[:, 2], atol=1e-3)


def test_legacy_bit_for_bit_vs_reference():
    g = torch.Generator().manual_seed(11)
    for seed in range(4):
        d, c = _images(2, 24, 40, 10 + seed), _images(2, 24, 40, 20 + seed)
        p = draw_aug_params(2, g, legacy=True)
        if seed == 0:  # everything on
            p.update(blur=[True, True], jitter=[True, True], gray=[True, True])
        ref = legacy_augment_reference(to_input(d), to_input(c), p)
        ours = strong_augment(d, c, params=p, legacy=True)
        assert torch.equal(ref[0], ours[0]) and torch.equal(ref[1], ours[1])
        assert ours[0].min() >= 0 and ours[0].max() <= 1


def test_legacy_wraps_modulo_256():
    "The legacy input is the normalised BGR image times 255, wrapped modulo 256, then / 255."
    d = _images(1, 8, 16, 7)
    p = draw_aug_params(1, torch.Generator().manual_seed(0), legacy=True)
    p.update(blur=[False], jitter=[False], gray=[False])
    out = strong_augment(d, d, params=p, legacy=True, rescale=False)[0]
    expected = (np.trunc(to_input(d).numpy() * np.float32(255)).astype(np.int64) % 256).astype(np.float32)
    assert torch.equal(out, torch.from_numpy(expected).div(255))


@pytest.mark.parametrize('device', DEVICES)
def test_histogram_matching_vs_skimage(device):
    g = torch.Generator().manual_seed(0)
    for seed in range(3):
        src = _images(2, 40, 56, seed)
        ref = ((torch.rand(2, 3, 30, 50, generator=g) ** (seed + 1)) * 180 + 40).to(torch.uint8)
        ours8 = match_histograms(src.to(device), ref.to(device)).cpu()
        oursf = match_histograms(src.to(device), ref.to(device), dtype=torch.float32).cpu()
        assert ours8.dtype == torch.uint8 and ours8.shape == src.shape
        for b in range(2):
            s, r = src[b].permute(1, 2, 0).numpy(), ref[b].permute(1, 2, 0).numpy()
            skf = sk_match(s.astype(np.float32), r.astype(np.float32), channel_axis=-1)  # as the reference calls it
            assert np.abs(oursf[b].permute(1, 2, 0).numpy() - skf).max() < 1e-3
            sk8 = sk_match(s, r, channel_axis=-1)
            assert np.abs(ours8[b].permute(1, 2, 0).numpy().astype(int) - sk8.astype(int)).max() <= 1


def test_histogram_matching_errors_and_broadcast():
    src, ref = _images(2, 16, 16, 0), _images(1, 8, 8, 1)
    assert match_histograms(src, ref).shape == src.shape
    with pytest.raises(TypeError, match='uint8'):
        match_histograms(src.float(), ref)
    with pytest.raises(ValueError, match='batch'):
        match_histograms(src, _images(3, 8, 8, 2))


def test_flip_pair_consistent_with_flow():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 20, 30, generator=g)
    flow = torch.randn(2, 2, 20, 30, generator=g) * 3
    x1, x2, f = flip_pair(x, x, flow)
    lhs = flow_warp(x1, f)             # warp(flip(x), flip(flow))
    rhs = flow_warp(x, flow).flip(3)   # flip(warp(x, flow))
    assert torch.allclose(lhs[..., 3:-3, 3:-3], rhs[..., 3:-3, 3:-3], atol=1e-4)
    assert torch.allclose(lhs, rhs, atol=1e-4)  # border clamping is mirror-symmetric too
    # legacy: u not negated, the identity fails
    _, _, fl = flip_pair(x, x, flow, legacy=True)
    assert (flow_warp(x1, fl) - rhs).abs().max() > 0.1
    assert torch.equal(fl[:, 0], flow[:, 0].flip(2)) and torch.equal(f[:, 0], -flow[:, 0].flip(2))
    assert torch.equal(x2, x.flip(3))


@pytest.mark.skipif(not CUDA, reason='needs a GPU')
def test_augment_on_gpu_matches_cpu():
    d, c = _images(2, 32, 64, 0), _images(2, 32, 64, 1)
    p = draw_aug_params(2, torch.Generator().manual_seed(0))
    p.update(blur=[True, True], jitter=[True, True])
    a = strong_augment(d, c, params=p)
    b = strong_augment(d.cuda(), c.cuda(), params=p)
    assert b[0].is_cuda and torch.allclose(a[0], b[0].cpu(), atol=0.05) and torch.allclose(a[1], b[1].cpu(), atol=0.05)
    la = strong_augment(d, c, params=p, legacy=True)
    lb = strong_augment(d.cuda(), c.cuda(), params=p, legacy=True)
    assert torch.equal(la[0], lb[0].cpu()) and torch.equal(la[1], lb[1].cpu())
    gp = draw_aug_params(3, torch.Generator(device='cuda').manual_seed(0))
    assert len(gp['blur']) == 3


# ---------------------------------------------------------------- the fast paths equal what they replace
def _conv_blur(x, sigma):
    "The separable Gaussian as a padded depthwise convolution (the previous implementation)."
    half = math.ceil(3 * sigma)
    t = torch.arange(-half, half + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2); k = k / k.sum()
    C = x.shape[1]
    x = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (half, half, 0, 0), mode='replicate'),
                                   k.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    return torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 0, half, half), mode='replicate'),
                                      k.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)


@pytest.mark.parametrize('device', DEVICES)
def test_blur_matrix_equals_depthwise_convolution(device):
    g = torch.Generator().manual_seed(0)
    for shape in ((2, 3, 128, 256), (1, 3, 7, 100), (2, 3, 40, 9)):  # incl. images smaller than the kernel
        x = torch.rand(*shape, generator=g)
        for s in (5, 7, 9):
            ours = gaussian_blur(x.to(device), s).cpu()
            tol = 2e-6 if device == 'cpu' else 2e-3  # the GPU's convolution may use TF32
            assert (ours - _conv_blur(x, s)).abs().max() < tol
    m = blur_matrix(64, 7)
    assert torch.allclose(m.sum(1), torch.ones(64)) and blur_matrix(64, 7) is m  # cached
    assert (m[0, :22] > 0).all() and m[0, 22] == 0 and m[0, 0] > m[0, 1]  # row 0: taps to 3 sigma = 21, border folded in


@pytest.mark.parametrize('device', DEVICES)
def test_adjust_hue_equals_torchvision(device):
    from torchvision.transforms.v2 import functional as TF
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 24, 32, generator=g)
    x[0, :, :6] = x[0, :1, :6]                   # grey
    x[1, 1, :6] = x[1, 0, :6]                    # max shared by R and G
    x[2, :, :6] = (x[2, :, :6] * 8).round() / 8  # many ties
    x[2, :, 6:8] = 0; x[2, :, 8:10] = 1          # black and white
    for h in np.linspace(-0.5, 0.5, 21):
        ours = adjust_hue(x.to(device), float(h)).cpu()
        assert (ours - TF.adjust_hue(x, float(h))).abs().max() < 2e-5, h
    with pytest.raises(ValueError, match='hue_factor'):
        adjust_hue(x, 0.6)


def test_histogram_lut_float32_equals_float64():
    g = torch.Generator().manual_seed(3)
    for seed in range(4):
        src = _images(2, 90, 160, seed)
        ref = ((torch.rand(2, 3, 64, 128, generator=g) ** (seed + 1)) * 200 + 30).to(torch.uint8)
        a = match_histograms(src, ref, dtype=torch.float32)   # float32 LUTs
        b = match_histograms(src, ref, dtype=torch.float64)   # float64 LUTs
        assert (a.double() - b).abs().max() < 1e-3
        assert (match_histograms(src, ref).int() - b.round().int()).abs().max() <= 1


def test_to_device_async_and_host_masks():
    m = torch.tensor([True, False])
    assert to_device_async(m, 'cpu') is m
    x = torch.rand(2, 3, 4, 6); f = torch.rand(2, 2, 4, 6)
    a = flip_pair(x, x, f, mask=m)                  # host mask
    b = flip_pair(x, x, f, mask=[True, False])      # list mask
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    if CUDA:
        d = to_device_async(m, 'cuda')
        assert d.is_cuda and d.tolist() == [True, False]


@pytest.mark.skipif(not CUDA, reason='needs a GPU')
def test_augment_and_histograms_have_no_host_sync():
    "Strong augmentation (CPU generator), histogram matching, to_input and a host-mask flip never block the host."
    d, c = _images(2, 64, 128, 0).cuda(), _images(2, 64, 128, 1).cuda()
    g = torch.Generator().manual_seed(0)
    def run():
        for _ in range(4): strong_augment(d, c, g)
        match_histograms(d, c); to_input(d)
        flip_pair(d.float(), c.float(), torch.zeros(2, 2, 64, 128, device='cuda'), mask=torch.tensor([True, False]))
    run()  # warm-up: blur matrices, constants
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try: run()
    finally: torch.cuda.set_sync_debug_mode(0)
