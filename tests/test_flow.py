"Flow files, names and estimators (tps.flow), and the resumable `tps-flow` precompute command (tps.tools.flows)."
import signal, subprocess, sys, time
from pathlib import Path
import cv2, numpy as np, pytest, torch
from tps.flow import (FlowFileError, read_flow, write_flow, flow_name, flow_path, estimate_flow, estimate_flow_batch,
                      load_raft, flow_to_color, warp_error)
from tps.tools.flows import flow_jobs, main
from flow_fixtures import synthetic_pair, texture

CLI = [sys.executable, '-c', 'import sys; from tps.tools.flows import main; sys.exit(main())']


# ---------------------------------------------------------------- files
def test_npy_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, 33, 47, generator=g) * 30                         # (2, H, W)
    back = read_flow(write_flow(tmp_path / 'f.npy', f))
    assert back.dtype == torch.float32 and back.shape == f.shape
    err = f - back
    assert err.abs().max() < 0.1                                         # truncation to 0.1 px steps
    assert (err * f.sign() >= -1e-6).all()                               # toward zero
    raw = np.load(tmp_path / 'f.npy')
    assert raw.dtype == np.int16 and raw.shape == (33, 47, 2)            # published layout H x W x 2
    assert np.array_equal(raw, (f.permute(1, 2, 0).numpy() * 10).astype(np.int16))  # numpy's int16(flow * 10)
    # values on the 0.1 px grid come back to float rounding (well within 0.05 px)
    q = torch.round(f * 10) / 10
    assert (read_flow(write_flow(tmp_path / 'q.npy', q)) - q).abs().max() < 1e-4
    exact = torch.tensor([[[1.27, -1.27, 0.09, -0.09, 3276.7]], [[-3276.7, 12.5, -12.5, 0.0, 0.1]]])
    want = torch.tensor([[[1.2, -1.2, 0.0, 0.0, 3276.7]], [[-3276.7, 12.5, -12.5, 0.0, 0.1]]])
    assert torch.allclose(read_flow(write_flow(tmp_path / 'e.npy', exact)), want, atol=1e-4)
    with pytest.raises(ValueError, match='int16'):
        write_flow(tmp_path / 'big.npy', torch.full((2, 2, 2), 5000.0))
    assert not (tmp_path / 'big.npy').exists()


def test_flo_round_trip_exact(tmp_path):
    f = torch.randn(2, 19, 23) * 100
    assert torch.equal(read_flow(write_flow(tmp_path / 'f.flo', f)), f)
    raw = (tmp_path / 'f.flo').read_bytes()
    assert raw[:4] == np.float32(202021.25).tobytes() and len(raw) == 12 + 19 * 23 * 8
    # (H, W, 2) arrays are accepted too
    assert torch.equal(read_flow(write_flow(tmp_path / 'g.flo', f.permute(1, 2, 0).numpy())), f)


def test_write_is_atomic_and_leaves_no_tmp(tmp_path):
    write_flow(tmp_path / 'a.npy', torch.zeros(2, 4, 5))
    with pytest.raises(ValueError, match='NaN'):
        write_flow(tmp_path / 'a.npy', torch.full((2, 4, 5), float('nan')))
    assert torch.equal(read_flow(tmp_path / 'a.npy'), torch.zeros(2, 4, 5))  # the old file survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a.npy']


