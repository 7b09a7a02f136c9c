"The two-frame ACCEL DeepLab-v2 model: architecture against the method notes (nbs/method.ipynb, the model), fusion, gradients, loaders, bf16/compile."
import copy
import pytest
import torch
import torch.nn as nn
import torchvision
from tps.config import ModelConfig
from tps.model import (TPSNet, FusionOutput, build_model, param_groups, load_checkpoint, load_imagenet_init,
                       load_torchvision_resnet, load_init, CheckpointError, score_size)

BLOCKS = {'resnet101': (3, 4, 23, 3), 'resnet50': (3, 4, 6, 3)}

# ---------------------------------------------------------------- the architecture, written out from the method notes (nbs/method.ipynb)
def spec_keys(num_classes=15, blocks=(3, 4, 23, 3), multi_level=True) -> dict:
    "Reference state-dict keys and shapes of the Bottleneck ACCEL DeepLab-v2, built from the description alone."
    C, sd = num_classes, {}
    def bn(p, c):
        sd.update({f'{p}.weight': (c,), f'{p}.bias': (c,), f'{p}.running_mean': (c,), f'{p}.running_var': (c,),
                   f'{p}.num_batches_tracked': ()})
    sd['conv1.weight'] = (64, 3, 7, 7); bn('bn1', 64)
    inp = 64
    for li, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks), 1):
        for b in range(n):
            p = f'layer{li}.{b}'
            sd[f'{p}.conv1.weight'] = (planes, inp, 1, 1); bn(f'{p}.bn1', planes)
            sd[f'{p}.conv2.weight'] = (planes, planes, 3, 3); bn(f'{p}.bn2', planes)
            sd[f'{p}.conv3.weight'] = (4 * planes, planes, 1, 1); bn(f'{p}.bn3', 4 * planes)
            if b == 0:  # every first block: stride 2, channel change, or dilation 2/4
                sd[f'{p}.downsample.0.weight'] = (4 * planes, inp, 1, 1); bn(f'{p}.downsample.1', 4 * planes)
            inp = 4 * planes
    for head, cin in (('layer5', 1024), ('layer6', 2048)):
        if head == 'layer5' and not multi_level: continue
        for i in range(4):
            sd[f'{head}.conv2d_list.{i}.weight'] = (C, cin, 3, 3); sd[f'{head}.conv2d_list.{i}.bias'] = (C,)
    sd['sf_layer.weight'] = (C, 2 * C, 1, 1)
    return sd

def expected_params(num_classes, blocks=(3, 4, 23, 3)) -> int:
    "Parameter count by arithmetic: convs (+bias in heads), 2 per BN channel, fusion 2C*C."
    C = num_classes
    n = 3 * 64 * 49 + 2 * 64
    inp = 64
    for planes, nb in zip((64, 128, 256, 512), blocks):
        for b in range(nb):
            n += inp * planes + 2 * planes + planes * planes * 9 + 2 * planes + planes * 4 * planes + 2 * 4 * planes
            if b == 0: n += inp * 4 * planes + 2 * 4 * planes
            inp = 4 * planes
    n += 4 * (1024 * C * 9 + C) + 4 * (2048 * C * 9 + C) + 2 * C * C
    return n

@pytest.mark.parametrize('C', [15, 12])
def test_param_count_and_keys_r101(C):
    net = TPSNet('resnet101', C)
    assert sum(p.numel() for p in net.parameters()) == expected_params(C)
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == spec_keys(C)
    # torchvision's ResNet-101 without fc has the same backbone size
    tv = torchvision.models.resnet101(weights=None)
    assert expected_params(C) - (4 * 3072 * C * 9 + 8 * C + 2 * C * C) == sum(p.numel() for p in tv.parameters()) - 2048 * 1000 - 1000

def test_keys_r50_and_single_level():
    assert {k: tuple(v.shape) for k, v in TPSNet('resnet50', 12, multi_level=False).state_dict().items()} == \
        spec_keys(12, BLOCKS['resnet50'], multi_level=False)

