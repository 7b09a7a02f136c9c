"tps.explorer without a browser: controls drive panels, the network runs only on new keys, pseudo labels and metrics equal a direct computation."
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tps.augment import to_input, flip_pair
from tps.config import apply_overrides, config_to_dict
from tps.presets import get_preset
from tps.data import CityscapesSeq
from tps.data.synthetic import make_synthetic
from tps.metrics import confusion_matrix, per_class_iou, mean_iou
from tps.config import IGNORE
from tps.teacher import cross_frame_pseudo_labels
from tps.model import TPSNet, CheckpointError, infer_model_kwargs
from tps.runs import load_model
from tps.explorer import PseudoLabelExplorer, PANELS, sample_names

SIZE = (128, 64)  # (W, H)


@pytest.fixture(scope='module')
def bench(tmp_path_factory):
    "A tiny synthetic benchmark with intervals 1 and 3, and an untrained R18 state dict saved with torch.save."
    root = tmp_path_factory.mktemp('explorer')
    make_synthetic(root, size=SIZE, source_size=SIZE, snippets=3, val_snippets=1, source_seqs=1, source_frames=10,
                   intervals=(1, 3), full_snippets=0, workers=1, progress=False)
    torch.manual_seed(0)
    net = TPSNet('resnet18', 15)
    torch.save(net.state_dict(), root/'r18.pth')
    return root


def _ds(root, split='train', k=1, **kw):
    return CityscapesSeq(root/'cityscapes', root/f'cityscapes_flow/{split}', split=split, size=SIZE, interval=k, **kw)


def _png(ex):
    return {p: bytes(w.value) for p, w in ex.panels.items()}


@pytest.fixture(scope='module')
def ex(bench):
    return PseudoLabelExplorer(bench/'r18.pth', _ds(bench), intervals=(1, 3), device='cpu', panel_width=128)


def test_model_from_state_dict_or_training_checkpoint(bench, tmp_path):
    sd = torch.load(bench/'r18.pth')
    assert infer_model_kwargs(sd) == dict(arch='resnet18', num_classes=15, multi_level=True, width=64)
    net, _ = load_model(bench/'r18.pth', device='cpu')
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in sd.items())
    cfg = apply_overrides(get_preset('demo'), {'model.num_classes': '12', 'model.multi_level': 'false',
                                               'model.flow_scale': 'per_axis'})
    small = TPSNet('resnet18', 12, multi_level=False, flow_scale='per_axis', width=cfg.model.width)   # the demo's half width
    torch.save({'model': small.state_dict(), 'iter': 3, 'config': config_to_dict(cfg)}, tmp_path/'iter_0000003.pth')
    got, _ = load_model(tmp_path/'iter_0000003.pth', device='cpu')
    assert (got.num_classes, got.multi_level, got.flow_scale) == (12, False, 'per_axis')
    assert infer_model_kwargs(small.state_dict())['width'] == cfg.model.width == 32
    assert infer_model_kwargs({'module.' + k: v for k, v in small.state_dict().items()})['multi_level'] is False
    (tmp_path/'bad.pth').write_bytes(b'not a checkpoint')
    with pytest.raises(CheckpointError, match='bad.pth'): load_model(tmp_path/'bad.pth')
    with pytest.raises(CheckpointError, match='layer6'): infer_model_kwargs({'conv1.weight': torch.zeros(1)})
    with pytest.raises(ValueError, match='predicts 15 classes'):  # a 15-class network on the SYNTHIA setting
        PseudoLabelExplorer(net, _ds(bench), setting='synthia')


