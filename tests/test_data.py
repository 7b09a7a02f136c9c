"Dataset loaders on generated trees: samples, class maps, flow direction, SYNTHIA layouts and crop, bad input, speed."
import pickle, shutil
from pathlib import Path
import numpy as np
import cv2
import pytest
import torch
from PIL import Image

from tps.config import apply_overrides, CLASS_NAMES
from tps.presets import get_preset
from tps.data import CityscapesSeq, Viper, SynthiaSeq, build_source, build_target, DatasetError, benchmark_loader
from tps.data.core import (CITYSCAPES_TO_TRAIN, VIPER_TO_TRAIN, SYNTHIA_TO_TRAIN, make_lut, map_label,
                           remove_ego_vehicle, read_label)
from tps.warp import flow_warp, resize_flow

TGT, SRC = (96, 48), (96, 56)           # (W, H) of the generated target and source frames

from tps.data.synthetic import make_synthetic, make_synthia_tree

# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope='module')
def tree(tmp_path_factory):
    "A small synthetic VIPER + Cityscapes-Seq benchmark with the frames and flows of intervals 1 and 2."
    out = tmp_path_factory.mktemp('synthetic')
    make_synthetic(out, seed=0, size=TGT, source_size=SRC, snippets=2, val_snippets=1, source_seqs=2,
                   source_frames=20, intervals=(1, 2), full_snippets=0, workers=1, progress=False)
    return out

@pytest.fixture(scope='module', params=['reference', 'raw'])
def synthia(request, tmp_path_factory):
    "A small SYNTHIA-Seq sequence root (and its flow folder) in each layout."
    out = tmp_path_factory.mktemp(f'synthia_{request.param}')
    r = make_synthia_tree(out, seed=0, size=(64, 38), frames=4, layout=request.param)
    return Path(r['root']), Path(r['flow_root']), request.param

def _cfg(tree, **kw):
    c = get_preset('demo')
    over = {'data.source_root': str(tree/'viper'), 'data.source_flow_root': str(tree/'viper_flow'),
            'data.target_root': str(tree/'cityscapes'), 'data.target_flow_root': str(tree/'cityscapes_flow'),
            'data.source_size': f'[{SRC[0]}, {SRC[1]}]', 'data.target_size': f'[{TGT[0]}, {TGT[1]}]',
            'eval.input_size': f'[{TGT[0] // 2}, {TGT[1] // 2}]', 'eval.label_size': f'[{TGT[0]}, {TGT[1]}]'}
    over.update(kw)
    return apply_overrides(c, over)

def _check_flow(frame, key, flow):
    "Warping `key` by `flow` (resized to the frame size) approximates `frame` better than no warp and than the reversed flow."
    H, W = frame.shape[-2:]
    fl = resize_flow(flow[None], (H, W)) if flow.shape[-2:] != (H, W) else flow[None]
    m = (slice(None), slice(2, H - 2), slice(2, W - 6))
    err = lambda f: float((flow_warp(key[None].float(), f)[0] - frame.float()).abs()[m].mean())
    base = float((key.float() - frame.float()).abs()[m].mean())
    e, e_rev = err(fl), err(-fl)
    assert e < 0.95 * base and e < e_rev, (e, base, e_rev)

# ---------------------------------------------------------------- class maps (the published tables, nbs/method.ipynb)
PUBLISHED = {
    ('cityscapes', 'viper'): {7: 0, 8: 1, 11: 2, 13: 3, 19: 4, 20: 5, 21: 6, 22: 7, 23: 8, 24: 9, 25: 9, 26: 10, 27: 11,
                              28: 12, 32: 13, 33: 14},
    ('cityscapes', 'synthia'): {7: 0, 8: 1, 11: 2, 13: 3, 17: 4, 19: 5, 20: 6, 21: 7, 23: 8, 24: 9, 25: 10, 26: 11},
    ('viper', 'viper'): {3: 0, 4: 1, 9: 2, 11: 3, 13: 4, 14: 5, 7: 6, 8: 6, 6: 7, 2: 8, 20: 9, 24: 10, 27: 11, 26: 12,
                         23: 13, 22: 14},
    ('synthia', 'synthia'): {3: 0, 4: 1, 2: 2, 5: 3, 7: 4, 15: 5, 9: 6, 6: 7, 1: 8, 10: 9, 11: 10, 8: 11}}