def test_architecture_details():
    net = TPSNet('resnet101', 15)
    assert net.maxpool.ceil_mode and net.maxpool.kernel_size == 3 and net.maxpool.stride == 2 and net.maxpool.padding == 1
    assert net.conv1.stride == (2, 2) and net.conv1.bias is None
    assert net.layer2[0].conv1.stride == (2, 2) and net.layer2[0].conv2.stride == (1, 1)  # stride in the 1x1 conv
    for layer, d in ((net.layer3, 2), (net.layer4, 4)):
        assert all(b.conv2.dilation == (d, d) and b.conv2.padding == (d, d) and b.conv1.stride == (1, 1) for b in layer)
    for h in (net.layer5, net.layer6):
        assert [c.dilation[0] for c in h.conv2d_list] == [6, 12, 18, 24] and all(c.bias is not None for c in h.conv2d_list)
        assert all(abs(c.weight.std().item() - 0.01) < 1e-3 for c in h.conv2d_list)
    assert net.sf_layer.bias is None and net.sf_layer.kernel_size == (1, 1)
    assert all(not p.requires_grad for m in net.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())

# ---------------------------------------------------------------- shapes
@pytest.mark.slow   # the paper's ResNet-101 at full resolution
def test_shape_r101_1024x512():
    torch.manual_seed(0)
    net = TPSNet('resnet101', 15).eval()
    with torch.no_grad():
        aux, main = net.single(torch.randn(1, 3, 512, 1024))
    assert aux.shape == main.shape == (1, 15, 65, 129) and torch.isfinite(main).all()

def test_shape_r101_1280x720_meta():
    "The full two-frame forward of the paper's network at VIPER size, shapes only (meta tensors)."
    with torch.device('meta'):
        net = TPSNet('resnet101', 12)
        aux, main = net.single(torch.empty(2, 3, 720, 1280))
        out = net(torch.empty(1, 3, 720, 1280), torch.empty(1, 3, 720, 1280), torch.empty(1, 2, 576, 1024))  # VIPER flows: 1024x576
    assert aux.shape == main.shape == (2, 12, 91, 161)
    assert all(t.shape == (1, 12, 91, 161) for t in out)
    assert score_size(720, 1280) == (91, 161) and score_size(512, 1024) == (65, 129)

# ---------------------------------------------------------------- fusion and gradients
@pytest.fixture
def r18():
    torch.manual_seed(0)
    return TPSNet('resnet18', 6)

def test_fusion_identity_at_init(r18):
    cf, kf = torch.randn(2, 2, 3, 80, 112).unbind(0)
    out = r18.train()(cf, kf, torch.randn(2, 2, 40, 56) * 4)
    assert torch.allclose(out.fused_main, out.cf_main, atol=1e-6) and torch.allclose(out.fused_aux, out.cf_aux, atol=1e-6)

def test_zero_flow_identical_frames(r18):
    r18.eval()
    with torch.no_grad():
        r18.sf_layer.weight.normal_()
        C = 6
        r18.sf_layer.weight[:, C:] = torch.eye(C).view(C, C, 1, 1) - r18.sf_layer.weight[:, :C]  # halves sum to I
        x = torch.randn(1, 3, 64, 96)
        out = r18(x, x.clone(), torch.zeros(1, 2, 32, 48))
    assert torch.equal(out.kf_main, out.cf_main)
    assert torch.allclose(out.fused_main, out.cf_main, atol=1e-4) and torch.allclose(out.fused_aux, out.cf_aux, atol=1e-4)