def test_controls_redraw_and_cache(ex):
    ex.sample.value, ex.flip.value, ex.augment.value, ex.threshold.value, ex.interval.value = 0, False, True, 0.0, 1
    ex.seed.value, ex.mode.value, ex.view.value = 0, 'correct', 'overlay'
    calls = dict(ex.calls)
    a = _png(ex)
    assert all(len(v) > 100 and v[:4] == b'\x89PNG' for v in a.values()) and set(a) == set(PANELS)

    ex.threshold.value = 0.8                                    # threshold: no network, PL panels change
    b = _png(ex)
    assert ex.calls == calls
    assert {p for p in PANELS if a[p] != b[p]} == {'pseudo_label', 'confidence', 'errors'}
    assert (ex.current['pseudo_label'] == IGNORE).any() and ex.current['threshold'] == 0.8
    ex.view.value = 'labels'                                    # view: no network, label panels change
    assert ex.calls == calls and _png(ex)['teacher_b'] != b['teacher_b'] and _png(ex)['d'] == b['d']
    ex.view.value = 'overlay'

    ex.seed.value = 7                                           # a new augmentation draw: the student only
    assert ex.calls == {**calls, 'student': calls['student'] + 1}
    c = _png(ex)
    assert c['student_input'] != b['student_input'] and c['pseudo_label'] == b['pseudo_label']
    ex.augment.value = False                                    # un-augmented d: the student input is d itself
    assert ex.calls['student'] == calls['student'] + 2
    assert torch.equal(ex.current['student_input'], ex.dataset()[0]['d'])
    ex.flip.value = True                                        # the flipped teacher pair: the teacher only
    assert ex.calls == {'teacher': calls['teacher'] + 1, 'student': calls['student'] + 2}
    ex.mode.value = 'legacy'                                    # legacy flip handling is another teacher key
    assert ex.calls['teacher'] == calls['teacher'] + 2
    ex.mode.value, ex.flip.value, ex.augment.value, ex.seed.value = 'correct', False, True, 0   # back: all cached
    assert ex.calls == {'teacher': calls['teacher'] + 2, 'student': calls['student'] + 2}
    assert _png(ex) == b

    ex.sample.value = 1                                         # slider and dropdown stay in sync
    assert ex.name.value == 1 and ex.calls['teacher'] == calls['teacher'] + 3
    assert _png(ex)['d'] != b['d']
    ex.name.value = 2
    assert ex.sample.value == 2 and ex.name.label.endswith(ex.names[2])
    assert ex.dataset()[2]['name'] == ex.names[2]


def test_busy_indicator(ex):
    seen = []
    ex.status.observe(lambda ch: seen.append(ch['new']), 'value')
    ex.seed.value = 123                                         # runs the student
    assert any('computing' in s for s in seen[:-1]) and 'ready' in seen[-1] and 'computed in' in seen[-1]
    seen.clear()
    ex.threshold.value = 0.3                                    # cached: never busy
    assert not any('computing' in s for s in seen) and 'from cache' in seen[-1]


@pytest.mark.parametrize('flip,mode,thr', [(False, 'correct', 0.0), (True, 'correct', 0.6), (True, 'legacy', 0.9)])
def test_metrics_equal_direct_computation(ex, flip, mode, thr):
    ex.sample.value, ex.interval.value, ex.augment.value = 1, 3, False
    ex.flip.value, ex.mode.value, ex.threshold.value = flip, mode, thr
    assert ex.error is None
    s = ex.dataset()[1]
    assert s['name'] == ex.names[1] and torch.equal(s['b'], ex.dataset(3)[1]['b'])
    b, a, f = s['b'][None], s['a'][None], s['flow_ba'][None]
    if flip: b, a, f = flip_pair(b, a, f, legacy=mode == 'legacy')
    with torch.no_grad():
        out = ex.net.eval()(to_input(b), to_input(a), f)
    pl, conf = cross_frame_pseudo_labels(out.fused_main.softmax(1), s['flow_db'][None], flipped=torch.tensor([flip]),
                                         legacy=mode == 'legacy', conf_threshold=thr)       # (1, h, w)
    assert torch.equal(pl[0], ex.current['pseudo_label'])
    assert torch.allclose(conf[0], ex.current['confidence'], atol=1e-4)   # the explorer's teacher batches its two frames
    full = F.interpolate(pl[None].float(), size=tuple(s['label'].shape), mode='nearest')[0, 0].long()
    gt = s['label'].long()
    keep = (full != IGNORE) & (gt < 15)
    cm = confusion_matrix(full[keep], gt[keep], 15)
    m = ex.current['metrics']
    assert np.array_equal(cm.numpy(), m['cm'])
    np.testing.assert_allclose(m['iou'], per_class_iou(cm), equal_nan=True)
    tp = np.diag(cm.numpy()).astype(float)
    n_gt = torch.bincount(gt[gt < 15], minlength=15).numpy()
    with np.errstate(invalid='ignore', divide='ignore'):
        np.testing.assert_allclose(m['precision'], tp / cm.sum(0).numpy(), equal_nan=True)
        np.testing.assert_allclose(m['recall'], tp / n_gt, equal_nan=True)
    assert m['miou'] == mean_iou(cm) and abs(m['coverage'] - keep.sum().item() / (gt < 15).sum().item()) < 1e-12
    html = ex.table.value                                       # what is shown is what was computed
    c = int(np.nanargmax(np.where(n_gt > 0, m['iou'], np.nan)))
    assert f'<td>{ex.class_names[c]}</td><td>{n_gt[c]:,}</td>' in html
    assert f'<td>{100 * m["iou"][c]:.1f}</td>' in html and f'<b>{m["miou"]:.1f}</b>' in html


