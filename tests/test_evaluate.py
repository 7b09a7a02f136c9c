"Evaluation: the kit's per-class IoUs equal cityscapesscripts' pixel-level evaluation; the table; the sweep cache."
import json
import numpy as np
import pytest
import torch
from PIL import Image

from tps.config import CLASS_NAMES
from tps.presets import get_preset
from tps.evaluate import (confusion_matrix, per_class_iou, mean_iou, train_to_label_ids, results_table,
                          write_table, evaluate_run)


def _cityscapes_eval(pairs):
    "Per-label-id IoU from cityscapesscripts, driving its functions directly (no CITYSCAPES_DATASET needed)."
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as ev
    args = ev.args
    args.evalInstLevelScore, args.evalPixelAccuracy, args.quiet = False, False, True
    cm = ev.generateMatrix(args)
    for pred, gt in pairs: ev.evaluatePair(str(pred), str(gt), cm, {}, {}, args)
    return lambda label_id: ev.getIouScoreForLabel(label_id, cm, args)


@pytest.mark.parametrize('setting', ['synthia', 'viper'])
def test_matches_cityscapesscripts(tmp_path, setting):
    from cityscapesscripts.helpers.labels import labels
    from tps.data.core import CITYSCAPES_TO_TRAIN, make_lut
    C = len(CLASS_NAMES[setting])
    t2l = train_to_label_ids(setting)
    lut = make_lut(CITYSCAPES_TO_TRAIN[setting])
    ignored = [l.id for l in labels if l.ignoreInEval and l.id >= 0]
    # ground truth uses the setting's label ids and ignored ids only: ids the kit ignores but Cityscapes scores
    # (e.g. wall, or rider merged into person in the VIPER setting) would be counted differently by design
    used = [int(t2l[i]) for i in range(C)]
    rng = np.random.default_rng(0)
    pairs, cm = [], torch.zeros(C, C, dtype=torch.long)
    for k in range(4):
        city = tmp_path/'gtFine'/'val'/'frankfurt'; city.mkdir(parents=True, exist_ok=True)
        H, W = 48, 80
        ids = used[:-2] if k == 0 else used  # one frame without the last classes
        gt = rng.choice(ids + ignored, size=(H, W)).astype(np.uint8)
        gt[:10] = rng.choice(ids[:3])          # some structure: a band of one class
        gt_train = lut[gt]                      # the kit's loader mapping: label id -> train id / 255
        pred_train = np.where(rng.random((H, W)) < 0.6, np.where(gt_train < C, gt_train, 0),
                              rng.integers(0, C - 1, size=(H, W))).astype(np.uint8)  # class C-1 never predicted
        gt_path = city/f'frankfurt_000000_{k:06d}_gtFine_labelIds.png'
        pred_path = tmp_path/'results'/f'frankfurt_000000_{k:06d}_pred.png'; pred_path.parent.mkdir(exist_ok=True)
        Image.fromarray(gt).save(gt_path)
        Image.fromarray(t2l[pred_train]).save(pred_path)
        pairs.append((pred_path, gt_path))
        cm += confusion_matrix(torch.from_numpy(pred_train), torch.from_numpy(gt_train), C)
    ref = _cityscapes_eval(pairs)
    ours = per_class_iou(cm)
    theirs = np.array([ref(int(t2l[i])) for i in range(C)])
    assert np.allclose(ours, theirs, equal_nan=True), (ours, theirs)
    assert not np.isnan(ours).any() and (ours > 0).all()
    drop = ['fence'] if setting == 'synthia' else []
    keep = [i for i, n in enumerate(CLASS_NAMES[setting]) if n not in drop]
    assert mean_iou(cm, drop, CLASS_NAMES[setting]) == round(float(np.mean(theirs[keep])) * 100, 2)


def test_confusion_matrix_device_and_ignore():
    pred = torch.tensor([0, 1, 2, 2, 1])
    label = torch.tensor([0, 1, 255, 7, -1])  # only labels in [0, C) count
    cm = confusion_matrix(pred, label, 3)
    assert cm.dtype == torch.long and cm.sum() == 2 and cm[0, 0] == 1 and cm[1, 1] == 1


def test_results_table_and_files(tmp_path):
    names = CLASS_NAMES['synthia']
    r = {'classes': names, 'drop': ['fence'], 'iou': {n: float(i) for i, n in enumerate(names)}, 'miou': 12.34}
    md = results_table([('Source-only', r), ('TPS', r)])
    head = md.splitlines()[0]
    assert 'fence' not in head and head.endswith('| mIoU |') and head.count('|') == 11 + 3
    assert md.splitlines()[2].startswith('| Source-only | 0.0 | 1.0 | 2.0 | 4.0')
    md_path, csv_path = write_table([('TPS', r)], tmp_path/'results')
    assert md_path.read_text().startswith('| method') and csv_path.read_text().splitlines()[1].endswith(',12.34')


