"The faithful presets' switches each change exactly what they name: optimiser multiplicities, pass order, float histogram matching, augmentation keys, the ImageNet requirement."
from collections import Counter
import numpy as np
import pytest
import torch

from tps.config import apply_overrides, ConfigError
from tps.presets import get_preset, FAITHFUL
from tps.model import TPSNet
from tps.augment import to_input, match_histograms
from tps.steps import StepContext, step_tps, random_batches
from tps.train import build_optimizer, set_lr, train


def test_duplicated_entries_step_n_times():
    "A parameter listed n times in the reference's backbone group moves n times as far on the first SGD step."
    torch.manual_seed(0)
    net = TPSNet('resnet18', 4)
    t = get_preset('viper2city_faithful').train
    opt = build_optimizer(net, t)
    counts = Counter(id(p) for p in opt.param_groups[0]['params'])
    names = {id(p): n for n, p in net.named_parameters()}
    assert counts[id(net.conv1.weight)] == 1 and counts[id(net.layer2[0].downsample[0].weight)] == 4
    assert counts[id(net.layer3[1].conv2.weight)] == 3 and all(names[i].split('.')[0] != 'bn1' for i in counts)
    set_lr(opt, 0, t)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for p in net.parameters():
        if p.requires_grad: p.grad = torch.randn_like(p)
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    opt.step()
    lr, wd = opt.param_groups[0]['lr'], t.weight_decay
    for n, p in net.named_parameters():
        k = counts.get(id(p), 0)
        if not k: continue
        want = before[n].clone()
        for _ in range(k): want = want - lr * (grads[n] + wd * want)      # each entry steps the current value
        assert torch.allclose(p.detach(), want, atol=1e-7), n


@pytest.mark.parametrize('order', ['cf_kf', 'kf_cf'])
def test_pass_order_sets_bn_statistics(order):
    "The two frames update BN's running statistics in the named order (the reference: current frame first)."
    torch.manual_seed(0)
    net = TPSNet('resnet18', 4, pass_order=order).train()
    ref = TPSNet('resnet18', 4).train(); ref.load_state_dict(net.state_dict())
    cf, kf, flow = torch.randn(1, 3, 32, 48), torch.randn(1, 3, 32, 48) * 2 + 1, torch.zeros(1, 2, 32, 48)
    net(cf, kf, flow)
    with torch.no_grad():
        for x in ((cf, kf) if order == 'cf_kf' else (kf, cf)): ref.single(x)
    stats = lambda m: [b.running_mean.clone() for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(stats(net), stats(ref)))
    torch.manual_seed(0); fresh = TPSNet('resnet18', 4, pass_order='kf_cf' if order == 'cf_kf' else 'cf_kf').train()
    fresh(cf, kf, flow)
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(stats(net), stats(fresh)))


def test_float_histogram_matching_is_scikit_image():
    from skimage.exposure import match_histograms as sk
    g = torch.Generator().manual_seed(3)
    src = torch.randint(0, 256, (2, 3, 36, 64), generator=g, dtype=torch.uint8)          # a 'source' size
    ref = (torch.rand(2, 3, 24, 48, generator=g) ** 3 * 255).to(torch.uint8)             # a 'target' size
    ours = match_histograms(src, ref, torch.float32)
    for b in range(2):
        want = sk(src[b].permute(1, 2, 0).numpy().astype(np.float32), ref[b].permute(1, 2, 0).numpy().astype(np.float32),
                  channel_axis=-1)
        assert np.abs(ours[b].permute(1, 2, 0).numpy() - want).max() <= 1e-6
    assert (match_histograms(src, ref).float() - ours).abs().max() <= 0.5 + 1e-4           # uint8: the same, rounded


class _Recorder(torch.nn.Module):
    "Records the frames each forward of the wrapped network receives."
    def __init__(self, net): super().__init__(); self.net, self.calls = net, []
    def forward(self, cf, kf, flow, **kw): self.calls.append((cf.detach().clone(), kf.detach().clone())); return self.net(cf, kf, flow, **kw)


def test_augmentation_keys_reach_the_student():
    "With blur, jitter and grey off and scale 1 the student sees exactly (d, c); with grey at p=1 it sees grey frames."
    cfg = apply_overrides(get_preset('smoke'), {'train.aug_blur_p': 0.0, 'train.aug_jitter_p': 0.0, 'train.aug_gray_p': 0.0,
                                                 'train.aug_scale': [1.0, 1.0]})
    src, tgt = random_batches(cfg)[0]
    torch.manual_seed(0)
    rec = _Recorder(TPSNet('resnet18', 15, bn='frozen'))
    step_tps(StepContext(rec, cfg, torch.Generator().manual_seed(0), torch.device('cpu')), src, tgt)
    cf, kf = rec.calls[-1]                                         # source, teacher, student: the student is last
    assert torch.equal(cf, to_input(tgt['d'])) and torch.equal(kf, to_input(tgt['c']))
    cfg.train.aug_gray_p = 1.0
    rec.calls.clear()
    step_tps(StepContext(rec, cfg, torch.Generator().manual_seed(0), torch.device('cpu')), src, tgt)
    cf, _ = rec.calls[-1]
    rgb = cf - to_input(torch.zeros(1, 3, 1, 1, dtype=torch.uint8))   # add the mean back: all channels equal
    assert torch.allclose(rgb[:, 0], rgb[:, 1], atol=1e-3) and torch.allclose(rgb[:, 1], rgb[:, 2], atol=1e-3)
    cfg.train.aug_scale = (0.5, 0.5)
    rec.calls.clear()
    step_tps(StepContext(rec, cfg, torch.Generator().manual_seed(0), torch.device('cpu')), src, tgt)
    assert rec.calls[-1][0].shape[-2:] == (16, 32)                   # round(32 * 0.5 / 8) * 8, round(64 * 0.5 / 8) * 8


@pytest.mark.parametrize('preset', ['syn2city', 'viper2city', 'syn2city_faithful', 'viper2city_faithful'])
def test_paper_presets_need_the_imagenet_weights(preset, tmp_path):
    cfg = apply_overrides(get_preset(preset), {'train.out_root': str(tmp_path)})
    with pytest.raises(ConfigError, match='DeepLab_resnet_pretrained_imagenet.pth.*model.require_init=false'):
        train(cfg)
    assert not list(tmp_path.iterdir())                               # nothing was created


def test_faithful_keys_are_all_switches():
    "Every faithful behaviour is a config key of its own, and the correct presets leave the reference's numerics off."
    for key, value in FAITHFUL.items():
        assert get_preset('viper2city_faithful').__getattribute__(key.split('.')[0]).__getattribute__(key.split('.')[1]) == value
    c = get_preset('viper2city')
    assert (c.train.legacy_param_groups, c.train.hist_match, c.model.legacy_warp, c.train.legacy_ce, c.data.flow_dtype) == \
           (False, 'uint8', False, False, 'float32')