@pytest.mark.parametrize('name,make,what', [
    ('trunc.npy', lambda p, good: p.write_bytes(good['npy'][:90]), 'not a readable'),
    ('trunc2.npy', lambda p, good: p.write_bytes(good['npy'][:-7]), 'not a readable'),
    ('garbage.npy', lambda p, good: p.write_bytes(b'\x00' * 300), 'not a readable'),
    ('shape.npy', lambda p, good: np.save(p, np.zeros((5, 6, 3), np.int16)), '(H, W, 2)'),
    ('shape2.npy', lambda p, good: np.save(p, np.zeros((5, 6), np.int16)), '(H, W, 2)'),
    ('dtype.npy', lambda p, good: np.save(p, np.zeros((5, 6, 2), np.float32)), 'int16'),
    ('trunc.flo', lambda p, good: p.write_bytes(good['flo'][:-3]), 'truncated'),
    ('header.flo', lambda p, good: p.write_bytes(good['flo'][:8]), 'truncated'),
    ('magic.flo', lambda p, good: p.write_bytes(b'PIEH' + good['flo'][4:12] + b'\x00' * 4), 'magic'),
    ('nan.flo', lambda p, good: p.write_bytes(good['flo'][:12] + np.full(60, np.nan, np.float32).tobytes()), 'NaN'),
    ('flow.png', lambda p, good: p.write_bytes(b'x'), 'unknown'),
])
def test_bad_files_raise_naming_the_file(tmp_path, name, make, what):
    write_flow(tmp_path / 'good.npy', torch.ones(2, 5, 6)); write_flow(tmp_path / 'good.flo', torch.ones(2, 5, 6))
    good = {'npy': (tmp_path / 'good.npy').read_bytes(), 'flo': (tmp_path / 'good.flo').read_bytes()}
    make(tmp_path / name, good)
    with pytest.raises(FlowFileError) as e:
        read_flow(tmp_path / name)
    assert name in str(e.value) and what in str(e.value)
    assert isinstance(e.value, ValueError)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match='nothere.npy'):
        read_flow(tmp_path / 'nothere.npy')


# ---------------------------------------------------------------- names
def test_flow_names_published_examples():
    assert flow_name('cityscapes', 'frankfurt_000000_000294_leftImg8bit.png', 293) == 'frankfurt_000000_000294_000293_int16_x10.npy'
    assert flow_name('viper', '001_00010.jpg', 9) == '001_0001000009_int16_x10.npy'
    assert flow_name('synthia', '000002.png') == '000002_int16_x10.npy'
    # defaults and paths
    assert flow_name('cityscapes', '/x/frankfurt/frankfurt_000000_000294_leftImg8bit.png') == 'frankfurt_000000_000294_000293_int16_x10.npy'
    assert flow_name('cityscapes', 'frankfurt_000000_000294_leftImg8bit.png', 290) == 'frankfurt_000000_000294_000290_int16_x10.npy'
    assert flow_name('viper', '001_00010.jpg') == '001_0001000009_int16_x10.npy'
    assert flow_path('synthia', 'd', '000849.png') == Path('d/000849_int16_x10.npy')
    with pytest.raises(ValueError): flow_name('synthia', '000002.png', 0)
    with pytest.raises(ValueError, match='kitti'): flow_name('kitti', 'a.png')
    with pytest.raises(ValueError, match='frankfurt'): flow_name('cityscapes', 'hello.png')


# ---------------------------------------------------------------- estimators
@pytest.mark.parametrize('preset', ['ultrafast', 'fast', 'medium'])
def test_dis_recovers_translation(preset):
    ft, fp, gt = synthetic_pair(160, 256, 'translation', seed=3)         # shift (3.4, -2.2)
    est = estimate_flow(ft, fp, 'dis', preset)
    assert est.shape == (2, 160, 256) and est.dtype == torch.float32
    med = est[:, 16:-16, 16:-16].flatten(1).median(1).values
    assert (med - torch.tensor([3.4, -2.2])).abs().max() < 0.5, med
    # the same pair as (3, H, W) tensors gives the same flow
    t = lambda a: torch.from_numpy(a).permute(2, 0, 1)
    assert torch.equal(estimate_flow(t(ft), t(fp), 'dis', preset), est)


def test_dis_warp_error_drops():
    ft, fp, gt = synthetic_pair(128, 192, 'zoom', seed=2)
    est = estimate_flow(ft, fp)
    e0, e1 = warp_error(ft, fp, torch.zeros_like(est)), warp_error(ft, fp, est)
    assert e1[10:-10, 10:-10].mean() < 0.5 * e0[10:-10, 10:-10].mean()
    c = flow_to_color(est)
    assert c.shape == (3, 128, 192) and c.dtype == torch.uint8


