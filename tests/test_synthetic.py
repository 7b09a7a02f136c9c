"""The synthetic benchmark: CLI, file layout and names, class ids, flow files, determinism, flow exactness, the
domain-shift strength, held-out source sequences, object statistics and class frequencies."""
import dataclasses, hashlib, json, math, re, shutil, subprocess, sys
from pathlib import Path
import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from tps.data.synthetic import (make_synthetic, make_synthia_tree, main, class_frequencies, _TRAIN_CITIES, _VAL_CITIES)
from tps.data.scene import (make_scene, class_ids, VIPER_IDS, SYNTHIA_IDS, STYLES, Style, SceneMix, target_style)
from tps.data.render import render, visible
from tps.flow import read_flow
from tps.warp import flow_warp

SIZE, SRC = (128, 64), (160, 88)
ARGS = ['--size', '128x64', '--source-size', '160x88', '--snippets', '4', '--val-snippets', '2', '--source-seqs', '2',
        '--source-frames', '20', '--intervals', '1,3', '--full-snippets', '1', '--no-progress']

def _cli(*args):
    exe = shutil.which('tps-make-synthetic')
    cmd = [exe] if exe else [sys.executable, '-c', 'import sys; from tps.data.synthetic import main; sys.exit(main())']
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=120)

@pytest.fixture(scope='module')
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp('syn') / 'synthetic'
    r = _cli('--out', str(out), '--seed', '5', '--workers', '2', *ARGS)
    assert r.returncode == 0, r.stderr
    return out

def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file()}

def test_layout_and_names(bench):
    c = sorted(str(p.relative_to(bench)) for p in bench.rglob('*') if p.is_file())
    viper_img = [p for p in c if p.startswith('viper/train/img/')]
    assert len(viper_img) == 8 and all(re.fullmatch(r'viper/train/img/(\d{3})/\1_\d{5}\.jpg', p) for p in viper_img)
    assert {Path(p).stem.split('_')[1] for p in viper_img} == {'00009', '00010', '00019', '00020'}
    assert sorted(p.replace('/img/', '/cls/').replace('.jpg', '.png') for p in viper_img) == \
           [p for p in c if p.startswith('viper/train/cls/')]
    assert sorted(p for p in c if p.startswith('viper_flow/')) == \
           [f'viper_flow/{s}_{f:05d}{f - 1:05d}_int16_x10.npy' for s in ('001', '002') for f in (10, 20)]
    city = re.compile(r'cityscapes/leftImg8bit_sequence/(train|val)/([a-z]+)/\2_(\d{6})_(\d{6})_leftImg8bit\.png')
    for split, n, cities in (('train', 4, _TRAIN_CITIES), ('val', 2, _VAL_CITIES)):
        labs = [p for p in c if p.startswith(f'cityscapes/gtFine/{split}/')]
        assert len(labs) == n
        frames = [city.fullmatch(p) for p in c if p.startswith(f'cityscapes/leftImg8bit_sequence/{split}/')]
        assert all(frames) and {m[2] for m in frames} == set(cities)
        assert len(frames) == 30 + (n - 1) * 5          # first snippet in full; others d, d-1, d-2 (c->c-1), d-3, d-4
        flows = {p.split('/')[-1] for p in c if p.startswith(f'cityscapes_flow/{split}/')}
        assert len(flows) == 4 * n                      # d->c, d->b (k=3), b->a (k=3), c->c-1 (k=1)
        for lab in labs:
            m = re.fullmatch(rf'cityscapes/gtFine/{split}/([a-z]+)/\1_(\d{{6}})_(\d{{6}})_gtFine_labelIds\.png', lab)
            assert m and (int(m[3]) - 19) % 30 == 0
            cty, seq, d = m[1], m[2], int(m[3])
            for t in (d, d - 1, d - 2, d - 3, d - 4):
                assert f'cityscapes/leftImg8bit_sequence/{split}/{cty}/{cty}_{seq}_{t:06d}_leftImg8bit.png' in c
            for a, b in ((d, d - 1), (d, d - 3), (d - 3, d - 4), (d - 1, d - 2)):
                assert f'{cty}_{seq}_{a:06d}_{b:06d}_int16_x10.npy' in flows
    assert (bench / 'synthetic.json').exists()

