"""The Mask2Former .pkl / PSALM checkpoint maps, checked against a direct reference.

The fixture state dicts are written here from the published architecture (detectron2's
Mask2Former: D2SwinTransformer, MSDeformAttnPixelDecoder, MultiScaleMaskedTransformerDecoder;
PSALM's Mask2Former_Simplify pixel decoder), with names and shapes of those modules, not
through the map under test. The reference forward passes read that layout directly:
window attention with relative position bias, shifted windows with the cyclic-shift mask,
padding to the window, patch merging; the MSDeformAttn encoder with grid_sample sampling,
the sine position encoding, the FPN level and the 1x1 mask-feature conv.

Sources (read from these commits): facebookresearch/Mask2Former (commit 9b0651c)
mask2former/modeling/backbone/swin.py L74-L171 (WindowAttention), L174-L295 (block),
L298-L337 (PatchMerging), L687-L770 (D2SwinTransformer);
mask2former/modeling/pixel_decoder/msdeformattn.py L165-L358 (MSDeformAttnPixelDecoder);
mask2former/modeling/transformer_decoder/mask2former_transformer_decoder.py L208-L461;
zamling/PSALM (commit d5dbfda)
psalm/model/mask_decoder/Mask2Former_Simplify/modeling/pixel_decoder/msdeformattn.py L166-L315.
"""

from __future__ import annotations

import math
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskloop.model.checkpoints import CheckpointError
from maskloop.model.psalm.checkpoints import (
    PickleRefused,
    load_detectron2_pkl,
    load_mm_projector,
    load_psalm_checkpoint,
    native_to_detectron2,
    read_detectron2_pkl,
    write_detectron2_pkl,
)
from maskloop.model.psalm.model import PSALMModel, psalm_config

# reduced Swin: 2 blocks per stage (the second one shifted), window 3 so that every stage pads
EMBED, DEPTHS, HEADS, WIN, IMG = 16, (2, 2, 2, 2), (1, 2, 2, 4), 3, 64
CONV, ENC, DEC, NQ, NCLS, ENC_FFN, DEC_FFN, PD_HEADS = 32, 2, 3, 6, 5, 48, 64, 2


def _config(fpn_style="detectron2", **kw):
    return psalm_config("psalm-tiny", image_size=IMG, swin_embed_dim=EMBED, swin_depths=DEPTHS, swin_heads=HEADS,
                        swin_window=WIN, mask_hidden=CONV, enc_layers=ENC, dec_layers=DEC, num_queries=NQ,
                        mask_ffn=DEC_FFN, enc_ffn=ENC_FFN, mask_heads=PD_HEADS, fpn_style=fpn_style, **kw)


def _rel_index(w):
    ys, xs = np.meshgrid(np.arange(w), np.arange(w), indexing="ij")
    c = np.stack([ys.ravel(), xs.ravel()])  # (2, w*w)
    d = c[:, :, None] - c[:, None, :] + (w - 1)
    return torch.from_numpy(d[0] * (2 * w - 1) + d[1]).long()