def test_no_gradient_to_key_frame(r18):
    r18.train()
    cf = torch.randn(1, 3, 64, 96, requires_grad=True)
    kf = torch.randn(1, 3, 64, 96, requires_grad=True)
    flow = torch.randn(1, 2, 32, 48)
    out = r18(cf, kf, flow)
    assert out.kf_main.grad_fn is None and out.kf_aux.grad_fn is None and not out.kf_main.requires_grad
    (out.fused_main.sum() + out.fused_aux.sum()).backward()
    assert kf.grad is None and cf.grad is not None and r18.conv1.weight.grad.abs().sum() > 0
    # backbone gradients come from the cf pass alone: the same as with precomputed (constant) kf scores
    g1 = {n: p.grad.clone() for n, p in r18.named_parameters() if p.grad is not None}
    r2 = copy.deepcopy(r18); r2.zero_grad()
    out2 = r2(cf.detach(), None, flow, kf_scores=(out.kf_aux, out.kf_main))
    # BN running stats moved once more in r18's first call than in r2's second; batch statistics are what count
    (out2.fused_main.sum() + out2.fused_aux.sum()).backward()
    for n, p in r2.named_parameters():
        if n in g1: assert torch.allclose(p.grad, g1[n], rtol=1e-4, atol=1e-6), n

def test_kf_scores_reuse_is_detached(r18):
    a, m = torch.randn(2, 1, 6, 9, 13, requires_grad=True).unbind(0)
    out = r18(torch.randn(1, 3, 64, 96), None, torch.zeros(1, 2, 9, 13), kf_scores=(a, m))
    out.fused_main.sum().backward()
    assert not out.kf_main.requires_grad
    with pytest.raises(ValueError, match='kf'): r18(torch.randn(1, 3, 64, 96), None, torch.zeros(1, 2, 9, 13))

def test_bn_modes():
    x = torch.randn(2, 3, 48, 48)
    leg = TPSNet('resnet18', 4).train(); before = leg.bn1.running_mean.clone()
    leg.single(x); assert not torch.equal(before, leg.bn1.running_mean)  # batch statistics, running stats updated
    fr = TPSNet('resnet18', 4, bn='frozen').train(); before = fr.bn1.running_mean.clone()
    fr.single(x); assert torch.equal(before, fr.bn1.running_mean)
    assert not any(m.training for m in fr.modules() if isinstance(m, nn.BatchNorm2d)) and fr.training

def test_param_groups():
    net = TPSNet('resnet50', 12)
    g = param_groups(net, 2.5e-4)
    assert [x['name'] for x in g] == ['backbone', 'fusion', 'heads'] and [x['lr_mult'] for x in g] == [1, 1, 10]
    assert g[0]['lr'] == 2.5e-4 and g[2]['lr'] == pytest.approx(2.5e-3)
    ids = lambda ps: {id(p) for p in ps}
    assert ids(g[1]['params']) == {id(net.sf_layer.weight)}
    assert ids(g[2]['params']) == ids(list(net.layer5.parameters()) + list(net.layer6.parameters()))
    assert ids(g[0]['params']) == {id(p) for n, p in net.named_parameters() if p.requires_grad and n.split('.')[0].startswith(('conv1', 'layer1', 'layer2', 'layer3', 'layer4'))}
    assert sum(len(x['params']) for x in g) == sum(p.requires_grad for p in net.parameters())
    torch.optim.SGD(g, lr=2.5e-4, momentum=0.9, weight_decay=5e-4)

# ---------------------------------------------------------------- loaders
def same(a: nn.Module, b: nn.Module, prefix=('',)):
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if k.startswith(prefix))

def test_checkpoint_roundtrip_strict(tmp_path):
    src = TPSNet('resnet50', 12); p = tmp_path/'tps_syn2city.pth'
    torch.save(src.state_dict(), p)
    dst = TPSNet('resnet50', 12); r = load_checkpoint(dst, p)
    assert same(src, dst) and r['missing'] == [] and r['kind'] == 'a checkpoint'
    dst.load_state_dict(torch.load(p), strict=True)  # a file from our own state_dict loads strictly with plain torch too
    torch.save({'state_dict': {'module.' + k: v for k, v in src.state_dict().items()}}, tmp_path/'ddp.pth')
    d = TPSNet('resnet50', 12); load_checkpoint(d, tmp_path/'ddp.pth'); assert same(src, d)
    old = {k: v for k, v in src.state_dict().items() if not k.endswith('num_batches_tracked')}  # older torch
    torch.save({'model': old, 'iter': 100, 'config': {'a': 1}}, tmp_path/'old.pth')
    d = TPSNet('resnet50', 12); r = load_checkpoint(d, tmp_path/'old.pth')
    assert r['missing'] == [] and same(src, d)