def test_images_labels_and_ids(bench):
    vids, seen = set(VIPER_IDS.values()), set()
    for p in sorted((bench / 'viper/train/cls').rglob('*.png')):
        im = Image.open(p)
        assert im.mode == 'P' and im.size == SRC
        a = np.array(im)
        assert set(np.unique(a)) <= vids, p
        assert a[-1, SRC[0] // 2] == 24, f'{p}: no ego vehicle (car) at the bottom centre'
        seen |= set(np.unique(a).tolist())
    assert {3, 4, 9, 2, 24} <= seen
    for p in (bench / 'viper/train/img').rglob('*.jpg'):
        assert cv2.imread(str(p)).shape == (SRC[1], SRC[0], 3)
    cids, seen = set(class_ids('cityscapes').tolist()), set()
    for p in (bench / 'cityscapes/gtFine').rglob('*.png'):
        a = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        assert a.dtype == np.uint8 and a.shape == (SIZE[1], SIZE[0]) and set(np.unique(a)) <= cids, p
        seen |= set(np.unique(a).tolist())
    assert {7, 8, 11, 23, 26, 1} <= seen                # road, sidewalk, building, sky, car, ego vehicle
    for p in (bench / 'cityscapes/leftImg8bit_sequence').rglob('*.png'):
        assert cv2.imread(str(p), cv2.IMREAD_UNCHANGED).shape == (SIZE[1], SIZE[0], 3)

def test_flow_files(bench):
    for folder, (w, h) in (('viper_flow', SRC), ('cityscapes_flow/train', SIZE), ('cityscapes_flow/val', SIZE)):
        files = sorted((bench / folder).glob('*.npy'))
        assert files
        for p in files:
            a = np.load(p)
            assert a.dtype == np.int16 and a.shape == (h, w, 2), p
            f = read_flow(p)
            assert f.shape == (2, h, w) and torch.isfinite(f).all()
        assert max(read_flow(p).abs().max().item() for p in files) > 1    # there is motion

def _warp_err(cur, prev, flow, vis):
    "(mean, median) abs error of the warped previous frame and mean error of the unwarped one, on visible pixels."
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).permute(2, 0, 1)[None]
    w = flow_warp(t(prev), flow[None])[0].permute(1, 2, 0).numpy()
    e = np.abs(w - cur).mean(-1)[vis]
    return e.mean(), np.median(e), np.abs(prev.astype(np.float32) - cur).mean(-1)[vis].mean()

def test_flow_reproduces_frames_on_disk(bench):
    "Warping the previous frame file with the flow file reproduces the current frame file outside occlusions."
    rd = lambda p: cv2.imread(str(p))[..., ::-1].astype(np.float32)
    # target: train snippets 0 and 1, d -> b (k = 3); the files carry blur and sensor noise (sigma 3)
    for j, cty in ((0, 'arden'), (1, 'belmont')):
        lab = sorted((bench / f'cityscapes/gtFine/train/{cty}').glob(f'{cty}_000000_*'))[0]
        d = int(lab.name.split('_')[2])
        vis = visible(make_scene('real', (5, 2, j), SIZE, 30), 19, 16)
        img = lambda t: rd(bench / f'cityscapes/leftImg8bit_sequence/train/{cty}/{cty}_000000_{t:06d}_leftImg8bit.png')
        flow = read_flow(bench / f'cityscapes_flow/train/{cty}_000000_{d:06d}_{d - 3:06d}_int16_x10.npy')
        e, med, e0 = _warp_err(img(d), img(d - 3), flow, vis)
        assert vis.mean() > 0.5 and e < 6 and med < 4 and e < 0.6 * e0, (cty, e, med, e0)
    # source: sequence 001, 10 -> 9 (JPEG q95; flat 'game' colours change little even unwarped, hence the looser ratio)
    vis = visible(make_scene('game', (5, 1, 0), SRC, 21), 10, 9)
    e, med, e0 = _warp_err(rd(bench / 'viper/train/img/001/001_00010.jpg'), rd(bench / 'viper/train/img/001/001_00009.jpg'),
                           read_flow(bench / 'viper_flow/001_0001000009_int16_x10.npy'), vis)
    assert vis.mean() > 0.5 and e < 8 and med < 4 and e < 0.7 * e0, (e, med, e0)

