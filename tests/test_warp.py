"Tests of tps.warp: the reference warp against a loop transcription of the warp formula, gradients, errors, resize_flow, the CUDA source and build, (on a GPU) the CUDA kernel, and the benchmark tool tps.tools.warp_bench."
import math, os, time, warnings
import numpy as np
import pytest
import torch
import tps.warp as W
from tps.warp import flow_warp, resize_flow, warp_backend, build_cuda_extension, find_cuda_home

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


def warp_loops(x, flow, mode='bilinear'):
    "The warp formula as plain loops over pixels, float64 numpy, written independently of tps.warp."
    x, flow = np.asarray(x, np.float64), np.asarray(flow, np.float64)
    B, C, H, Wd = x.shape
    out = np.empty_like(x)
    for b in range(B):
        for y in range(H):
            for i in range(Wd):
                sx, sy = i + flow[b, 0, y, i], y + flow[b, 1, y, i]
                if mode == 'nearest':
                    xi = min(max(math.floor(sx + 0.5), 0), Wd - 1); yi = min(max(math.floor(sy + 0.5), 0), H - 1)
                    out[b, :, y, i] = x[b, :, yi, xi]
                    continue
                x0, y0 = math.floor(sx), math.floor(sy)
                ax, ay = sx - x0, sy - y0
                acc = np.zeros(C)
                for dy, wy in ((0, 1 - ay), (1, ay)):
                    for dx, wx in ((0, 1 - ax), (1, ax)):
                        yy = min(max(y0 + dy, 0), H - 1); xx = min(max(x0 + dx, 0), Wd - 1)
                        acc += wy * wx * x[b, :, yy, xx]
                out[b, :, y, i] = acc
    return out


def random_case(seed, B=2, C=3, H=7, Wd=9, dtype=torch.float64):
    "Random input and flow with far-outside, exactly-on-border and integer vectors mixed in."
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, Wd, generator=g, dtype=dtype)
    flow = torch.randn(B, 2, H, Wd, generator=g, dtype=dtype) * 5
    flow[0, 0, 0, :4] = torch.tensor([1e4, -1e4, 1e7, -3.25], dtype=dtype)    # far outside in x
    flow[0, 1, 1, :4] = torch.tensor([-1e4, 1e4, 2.5, -1e7], dtype=dtype)     # far outside in y
    flow[1, :, 0, 0] = torch.tensor([Wd - 1, H - 1], dtype=dtype)             # exactly on the far corner
    flow[1, :, H - 1, Wd - 1] = torch.tensor([-(Wd - 1), -(H - 1)], dtype=dtype)  # exactly on the origin
    flow[1, 0, 2, :] = torch.arange(Wd, dtype=dtype).neg()                    # exactly on the left border (x = 0)
    flow[:, :, -2, :] = torch.randint(-4, 5, (B, 2, Wd), generator=g).to(dtype)  # integer flows
    return x, flow


@pytest.mark.parametrize('seed', range(4))
@pytest.mark.parametrize('mode', ['bilinear', 'nearest'])
def test_reference_matches_loops(seed, mode):
    x, flow = random_case(seed)
    np.testing.assert_allclose(flow_warp(x, flow, mode, impl='torch').numpy(), warp_loops(x, flow, mode), rtol=0, atol=1e-12)
    x32, f32 = x.float(), flow.float()
    np.testing.assert_allclose(flow_warp(x32, f32, mode, impl='torch').numpy(), warp_loops(x32, f32, mode), rtol=1e-5, atol=1e-5)


def test_reference_matches_grid_sample():
    x, flow = random_case(7, C=5, H=11, Wd=6)
    torch.testing.assert_close(W._flow_warp_grid_sample(x, flow), W._flow_warp_torch(x, flow), rtol=1e-10, atol=1e-10)


def test_integer_flow_is_translation():
    x = torch.randn(1, 4, 5, 6, dtype=torch.float64)
    flow = torch.zeros(1, 2, 5, 6, dtype=torch.float64); flow[:, 0] = -2; flow[:, 1] = 1
    want = x[:, :, [1, 2, 3, 4, 4]][..., [0, 0, 0, 1, 2, 3]]
    for mode in ('bilinear', 'nearest'):
        assert torch.equal(flow_warp(x, flow, mode), want)


