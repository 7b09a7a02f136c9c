"tps.viz: palettes match cityscapesscripts, colourising and overlays on numpy and torch input, grids saved as small PNGs."
import numpy as np, pytest, torch
from PIL import Image
from cityscapesscripts.helpers.labels import name2label
from tps.config import CLASS_NAMES
from tps import viz


@pytest.mark.parametrize('setting', ['viper', 'synthia'])
def test_palette_is_cityscapes(setting):
    pal = viz.palette(setting)
    assert pal.dtype == np.uint8 and pal.shape == (len(CLASS_NAMES[setting]), 3)
    for name, col in zip(CLASS_NAMES[setting], pal):
        assert tuple(int(v) for v in col) == name2label[name].color, name


@pytest.mark.parametrize('setting', ['viper', 'synthia'])
def test_colorize_numpy_equals_torch(setting):
    n = len(CLASS_NAMES[setting])
    lab = np.random.default_rng(0).integers(0, n, (17, 23)).astype(np.uint8)
    lab[0] = 255
    a = viz.colorize(lab, setting)
    b = viz.colorize(torch.from_numpy(lab).long()[None], setting)   # (1, H, W) long tensor
    assert a.shape == (17, 23, 3) and (a == b).all()
    assert (a[0] == 0).all()                                            # ignore is black
    assert (a[1:] == viz.palette(setting)[lab[1:]]).all()


def test_overlay_and_error_map():
    img = torch.full((3, 8, 8), 0.5)                                     # float 0..1 CHW
    lab = torch.zeros(16, 16, dtype=torch.long); lab[:8] = 255           # label larger than the image
    o = viz.overlay(img, lab, alpha=0.25)
    assert o.shape == (8, 8, 3) and (o[:4] == 128).all()                 # ignore keeps the image
    assert (o[4:] == np.round(128 * 0.75 + np.array([128, 64, 128]) * 0.25)).all()
    with pytest.raises(ValueError, match='alpha'):
        viz.overlay(img, lab, alpha=2)
    pred = torch.ones(16, 16, dtype=torch.long)
    e = viz.error_map(pred, lab)
    assert (e[8:] == (255, 0, 0)).all() and (e[:8] == 0).all()
    assert viz.error_rate(pred, lab) == 1.0


def test_grid_saved_small(tmp_path):
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 255, (64, 128, 3), dtype=np.uint8)
    gt = rng.integers(0, 12, (64, 128)).astype(np.uint8)
    fig = viz.show_grid([[frame, gt, viz.error_map(gt, gt)], [viz.overlay(frame, gt, 'synthia'), None, rng.random((64, 128))]],
                        titles=['frame', 'label', 'errors'], setting='synthia', legend_setting='synthia', suptitle='t')
    p = viz.save_figure(fig, tmp_path / 'g.png', dpi=60)
    assert sorted(x.name for x in tmp_path.iterdir()) == ['g.png']
    w, h = Image.open(p).size
    assert 200 < w < 1000 and p.stat().st_size < 200_000
    q = viz.save_figure(fig, tmp_path / 'q.png', dpi=60, max_colors=64)
    assert q.stat().st_size < p.stat().st_size


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match='synthia'):
        viz.colorize(np.array([[13]]), 'synthia')
    with pytest.raises(ValueError, match='unknown setting'):
        viz.palette('cityscapes19')
    with pytest.raises(ValueError, match=r'\(H, W\)'):
        viz.colorize(np.zeros((2, 3, 4, 5)))