@pytest.mark.parametrize('style,size', [('game', (160, 88)), ('real', (128, 64))])
def test_flow_is_exact_on_clean_renders(style, size):
    "On the clean render (no sensor model) the warp error is small and far below the unwarped difference."
    for seed in range(3):
        sc = make_scene(style, seed, size, 30)
        r, rm = render(sc, 19, to=(16,), post=False), render(sc, 16, post=False)
        vis = visible(sc, 19, 16, r)
        e, med, e0 = _warp_err(r['image'], rm['image'], torch.from_numpy(r['flow'][16]).permute(2, 0, 1), vis)
        assert vis.mean() > 0.4 and e < 7 and med < 1.5 and e < 0.4 * e0, (style, seed, e, med, e0)

def test_determinism(bench, tmp_path):
    kw = dict(seed=5, size=SIZE, source_size=SRC, snippets=4, val_snippets=2, source_seqs=2, source_frames=20,
              intervals=(1, 3), full_snippets=1, progress=False)
    s = make_synthetic(tmp_path / 'a', workers=1, **kw)
    assert not s['cached'] and s['counts'] == make_synthetic(tmp_path / 'a', workers=1, **kw)['counts']
    a, ref = _files(tmp_path / 'a'), _files(bench)
    assert a.keys() == ref.keys() and all(a[k] == ref[k] for k in a), 'same seed must give identical bytes (1 vs 2 workers)'
    b = _files(Path(make_synthetic(tmp_path / 'b', workers=1, **{**kw, 'seed': 6})['out']))
    assert sum(b.get(k) != v for k, v in a.items()) > 0.9 * len(a)

def test_synthia_tree(tmp_path):
    for layout, rgb, lab in (('raw', 'RGB/Stereo_Left/Omni_F', 'GT/LABELS/Stereo_Left/Omni_F'), ('reference', 'rgb', 'label')):
        t = make_synthia_tree(tmp_path / layout, seed=1, size=(96, 57), frames=4, layout=layout)
        root = tmp_path / layout / 'SEQS-04-DAWN'
        assert Path(t['root']) == root and Path(t['flow_root']) == tmp_path / layout / 'synthia_flow'
        assert sorted(p.name for p in (root / rgb).iterdir()) == [f'{i:06d}.png' for i in range(4)]
        assert sorted(p.name for p in (root / lab).iterdir()) == [f'{i:06d}.png' for i in range(4)]
        l = cv2.imread(str(root / lab / '000002.png'), cv2.IMREAD_UNCHANGED)
        assert l.dtype == np.uint16 and l.shape == (57, 96, 3)
        cls = l[..., 2]                                  # OpenCV's BGR order: file channel 0 is the last one
        assert set(np.unique(cls)) <= set(SYNTHIA_IDS.values()) | {0} and {1, 2, 3} <= set(np.unique(cls).tolist())
        assert sorted(p.name for p in Path(t['flow_root']).iterdir()) == [f'{i:06d}_int16_x10.npy' for i in (1, 2, 3)]
        assert read_flow(Path(t['flow_root']) / '000003_int16_x10.npy').shape == (2, 48, 96)   # round(57 * 640 / 760)
    with pytest.raises(ValueError, match='layout'): make_synthia_tree(tmp_path / 'x', layout='flat')