def test_estimator_errors(tmp_path):
    ft, fp, _ = synthetic_pair(64, 64)
    with pytest.raises(ValueError, match='never downloads'): estimate_flow(ft, fp, 'raft_large')
    with pytest.raises(FileNotFoundError, match='w.pth'): estimate_flow(ft, fp, 'raft_small', weights=tmp_path / 'w.pth')
    (tmp_path / 'junk.pth').write_bytes(b'not a torch file')
    with pytest.raises(ValueError, match='junk.pth'): load_raft('raft_small', tmp_path / 'junk.pth', 'cpu')
    with pytest.raises(ValueError, match='unknown flow method'): estimate_flow(ft, fp, 'farneback')
    with pytest.raises(ValueError, match='uint8'): estimate_flow(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8))


def test_raft_local_weights_round_trip(tmp_path):
    from torchvision.models.optical_flow import raft_small, raft_large
    torch.manual_seed(0)
    torch.save(raft_small(weights=None).state_dict(), tmp_path / 'small.pth')
    torch.save({'model': raft_large(weights=None).state_dict()}, tmp_path / 'large.pth')  # wrapped dicts work too
    ft, fp, _ = synthetic_pair(100, 140)                                # not multiples of 8, under 128: padded
    f = estimate_flow(ft, fp, 'raft_small', weights=tmp_path / 'small.pth', device='cpu', iters=2)
    assert f.shape == (2, 100, 140) and torch.isfinite(f).all()
    bt = torch.from_numpy(np.stack([ft, fp, ft])).permute(0, 3, 1, 2)     # (3, 3, H, W)
    bp = torch.from_numpy(np.stack([fp, ft, ft])).permute(0, 3, 1, 2)
    fb = estimate_flow_batch(bt, bp, 'raft_small', weights=tmp_path / 'small.pth', device='cpu', iters=2, batch_size=2)
    assert fb.shape == (3, 2, 100, 140)
    assert torch.allclose(fb[0], f, atol=1e-3)                           # batching does not change the answer
    m = load_raft('raft_large', tmp_path / 'large.pth', 'cpu')
    assert not m.training
    with pytest.raises(ValueError, match='small.pth'): load_raft('raft_large', tmp_path / 'small.pth', 'cpu')


# ---------------------------------------------------------------- precompute command
def fake_cityscapes(root, seqs=4, frames=range(12, 20), size=(160, 96), split='train', gt=True):
    "Textured snippets drifting right 2 px per frame; frame 19 labelled in gtFine."
    for i in range(seqs):
        d = root / 'leftImg8bit_sequence' / split / 'ulm'; d.mkdir(parents=True, exist_ok=True)
        tex = texture(size[1], size[0] + 2 * len(frames) + 20, seed=i)
        for f in frames:
            img = np.ascontiguousarray(tex[:, 2 * (max(frames) - f) + 10:][:, :size[0]])
            cv2.imwrite(str(d / f'ulm_{i:06d}_{f:06d}_leftImg8bit.png'), img[..., ::-1])
        if gt:
            g = root / 'gtFine' / split / 'ulm'; g.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(g / f'ulm_{i:06d}_{max(frames):06d}_gtFine_labelIds.png'), np.zeros(size[::-1], np.uint8))
    return root