def test_checkpoint_errors(tmp_path):
    src = TPSNet('resnet50', 12); torch.save(src.state_dict(), tmp_path/'c12.pth')
    with pytest.raises(CheckpointError, match=r'layer6\.conv2d_list\.0\.weight \(12, 2048, 3, 3\) vs model \(15, 2048, 3, 3\)') as e:
        load_checkpoint(TPSNet('resnet50', 15, multi_level=False), tmp_path/'c12.pth')
    assert 'c12.pth' in str(e.value) and '12 classes, the model 15' in str(e.value) and 'layer5' in str(e.value)
    with pytest.raises(CheckpointError, match=r'model keys missing from the file \d+: layer3\.6\.'):
        load_checkpoint(TPSNet('resnet101', 12), tmp_path/'c12.pth')  # R50 file into R101
    part = {k: v for k, v in src.state_dict().items() if not k.startswith('sf_layer')}
    torch.save(part, tmp_path/'nofuse.pth')
    with pytest.raises(CheckpointError, match='sf_layer.weight'): load_checkpoint(TPSNet('resnet50', 12), tmp_path/'nofuse.pth')
    with pytest.raises(FileNotFoundError, match='missing.pth'): load_checkpoint(src, tmp_path/'missing.pth')
    (tmp_path/'junk.pth').write_bytes(b'\x00garbage' * 10)
    with pytest.raises(CheckpointError, match='junk.pth'): load_checkpoint(src, tmp_path/'junk.pth')
    torch.save([1, 2], tmp_path/'list.pth')
    with pytest.raises(CheckpointError, match='expected a state dict'): load_checkpoint(src, tmp_path/'list.pth')

def test_imagenet_init(tmp_path):
    src = TPSNet('resnet101', 21)  # a DeepLab-style file: backbone + a 21-class layer5, keys prefixed 'Scale.'
    sd = {'Scale.' + k: v for k, v in src.state_dict().items()
          if k.split('.')[0] not in ('layer6', 'sf_layer') and not k.endswith('num_batches_tracked')}
    torch.save(sd, tmp_path/'DeepLab_resnet_pretrained_imagenet.pth')
    net = TPSNet('resnet101', 15); head = net.layer6.conv2d_list[0].weight.clone()
    r = load_imagenet_init(net, tmp_path/'DeepLab_resnet_pretrained_imagenet.pth')
    assert sorted(r['skipped']) == sorted(k for k in sd if k.startswith('Scale.layer5')) and len(r['skipped']) == 8
    assert set(r['missing']) == {k for k in net.state_dict() if k.split('.')[0] in ('layer5', 'layer6', 'sf_layer')}
    assert same(src, net, ('conv1', 'bn1', 'layer1', 'layer2', 'layer3', 'layer4'))
    assert torch.equal(net.layer6.conv2d_list[0].weight, head)  # heads keep their init
    assert build_model(ModelConfig(arch='resnet101', num_classes=15, init=str(tmp_path/'DeepLab_resnet_pretrained_imagenet.pth'))).conv1.weight.equal(src.conv1.weight)
    with pytest.raises(CheckpointError, match="no 'Scale.'-prefixed keys"):
        load_imagenet_init(net, {k[6:]: v for k, v in sd.items()})
    with pytest.raises(CheckpointError, match='keys not in the model'):
        load_imagenet_init(TPSNet('resnet50', 15), tmp_path/'DeepLab_resnet_pretrained_imagenet.pth')
    with pytest.raises(FileNotFoundError, match='DeepLab_resnet_pretrained_imagenet.pth'):
        load_imagenet_init(net, tmp_path/'x'/'DeepLab_resnet_pretrained_imagenet.pth')