def d2_state(seed=0, n_queries=NQ, psalm=False):
    """A detectron2 Mask2Former state dict (or PSALM's names when ``psalm``), random values."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.2):
        return torch.randn(*shape, generator=g) * s

    def ln(d):
        return {"weight": 1 + r(d, s=0.1), "bias": r(d, s=0.1)}

    sd = {}
    B = "model.vision_tower." if psalm else "backbone."
    sd[B + "patch_embed.proj.weight"], sd[B + "patch_embed.proj.bias"] = r(EMBED, 3, 4, 4), r(EMBED)
    sd.update({B + f"patch_embed.norm.{k}": v for k, v in ln(EMBED).items()})
    for i, (depth, nh) in enumerate(zip(DEPTHS, HEADS)):
        d = EMBED * 2**i
        for j in range(depth):
            p = f"{B}layers.{i}.blocks.{j}."
            sd.update({p + f"norm1.{k}": v for k, v in ln(d).items()})
            sd.update({p + f"norm2.{k}": v for k, v in ln(d).items()})
            sd[p + "attn.relative_position_bias_table"] = r((2 * WIN - 1) ** 2, nh, s=0.5)
            sd[p + "attn.relative_position_index"] = _rel_index(WIN)
            sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"] = r(3 * d, d), r(3 * d)
            sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"] = r(d, d), r(d)
            sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = r(4 * d, d), r(4 * d)
            sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = r(d, 4 * d), r(d)
        if i < 3:
            sd[f"{B}layers.{i}.downsample.reduction.weight"] = r(2 * d, 4 * d)
            sd.update({f"{B}layers.{i}.downsample.norm.{k}": v for k, v in ln(4 * d).items()})
        sd.update({f"{B}norm{i}.{k}": v for k, v in ln(d).items()})
    P = "pixel_decoder." if psalm else "sem_seg_head.pixel_decoder."
    chans = [EMBED * 2**i for i in range(4)]
    for lvl, ch in enumerate(chans[1:][::-1]):  # res5, res4, res3
        sd[f"{P}input_proj.{lvl}.0.weight"], sd[f"{P}input_proj.{lvl}.0.bias"] = r(CONV, ch, 1, 1), r(CONV)
        sd.update({f"{P}input_proj.{lvl}.1.{k}": v for k, v in ln(CONV).items()})
    sd[P + "transformer.level_embed"] = r(3, CONV)
    for i in range(ENC):
        p = f"{P}transformer.encoder.layers.{i}."
        sd[p + "self_attn.sampling_offsets.weight"] = r(PD_HEADS * 3 * 4 * 2, CONV, s=0.05)
        sd[p + "self_attn.sampling_offsets.bias"] = r(PD_HEADS * 3 * 4 * 2, s=1.0)
        sd[p + "self_attn.attention_weights.weight"] = r(PD_HEADS * 3 * 4, CONV)
        sd[p + "self_attn.attention_weights.bias"] = r(PD_HEADS * 3 * 4)
        for m in ("value_proj", "output_proj"):
            sd[p + f"self_attn.{m}.weight"], sd[p + f"self_attn.{m}.bias"] = r(CONV, CONV), r(CONV)
        sd[p + "linear1.weight"], sd[p + "linear1.bias"] = r(ENC_FFN, CONV), r(ENC_FFN)
        sd[p + "linear2.weight"], sd[p + "linear2.bias"] = r(CONV, ENC_FFN), r(CONV)
        sd.update({p + f"norm1.{k}": v for k, v in ln(CONV).items()})
        sd.update({p + f"norm2.{k}": v for k, v in ln(CONV).items()})
    sd[P + "mask_features.weight"], sd[P + "mask_features.bias"] = r(CONV, CONV, 1, 1), r(CONV)
    if psalm:  # Mask2Former_Simplify: Sequential(Conv2d(bias), GroupNorm, ReLU)
        sd[P + "adapter_1.0.weight"], sd[P + "adapter_1.0.bias"] = r(CONV, chans[0], 1, 1), r(CONV)
        sd[P + "layer_1.0.weight"], sd[P + "layer_1.0.bias"] = r(CONV, CONV, 3, 3, s=0.1), r(CONV)
        sd.update({P + f"adapter_1.1.{k}": v for k, v in ln(CONV).items()})
        sd.update({P + f"layer_1.1.{k}": v for k, v in ln(CONV).items()})
    else:  # detectron2 Conv2d(norm=GN): no bias
        sd[P + "adapter_1.weight"], sd[P + "layer_1.weight"] = r(CONV, chans[0], 1, 1), r(CONV, CONV, 3, 3, s=0.1)
        sd.update({P + f"adapter_1.norm.{k}": v for k, v in ln(CONV).items()})
        sd.update({P + f"layer_1.norm.{k}": v for k, v in ln(CONV).items()})
    Q = "predictor." if psalm else "sem_seg_head.predictor."
    for i in range(DEC - 1):  # DEC_LAYERS - 1 masked-attention layers
        for grp, att in (("transformer_self_attention_layers", "self_attn"),
                         ("transformer_cross_attention_layers", "multihead_attn")):
            p = f"{Q}{grp}.{i}."
            sd[p + f"{att}.in_proj_weight"], sd[p + f"{att}.in_proj_bias"] = r(3 * CONV, CONV), r(3 * CONV)
            sd[p + f"{att}.out_proj.weight"], sd[p + f"{att}.out_proj.bias"] = r(CONV, CONV), r(CONV)
            sd.update({p + f"norm.{k}": v for k, v in ln(CONV).items()})
        p = f"{Q}transformer_ffn_layers.{i}."
        sd[p + "linear1.weight"], sd[p + "linear1.bias"] = r(DEC_FFN, CONV), r(DEC_FFN)
        sd[p + "linear2.weight"], sd[p + "linear2.bias"] = r(CONV, DEC_FFN), r(CONV)
        sd.update({p + f"norm.{k}": v for k, v in ln(CONV).items()})
    sd.update({Q + f"decoder_norm.{k}": v for k, v in ln(CONV).items()})
    sd[Q + "query_feat.weight"], sd[Q + "query_embed.weight"] = r(n_queries, CONV), r(n_queries, CONV)
    sd[Q + "level_embed.weight"] = r(3, CONV)
    for k in range(3):
        sd[f"{Q}mask_embed.layers.{k}.weight"], sd[f"{Q}mask_embed.layers.{k}.bias"] = r(CONV, CONV), r(CONV)
    if psalm:
        for m in ("SEG_proj", "CLASS_proj", "REGION_proj"):
            for k in range(2):
                sd[f"{Q}{m}.layers.{k}.weight"], sd[f"{Q}{m}.layers.{k}.bias"] = r(CONV, CONV), r(CONV)
        sd[Q + "SEG_query_embed.weight"] = r(n_queries + 1, CONV)
    else:
        sd[Q + "class_embed.weight"], sd[Q + "class_embed.bias"] = r(NCLS + 1, CONV), r(NCLS + 1)
        sd["criterion.empty_weight"] = torch.ones(NCLS + 1)
    return sd


# ----------------------------------------------------------------------------------------------
# the reference forward passes, straight from the published architecture


def _ln(x, W, p):
    return F.layer_norm(x, x.shape[-1:], W[p + "weight"], W[p + "bias"], eps=1e-5)


def _windows(x, w):  # (B, H, W, C) -> (B * nW, w*w, C)
    B, H, Wd, C = x.shape
    return x.view(B, H // w, w, Wd // w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, C)


def _unwindows(x, w, B, H, Wd):
    return x.view(B, H // w, Wd // w, w, w, -1).permute(0, 1, 3, 2, 4, 5).reshape(B, H, Wd, -1)


# follows facebookresearch/Mask2Former mask2former/modeling/backbone/swin.py L174-L295
#   (SwinTransformerBlock: pad, cyclic shift, WindowAttention L74-L171), L406-L453 (shift mask)
#   (commit 9b0651c)
def ref_block(x, H, Wd, W, p, heads, shift):
    B, L, C = x.shape
    short = x
    h = _ln(x, W, p + "norm1.").view(B, H, Wd, C)
    pr, pb = (WIN - Wd % WIN) % WIN, (WIN - H % WIN) % WIN
    h = F.pad(h, (0, 0, 0, pr, 0, pb))
    Hp, Wp = H + pb, Wd + pr
    mask = None
    if shift:
        h = torch.roll(h, (-shift, -shift), (1, 2))
        img = torch.zeros(1, Hp, Wp, 1)
        cnt = 0
        for hs in (slice(0, -WIN), slice(-WIN, -shift), slice(-shift, None)):
            for ws in (slice(0, -WIN), slice(-WIN, -shift), slice(-shift, None)):
                img[:, hs, ws] = cnt
                cnt += 1
        mw = _windows(img, WIN).squeeze(-1)  # (nW, N)
        mask = (mw[:, None, :] - mw[:, :, None]).ne(0).float() * -100.0
    win = _windows(h, WIN)
    Bn, N, _ = win.shape
    qkv = (win @ W[p + "attn.qkv.weight"].T + W[p + "attn.qkv.bias"]).view(Bn, N, 3, heads, C // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    att = (q * (C // heads) ** -0.5) @ k.transpose(-2, -1)
    table, idx = W[p + "attn.relative_position_bias_table"], W[p + "attn.relative_position_index"]
    att = att + table[idx.reshape(-1)].view(N, N, heads).permute(2, 0, 1)[None]
    if mask is not None:
        nW = mask.shape[0]
        att = (att.view(Bn // nW, nW, heads, N, N) + mask[None, :, None]).view(Bn, heads, N, N)
    o = (att.softmax(-1) @ v).transpose(1, 2).reshape(Bn, N, C)
    o = o @ W[p + "attn.proj.weight"].T + W[p + "attn.proj.bias"]
    o = _unwindows(o, WIN, B, Hp, Wp)
    if shift:
        o = torch.roll(o, (shift, shift), (1, 2))
    x = short + o[:, :H, :Wd].reshape(B, L, C)
    m = _ln(x, W, p + "norm2.")
    m = F.gelu(m @ W[p + "mlp.fc1.weight"].T + W[p + "mlp.fc1.bias"]) @ W[p + "mlp.fc2.weight"].T + W[p + "mlp.fc2.bias"]
    return x + m


def ref_swin(img, W, B="backbone."):
    x = F.conv2d(img, W[B + "patch_embed.proj.weight"], W[B + "patch_embed.proj.bias"], stride=4)
    Bn, C, H, Wd = x.shape
    x = _ln(x.flatten(2).transpose(1, 2), W, B + "patch_embed.norm.")
    outs = []
    for i, depth in enumerate(DEPTHS):
        for j in range(depth):
            x = ref_block(x, H, Wd, W, f"{B}layers.{i}.blocks.{j}.", HEADS[i], WIN // 2 if j % 2 else 0)
        outs.append(_ln(x, W, f"{B}norm{i}.").view(Bn, H, Wd, -1).permute(0, 3, 1, 2))
        if i < 3:
            y = x.view(Bn, H, Wd, -1)
            y = F.pad(y, (0, 0, 0, Wd % 2, 0, H % 2))
            y = torch.cat([y[:, 0::2, 0::2], y[:, 1::2, 0::2], y[:, 0::2, 1::2], y[:, 1::2, 1::2]], -1)
            y = _ln(y.flatten(1, 2), W, f"{B}layers.{i}.downsample.norm.")
            x = y @ W[f"{B}layers.{i}.downsample.reduction.weight"].T
            H, Wd = (H + 1) // 2, (Wd + 1) // 2
    return outs


def _sine(x, n):  # PositionEmbeddingSine(n, normalize=True), no padding mask
    Bn, _, H, Wd = x.shape
    ones = torch.ones(Bn, H, Wd)
    ye, xe = ones.cumsum(1), ones.cumsum(2)
    ye, xe = ye / (ye[:, -1:] + 1e-6) * 2 * math.pi, xe / (xe[:, :, -1:] + 1e-6) * 2 * math.pi
    dt = 10000 ** (2 * (torch.arange(n) // 2) / n)
    px, py = xe[..., None] / dt, ye[..., None] / dt
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), 4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), 4).flatten(3)
    return torch.cat((py, px), 3).permute(0, 3, 1, 2)


def _gn(x, W, p):
    return F.group_norm(x, 32, W[p + "weight"], W[p + "bias"], eps=1e-5)


def ref_pixel_decoder(feats, W, P="sem_seg_head.pixel_decoder.", psalm=False):
    srcs, pos = [], []
    for lvl, f in enumerate(feats[1:][::-1]):
        srcs.append(_gn(F.conv2d(f, W[f"{P}input_proj.{lvl}.0.weight"], W[f"{P}input_proj.{lvl}.0.bias"]), W,
                        f"{P}input_proj.{lvl}.1."))
        pos.append(_sine(f, CONV // 2))
    shapes = [s.shape[-2:] for s in srcs]
    src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
    lpos = torch.cat([p.flatten(2).transpose(1, 2) + W[P + "transformer.level_embed"][lv] for lv, p in enumerate(pos)], 1)
    refs = []
    for H, Wd in shapes:
        ry, rx = torch.meshgrid(torch.linspace(0.5, H - 0.5, H) / H, torch.linspace(0.5, Wd - 0.5, Wd) / Wd,
                                indexing="ij")
        refs.append(torch.stack((rx.reshape(-1), ry.reshape(-1)), -1))
    ref = torch.cat(refs, 0)[None, :, None].expand(src.shape[0], -1, 3, -1)  # valid ratios 1
    Bn, S, C = src.shape
    hd, L, Pn = C // PD_HEADS, 3, 4
    norm = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)
    for i in range(ENC):
        p = f"{P}transformer.encoder.layers.{i}."
        q = src + lpos
        val = (src @ W[p + "self_attn.value_proj.weight"].T + W[p + "self_attn.value_proj.bias"]).view(Bn, S, PD_HEADS, hd)
        off = (q @ W[p + "self_attn.sampling_offsets.weight"].T + W[p + "self_attn.sampling_offsets.bias"])
        off = off.view(Bn, S, PD_HEADS, L, Pn, 2)
        aw = (q @ W[p + "self_attn.attention_weights.weight"].T + W[p + "self_attn.attention_weights.bias"])
        aw = aw.view(Bn, S, PD_HEADS, L * Pn).softmax(-1).view(Bn, S, PD_HEADS, L, Pn)
        loc = ref[:, :, None, :, None, :] + off / norm[None, None, None, :, None, :]
        out = torch.zeros(Bn, S, PD_HEADS, hd)
        start = 0
        for lv, (H, Wd) in enumerate(shapes):
            v = val[:, start:start + H * Wd].permute(0, 2, 3, 1).reshape(Bn * PD_HEADS, hd, H, Wd)
            grid = (2 * loc[:, :, :, lv] - 1).transpose(1, 2).reshape(Bn * PD_HEADS, S, Pn, 2)
            s = F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # (BH, hd, S, P)
            wgt = aw[:, :, :, lv].transpose(1, 2).reshape(Bn * PD_HEADS, 1, S, Pn)
            out += (s * wgt).sum(-1).view(Bn, PD_HEADS, hd, S).permute(0, 3, 1, 2)
            start += H * Wd
        o = out.reshape(Bn, S, C) @ W[p + "self_attn.output_proj.weight"].T + W[p + "self_attn.output_proj.bias"]
        src = _ln(src + o, W, p + "norm1.")
        ff = F.relu(src @ W[p + "linear1.weight"].T + W[p + "linear1.bias"]) @ W[p + "linear2.weight"].T
        src = _ln(src + ff + W[p + "linear2.bias"], W, p + "norm2.")
    outs, start = [], 0
    for H, Wd in shapes:
        outs.append(src[:, start:start + H * Wd].transpose(1, 2).reshape(Bn, C, H, Wd))
        start += H * Wd
    if psalm:
        lat = F.relu(_gn(F.conv2d(feats[0], W[P + "adapter_1.0.weight"], W[P + "adapter_1.0.bias"]), W, P + "adapter_1.1."))
    else:
        lat = _gn(F.conv2d(feats[0], W[P + "adapter_1.weight"]), W, P + "adapter_1.norm.")
    y = lat + F.interpolate(outs[-1], size=lat.shape[-2:], mode="bilinear", align_corners=False)
    if psalm:
        y = F.relu(_gn(F.conv2d(y, W[P + "layer_1.0.weight"], W[P + "layer_1.0.bias"], padding=1), W, P + "layer_1.1."))
    else:
        y = F.relu(_gn(F.conv2d(y, W[P + "layer_1.weight"], padding=1), W, P + "layer_1.norm."))
    outs.append(y)
    return F.conv2d(y, W[P + "mask_features.weight"], W[P + "mask_features.bias"]), outs[:3]


# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def d2_model_and_state(tmp_path_factory):
    torch.manual_seed(0)
    model = PSALMModel(_config()).eval()
    sd = d2_state(seed=1, n_queries=2 * NQ)  # 2x the queries: PSALM keeps the first ones (200 -> 100)
    path = write_detectron2_pkl(tmp_path_factory.mktemp("pkl") / "model_final_test.pkl", sd)
    report = load_detectron2_pkl(model, path)
    return model, sd, report, path


# follows facebookresearch/Mask2Former mask2former/modeling/backbone/swin.py L74-L337, L687-L770
#   (D2SwinTransformer) and mask2former/modeling/pixel_decoder/msdeformattn.py L165-L358
#   (MSDeformAttnPixelDecoder) (commit 9b0651c)
def test_pkl_features_match_reference(d2_model_and_state):
    model, sd, report, _ = d2_model_and_state
    img = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = ref_swin(img, sd)
        ours = list(model.vision_tower(img).feature_maps)
        assert [tuple(f.shape) for f in ours] == [tuple(f.shape) for f in ref]
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        mask_ref, ms_ref = ref_pixel_decoder(ref, sd)
        pix = model.pixel_decoder(ours)
    torch.testing.assert_close(pix.mask_features, mask_ref, atol=1e-4, rtol=1e-4)
    for a, b in zip(pix.multi_scale_features, ms_ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # the decoder pieces landed where the map says, with PSALM's trim of the query table
    q = "sem_seg_head.predictor."
    torch.testing.assert_close(model.predictor.query_pos.weight, sd[q + "query_embed.weight"][:NQ])
    qkv = torch.cat([getattr(model.predictor.module.decoder.layers[0].self_attn, f"{x}_proj").weight for x in "qkv"])
    torch.testing.assert_close(qkv, sd[q + "transformer_self_attention_layers.0.self_attn.in_proj_weight"])
    assert q + "class_embed.weight" in report["aside"] and "criterion.empty_weight" in report["aside"]


def test_pkl_round_trip(d2_model_and_state, tmp_path):
    model, sd, _, path = d2_model_and_state
    back = native_to_detectron2(model)
    expect = dict(sd)
    expect["sem_seg_head.predictor.query_embed.weight"] = sd["sem_seg_head.predictor.query_embed.weight"][:NQ]
    assert set(back) == set(expect)
    for k, v in expect.items():
        torch.testing.assert_close(back[k].to(v.dtype), v, msg=k)
    # written in detectron2's wrapping, read again: same arrays
    out = write_detectron2_pkl(tmp_path / "again.pkl", back)
    with open(out, "rb") as f:
        raw = pickle.load(f)
    assert set(raw) >= {"model", "__author__"} and isinstance(raw["model"]["backbone.norm0.weight"], np.ndarray)
    again = read_detectron2_pkl(out)
    torch.testing.assert_close(again["backbone.layers.1.blocks.1.attn.qkv.weight"],
                               sd["backbone.layers.1.blocks.1.attn.qkv.weight"])
    assert read_detectron2_pkl(path).keys() == sd.keys()


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/maskloop_pwned_by_pkl",))


def test_hostile_pkl_refused(tmp_path):
    marker = "/tmp/maskloop_pwned_by_pkl"
    if os.path.exists(marker):
        os.remove(marker)
    bad = tmp_path / "model_final_evil.pkl"
    with open(bad, "wb") as f:
        pickle.dump({"model": {"backbone.norm0.weight": np.zeros(3, np.float32), "x": _Boom()}}, f)
    with pytest.raises(PickleRefused, match="refusing to unpickle posix.system|refusing to unpickle os.system"):
        read_detectron2_pkl(bad)
    assert not os.path.exists(marker)
    # a torch.save file is not a .pkl of arrays either
    tpath = tmp_path / "weights.pkl"
    torch.save({"a": torch.zeros(2)}, tpath)
    with pytest.raises(CheckpointError):
        read_detectron2_pkl(tpath)


# backbone key names follow facebookresearch/Mask2Former mask2former/modeling/backbone/swin.py L588-L616
#   (layers.N, norm{i}) (commit 9b0651c)
def test_pkl_mismatch_one_error_listing_all():
    model = PSALMModel(_config())
    sd = d2_state(seed=2)
    sd.pop("backbone.layers.0.blocks.1.attn.qkv.weight")
    sd["backbone.norm3.weight"] = torch.zeros(7)
    sd["sem_seg_head.pixel_decoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as ei:
        load_detectron2_pkl(model, sd)
    msg = str(ei.value)
    for s in ("unknown keys (1)", "sem_seg_head.pixel_decoder.extra.weight", "missing keys (1)",
              "backbone.layers.0.blocks.1.attn.qkv.weight", "wrong shapes (1)", "backbone.norm3.weight"):
        assert s in msg


# PSALM FPN layout follows zamling/PSALM psalm/model/mask_decoder/Mask2Former_Simplify/modeling/
#   pixel_decoder/msdeformattn.py L246-L262 (adapter_/layer_ conv with bias + ReLU) (commit d5dbfda); the
#   zero-bias start is not cited
def test_pkl_into_psalm_fpn_zero_biases():
    """A PSALM-style model (conv biases + lateral ReLU) starts from the .pkl as PSALM does: biases 0."""
    model = PSALMModel(_config("psalm")).eval()
    sd = d2_state(seed=4)
    rep = load_detectron2_pkl(model, sd)
    assert sorted(rep["zero_init"]) == ["pixel_decoder.adapter_1.0.bias", "pixel_decoder.layer_1.0.bias"]
    assert float(model.pixel_decoder.adapter_1[0].bias.detach().abs().sum()) == 0.0


# module names follow zamling/PSALM psalm/model/language_model/llava_phi.py L170-L187 (seg_query,
#   pixel_decoder, predictor, *_projector) (commit d5dbfda)
def psalm_state(model, seed):
    """A baseline PSALM checkpoint in PSALM's module names (LLM / projectors from the model's shapes)."""
    from maskloop.model.psalm.adapt import PSALM_TO_MASKLOOP

    sd = d2_state(seed=seed, psalm=True)
    g = torch.Generator().manual_seed(seed + 100)
    inv = {v: k for k, v in PSALM_TO_MASKLOOP.items()}
    for k, v in model.state_dict().items():
        for dst, src in inv.items():
            if k.startswith(dst) and not k.startswith("deform_projector."):
                sd[src + k[len(dst):]] = torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
    sd["seg_query"] = torch.randn(NQ, model.config.llm_hidden, generator=g)
    return sd


def test_adapted_baseline_loads_with_its_deform_projector(tmp_path):
    """PSALM's guide: adapt a baseline (maskloop export psalm-to-deformable), then train at lr 1e-6."""
    from safetensors.torch import save_file

    from maskloop.model.psalm.adapt import psalm_to_deformable

    model = PSALMModel(_config("psalm"))
    c = model.config
    base = psalm_state(model, seed=12)
    deform, rep = psalm_to_deformable(base, hidden=c.deform_hidden, n_heads=c.deform_heads, n_points=c.deform_points,
                                      level_dims=c.level_dims, seed=3)
    save_file({k: v.contiguous() for k, v in deform.items()}, str(tmp_path / "deformable.safetensors"))
    load_psalm_checkpoint(model, tmp_path / "deformable.safetensors")
    torch.testing.assert_close(model.deform_projector.attn.sampling_offsets.weight,
                               deform["model.deform_projector.attn.sampling_offsets.weight"])
    torch.testing.assert_close(model.mm_projector.fc.weight, base["model.mm_projector.fc.weight"])