def test_bad_input(tmp_path, capsys):
    with pytest.raises(ValueError, match='intervals'): make_synthetic(tmp_path / 'a', intervals=(0,), progress=False)
    with pytest.raises(ValueError, match='WxH'): make_synthetic(tmp_path / 'a', size='big', progress=False)
    assert main(['--out', str(tmp_path / 'b'), '--snippets', '-1', '--no-progress']) == 2
    assert 'snippets' in capsys.readouterr().err
    kw = dict(size=(64, 32), source_size=(64, 32), snippets=1, val_snippets=1, source_seqs=1, source_frames=10,
              full_snippets=0, workers=1, progress=False)
    make_synthetic(tmp_path / 'c', **kw)
    with pytest.raises(FileExistsError, match='overwrite'): make_synthetic(tmp_path / 'c', seed=1, **kw)
    s = make_synthetic(tmp_path / 'c', seed=1, overwrite=True, **kw)
    assert not s['cached'] and s['seed'] == 1


# ---- scenes: the default streets must not change (guards the order of the random draws) ----

def _scene_digest(sc) -> str:
    rows = [(o['kind'], *(round(float(o[k]), 9) for k in ('x', 'z', 'vx', 'vz', 'w', 'h')), tuple(c for _, c in o['parts']))
            for o in sc.objects]
    rows += [(round(sc.cy, 9), round(sc.road_half, 9), round(sc.speed, 9), tuple(round(v, 9) for v in sc.facade),
              len(sc.segments[0]['z0']), round(float(sc.segments[1]['height'].sum()), 6), round(float(sc.tab.sum()), 6))]
    return hashlib.sha256(repr(rows).encode()).hexdigest()[:16]

def test_default_scenes_unchanged():
    "Digests of streets drawn by the generator as first published (same seeds, same draws, same objects)."
    want = {'game': ['94425189163f0760', 'f0c0f0a9ff9235df'], 'real': ['09e2a8cec65fbb7f', '940cb9bede734b2e']}
    for style, digests in want.items():
        assert [_scene_digest(make_scene(style, (s, 1, 2), (256, 128), 30)) for s in range(2)] == digests, style
        assert _scene_digest(make_scene(style, (0, 1, 2), (256, 128), 30, SceneMix())) == digests[0]
    assert _scene_digest(make_scene(target_style(1.0), (0, 1, 2), (256, 128), 30)) == want['real'][0]

# ---- the domain-shift strength ----

def _numbers(v): return [v] if isinstance(v, (int, float)) and not isinstance(v, bool) else [x for e in v for x in _numbers(e)]

def test_target_style_end_points_and_between():
    game, real = STYLES['game'], STYLES['real']
    fields = [f.name for f in dataclasses.fields(Style) if f.name != 'name']
    t0 = target_style(0.0)
    for k in fields: assert getattr(t0, k) == getattr(game, k) and type(getattr(t0, k)) == type(getattr(game, k)), k
    assert t0.name == 'real' and target_style(0, seed=(1, 2, 3)) == t0
    assert target_style(1.0) == real and target_style(1, seed=7) == real
    assert all(getattr(target_style(1.0), k) == getattr(real, k) for k in fields)
    for shift in (0.2, 0.5, 0.8):
        t = target_style(shift, seed=(4, int(shift * 10)))
        for k in fields:
            a, b, v = getattr(game, k), getattr(real, k), getattr(t, k)
            if k in ('rounded', 'dashed', 'posterize'): assert v in (a, b), k
            elif len(_numbers(a)) == len(_numbers(b)):
                assert all(min(x, y) - 1e-12 <= z <= max(x, y) + 1e-12 for x, y, z in zip(_numbers(a), _numbers(b), _numbers(v))), (shift, k)
                assert all(math.isclose(z, (1 - shift) * x + shift * y) for x, y, z in zip(_numbers(a), _numbers(b), _numbers(v))), (shift, k)
            else:                                       # palettes of 7 and 6 colours: colour i blends i mod 7 and i mod 6
                assert len(v) == max(len(a), len(b))
                for i, c in enumerate(v):
                    assert np.allclose(c, (1 - shift) * np.array(a[i % len(a)]) + shift * np.array(b[i % len(b)])), (k, i)
    assert target_style(0.3).focal < target_style(0.6).focal and target_style(0.3).noise < target_style(0.6).noise
    assert target_style(0.49).rounded is False and target_style(0.5).rounded is True      # no seed: switch at 0.5
    share = np.mean([target_style(0.25, seed=(i, 0)).rounded for i in range(600)])           # seed: probability = shift
    assert 0.19 < share < 0.31