def test_cityscapes_jobs(tmp_path):
    root = fake_cityscapes(tmp_path / 'c', seqs=2, frames=range(15, 20))
    names = [j.name for j in flow_jobs('cityscapes', root, 'train', (1, 2))]
    assert names[:4] == ['ulm_000000_000019_000018_int16_x10.npy', 'ulm_000000_000018_000017_int16_x10.npy',
                         'ulm_000000_000019_000017_int16_x10.npy', 'ulm_000000_000017_000016_int16_x10.npy']
    assert len(names) == 8 and len(set(names)) == 8
    # without gtFine: frame 19 of each 30-frame snippet
    root2 = fake_cityscapes(tmp_path / 'c2', seqs=1, frames=range(0, 60), size=(32, 32), gt=False)
    d = sorted({j.name.split('_')[2] for j in flow_jobs('cityscapes', root2, 'train', 1) if j.name.endswith('int16_x10.npy')})
    assert {'000019', '000049'} <= set(d)
    (tmp_path / 'list.txt').write_text('ulm/ulm_000000_000049_leftImg8bit.png\n')
    assert [j.name for j in flow_jobs('cityscapes', root2, 'train', 1, tmp_path / 'list.txt')] == \
        ['ulm_000000_000049_000048_int16_x10.npy', 'ulm_000000_000048_000047_int16_x10.npy']
    with pytest.raises(FileNotFoundError, match='leftImg8bit_sequence'): flow_jobs('cityscapes', tmp_path, 'val')