# follows zamling/PSALM psalm/model/language_model/llava_phi.py L170-L187 and psalm/model/mask_decoder/
#   Mask2Former_Simplify/modeling/transformer_decoder/mask2former_transformer_decoder.py L482 (SEG_proj)
#   (commit d5dbfda)
def test_psalm_full_checkpoint_matches_reference(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = PSALMModel(_config("psalm")).eval()
    sd = psalm_state(model, seed=5)
    g = torch.Generator().manual_seed(6)
    save_file(sd, str(tmp_path / "model.safetensors"))
    rep = load_psalm_checkpoint(model, tmp_path)
    assert "predictor.SEG_proj.layers.0.weight" in rep["loaded"] and "predictor.SEG_query_embed.weight" in rep["aside"]
    img = torch.randn(1, 3, IMG, IMG, generator=g)
    with torch.no_grad():
        ref = ref_swin(img, sd, "model.vision_tower.")
        ours = list(model.vision_tower(img).feature_maps)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        mref, msref = ref_pixel_decoder(ref, sd, "pixel_decoder.", psalm=True)
        pix = model.pixel_decoder(ours)
    torch.testing.assert_close(pix.mask_features, mref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model.seg_query, sd["seg_query"])
    torch.testing.assert_close(model.llm.lm_head.weight, sd["lm_head.weight"])
    # an unknown PSALM key is reported
    sd["model.something_new.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="model.something_new.weight"):
        load_psalm_checkpoint(model, sd)


# follows zamling/PSALM psalm/model/language_model/llava_phi.py L126-L135 (mm_projector weights by key)
#   (commit d5dbfda)
def test_mm_projector_bin(tmp_path):
    model = PSALMModel(_config())
    g = torch.Generator().manual_seed(7)
    own = model.mm_projector.state_dict()
    state = {f"model.mm_projector.{k}": (torch.randn(v.shape, generator=g) if v.is_floating_point() else v)
             for k, v in own.items()}
    state["model.embed_tokens.weight"] = torch.zeros(3, 4)
    torch.save(state, tmp_path / "mm_projector.bin")
    rep = load_mm_projector(model, tmp_path / "mm_projector.bin")
    assert rep["ignored"] == ["model.embed_tokens.weight"]
    torch.testing.assert_close(model.mm_projector.fc.weight, state["model.mm_projector.fc.weight"])
    state["model.mm_projector.fc.weight"] = torch.zeros(1, 1)
    with pytest.raises(CheckpointError, match="wrong shapes"):
        load_mm_projector(model, state)


def test_phi_folder_and_one_call_start(tmp_path):
    from safetensors.torch import save_file

    from maskloop.model.psalm.checkpoints import load_pretrained_parts

    model = PSALMModel(_config("psalm"))
    g = torch.Generator().manual_seed(8)
    phi = {}
    for k, v in model.state_dict().items():
        if k.startswith("llm."):
            shape = list(v.shape)
            if k in ("llm.model.embed_tokens.weight", "llm.lm_head.weight", "llm.lm_head.bias"):
                shape[0] = model.config.base_vocab  # the released vocabulary, without PSALM's tokens
            phi[k[4:]] = torch.randn(shape, generator=g)
    (tmp_path / "phi").mkdir()
    save_file(phi, str(tmp_path / "phi" / "model.safetensors"))
    pkl = write_detectron2_pkl(tmp_path / "m2f.pkl", d2_state(seed=9))
    rep = load_pretrained_parts(model, llm=tmp_path / "phi", vision_tower=pkl)
    assert sorted(rep["llm"]["grown"]) == ["lm_head.bias", "lm_head.weight", "model.embed_tokens.weight"]
    emb = model.llm.get_input_embeddings().weight
    V = model.config.base_vocab
    torch.testing.assert_close(emb[:V], phi["model.embed_tokens.weight"])
    torch.testing.assert_close(emb[V:], phi["model.embed_tokens.weight"].mean(0).expand(8, -1))
    assert rep["vision_tower"]["zero_init"]
    phi["model.layers.0.mlp.fc1.weight"] = torch.zeros(2, 2)
    with pytest.raises(CheckpointError, match="model.layers.0.mlp.fc1.weight"):
        load_pretrained_parts(model, llm=phi)


def _mlp(x, W, p, n=3):
    for k in range(n):
        x = x @ W[f"{p}layers.{k}.weight"].T + W[f"{p}layers.{k}.bias"]
        if k < n - 1:
            x = F.relu(x)
    return x


def ref_masked_decoder(queries, ms, mask_features, W, n_queries, Q="sem_seg_head.predictor.", states=None):
    """detectron2's MultiScaleMaskedTransformerDecoder (post-norm), fed external queries (B, Nq, C).
    ``states``: a list that receives each layer's normed query states (B, Nq, C) (``decoder_output``)."""
    B, Nq, C = queries.shape
    srcs, poss, sizes = [], [], []
    for lvl in range(3):
        x = ms[lvl]
        sizes.append(x.shape[-2:])
        poss.append(_sine(x, C // 2).flatten(2).permute(2, 0, 1))
        srcs.append((x.flatten(2) + W[Q + "level_embed.weight"][lvl][None, :, None]).permute(2, 0, 1))
    qpos = W[Q + "query_embed.weight"][:Nq, None].expand(Nq, B, C)
    out = queries.transpose(0, 1)

    def heads(o, size):
        d = _ln(o, W, Q + "decoder_norm.").transpose(0, 1)
        if states is not None:
            states.append(d)
        m = torch.einsum("bqc,bchw->bqhw", _mlp(d, W, Q + "mask_embed."), mask_features)
        am = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
        am = (am.sigmoid().flatten(2)[:, None].repeat(1, PD_HEADS, 1, 1).flatten(0, 1) < 0.5)
        return m, am

    masks, am = heads(out, sizes[0])
    all_masks = [masks]
    for i in range(DEC - 1):
        lvl = i % 3
        am[torch.where(am.sum(-1) == am.shape[-1])] = False
        ca, sa, ff = (f"{Q}transformer_cross_attention_layers.{i}.", f"{Q}transformer_self_attention_layers.{i}.",
                      f"{Q}transformer_ffn_layers.{i}.")
        o = F.multi_head_attention_forward(
            out + qpos, srcs[lvl] + poss[lvl], srcs[lvl], C, PD_HEADS, W[ca + "multihead_attn.in_proj_weight"],
            W[ca + "multihead_attn.in_proj_bias"], None, None, False, 0.0, W[ca + "multihead_attn.out_proj.weight"],
            W[ca + "multihead_attn.out_proj.bias"], training=False, attn_mask=am, need_weights=False)[0]
        out = _ln(out + o, W, ca + "norm.")
        o = F.multi_head_attention_forward(
            out + qpos, out + qpos, out, C, PD_HEADS, W[sa + "self_attn.in_proj_weight"], W[sa + "self_attn.in_proj_bias"],
            None, None, False, 0.0, W[sa + "self_attn.out_proj.weight"], W[sa + "self_attn.out_proj.bias"],
            training=False, need_weights=False)[0]
        out = _ln(out + o, W, sa + "norm.")
        o = F.relu(out @ W[ff + "linear1.weight"].T + W[ff + "linear1.bias"]) @ W[ff + "linear2.weight"].T
        out = _ln(out + o + W[ff + "linear2.bias"], W, ff + "norm.")
        masks, am = heads(out, sizes[(i + 1) % 3])
        all_masks.append(masks)
    return all_masks


# follows facebookresearch/Mask2Former
#   mask2former/modeling/transformer_decoder/mask2former_transformer_decoder.py L17-L205 (attention / FFN /
#   MLP layers), L208-L461 (MultiScaleMaskedTransformerDecoder) (commit 9b0651c)
def test_pkl_decoder_layers_match_reference(d2_model_and_state):
    """The masked-attention decoder layers (q/k/v split of in_proj, cross-attention, FFN, norms,
    mask MLP, level embedding, query positions) equal detectron2's decoder on the same queries."""
    model, sd, _, _ = d2_model_and_state
    g = torch.Generator().manual_seed(11)
    queries = torch.randn(2, NQ, CONV, generator=g)
    ms = [torch.randn(2, CONV, s, s, generator=g) for s in (2, 4, 8)]
    mask_features = torch.randn(2, CONV, 16, 16, generator=g)
    with torch.no_grad():
        ref = ref_masked_decoder(queries, ms, mask_features, sd, NQ)
        ours, _ = model.predictor(queries, ms, mask_features)
    assert len(ours) == len(ref) == DEC
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# PSALM's classification heads, written from zamling/PSALM (commit d5dbfda):
#   psalm/model/mask_decoder/Mask2Former_Simplify/modeling/transformer_decoder/mask2former_transformer_decoder.py
#   L187-L199 (MLP), L455-L461 (SEG_NORM modules), L482-L484 (SEG_proj / CLASS_proj / REGION_proj),
#   L564-L660 (forward_woconcat: query_embed positions, the heads after every layer),
#   L662-L745 (forward_prediction_heads: decoder_norm -> *_proj -> einsum with the embeddings);
#   psalm/model/language_model/llava_phi.py L453-L481 (seg_concat False), L972-L978 (SEG embedding = pooled
#   refer span), L1044-L1056 (class_name_projector / region_projector), L1072-L1087 (SEG_token_projector).
def _head_inputs(cfg, task, B=2, seed=0):
    from maskloop.model.psalm.model import build_prompt_ids, n_image_tokens

    g = torch.Generator().manual_seed(seed)
    n_img = n_image_tokens(cfg)
    if task == "panoptic":
        ids = [build_prompt_ids(cfg, task, [5, 6], n_img, cfg.num_queries, n_cls=3)[0] for _ in range(B)]
        names = torch.randint(10, 40, (B, 3, 2), generator=g)
        return dict(input_ids=torch.tensor(ids), class_name_ids=names, class_name_mask=torch.ones_like(names).bool())
    if task == "referring":
        built = [build_prompt_ids(cfg, task, [5], n_img, cfg.num_queries, refer_ids=[11, 12, 13]) for _ in range(B)]
        return dict(input_ids=torch.tensor([b[0] for b in built]), refer_mask=torch.tensor([b[1] for b in built]))
    ids = [build_prompt_ids(cfg, task, [5], n_img, cfg.num_queries, n_regions=2)[0] for _ in range(B)]
    regions = torch.zeros(B, 2, 16, 16)
    regions[:, 0, :8], regions[:, 1, 8:, 4:] = 1, 1
    return dict(input_ids=torch.tensor(ids), region_masks=regions)


def _lin(x, W, p):
    return x @ W[p + "weight"].T + W[p + "bias"]


@pytest.mark.parametrize("seg_norm", [False, True])
def test_psalm_heads_match_reference(seg_norm):
    """A PSALM-layout checkpoint loaded through the map gives PSALM's class-name, region and SEG logits and
    masks (PSALM's heads recomputed here from the raw checkpoint tensors on the LLM's hidden states)."""
    torch.manual_seed(0)
    model = PSALMModel(_config("psalm", seg_norm=seg_norm)).eval()
    sd = psalm_state(model, seed=21)
    for k in sd:  # psalm_state's N(0, 1) Phi overflows; smaller LLM weights keep the hidden states finite
        if k.startswith(("model.layers.", "model.embed_tokens.", "model.final_layernorm.")):
            sd[k] = sd[k] * 0.1
        elif k.endswith("running_var"):  # a BatchNorm variance is positive
            sd[k] = sd[k].abs() + 0.5
    g = torch.Generator().manual_seed(22)
    if seg_norm:  # PSALM's SEG_NORM modules
        for m in ("seg_proj_after_norm", "class_name_proj_after_norm"):
            for k in range(2):
                sd[f"predictor.{m}.layers.{k}.weight"] = torch.randn(CONV, CONV, generator=g) * 0.2
                sd[f"predictor.{m}.layers.{k}.bias"] = torch.randn(CONV, generator=g) * 0.2
        for m in ("SEG_norm", "class_name_norm"):
            sd[f"predictor.{m}.weight"] = 1 + 0.1 * torch.randn(CONV, generator=g)
            sd[f"predictor.{m}.bias"] = 0.1 * torch.randn(CONV, generator=g)
    load_psalm_checkpoint(model, sd)
    tok = model.config.tokens
    Q = "predictor."

    def after_norm(e, kind):
        if not seg_norm:
            return e
        return _mlp(_ln(e, sd, f"{Q}{kind}_norm."), sd, f"{Q}{'seg' if kind == 'SEG' else kind}_proj_after_norm.", 2)

    grab = {}
    model.llm.register_forward_hook(lambda m, a, o: grab.__setitem__("hidden", o.hidden_states[-1]))
    model.pixel_decoder.register_forward_hook(lambda m, a, o: grab.__setitem__("pix", o))
    img = torch.randn(2, 3, IMG, IMG, generator=g)
    for task in ("panoptic", "region", "referring"):
        kw = _head_inputs(model.config, task)
        with torch.no_grad():
            out = model(task, img, **kw)
        h, ids, pix = grab["hidden"], kw["input_ids"], grab["pix"]
        B = h.shape[0]
        queries = _lin(h[ids == tok.seg].view(B, NQ, -1), sd, "seg_query_projector.")
        states = []
        ref_masks = ref_masked_decoder(queries, list(pix.multi_scale_features), pix.mask_features, sd, NQ, Q, states)
        assert len(states) == len(out.pred_masks) == DEC
        for layer, d in enumerate(states):
            torch.testing.assert_close(out.pred_masks[layer], ref_masks[layer], atol=1e-4, rtol=1e-4)
            if task == "panoptic":  # einsum('bld,bcd->blc', CLASS_proj(decoder_output), class_name_embedding)
                emb = after_norm(_lin(h[ids == tok.cls].view(B, 3, -1), sd, "class_name_projector."), "class_name")
                ref = torch.einsum("bld,bcd->blc", _mlp(d, sd, Q + "CLASS_proj.", 2), emb)
                torch.testing.assert_close(out.class_logits[layer][..., :3], ref, atol=1e-4, rtol=1e-4)
            elif task == "region":  # per sample einsum('kd,ld->kl', region_embedding, REGION_proj(decoder_output))
                emb = _lin(h[ids == tok.region].view(B, 2, -1), sd, "region_projector.")
                for b in range(B):
                    ref = torch.einsum("kd,ld->kl", emb[b], _mlp(d[b], sd, Q + "REGION_proj.", 2))
                    torch.testing.assert_close(out.region_logits[layer][b, :, :2].T, ref, atol=1e-4, rtol=1e-4)
            else:  # SEG embedding: the refer span's hidden states average-pooled, SEG_token_projector
                m = kw["refer_mask"].float()[..., None]
                emb = after_norm(_lin((h * m).sum(1, keepdim=True) / m.sum(1, keepdim=True), sd,
                                      "SEG_token_projector."), "SEG")
                ref = torch.einsum("bld,bcd->blc", _mlp(d, sd, Q + "SEG_proj.", 2), emb)[..., 0]
                torch.testing.assert_close(out.seg_logits[layer], ref, atol=1e-4, rtol=1e-4)
    # exported back in PSALM's layout, the heads carry the loaded tensors
    from maskloop.model.psalm.checkpoints import PSALM_PREFIXES

    back = native_to_detectron2(model, prefixes=PSALM_PREFIXES)
    heads = [k for k in sd if k.startswith(("predictor.SEG_proj", "predictor.CLASS_proj", "predictor.REGION_proj",
                                            "predictor.SEG_norm", "predictor.seg_proj_after_norm", "predictor.class_name_"))]
    assert len(heads) == (24 if seg_norm else 12)
    for k in heads:
        torch.testing.assert_close(back[k], sd[k])
    # the heads are part of the map: a model without them refuses a checkpoint that has them
    with pytest.raises(CheckpointError, match="SEG_proj"):
        load_psalm_checkpoint(PSALMModel(_config("psalm", seg_proj=False, seg_norm=False)), sd)


def _load_tame_psalm_state(model, seed: int) -> dict:
    """A random PSALM-layout state dict with small LLM weights and positive BN variances, loaded; returned."""
    sd = psalm_state(model, seed=seed)
    for k in sd:
        if k.startswith(("model.layers.", "model.embed_tokens.", "model.final_layernorm.")):
            sd[k] = sd[k] * 0.1
        elif k.endswith("running_var"):
            sd[k] = sd[k].abs() + 0.5
    load_psalm_checkpoint(model, sd)
    return sd


# PSALM's no-object class: zamling/PSALM (commit d5dbfda) psalm/train/train_datasets.py L67 / L276 / L397
#   (coco_class_name + ['background']), psalm/model/mask_decoder/mask_criterion/pretrain_criterion.py
#   L211-L232 (the last class is the no-object target, weight 0.1)
def test_background_class_is_psalms_no_object():
    from maskloop.data.psalm import BACKGROUND, PSALMCollator
    from maskloop.model.psalm.losses import LossWeights, PSALMCriterion

    torch.manual_seed(0)
    model = PSALMModel(_config("psalm", no_object="background")).eval()
    sd = _load_tame_psalm_state(model, seed=31)
    grab = {}
    model.llm.register_forward_hook(lambda m, a, o: grab.__setitem__("hidden", o.hidden_states[-1]))
    kw = _head_inputs(model.config, "panoptic")  # 3 names per sample; the last plays background
    kw["class_valid"] = torch.tensor([[True, True, True], [True, True, False]])  # sample 1: background 2nd
    kw["input_ids"][1][(kw["input_ids"][1] == model.config.tokens.cls).nonzero()[-1]] = 0
    img = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(32))
    with torch.no_grad():
        out = model("panoptic", img, **kw)
    h, ids = grab["hidden"], kw["input_ids"]
    cls_h = h[ids == model.config.tokens.cls]  # 3 + 2 rows
    states = []
    ref_masked_decoder(_lin(h[ids == model.config.tokens.seg].view(2, NQ, -1), sd, "seg_query_projector."),
                       list(model.pixel_decoder(list(model.vision_tower(img).feature_maps)).multi_scale_features),
                       model.pixel_decoder(list(model.vision_tower(img).feature_maps)).mask_features, sd, NQ,
                       "predictor.", states)
    logits = out.class_logits[-1]
    assert logits.shape == (2, NQ, 4)
    for b, (rows, n) in enumerate(((cls_h[:3], 3), (cls_h[3:], 2))):
        ref = _mlp(states[-1][b], sd, "predictor.CLASS_proj.", 2) @ _lin(rows, sd, "class_name_projector.").T
        torch.testing.assert_close(logits[b, :, : n - 1], ref[:, : n - 1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(logits[b, :, -1], ref[:, n - 1], atol=1e-4, rtol=1e-4)  # no-object = background
        assert bool(torch.isinf(logits[b, :, n - 1 : -1]).all())  # the background slot and padding
    # the collator appends PSALM's class name; a from-scratch model trains with it
    tok = type("Tok", (), {"encode": lambda self, t, add_special_tokens=False: [5 + len(w) % 50 for w in t.split()],
                           "pad_token_id": 0})()
    cfg = psalm_config("psalm-tiny", no_object="background")
    sample = {"task": "panoptic", "pixel_values": torch.zeros(3, 64, 64), "class_names": ["box", "disc"],
              "masks": torch.ones(1, 16, 16), "labels": torch.tensor([1])}
    one = {**sample, "class_names": ["box"], "labels": torch.tensor([0])}
    g = PSALMCollator(cfg, tok)([sample, one])["groups"][0]
    assert g["inputs"]["class_name_ids"].shape[1] == 3 and BACKGROUND == "background"
    assert (g["inputs"]["input_ids"] == cfg.tokens.cls).sum(1).tolist() == [3, 2]
    assert g["inputs"]["class_valid"].tolist() == [[True, True, True], [True, True, False]]
    fresh = PSALMModel(cfg)
    loss, _ = PSALMCriterion(LossWeights(num_points=16))(fresh("panoptic", **g["inputs"]), g["targets"])
    loss.backward()
    assert torch.isfinite(loss) and fresh.predictor.CLASS_proj.layers[0].weight.grad is not None


# PSALM's class-name spans: zamling/PSALM (commit d5dbfda) psalm/train/train_datasets.py L175-L184
#   (preprocess_class_name: each name's tokens + the [SEG] token, cls_indices), psalm/model/language_model/
#   llava_phi.py L566-L574 (embed_class_ids), L652-L676 (a <cls> chunk -> its class's embeddings),
#   L552-L565 (get_class_name_embedding: hidden states of the span, AdaptiveAvgPool1d(1))
def test_class_name_spans_are_psalms():
    from maskloop.model.psalm.model import build_prompt_ids, n_image_tokens

    torch.manual_seed(0)
    model = PSALMModel(_config("psalm", class_name_tokens="span", no_object="background")).eval()
    sd = _load_tame_psalm_state(model, seed=41)
    cfg, tok = model.config, model.config.tokens
    # sample 0: names of 2, 1, 3 tokens; sample 1: 2, 2 tokens (its third class is padding)
    names = [[[11, 12], [13], [14, 15, 16]], [[17, 18], [19, 20]]]
    ids = [build_prompt_ids(cfg, "panoptic", [5, 6], n_image_tokens(cfg), NQ, cls_lengths=[len(x) + 1 for x in n])[0]
           for n in names]
    T = max(map(len, ids))
    input_ids = torch.tensor([i + [0] * (T - len(i)) for i in ids])
    cid, cmask = torch.zeros(2, 3, 3, dtype=torch.long), torch.zeros(2, 3, 3, dtype=torch.bool)
    for b, n in enumerate(names):
        for k, x in enumerate(n):
            cid[b, k, :len(x)], cmask[b, k, :len(x)] = torch.tensor(x), True
    valid = cmask.any(-1)
    grab = {}
    model.llm.register_forward_hook(lambda m, a, o: grab.__setitem__("hidden", o.hidden_states[-1]))
    model.llm.register_forward_pre_hook(lambda m, a, kw: grab.__setitem__("embeds", kw["inputs_embeds"]),
                                        with_kwargs=True)
    img = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(42))
    with torch.no_grad():
        out = model("panoptic", img, input_ids=input_ids, attention_mask=(input_ids != 0).long(), class_name_ids=cid,
                    class_name_mask=cmask, class_valid=valid)
        emb_table = sd["model.embed_tokens.weight"]
        states = []
        pix = model.pixel_decoder(list(model.vision_tower(img).feature_maps))
        h = grab["hidden"]
        ref_masked_decoder(_lin(h[input_ids == tok.seg].view(2, NQ, -1), sd, "seg_query_projector."),
                           list(pix.multi_scale_features), pix.mask_features, sd, NQ, "predictor.", states)
    for b, n in enumerate(names):
        pos = (input_ids[b] == tok.cls).nonzero()[:, 0].tolist()
        want = [t for x in n for t in x + [tok.seg_token]]  # PSALM: the name's tokens, then [SEG]
        assert len(pos) == len(want)
        torch.testing.assert_close(grab["embeds"][b, pos], emb_table[want])
        spans, start = [], 0
        for x in n:  # average-pool the hidden states over each class's span
            spans.append(h[b, pos[start:start + len(x) + 1]].mean(0))
            start += len(x) + 1
        ref = _mlp(states[-1][b], sd, "predictor.CLASS_proj.", 2) @ _lin(torch.stack(spans), sd,
                                                                          "class_name_projector.").T
        K = len(n)  # the last name plays background (no_object: background)
        torch.testing.assert_close(out.class_logits[-1][b, :, :K - 1], ref[:, :K - 1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.class_logits[-1][b, :, -1], ref[:, K - 1], atol=1e-4, rtol=1e-4)
    # the collator lays the spans out (names + PSALM's background, each + [SEG]); a fresh model trains on them
    from maskloop.data.psalm import PSALMCollator
    from maskloop.model.psalm.losses import LossWeights, PSALMCriterion

    tk = type("Tok", (), {"encode": lambda self, t, add_special_tokens=False: [5 + len(w) % 50 for w in t.split()],
                          "pad_token_id": 0})()
    tiny = psalm_config("psalm-tiny", class_name_tokens="span", no_object="background")
    s0 = {"task": "panoptic", "pixel_values": torch.zeros(3, 64, 64), "class_names": ["red box", "disc"],
          "masks": torch.ones(1, 16, 16), "labels": torch.tensor([1])}
    s1 = {**s0, "class_names": ["big blue disc"], "labels": torch.tensor([0])}
    g = PSALMCollator(tiny, tk)([s0, s1])["groups"][0]
    assert (g["inputs"]["input_ids"] == tiny.tokens.cls).sum(1).tolist() == [(2 + 1) + (1 + 1) + (1 + 1), (3 + 1) + 2]
    fresh = PSALMModel(tiny)
    loss, _ = PSALMCriterion(LossWeights(num_points=16))(fresh("panoptic", **g["inputs"]), g["targets"])
    loss.backward()
    assert torch.isfinite(loss)