def test_nearest_rounds_half_up():
    x = torch.arange(5.).view(1, 1, 1, 5)
    flow = torch.zeros(1, 2, 1, 5); flow[0, 0] = torch.tensor([0.5, -0.5, 0.49, -1.5, 0.5])
    assert flow_warp(x, flow, 'nearest').flatten().tolist() == [1., 1., 2., 2., 4.]


@pytest.mark.parametrize('mode', ['bilinear', 'nearest'])
def test_gradcheck_float64(mode):
    x, flow = random_case(3, B=2, C=2, H=4, Wd=5)
    flow = flow.clamp(-6, 6) * 0.9 + 0.137            # keep clear of integer kinks, where the derivative jumps
    flow[0, :, 0, 0] = torch.tensor([40.3, -17.6], dtype=torch.float64)   # outside: flow gradient 0 in the clamped axis
    x.requires_grad_(); flow.requires_grad_(mode == 'bilinear')
    assert torch.autograd.gradcheck(lambda a, f: flow_warp(a, f, mode, impl='torch'), (x, flow))
    if mode == 'nearest':
        f2 = flow.detach().requires_grad_()
        flow_warp(x, f2, mode).sum().backward()
        assert f2.grad is None or not f2.grad.any()


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes_and_layouts(dtype):
    x, flow = random_case(5, C=6, H=8, Wd=10, dtype=torch.float32)
    out = flow_warp(x.to(dtype), flow)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.float(), flow_warp(x.to(dtype).float(), flow), rtol=1e-2, atol=1e-2)
    xd = x.to(dtype)   # (a float16 flow would turn the 1e7 test vector into inf, hence NaN)
    assert torch.equal(flow_warp(xd.to(memory_format=torch.channels_last), flow), flow_warp(xd, flow))
    xs = x.transpose(2, 3).contiguous().transpose(2, 3)    # strided, same values
    assert torch.equal(flow_warp(xs, flow[:, :, :, :]), flow_warp(x, flow))
    assert torch.equal(flow_warp(x[:, ::2], flow), flow_warp(x[:, ::2].contiguous(), flow))


@pytest.mark.parametrize('call,err,text', [
    (lambda x, f: flow_warp(x, f[:, :1]), ValueError, 'flow must have 2 channels'),
    (lambda x, f: flow_warp(x, torch.cat([f, f], 1)), ValueError, 'flow must have 2 channels'),
    (lambda x, f: flow_warp(x, f[:1]), ValueError, 'batch sizes differ'),
    (lambda x, f: flow_warp(x, f[..., :-1]), ValueError, 'spatial sizes differ'),
    (lambda x, f: flow_warp(x.long(), f), TypeError, 'x must be a floating-point tensor'),
    (lambda x, f: flow_warp(x, f.to(torch.int16)), TypeError, 'flow must be a floating-point tensor'),
    (lambda x, f: flow_warp(x.to(torch.uint8), f), TypeError, 'torch.uint8'),
    (lambda x, f: flow_warp(x[0], f), ValueError, 'x must be 4-D'),
    (lambda x, f: flow_warp(x.numpy(), f), TypeError, 'x must be a torch.Tensor'),
    (lambda x, f: flow_warp(x, f, mode='bicubic'), ValueError, "mode='bicubic'"),
    (lambda x, f: flow_warp(x, f, impl='triton'), ValueError, "impl='triton'"),
    (lambda x, f: flow_warp(x, f, impl='cuda'), ValueError, 'needs CUDA tensors'),
])
def test_clear_errors(call, err, text):
    x, f = torch.zeros(2, 3, 4, 5), torch.zeros(2, 2, 4, 5)
    with pytest.raises(err, match=None) as e: call(x, f)
    assert text in str(e.value), str(e.value)