def test_sweep_uses_cache(tmp_path, monkeypatch):
    "A rerun of the best-snapshot sweep evaluates only snapshots it has not seen; best = max mIoU."
    import tps.evaluate as E
    from tps.runs import checkpoint_path, save_checkpoint
    cfg = get_preset('demo')
    for i in (100, 200): save_checkpoint(checkpoint_path(tmp_path, i), {'model': {}, 'optimizer': {}, 'iter': i})
    calls = []
    def fake(cfg, ck, split=None, **kw):
        calls.append(ck.name); it = int(ck.stem.split('_')[1])
        return {'iter': it, 'miou': {100: 30.0, 200: 50.0, 300: 40.0}[it], 'iou': {}, 'n_frames': 1, 'split': split,
                'classes': cfg.class_names, 'drop': []}
    monkeypatch.setattr(E, 'evaluate', fake)
    r = evaluate_run(cfg, tmp_path, progress=False)
    assert calls == ['iter_0000100.pth', 'iter_0000200.pth'] and r['best']['iter'] == 200
    save_checkpoint(checkpoint_path(tmp_path, 300), {'model': {}, 'optimizer': {}, 'iter': 300})
    r = evaluate_run(cfg, tmp_path, progress=False)
    assert calls[2:] == ['iter_0000300.pth'] and r['best']['iter'] == 200 and len(r['snapshots']) == 3
    # watch mode: no done.json and nothing new -> returns after the timeout, flagged
    r = evaluate_run(cfg, tmp_path, watch=True, timeout=0.2, poll=0.1, progress=False)
    assert r['timed_out'] and calls[3:] == []
    (tmp_path/'done.json').write_text('{}')
    assert not evaluate_run(cfg, tmp_path, watch=True, timeout=5, poll=0.1, progress=False)['timed_out']


def test_evaluate_protocols_on_smoke_run(smoke_config, tmp_path):
    "One checkpoint on val; honest protocol (select on held-out train frames, report val); eval during training keeps the best."
    from tps.evaluate import evaluate, checkpoint_evaluator
    from tps.data.build import build_target
    from tps.runs import make_run_dir, list_checkpoints
    from tps.train import train
    cfg = smoke_config('source_only', iters=3, save_every=1, keep_last=1)
    cfg.eval.holdout = 2
    run = make_run_dir(cfg)
    train(cfg, run_dir=run, on_checkpoint=checkpoint_evaluator(cfg, run, every=1))
    best = json.loads((run/'best.json').read_text())
    kept = [p.name for p in list_checkpoints(run)]
    assert best['split'] == 'holdout' and best['checkpoint'] in kept and 'iter_0000003.pth' in kept and len(kept) <= 2
    assert len((run/'eval.jsonl').read_text().splitlines()) == 3
    r = evaluate(cfg, run/'checkpoints'/'iter_0000003.pth', save_predictions=1, out_dir=tmp_path/'ev', progress=False)
    val = build_target(cfg, 'val', teacher=False)
    n_labelled = sum(int((val[i]['label'] < 15).sum()) for i in range(len(val)))
    assert r['split'] == 'val' and r['n_frames'] == len(val) and r['iter'] == 3 and len(r['iou']) == 15
    assert np.array(r['confusion']).sum() == n_labelled > 0
    assert len(list((tmp_path/'ev'/'predictions').glob('*.png'))) == 2      # colour + label ids of one frame
    s = evaluate_run(cfg, run, progress=False)
    assert s['selected_on'] == 'holdout' and s['report']['split'] == 'val' and s['report']['n_frames'] == len(val)
    assert all(v['split'] == 'holdout' and v['n_frames'] == 2 for v in s['snapshots'].values())


def test_rewritten_checkpoint_is_evaluated_again(tmp_path, monkeypatch):
    "The sweep's cache is keyed by the checkpoint's content (size, mtime), not its name: a rewritten file is re-evaluated."
    import os, tps.evaluate as E
    from tps.runs import checkpoint_path, save_checkpoint
    cfg = get_preset('demo')
    p = save_checkpoint(checkpoint_path(tmp_path, 100), {'model': {}, 'optimizer': {}, 'iter': 100})
    scores = iter([10.0, 20.0])
    monkeypatch.setattr(E, 'evaluate', lambda cfg, ck, split=None, **kw: {'iter': 100, 'miou': next(scores), 'iou': {},
                        'n_frames': 1, 'split': split, 'classes': cfg.class_names, 'drop': []})
    assert evaluate_run(cfg, tmp_path, progress=False)['best']['miou'] == 10.0
    save_checkpoint(p, {'model': {}, 'optimizer': {}, 'iter': 100, 'other': 'run'})
    os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))
    assert evaluate_run(cfg, tmp_path, progress=False)['best']['miou'] == 20.0