@pytest.mark.parametrize('arch', ['resnet101', 'resnet18'])
def test_torchvision_resnet(tmp_path, arch):
    tv = getattr(torchvision.models, arch)(weights=None); p = tmp_path/f'{arch}-tv.pth'
    torch.save(tv.state_dict(), p)
    net = TPSNet(arch, 15); r = load_torchvision_resnet(net, p)
    assert r['skipped'] == ['fc.bias', 'fc.weight']
    assert set(r['missing']) == {k for k in net.state_dict() if k.split('.')[0] in ('layer5', 'layer6', 'sf_layer')}
    tsd = tv.state_dict()
    assert all(torch.equal(v, tsd[k]) for k, v in net.state_dict().items() if k in tsd)
    assert load_init(TPSNet(arch, 15), p)['kind'] == 'torchvision ResNet weights'

def test_torchvision_wrong_depth(tmp_path):
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path/'r50.pth')
    with pytest.raises(CheckpointError, match='r50.pth') as e: load_torchvision_resnet(TPSNet('resnet101', 15), tmp_path/'r50.pth')
    assert 'missing from the file' in str(e.value)
    with pytest.raises(CheckpointError, match=r'shape mismatches'): load_torchvision_resnet(TPSNet('resnet18', 15), tmp_path/'r50.pth')

def test_build_model_checkpoint_and_channels_last(tmp_path):
    src = TPSNet('resnet18', 12, flow_scale='per_axis'); torch.save({'model': src.state_dict()}, tmp_path/'ck.pth')
    cfg = ModelConfig(arch='resnet18', num_classes=12, flow_scale='per_axis', init=str(tmp_path/'ck.pth'), channels_last=True)
    net = build_model(cfg)
    assert same(src, net) and net.flow_scale == 'per_axis' and net.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(FileNotFoundError, match='nothere'): build_model(ModelConfig(arch='resnet18', init=str(tmp_path/'nothere.pth')))

# ---------------------------------------------------------------- precision, memory format, compile
def test_bf16_autocast_channels_last():
    torch.manual_seed(0)
    net = TPSNet('resnet18', 5).eval()
    cf, kf = torch.randn(2, 1, 3, 64, 96).unbind(0)
    flow = torch.randn(1, 2, 32, 48)
    with torch.no_grad():
        ref = net(cf, kf, flow)
        net = net.to(memory_format=torch.channels_last)
        cl = net(cf.contiguous(memory_format=torch.channels_last), kf.contiguous(memory_format=torch.channels_last), flow)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            lo = net(cf, kf, flow)
    for a, b in zip(ref, cl): assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    assert lo.fused_main.dtype == torch.bfloat16 and torch.isfinite(lo.fused_main.float()).all()
    rel = (lo.cf_main.float() - ref.cf_main).norm() / ref.cf_main.norm()
    assert rel < 0.1, rel
    # training step under autocast
    net.train()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = net(cf, kf, flow)
    out.fused_main.float().mean().backward()
    assert net.layer6.conv2d_list[0].weight.grad is not None

@pytest.mark.slow   # torch.compile on a CPU: minutes
@pytest.mark.timeout(300)
def test_torch_compile_cpu():
    torch.manual_seed(0)
    net = TPSNet('resnet18', 4).eval()
    cf, kf = torch.randn(2, 1, 3, 64, 64).unbind(0)
    flow = torch.randn(1, 2, 64, 64)
    with torch.no_grad():
        ref = net(cf, kf, flow)
        out = torch.compile(net)(cf, kf, flow)
    assert isinstance(out, FusionOutput)
    for a, b in zip(ref, out): assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