@pytest.mark.parametrize('bad', [-0.01, 1.01, float('nan'), float('inf'), 'half', None])
def test_bad_shift(bad, tmp_path):
    with pytest.raises(ValueError, match=re.escape(repr(bad))): target_style(bad)
    with pytest.raises(ValueError, match='shift'): make_synthetic(tmp_path / 'x', shift=bad, progress=False)
    assert not (tmp_path / 'x').exists()

def test_shift_cli_and_tiny_generation(tmp_path, capsys):
    kw = ['--size', '64x32', '--source-size', '64x32', '--snippets', '2', '--val-snippets', '1', '--source-seqs', '1',
          '--source-frames', '10', '--full-snippets', '0', '--no-progress', '--workers', '1']
    assert main(['--out', str(tmp_path / 'half'), '--shift', '0.5', *kw]) == 0
    meta = json.loads((tmp_path / 'half/synthetic.json').read_text())
    assert meta['shift'] == 0.5 and meta['counts']['cityscapes/gtFine/train'] == 2
    capsys.readouterr()
    assert main(['--out', str(tmp_path / 'bad'), '--shift', 'nan', *kw]) == 2
    assert 'nan' in capsys.readouterr().err and not (tmp_path / 'bad').exists()
    # shift 0: the target street is drawn with the source's style (its hood is the source's red one)
    s0 = make_synthetic(tmp_path / 'zero', size=(64, 32), source_size=(64, 32), snippets=1, val_snippets=0, source_seqs=0,
                        full_snippets=0, workers=1, progress=False, shift=0.0)
    assert s0['shift'] == 0.0
    f = sorted((tmp_path / 'zero/cityscapes/leftImg8bit_sequence/train').rglob('*.png'))[0]
    img = cv2.imread(str(f))[..., ::-1].astype(int)
    assert img[-1, 32, 0] > 100 and img[-1, 32, 0] > 3 * img[-1, 32, 2]                 # red hood, not the dark one

# ---- held-out source sequences and object statistics ----

@pytest.fixture(scope='module')
def bench_val(tmp_path_factory):
    out = tmp_path_factory.mktemp('synval') / 'synthetic'
    s = make_synthetic(out, seed=5, size=SIZE, source_size=SRC, snippets=2, val_snippets=1, source_seqs=2, source_frames=20,
                       full_snippets=0, workers=2, progress=False, source_val_seqs=2, target_mix={'persons': 3.0})
    return out, s

