"Test frames with a known flow (shared by the flow tests): a random texture, OpenCV remap, and translated/rotated/zoomed pairs."
import cv2
import numpy as np
import torch


def texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    "A random multi-scale RGB texture `H x W x 3` uint8 (something flow estimators can lock onto)."
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.float32)
    for s in (2, 4, 8, 16, 32):
        n = rng.standard_normal((h // s + 2, w // s + 2, 3)).astype(np.float32)
        img += cv2.resize(n, (w, h), interpolation=cv2.INTER_CUBIC) * s ** 0.5
    img = (img - img.mean()) / img.std() * 45 + 128
    return np.clip(img, 0, 255).astype(np.uint8)


def remap(img: np.ndarray, flow: np.ndarray) -> np.ndarray:
    "`out(p) = img(p + flow(p))` for `flow` `(2, H, W)`, bicubic, reflected border (OpenCV, independent of tps.warp)."
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return cv2.remap(img, xx + flow[0].astype(np.float32), yy + flow[1].astype(np.float32),
                     cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)


def synthetic_pair(h: int = 128, w: int = 256, kind: str = 'translation', seed: int = 0):
    "(frame_t, frame_prev, flow_gt) with `frame_t(p) = frame_prev(p + flow_gt(p))`; kinds translation/rotation/zoom."
    prev = texture(h, w, seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    if kind == 'translation': u, v = np.full((h, w), 3.4), np.full((h, w), -2.2)
    elif kind == 'rotation':
        a = np.deg2rad(3.0)
        u = np.cos(a) * (xx - cx) - np.sin(a) * (yy - cy) + cx - xx
        v = np.sin(a) * (xx - cx) + np.cos(a) * (yy - cy) + cy - yy
    elif kind == 'zoom': u, v = 0.05 * (xx - cx), 0.05 * (yy - cy)
    else: raise ValueError(f"unknown kind {kind!r} (expected 'translation', 'rotation' or 'zoom')")
    flow = np.stack([u, v]).astype(np.float32)                      # (2, H, W)
    return remap(prev, flow), prev, torch.from_numpy(flow)
