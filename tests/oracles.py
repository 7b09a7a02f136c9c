"""Plain reference implementations the tests (and the notebooks' test cells) compare the kit's fast paths against.
They are yardsticks, not part of the package: `from oracles import ...` in tests, `tests/oracles.py` from a notebook."""
import torch
import torch.nn.functional as F
from tps.augment import scaled_size

JITTER_NAMES = {0: 'brightness', 1: 'contrast', 2: 'saturation', 3: 'hue'}
"Draw order codes of the colour jitter (`tps.augment.draw_aug_params`) and torchvision's `adjust_*` they call."


def legacy_augment_reference(d_in: torch.Tensor, c_in: torch.Tensor, params: dict, rescale: bool = True):
    "The reference's strong augmentation with torchvision transforms on the CPU, for normalised inputs (B,3,H,W)."
    import torchvision.transforms.functional as TVF
    from PIL import ImageFilter
    outs = []
    for i in range(d_in.shape[0]):
        cat = torch.cat((d_in[i:i + 1].cpu(), c_in[i:i + 1].cpu()), 2)  # (1, 3, 2H, W), as the reference
        img = TVF.to_pil_image(torch.squeeze(cat))
        if params['blur'][i]: img = img.filter(ImageFilter.GaussianBlur(radius=params['radius'][i]))
        if params['jitter'][i]:
            for f in params['order'][i]:
                name = JITTER_NAMES[f]
                img = getattr(TVF, f'adjust_{name}')(img, params[name][i])
        if params['gray'][i]: img = TVF.rgb_to_grayscale(img, num_output_channels=3)
        outs.append(TVF.to_tensor(img)[None])
    st = torch.cat(outs)  # (B, 3, 2H, W)
    H, W = d_in.shape[2:]
    d, c = st[:, :, :H], st[:, :, H:]
    if rescale:
        size = scaled_size(H, W, params['scale'])
        d = F.interpolate(d, size=size, mode='bilinear', align_corners=True)
        c = F.interpolate(c, size=size, mode='bilinear', align_corners=True)
    return d, c