def test_source_val_sequences(bench_val, bench):
    out, s = bench_val
    val = sorted(str(p.relative_to(out)) for p in (out / 'viper/val').rglob('*') if p.is_file())
    assert sorted({p.split('/')[3] for p in val}) == ['003', '004']                      # after the train ids 001, 002
    assert len([p for p in val if p.startswith('viper/val/img/')]) == 8 and len(val) == 16
    assert s['counts']['viper/val/img'] == 8 and s['counts']['viper/val/cls'] == 8 and s['counts']['viper_flow'] == 8
    train_ids = {p.name for p in (out / 'viper/train/img').iterdir()}
    assert train_ids == {'001', '002'}
    for seq in ('003', '004'):
        for f in (10, 20):
            flow = read_flow(out / f'viper_flow/{seq}_{f:05d}{f - 1:05d}_int16_x10.npy')
            assert flow.shape == (2, SRC[1], SRC[0])
            assert np.array(Image.open(out / f'viper/val/cls/{seq}/{seq}_{f:05d}.png'))[-1, SRC[0] // 2] == 24
    # the train sequences are those of a benchmark without held-out ones (same seed and sizes)
    for p in (out / 'viper/train').rglob('*.*'):
        assert p.read_bytes() == (bench / p.relative_to(out)).read_bytes(), p
    # held-out sequences are new streets
    assert (out / 'viper/val/img/003/003_00010.jpg').read_bytes() != (out / 'viper/train/img/001/001_00010.jpg').read_bytes()
    meta = json.loads((out / 'synthetic.json').read_text())
    assert meta['source_val_seqs'] == 2 and meta['target_mix']['persons'] == 3.0 and meta['source_mix']['persons'] == 1.0
    assert not (bench / 'viper/val').exists() and 'viper/val/img' not in json.loads((bench / 'synthetic.json').read_text())['counts']
    with pytest.raises(ValueError, match='999'): make_synthetic(out / 'x', source_seqs=990, source_val_seqs=10, progress=False)

def test_mix_knobs_change_what_they_say():
    def count(mix, n=25):
        objs = [o for i in range(n) for o in make_scene('real', (i, 3), (128, 64), 30, mix).objects]
        return {k: sum(o['kind'] == k for o in objs) for k in ('car', 'truck', 'bus', 'person', 'bicycle', 'motorcycle',
                                                                'pole', 'light', 'sign', 'tree')}
    base = count(SceneMix())
    more = count(SceneMix(buses=4, bicycles=3, traffic_signs=3, poles=0))
    assert more['bus'] > 2.5 * base['bus'] and more['bicycle'] > 2 * base['bicycle'] and more['sign'] > 2 * base['sign']
    assert more['pole'] == 0 < base['pole'] and 0.75 < more['person'] / base['person'] < 1.3
    none = count(SceneMix(cars=0, trucks=0, buses=0, persons=0, bicycles=0, motorcycles=0, poles=0, traffic_lights=0,
                          traffic_signs=0, trees=0))
    assert sum(none.values()) == 0
    wide = [make_scene('real', i, mix=SceneMix(terrain=2)) for i in range(5)]
    plain = [make_scene('real', i) for i in range(5)]
    assert all(w.facade[0] - w.road_half - w.sidewalk >= p.facade[0] - p.road_half - p.sidewalk for w, p in zip(wide, plain))
    with pytest.raises(ValueError, match='fences'): SceneMix(fences=-1)
    with pytest.raises(ValueError, match='lorries'): make_synthetic('unused', target_mix={'lorries': 1}, progress=False)

# ---- class frequencies ----

def _plain_frequencies(files, source: bool) -> np.ndarray:
    "Reference: loop over files and the 15 classes, with the loader's ego-vehicle removal for the source."
    from tps.data.core import VIPER_TO_TRAIN, CITYSCAPES_TO_TRAIN, remove_ego_vehicle
    table = VIPER_TO_TRAIN if source else CITYSCAPES_TO_TRAIN['viper']
    counts = np.zeros(15)
    for f in files:
        lab = remove_ego_vehicle(np.array(Image.open(f))) if source else cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
        for native, train in table.items(): counts[train] += (lab == native).sum()
    return counts / counts.sum()

def test_class_frequencies(bench_val):
    out, _ = bench_val
    fr = class_frequencies(out)
    assert list(fr) == ['source train', 'source val', 'target train', 'target val']
    for part, folder, source in (('source train', 'viper/train/cls', True), ('source val', 'viper/val/cls', True),
                                 ('target train', 'cityscapes/gtFine/train', False), ('target val', 'cityscapes/gtFine/val', False)):
        ref = _plain_frequencies(sorted((out / folder).rglob('*.png')), source)
        assert np.allclose(list(fr[part].values()), ref, atol=1e-12), part
        assert abs(sum(fr[part].values()) - 1) < 1e-9 and fr[part]['road'] > 0.05
    with pytest.raises(FileNotFoundError): class_frequencies(out / 'nothing')