def test_resize_flow_per_axis_and_legacy():
    f = torch.randn(2, 2, 6, 10, dtype=torch.float64)
    r = resize_flow(f, (12, 40))
    assert r.shape == (2, 2, 12, 40)
    base = torch.nn.functional.interpolate(f, size=(12, 40), mode='bilinear', align_corners=True)
    torch.testing.assert_close(r[:, 0], base[:, 0] * 4.0); torch.testing.assert_close(r[:, 1], base[:, 1] * 2.0)
    rl = resize_flow(f, (12, 40), legacy=True)
    torch.testing.assert_close(rl, base * 2.0)
    # same aspect ratio: per-axis and legacy agree; identity size is the identity
    torch.testing.assert_close(resize_flow(f, (3, 5)), resize_flow(f, (3, 5), legacy=True))
    torch.testing.assert_close(resize_flow(f, (6, 10)), f)
    # a constant flow resized keeps pointing at the same scene point in the new pixel grid
    c = torch.ones(1, 2, 4, 8); r = resize_flow(c, (8, 32))
    assert torch.allclose(r[:, 0], torch.tensor(4.)) and torch.allclose(r[:, 1], torch.tensor(2.))
    with pytest.raises(ValueError, match='B, 2, h, w'): resize_flow(torch.zeros(1, 3, 4, 4), (8, 8))
    with pytest.raises(ValueError, match='size must be'): resize_flow(c, (8,))
    with pytest.raises(TypeError, match='floating point'): resize_flow(c.long(), (8, 8))


def test_backend_choice_and_fallback(monkeypatch):
    assert warp_backend('cpu') == 'torch'
    if not torch.cuda.is_available(): assert warp_backend('cuda') == 'torch'
    # a failed build: impl='auto' warns once and falls back, impl='cuda' raises
    monkeypatch.setattr(W, '_EXT', {'error': RuntimeError('nvcc exploded')})
    monkeypatch.setattr(W, '_BACKEND', {})
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    with pytest.warns(RuntimeWarning, match='falls back to the PyTorch reference'): assert warp_backend('cuda') == 'torch'
    with warnings.catch_warnings():
        warnings.simplefilter('error'); assert warp_backend('cuda') == 'torch'   # warned once only
    with pytest.raises(RuntimeError, match='failed to build: nvcc exploded'): W._load_ext()


def test_find_cuda_home_follows_wrapper(tmp_path, monkeypatch):
    kit = tmp_path / 'cuda-13.0'; (kit / 'bin').mkdir(parents=True); (kit / 'include').mkdir()
    (kit / 'include' / 'cuda_runtime.h').write_text('')
    (kit / 'bin' / 'nvcc').write_text('#!/bin/sh\n'); (kit / 'bin' / 'nvcc').chmod(0o755)
    wrap = tmp_path / 'wrapbin'; wrap.mkdir()
    (wrap / 'nvcc').write_text(f'#!/bin/sh\nexec {kit}/bin/nvcc "$@"\n'); (wrap / 'nvcc').chmod(0o755)
    monkeypatch.delenv('CUDA_HOME', raising=False); monkeypatch.delenv('CUDA_PATH', raising=False)
    monkeypatch.setenv('PATH', f"{wrap}:{os.environ['PATH']}")
    assert find_cuda_home() == kit
    monkeypatch.setenv('CUDA_HOME', str(kit)); assert find_cuda_home() == kit
    monkeypatch.setenv('TORCH_CUDA_ARCH_LIST', '8.0;9.0+PTX')
    assert W._cuda_arch_flags() == ['-gencode=arch=compute_80,code=sm_80', '-gencode=arch=compute_90,code=sm_90',
                                    '-gencode=arch=compute_90,code=compute_90']


@pytest.mark.slow   # compiles the CUDA source
@pytest.mark.timeout(1200)
def test_cuda_source_compiles():
    "The kernel compiles with nvcc (no GPU needed); cached, so a rerun takes seconds."
    if find_cuda_home() is None: pytest.skip('nvcc / CUDA toolkit not found: cannot compile the CUDA kernel')
    t0 = time.time()
    ext = build_cuda_extension()
    print(f'CUDA extension ready in {time.time() - t0:.1f} s')
    assert callable(ext.warp_forward) and callable(ext.warp_backward)


def test_cuda_source_is_package_data(repo):
    "The kernel source is the file tps/csrc/flow_warp.cu, found through the installed package, declared as package data."
    import configparser
    from importlib import resources
    src = W.warp_cuda_source()
    assert src == (resources.files('tps') / 'csrc' / 'flow_warp.cu').read_text() == (repo / 'tps/csrc/flow_warp.cu').read_text()
    for name in ('warp_forward', 'warp_backward'):
        assert f'{name}(at::Tensor' in src and name in W._WARP_CPP_DECL
    cp = configparser.ConfigParser(interpolation=None); cp.read(repo / 'settings.ini')
    assert 'csrc/*.cu' in cp['DEFAULT']['package_data'].split()