def test_viper_and_synthia_jobs(tmp_path):
    img = np.zeros((8, 8, 3), np.uint8)
    for f in range(8, 22):
        p = tmp_path / 'viper' / 'train' / 'img' / '001' / f'001_{f:05d}.jpg'; p.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(p), img)
    jobs = flow_jobs('viper', tmp_path / 'viper')
    assert [j.name for j in jobs] == ['001_0001000009_int16_x10.npy', '001_0002000019_int16_x10.npy']
    assert jobs[0].frame_prev.name == '001_00009.jpg'
    for f in range(0, 4):
        p = tmp_path / 'syn' / 'RGB' / 'Stereo_Left' / 'Omni_F' / f'{f:06d}.png'; p.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(p), np.zeros((76, 128, 3), np.uint8))
    jobs = flow_jobs('synthia', tmp_path / 'syn')
    assert [j.name for j in jobs] == ['000001_int16_x10.npy', '000002_int16_x10.npy', '000003_int16_x10.npy']
    assert jobs[0].frame_prev.name == '000000.png'
    out = tmp_path / 'sflow'
    r = subprocess.run(CLI + ['--dataset', 'synthia', '--root', str(tmp_path / 'syn'), '--out', str(out), '--workers', '0',
                              '--preset', 'ultrafast', '--quiet'], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert read_flow(out / '000001_int16_x10.npy').shape == (2, 341, 683)  # published SYNTHIA flow size


def _run(args, **kw):
    return subprocess.run(CLI + args, capture_output=True, text=True, timeout=300, **kw)


def _npys(d):
    return {p.name: p.read_bytes() for p in sorted(Path(d).glob('*_int16_x10.npy'))}


@pytest.mark.slow   # flow subprocesses killed and resumed
def test_precompute_killed_and_resumed_is_identical(tmp_path):
    root = fake_cityscapes(tmp_path / 'city', seqs=6)
    common = ['--dataset', 'cityscapes', '--root', str(root), '--split', 'train', '--interval', '1', '2', '3', '4', '5',
              '--preset', 'medium', '--size', 'native', '--quiet']
    n_jobs = len(flow_jobs('cityscapes', root, 'train', (1, 2, 3, 4, 5)))
    assert n_jobs == 60
    # the reference: one uninterrupted run
    r = _run(common + ['--out', str(tmp_path / 'ref'), '--workers', '1'])
    assert r.returncode == 0, r.stderr
    assert f'wrote {n_jobs}, skipped 0' in r.stdout and 'failed 0' in r.stdout
    ref = _npys(tmp_path / 'ref' / 'train')
    assert len(ref) == n_jobs

    # SIGTERM (graceful: flows in progress finish) with 2 workers, and SIGKILL (abrupt) in-process
    for sig, workers in [(signal.SIGTERM, '2'), (signal.SIGKILL, '0')]:
        out = tmp_path / f'run{int(sig)}'
        p = subprocess.Popen(CLI + common + ['--out', str(out), '--workers', workers],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        t0 = time.time()
        while len(list((out / 'train').glob('*_int16_x10.npy'))) < 3 and p.poll() is None and time.time() - t0 < 120:
            time.sleep(0.005)
        p.send_signal(sig)
        stdout, stderr = p.communicate(timeout=120)
        if sig == signal.SIGTERM:
            assert p.returncode == 128 + signal.SIGTERM, (p.returncode, stderr)
            assert 'interrupted' in stdout
            assert not list((out / 'train').glob('.*.tmp'))           # a clean stop leaves no temporary files
        else:
            assert p.returncode == -signal.SIGKILL
        done = _npys(out / 'train')
        assert 3 <= len(done) < n_jobs, (sig, len(done))               # it was stopped mid-run
        assert all(ref[k] == v for k, v in done.items())               # whatever exists is complete
        r = _run(common + ['--out', str(out), '--workers', '2'])        # resume
        assert r.returncode == 0, r.stderr
        assert f'wrote {n_jobs - len(done)}, skipped {len(done)}' in r.stdout, r.stdout
        assert _npys(out / 'train') == ref                             # byte-identical to the uninterrupted run


@pytest.mark.slow   # flow / interpreter subprocesses
def test_precompute_reports_failures(tmp_path):
    root = fake_cityscapes(tmp_path / 'city', seqs=2, frames=range(16, 20), size=(64, 48))
    (root / 'leftImg8bit_sequence' / 'train' / 'ulm' / 'ulm_000001_000017_leftImg8bit.png').unlink()
    r = _run(['--dataset', 'cityscapes', '--root', str(root), '--out', str(tmp_path / 'o'), '--size', 'native',
              '--preset', 'ultrafast', '--workers', '2', '--quiet'])
    assert r.returncode == 1
    assert 'failed 1' in r.stdout and 'ulm_000001_000017_leftImg8bit.png' in r.stderr


def test_main_in_process(tmp_path, capsys):
    root = fake_cityscapes(tmp_path / 'city', seqs=2, frames=range(16, 20), size=(64, 48))
    assert main(['--dataset', 'cityscapes', '--root', str(tmp_path / 'nope'), '--out', str(tmp_path / 'o')]) == 2
    assert 'leftImg8bit_sequence' in capsys.readouterr().err
    assert main(['--dataset', 'cityscapes', '--root', str(root), '--out', str(tmp_path / 'o'), '--method', 'raft_small']) == 2
    assert 'never downloads' in capsys.readouterr().err
    assert main(['--dataset', 'cityscapes', '--root', str(root), '--out', str(tmp_path / 'o2'), '--limit', '1',
                 '--size', '32x24', '--preset', 'ultrafast', '--workers', '0', '--quiet']) == 0
    assert 'wrote 1, skipped 0' in capsys.readouterr().out
    assert read_flow(tmp_path / 'o2' / 'train' / 'ulm_000000_000019_000018_int16_x10.npy').shape == (2, 24, 32)
    assert sorted(p.name for p in (tmp_path / 'o2' / 'train').iterdir()) == ['ulm_000000_000019_000018_int16_x10.npy']
    with pytest.raises(SystemExit): main(['--dataset', 'cityscapes', '--root', str(root), '--out', 'x', '--size', 'big'])


# ---------------------------------------------------------------- the core does not load the tools
@pytest.mark.slow   # flow / interpreter subprocesses
def test_import_tps_loads_no_tools():
    "`import tps` (and tps.warp, tps.flow) loads no `tps.tools` module (tests/test_structure.py checks the imports statically)."
    code = 'import sys, tps, tps.warp, tps.flow; print(sorted(m for m in sys.modules if m.startswith("tps.tools")))'
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == '[]', r.stdout + r.stderr
    r = subprocess.run([sys.executable, '-c', code.replace('tps.flow;', 'tps.flow, tps.tools.flows;')],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "'tps.tools.flows'" in r.stdout, r.stdout + r.stderr   # the check itself can fail