def test_running_summary(ex):
    ex.augment.value, ex.threshold.value, ex.interval.value, ex.sample.value = False, 0.0, 1, 0
    ex.reset_summary()                                          # restarts from the current frame
    assert list(ex.visited) == [(0, 1)]
    seen = {}
    for i in (0, 1, 0):                                         # revisiting counts a frame once
        ex.sample.value = i
        seen[i] = ex.current['metrics']['cm']
    S = ex.summary()
    assert S['frames'] == 2 and np.array_equal(S['cm'], seen[0] + seen[1])
    np.testing.assert_allclose(S['iou'], per_class_iou(seen[0] + seen[1]), equal_nan=True)
    assert f'{S["frames"]} frame(s) visited' in ex.table.value and f'<b>{S["miou"]:.1f}</b>' in ex.table.value


def test_interval_errors_and_factory(bench):
    ex = PseudoLabelExplorer(bench/'r18.pth', _ds(bench), intervals=(1, 2), device='cpu', panel_width=96)
    good = _png(ex)
    ex.interval.value = 2                                       # k = 2 was not generated: an error, not a crash
    assert ex.error is not None and 'error' in ex.status.value and _png(ex) == good
    ex.interval.value = 1
    assert ex.error is None and 'ready' in ex.status.value
    one = PseudoLabelExplorer(ex.net, _ds(bench, k=3), device='cpu', panel_width=96)
    assert one.interval.disabled and one.interval.value == 3    # a single interval: shown, not switchable
    made = []
    fac = PseudoLabelExplorer(ex.net, lambda k: made.append(k) or _ds(bench, k=k), intervals=(3, 1), device='cpu',
                              panel_width=96)
    fac.interval.value = 1
    assert made == [3, 1] and fac.error is None and fac.dataset().interval == 1
    class NoInterval(torch.utils.data.Dataset):
        def __len__(self): return 1
        def __getitem__(self, i): return {}
    with pytest.raises(ValueError, match='interval'):
        PseudoLabelExplorer(ex.net, NoInterval(), intervals=(1, 3), device='cpu')


def test_val_split_subset_and_unlabelled(bench):
    val = _ds(bench, 'val')                                     # built without the teacher frames
    assert not val.teacher
    ex = PseudoLabelExplorer(bench/'r18.pth', torch.utils.data.Subset(val, [0]), device='cpu', panel_width=96)
    assert ex.error is None and ex.current['metrics'] is not None and ex.names == sample_names(val)[:1]
    assert not val.teacher                                      # the user's dataset is left alone
    nolab = PseudoLabelExplorer(ex.net, _ds(bench, with_label=False), device='cpu', panel_width=96)
    assert nolab.error is None and nolab.current['metrics'] is None and 'no ground truth' in nolab.table.value
    assert len(nolab.panels['errors'].value) > 100


def test_from_config_and_display(bench):
    cfg = apply_overrides(get_preset('demo'), {'data.target_root': str(bench/'cityscapes'),
                                               'data.target_flow_root': str(bench/'cityscapes_flow'),
                                               'eval.input_size': '[128, 64]', 'eval.label_size': '[128, 64]'})
    ex = PseudoLabelExplorer.from_config(cfg, bench/'r18.pth', split='val', device='cpu', panel_width=96)
    assert ex.error is None and ex.setting == 'viper' and len(ex.names) == 1
    assert 'application/vnd.jupyter.widget-view+json' in ex.widget._repr_mimebundle_()
    fig = ex.figure()
    assert len(fig.axes) == 12