def test_benchmark_smoke():
    from tps.tools.warp_bench import benchmark_warp, format_benchmark
    rows = benchmark_warp('cpu', sizes=[(3, 12, 20)], min_time=0.01)
    assert {(r['impl'], r['pass_']) for r in rows} == {(i, p) for i in ('torch', 'grid_sample') for p in ('fwd', 'fwd+bwd')}
    assert all(r['ms'] > 0 and r['gb_s'] > 0 and r['copy_gb_s'] > 0 for r in rows)
    assert 'grid_sample' in format_benchmark(rows)


# ---- on a GPU -------------------------------------------------------------------------------------------------
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


def _cuda_case(C, H, Wd, dtype, seed=0, B=2):
    x, flow = random_case(seed, B=B, C=C, H=H, Wd=Wd, dtype=torch.float32)
    return x.cuda().to(dtype), flow.cuda()


@GPU
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize('mode', ['bilinear', 'nearest'])
@pytest.mark.parametrize('C,H,Wd', [(19, 65, 129), (3, 7, 9), (21, 13, 31)])
def test_cuda_matches_reference(dtype, mode, C, H, Wd):
    assert warp_backend('cuda') == 'cuda'
    x, flow = _cuda_case(C, H, Wd, dtype)
    grad = torch.randn_like(x)
    xr, fr = x.float().requires_grad_(), flow.clone().requires_grad_()   # the float32 reference is the truth
    ref = W._flow_warp_torch(xr, fr, mode); ref.backward(grad.float())
    xk, fk = x.clone().requires_grad_(), flow.clone().requires_grad_()
    out = flow_warp(xk, fk, mode, impl='cuda'); out.backward(grad)
    assert out.dtype == dtype and xk.grad.dtype == dtype and fk.grad.dtype == flow.dtype
    torch.testing.assert_close(out.float(), ref.to(dtype).float(), **TOL[dtype])
    torch.testing.assert_close(xk.grad.float(), xr.grad, **TOL[dtype])
    # the flow gradient sums C products of differences: scale the tolerance with the gradient's magnitude
    scale = fr.grad.abs().max().clamp_min(1)
    torch.testing.assert_close(fk.grad.float() / scale, fr.grad / scale, **TOL[dtype])


@GPU
def test_cuda_layouts_and_float64():
    x, flow = _cuda_case(19, 33, 47, torch.float32)
    want = flow_warp(x, flow, impl='cuda')
    torch.testing.assert_close(flow_warp(x.contiguous(memory_format=torch.channels_last), flow, impl='cuda'), want, rtol=0, atol=0)
    torch.testing.assert_close(flow_warp(x[:, ::2], flow, impl='cuda'), W._flow_warp_torch(x[:, ::2], flow), rtol=1e-5, atol=1e-5)
    xd, fd = x.double()[:, :2, :5, :6].requires_grad_(), (flow.double()[:, :, :5, :6] * 0.9 + 0.13).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, f: flow_warp(a, f, impl='cuda'), (xd, fd))


@GPU
def test_cuda_autocast():
    conv = torch.nn.Conv2d(3, 19, 3, padding=1).cuda()
    x, flow = _cuda_case(3, 32, 48, torch.float32)
    with torch.autocast('cuda', dtype=torch.bfloat16):
        y = conv(x); out = flow_warp(y, flow)
    assert y.dtype == out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()


@GPU
@pytest.mark.timeout(600)
def test_cuda_torch_compile():
    warp_backend('cuda')
    x, flow = _cuda_case(19, 65, 129, torch.float32)

    def f(a, fl):
        return (flow_warp(a.sin(), fl * 0.5) * 2).sum(1)

    cf = torch.compile(f, fullgraph=True)
    xa, fa = x.clone().requires_grad_(), flow.clone().requires_grad_()
    xb, fb = x.clone().requires_grad_(), flow.clone().requires_grad_()
    out_e, out_c = f(xa, fa), cf(xb, fb)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    out_e.sum().backward(); out_c.sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fb.grad, fa.grad, rtol=1e-4, atol=1e-4)


@GPU
@pytest.mark.parametrize('nearest', [False, True])
def test_cuda_opcheck(nearest):
    x, flow = _cuda_case(5, 9, 13, torch.float32)
    torch.library.opcheck(W._warp_cuda_op, (x.requires_grad_(), flow.requires_grad_(), nearest))
    torch.library.opcheck(W._warp_cuda_backward_op, (torch.randn_like(x), x.detach(), flow.detach(), nearest))