OURS = {('cityscapes', 'viper'): CITYSCAPES_TO_TRAIN['viper'], ('cityscapes', 'synthia'): CITYSCAPES_TO_TRAIN['synthia'],
        ('viper', 'viper'): VIPER_TO_TRAIN, ('synthia', 'synthia'): SYNTHIA_TO_TRAIN}

@pytest.mark.parametrize('key', list(PUBLISHED))
def test_class_maps(key):
    assert OURS[key] == PUBLISHED[key]
    lut = make_lut(OURS[key])
    ids = np.arange(256, dtype=np.uint8)
    assert map_label(ids, lut).tolist() == [PUBLISHED[key].get(i, 255) for i in range(256)]
    assert sorted(set(PUBLISHED[key].values())) == list(range(len(CLASS_NAMES[key[1]])))

def test_cityscapes_ids_come_from_cityscapesscripts():
    from cityscapesscripts.helpers.labels import name2label
    for setting in ('viper', 'synthia'):
        for lid, tid in CITYSCAPES_TO_TRAIN[setting].items():
            name = CLASS_NAMES[setting][tid]
            assert name2label[name].id == lid or (setting, name, lid) == ('viper', 'person', name2label['rider'].id)

def test_ego_vehicle_unit():
    lab = np.full((12, 16), 3, np.uint8); lab[8:, 4:12] = 24; lab[7, 3] = 24; lab[0:2, 0:2] = 24
    out = remove_ego_vehicle(lab)
    assert (out[8:, 4:12] == 0).all() and out[7, 3] == 0 and (out[0:2, 0:2] == 24).all()

# ---------------------------------------------------------------- Cityscapes-Seq
@pytest.mark.parametrize('setting', ['viper', 'synthia'])
def test_cityscapes_train(tree, setting):
    ds = build_target(_cfg(tree, **{'data.source': setting, 'model.num_classes': 15 if setting == 'viper' else 12}), 'train')
    assert isinstance(ds, CityscapesSeq) and ds.setting == setting and len(ds) >= 2 and ds.skipped == 0
    assert [ds[i]['name'] for i in range(len(ds))] == sorted(ds[i]['name'] for i in range(len(ds)))
    s = ds[0]
    assert set(s) == {'d', 'c', 'b', 'a', 'flow_dc', 'flow_db', 'flow_ba', 'label', 'name'}
    for k in 'dcba': assert s[k].shape == (3, TGT[1], TGT[0]) and s[k].dtype == torch.uint8
    for k in ('flow_dc', 'flow_db', 'flow_ba'): assert s[k].dtype == torch.float32 and s[k].shape[0] == 2
    assert s['label'].shape == (TGT[1], TGT[0]) and s['label'].dtype == torch.uint8
    assert set(s['label'].unique().tolist()) <= set(range(len(CLASS_NAMES[setting]))) | {255}
    assert (s['label'] != 255).any()
    raw = read_label(ds.label_path(*ds.samples[0]), 'gray')
    assert (s['label'].numpy() == map_label(raw, make_lut(CITYSCAPES_TO_TRAIN[setting]))).all()

def test_cityscapes_frames_and_flow_direction(tree):
    ds = build_target(_cfg(tree, **{'data.interval': 2}), 'train')
    for i in range(len(ds)):
        s, (c, q, t) = ds[i], ds.samples[i]
        for key, f in zip('dcba', (t, t - 1, t - 2, t - 3)):
            ref = cv2.cvtColor(cv2.imread(str(ds.frame_path(c, q, f))), cv2.COLOR_BGR2RGB)
            assert (s[key].permute(1, 2, 0).numpy() == ref).all(), (key, f)
        for frame, key, flow in (('d', 'c', 'flow_dc'), ('d', 'b', 'flow_db'), ('b', 'a', 'flow_ba')):
            _check_flow(s[frame], s[key], s[flow])

def test_cityscapes_val_protocol(tree):
    ds = build_target(_cfg(tree), 'val')
    s = ds[0]
    assert set(s) == {'d', 'c', 'flow_dc', 'label', 'name'}
    assert s['d'].shape == (3, TGT[1] // 2, TGT[0] // 2) and s['label'].shape == (TGT[1], TGT[0])
    assert str(ds.flow_root).endswith('cityscapes_flow/val')

# ---------------------------------------------------------------- VIPER
def test_viper(tree):
    ds = build_source(_cfg(tree))
    assert isinstance(ds, Viper) and len(ds) == 4 and ds.skipped == 0
    assert [n for _, n in ds.samples] == [10, 20, 10, 20]
    for i in range(len(ds)):
        s = ds[i]
        assert set(s) == {'d', 'c', 'flow_dc', 'label', 'name'}
        assert s['d'].shape == s['c'].shape == (3, SRC[1], SRC[0]) and s['d'].dtype == torch.uint8
        assert s['label'].shape == (SRC[1], SRC[0]) and s['label'].dtype == torch.uint8
        assert set(s['label'].unique().tolist()) <= set(range(15)) | {255}
        _check_flow(s['d'], s['c'], s['flow_dc'])
        raw = read_label(ds.label_path(*ds.samples[i]), 'palette')
        exp = map_label(remove_ego_vehicle(raw), make_lut(VIPER_TO_TRAIN))
        assert (s['label'].numpy() == exp).all()
        # the generator draws the ego car (VIPER 24) at the bottom centre, plus other cars
        assert raw[-1, raw.shape[1] // 2] == 24
        _, comp = cv2.connectedComponents((raw == 24).astype(np.uint8), connectivity=8)
        ego = comp == comp[-1, raw.shape[1] // 2]
        assert (s['label'].numpy()[ego] == 255).all()                     # ego vehicle ignored
        assert (s['label'].numpy()[(raw == 24) & ~ego] == 10).all()       # other cars stay cars

# ---------------------------------------------------------------- SYNTHIA-Seq
def test_synthia_layouts_and_crop(synthia):
    root, flow, layout = synthia
    ds = SynthiaSeq(root, flow, size=(64, 38))
    assert ds.layout == layout and ds.crop == 6 and ds.out_size == (64, 32) and len(ds) >= 2 and ds.samples[0] >= 1
    s = ds[0]
    assert s['d'].shape == s['c'].shape == (3, 32, 64) and s['label'].shape == (32, 64)
    assert set(s['label'].unique().tolist()) <= set(range(12)) | {255}
    full = cv2.imread(str(ds.frame_path(ds.samples[0])), cv2.IMREAD_UNCHANGED)
    if full.shape[:2] == (38, 64):   # no resize: the crop is exactly the top 32 rows
        assert (s['d'].permute(1, 2, 0).numpy() == cv2.cvtColor(full, cv2.COLOR_BGR2RGB)[:32]).all()
        ids = cv2.imread(str(ds.label_path(ds.samples[0])), cv2.IMREAD_UNCHANGED)
        ids = ids[..., 2] if ids.ndim == 3 else ids     # file's first (R) channel
        assert (s['label'].numpy() == map_label(ids[:32], make_lut(SYNTHIA_TO_TRAIN))).all()
    _check_flow(s['d'], s['c'], s['flow_dc'])
    big = SynthiaSeq(root, flow)                      # the paper's size: 1280x760, bottom 120 rows cut
    assert big.out_size == (1280, 640) and big[0]['d'].shape == (3, 640, 1280) and big[0]['label'].shape == (640, 1280)

def test_build_source_synthia(synthia):
    root, flow, _ = synthia
    cfg = apply_overrides(get_preset('syn2city'), {'data.source_root': str(root), 'data.source_flow_root': str(flow)})
    ds = build_source(cfg)
    assert isinstance(ds, SynthiaSeq) and ds.size == (1280, 760) and ds.out_size == (1280, 640)

# ---------------------------------------------------------------- bad input
def _copy(src, dst):
    shutil.copytree(src, dst); return dst

def test_bad_input_empty_root(tmp_path, tree):
    (tmp_path/'empty').mkdir()
    for make, words in [(lambda: CityscapesSeq(tmp_path/'empty', tree/'cityscapes_flow/train'), ['leftImg8bit_sequence/train', 'gtFine/train']),
                        (lambda: Viper(tmp_path/'empty', tree/'viper_flow'), ['train/img', 'train/cls']),
                        (lambda: SynthiaSeq(tmp_path/'empty', tree/'viper_flow'), ['rgb/', 'RGB/Stereo_Left/Omni_F/']),
                        (lambda: Viper(tmp_path/'nope', tree/'viper_flow'), ['nope', 'does not exist'])]:
        with pytest.raises(DatasetError) as e: make()
        for w in words: assert w in str(e.value)

def test_bad_input_missing_frame(tmp_path, tree):
    cs = _copy(tree/'cityscapes', tmp_path/'cs')
    ds = CityscapesSeq(cs, tree/'cityscapes_flow/train', size=TGT)
    c, q, t = ds.samples[-1]
    gone = ds.frame_path(c, q, t - 1); gone.unlink()
    with pytest.raises(DatasetError) as e: CityscapesSeq(cs, tree/'cityscapes_flow/train', size=TGT)
    assert str(gone) in str(e.value) and 'data.on_bad_file=skip' in str(e.value)
    ok = CityscapesSeq(cs, tree/'cityscapes_flow/train', size=TGT, skip_missing=True)
    assert len(ok) == len(ds) - 1 and ok.skipped == 1
    vp = _copy(tree/'viper', tmp_path/'vp')
    v = Viper(vp, tree/'viper_flow', size=SRC)
    gone = v.frame_path(v.samples[0][0], v.samples[0][1] - 1); gone.unlink()
    with pytest.raises(DatasetError) as e: Viper(vp, tree/'viper_flow')
    assert str(gone) in str(e.value)
    fl = _copy(tree/'viper_flow', tmp_path/'vf')
    gone = fl/v.flow_path(*v.samples[1]).name; gone.unlink()
    with pytest.raises(DatasetError) as e: Viper(tree/'viper', fl)
    assert str(gone) in str(e.value)

def test_bad_input_label_size_and_corrupt_image(tmp_path, tree, synthia):
    cs = _copy(tree/'cityscapes', tmp_path/'cs')
    ds = CityscapesSeq(cs, tree/'cityscapes_flow/train', size=TGT)
    lp = ds.label_path(*ds.samples[0]); cv2.imwrite(str(lp), np.zeros((10, 20), np.uint8))
    with pytest.raises(DatasetError) as e: ds[0]
    assert str(lp) in str(e.value) and '20x10' in str(e.value)
    fp = ds.frame_path(*ds.samples[1]); fp.write_bytes(fp.read_bytes()[:64])
    with pytest.raises(DatasetError) as e: ds[1]
    assert str(fp) in str(e.value) and 'corrupt' in str(e.value)
    vp = _copy(tree/'viper', tmp_path/'vp')
    v = Viper(vp, tree/'viper_flow', size=SRC)
    lp = v.label_path(*v.samples[0]); Image.fromarray(np.zeros((5, 7), np.uint8), 'P').save(lp)
    with pytest.raises(DatasetError) as e: v[0]
    assert str(lp) in str(e.value) and '7x5' in str(e.value)
    fp = v.frame_path(v.samples[1][0], v.samples[1][1] - 1); fp.write_bytes(b'\xff\xd8garbage')
    with pytest.raises(DatasetError) as e: v[1]
    assert str(fp) in str(e.value)
    root, flow, _ = synthia
    sy = _copy(root, tmp_path/'sy')
    s = SynthiaSeq(sy, flow, size=(64, 38))
    lp = s.label_path(s.samples[0]); cv2.imwrite(str(lp), np.zeros((9, 11, 3), np.uint16))
    with pytest.raises(DatasetError) as e: s[0]
    assert str(lp) in str(e.value) and '11x9' in str(e.value)

# ---------------------------------------------------------------- loading: workers, pickling, determinism, speed
def test_workers_pickle_determinism(tree):
    cfg = _cfg(tree)
    src, tgt = build_source(cfg), build_target(cfg, 'train')
    for ds in (src, tgt):
        ds2 = pickle.loads(pickle.dumps(ds))
        assert ds2.samples == ds.samples and len(ds2) == len(ds)
    assert build_target(cfg, 'train').samples == tgt.samples and build_source(cfg).samples == src.samples
    dl = torch.utils.data.DataLoader(tgt, batch_size=2, num_workers=2)
    b = next(iter(dl))
    assert b['d'].shape == (2, 3, TGT[1], TGT[0]) and b['d'].dtype == torch.uint8 and len(b['name']) == 2
    assert torch.equal(b['d'][0], tgt[0]['d'])

def test_benchmark(tree, synthia, capsys):
    cfg = _cfg(tree)
    root, flow, _ = synthia
    for ds in (build_source(cfg), build_target(cfg, 'train'), SynthiaSeq(root, flow, size=(64, 38))):
        assert benchmark_loader(ds, n=8, num_workers=0) > 0
    out = capsys.readouterr().out
    for name in ('Viper', 'CityscapesSeq', 'SynthiaSeq'): assert f'{name}:' in out
