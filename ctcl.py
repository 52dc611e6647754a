"""CTCL: CNN-Transformer Collaborative Learning for semantic segmentation, in one file.

An unofficial implementation (the authors released no code) of Zhu, Luo, Zheng, Wang and Wang, "A Good
Student is Cooperative and Reliable: CNN-Transformer Collaborative Learning for Semantic Segmentation",
ICCV 2023 (arXiv 2307.12574), built from its abstract and its framework figure. Two students, a ResNet-18
DeepLabV3+ (CNN) and a SegFormer-B0 (ViT), learn together with no pre-trained teacher, through HFD and
region- and pixel-wise BSD. Top to bottom: the paper (the students, HFD, both BSDs, the objective: class CTCL),
running it (data, MiT-B0 weights, evaluation, the loop), using it (--predict, --export, the command line).

    python ctcl.py                                    # synthetic data on the CPU, under 3 minutes
    bash data_prep.sh voc && python ctcl.py --data voc --gpu 0
    torchrun --nproc_per_node=4 ctcl.py --data voc    # the same recipe on 4 GPUs (DDP)
    python ctcl.py --method independent               # baselines: independent, dml
    python ctcl.py --data folder --data-root my_data  # your own data: images/, labels/, classes.txt
    python ctcl.py --predict photos/ --resume runs/voc-ctcl-s0/last.pt   # segment images; --export ships one
    python -m pytest -q test_ctcl.py                  # the tests

Choices the abstract and the figure leave open are marked [I] (interpreted): each is a flag, listed in the README.
"""
import argparse
import collections
import contextlib
import functools
import glob
import inspect
import json
import math
import os
import pathlib
import re
import resource
import shutil
import signal
import sys
import time
import traceback
import urllib.error

import numpy
import PIL.Image
import PIL.ImageDraw
import PIL.ImageOps
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.segmentation.deeplabv3 import ASPP
from torchvision.ops import StochasticDepth
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from torchvision.transforms import v2

IGNORE_INDEX = 255  # VOC's "void" label: padding, object borders, unlabelled pixels
PIL.Image.MAX_IMAGE_PIXELS = None  # panoramas and orthophotos are the user's own files, not a stranger's upload


class UserError(Exception):
    """Bad input from the command line or the disk: printed as one line, exit code 2."""
    code = 2


class RunError(UserError):
    """The run cannot go on (a non-finite loss, a full disk) or was stopped (a signal): one line, last.pt whole."""
    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


# ---- The CNN student: ResNet-18 DeepLabV3+ ---------------------------------------------------------------------------

def conv_bn_relu(in_channels, out_channels, kernel_size=1):
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def dilate_stage(stage, dilation, previous=1):
    """A BasicBlock stage at stride 1, its 3x3 convs dilated [I]: the first keeps the previous stage's
    dilation, the rest get `dilation` (torchvision's Bottleneck way, which it refuses for BasicBlock)."""
    stage[0].conv1.stride = stage[0].downsample[0].stride = (1, 1)  # layer3 and layer4 start with a downsample
    convs = [conv for block in stage for conv in (block.conv1, block.conv2)]
    for conv, d in zip(convs, [previous] + [dilation] * (len(convs) - 1)):
        conv.dilation, conv.padding = (d, d), (d, d)


class DeepLabV3Plus(nn.Module):
    """ResNet-18 + ASPP + DeepLabV3+ decoder. Returns {low, mid, last, feat, logits}: F₁ᶜ = layer1 (stride 4),
    F₂ᶜ = layer2 (8), Fₗᶜ = ASPP's output (16 or 8), the decoder feature and the class scores (both 4)."""

    def __init__(self, num_classes, output_stride=16, pretrained=False):
        super().__init__()
        assert output_stride in (8, 16), f"output_stride must be 8 or 16, got {output_stride}"
        weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1 if pretrained else None
        self.backbone = torchvision.models.resnet18(weights=weights)
        del self.backbone.fc, self.backbone.avgpool  # a dense head replaces them
        if output_stride == 8:
            dilate_stage(self.backbone.layer3, 2)
        dilate_stage(self.backbone.layer4, *((2, 1) if output_stride == 16 else (4, 2)))
        self.aspp = ASPP(512, [6, 12, 18] if output_stride == 16 else [12, 24, 36], out_channels=256)
        self.low_proj = conv_bn_relu(64, 48)
        self.fuse = nn.Sequential(conv_bn_relu(256 + 48, 256, 3), conv_bn_relu(256, 256, 3))
        self.classifier = nn.Conv2d(256, num_classes, 1)

    def forward(self, x):
        b = self.backbone
        low = b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(x)))))
        mid = b.layer2(low)
        last = self.aspp(b.layer4(b.layer3(mid)))
        context = F.interpolate(last, size=low.shape[-2:], mode="bilinear", align_corners=False)
        feat = self.fuse(torch.cat([context, self.low_proj(low)], dim=1))
        return {"low": low, "mid": mid, "last": last, "feat": feat, "logits": self.classifier(feat)}


# ---- The ViT student: MiT-B0 encoder + SegFormer all-MLP decoder.
# Module names follow the official MiT checkpoint so that mit_b0.pth loads as is.

class OverlapPatchEmbed(nn.Module):
    """Strided conv (patches overlap), then LayerNorm over the tokens."""

    def __init__(self, in_channels, dim, *, patch_size, stride):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x):
        x = self.proj(x)
        return self.norm(x.flatten(2).transpose(1, 2)), *x.shape[-2:]


class EfficientSelfAttention(nn.Module):
    """softmax(Q K^T / sqrt(d)) V, with K and V computed on a map shrunk sr_ratio times."""

    def __init__(self, dim, *, heads, sr_ratio):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)  # first dim outputs: keys, next dim: values
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:  # the checkpoint holds sr/norm only where the ratio is > 1
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x, h, w):
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.heads, c // self.heads).transpose(1, 2)
        if hasattr(self, "sr"):
            x = self.norm(self.sr(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2))
        k, v = self.kv(x).reshape(b, -1, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # default scale: head_dim ** -0.5
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class DWConv(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x, h, w):
        b, n, c = x.shape
        return self.dwconv(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)


class MixFFN(nn.Module):
    """Linear -> depthwise 3x3 conv -> GELU -> Linear; the conv leaks position: no position embedding."""

    def __init__(self, dim, *, mlp_ratio):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim * mlp_ratio)
        self.dwconv = DWConv(dim * mlp_ratio)
        self.fc2 = nn.Linear(dim * mlp_ratio, dim)

    def forward(self, x, h, w):
        return self.fc2(F.gelu(self.dwconv(self.fc1(x), h, w)))  # exact (erf) GELU


class MiTBlock(nn.Module):
    def __init__(self, dim, *, heads, sr_ratio, mlp_ratio, drop_path):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = EfficientSelfAttention(dim, heads=heads, sr_ratio=sr_ratio)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MixFFN(dim, mlp_ratio=mlp_ratio)
        self.drop_path = StochasticDepth(drop_path, mode="row")

    def forward(self, x, h, w):
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


class MixTransformer(nn.Module):
    """MiT encoder; the defaults are MiT-B0. forward(x) returns the 4 stage maps (NCHW);
    forward(x, stage=2) runs stage 2 alone on a stage-1 map x and returns its map."""

    def __init__(self, widths=(32, 64, 160, 256), heads=(1, 2, 5, 8), depths=(2, 2, 2, 2),
                 sr_ratios=(8, 4, 2, 1), mlp_ratio=4, drop_path=0.1):
        super().__init__()
        self.widths = widths
        rates = torch.linspace(0, drop_path, sum(depths)).tolist()  # rises block by block
        for i, (dim, n_heads, depth, sr) in enumerate(zip(widths, heads, depths, sr_ratios), 1):
            patch, stride = (7, 4) if i == 1 else (3, 2)
            setattr(self, f"patch_embed{i}", OverlapPatchEmbed(widths[i - 2] if i > 1 else 3, dim,
                                                               patch_size=patch, stride=stride))
            setattr(self, f"block{i}", nn.ModuleList(
                MiTBlock(dim, heads=n_heads, sr_ratio=sr, mlp_ratio=mlp_ratio, drop_path=rates[sum(depths[:i - 1]) + j])
                for j in range(depth)))
            setattr(self, f"norm{i}", nn.LayerNorm(dim, eps=1e-6))
        self.apply(init_mit_weights)

    def forward(self, x, stage=None):
        maps = []
        for i in (1, 2, 3, 4) if stage is None else (stage,):
            x, h, w = getattr(self, f"patch_embed{i}")(x)
            for block in getattr(self, f"block{i}"):
                x = block(x, h, w)
            x = getattr(self, f"norm{i}")(x).transpose(1, 2).reshape(x.shape[0], -1, h, w)
            maps.append(x)
        return maps if stage is None else maps[0]


def init_mit_weights(module):
    """The initialisation of the official MiT code, for training from scratch."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0, math.sqrt(2.0 / fan_out))
        nn.init.zeros_(module.bias)


class SegFormer(nn.Module):
    """MiT-B0 + all-MLP decoder. Returns {low, mid, last, feat, logits}: F₁ᵛ, F₂ᵛ, Fₗᵛ = the stage-1, 2 and 4
    maps (stride 4, 8, 32), the decoder feature and the class scores (both stride 4)."""

    def __init__(self, num_classes, encoder_weights=None, embed_dim=256, drop_path=0.1):
        super().__init__()
        self.encoder = MixTransformer(drop_path=drop_path)
        self.weights_layout = None
        if encoder_weights is not None:
            self.weights_layout = load_encoder_weights(self.encoder, read_weights(encoder_weights))
        self.linear = nn.ModuleList(nn.Conv2d(w, embed_dim, 1) for w in self.encoder.widths)  # per-token Linears
        self.fuse = conv_bn_relu(4 * embed_dim, embed_dim)
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = nn.Conv2d(embed_dim, num_classes, 1)

    def forward(self, x):
        maps = self.encoder(x)
        fused = torch.cat([F.interpolate(lin(m), size=maps[0].shape[-2:], mode="bilinear", align_corners=False)
                           for lin, m in zip(self.linear, maps)], dim=1)
        feat = self.fuse(fused)
        return {"low": maps[0], "mid": maps[1], "last": maps[3], "feat": feat,
                "logits": self.classifier(self.dropout(feat))}


# ---- The method, as the framework figure draws it. Its symbols: F₁ᶜ, F₂ᶜ (ResNet layer1, layer2), F₁ᵛ, F₂ᵛ
# (MiT stages 1, 2), Fₗᶜ, Fₗᵛ (each encoder's last feature), Γ (a projector, owned by the learner),
# Pᶜ, Pᵛ (the predictions); sg = stop-gradient, n = L2 normalisation over the channels.
#
# HFD, "HFD Eq. (2)": heterogeneous feature distillation between the low layers

def feature_distance(student, teacher):
    """‖n(student) − sg(n(teacher))‖² at each position: (B, C, H, W) -> (B, H, W). In fp32 with autocast
    off: for features that nearly agree the distance is a small difference of large numbers, noise in bf16."""
    assert student.shape == teacher.shape, f"shapes differ: {tuple(student.shape)} vs {tuple(teacher.shape)}"
    with torch.autocast(student.device.type, enabled=False):
        return (F.normalize(student.float(), dim=1) - F.normalize(teacher.detach().float(), dim=1)).pow(2).sum(1)


def projector(in_channels, out_channels):
    """Γ: 1x1 conv -> BN -> ReLU -> 1x1 conv [I]."""
    return nn.Sequential(conv_bn_relu(in_channels, out_channels), nn.Conv2d(out_channels, out_channels, 1))


def frozen(module, parts=("",), **kwargs):
    """module(x, **kwargs) as a fixed function in a loss, handed only the tensors of its children `parts` ("": all):
    weights detached (no gradient from it), buffers copied (BN running stats stay), in its own mode [I]."""
    children = [(part, module.get_submodule(part)) for part in parts]
    state = {name: p.detach() for part, child in children for name, p in child.named_parameters(part)}
    state |= {name: b.clone() for part, child in children for name, b in child.named_buffers(part)}
    return lambda x: torch.func.functional_call(module, state, (x,), kwargs)


class HFD(nn.Module):
    """The figure's two insets. Each student's F₁, projected into the peer's form by its own Γ₁, goes
    through the peer's next block (a fixed function, see `frozen`) and must give the peer's own F₂ [I]:

        "ViT to CNNs":  loss_cnn = mean_positions ‖n(Attn(Γ₁ᶜ(F₁ᶜ))) − sg(n(F₂ᵛ))‖²,  Attn = MiT stage 2
        "CNNs to ViT":  loss_vit = mean_positions ‖n(MLP(Γ₁ᵛ(F₁ᵛ))) − sg(n(F₂ᶜ))‖²,   MLP = ResNet layer2
    """

    def __init__(self, cnn_channels=64, vit_channels=32):
        super().__init__()
        self.cnn_to_vit = projector(cnn_channels, vit_channels)  # Γ₁ᶜ, trained with the CNN
        self.vit_to_cnn = projector(vit_channels, cnn_channels)  # Γ₁ᵛ, trained with the ViT

    def forward(self, f1_cnn, f1_vit, f2_cnn, f2_vit, cnn_next, vit_next):
        """cnn_next, vit_next: each peer's next block, F₁ -> F₂, as a fixed function."""
        return (feature_distance(vit_next(self.cnn_to_vit(f1_cnn)), f2_vit).mean(),
                feature_distance(cnn_next(self.vit_to_cnn(f1_vit)), f2_cnn).mean())


# ---- Region-wise BSD, "BSD" of the figure: in each region the student whose prediction is more
# reliable there ("Select" from Pᶜ, Pᵛ) teaches the other one, on the encoders' last features

def region_sums(x, region_size):
    """Sum a (B, H, W) map over region_size² blocks; the last row/column may be partial."""
    h, w = x.shape[-2:]
    x = F.pad(x, (0, -w % region_size, 0, -h % region_size))
    b, hp, wp = x.shape
    return x.reshape(b, hp // region_size, region_size, wp // region_size, region_size).sum((2, 4))


def region_bsd_masks(ce_cnn, ce_vit, target, region_size=32, ignore_index=255, margin=0.0):
    """Which student teaches each region_size² block R of the label grid, from the per-pixel CE of Pᶜ
    and Pᵛ against the label [I] (0/1 error maps compare error rates), averaged over R's valid pixels:
        cnn_teaches[R] = R has a valid pixel and  mean_CE_vit(R) − mean_CE_cnn(R) > margin
    vit_teaches the mirror image; ties and empty blocks: neither. (B, H, W) -> (B, ⌈H/r⌉, ⌈W/r⌉)."""
    valid = (target != ignore_index).to(ce_cnn.dtype)
    count = region_sums(valid, region_size)
    mean_cnn = region_sums(ce_cnn.detach() * valid, region_size) / count.clamp_min(1)
    mean_vit = region_sums(ce_vit.detach() * valid, region_size) / count.clamp_min(1)
    cnn_teaches = (count > 0) & (mean_vit - mean_cnn > margin)
    vit_teaches = (count > 0) & (mean_cnn - mean_vit > margin)
    return cnn_teaches.to(ce_cnn.dtype), vit_teaches.to(ce_cnn.dtype)


def expand_region_mask(mask, cells_per_region, size):
    """Region grid -> feature grid, exactly: cell (y, x) belongs to region (y // s, x // s), s = cells_per_region."""
    return mask.repeat_interleave(cells_per_region, 1).repeat_interleave(cells_per_region, 2)[:, :size[0], :size[1]]


class RegionBSD(nn.Module):
    """The transfer on Fₗᶜ (ASPP's output, where DeepLabV3+'s encoder ends [I]) and Fₗᵛ (MiT stage 4),
    each through its learner's Γₗ [I], on the ViT's stride-32 grid, onto which Fₗᶜ is averaged:

        loss_vit = Σ_positions m_c→v·v·‖n(Γₗᵛ(Fₗᵛ)) − sg(n(Fₗᶜ))‖² / N_valid
        loss_cnn = Σ_positions m_v→c·v·‖n(Γₗᶜ(Fₗᶜ)) − sg(n(Fₗᵛ))‖² / N_valid

    m_c→v: cnn_teaches expanded from regions to positions; v: the positions whose 32×32 label cell holds a
    valid pixel, N_valid their count (an untaught one adds 0) [I]; per_taught=True divides by Σ m·v."""

    def __init__(self, channels=256, region_size=32, cnn_stride=16):
        super().__init__()
        assert region_size % 32 == 0, f"region_size must be a multiple of 32 (the grid's stride), got {region_size}"
        self.cells_per_region, self.pool = region_size // 32, 32 // cnn_stride
        self.q_cnn = nn.Conv2d(channels, channels, 1)  # Γₗᶜ, trained with the CNN
        self.q_vit = nn.Conv2d(channels, channels, 1)  # Γₗᵛ, trained with the ViT

    def forward(self, last_cnn, last_vit, cnn_teaches, vit_teaches, valid, per_taught=False):
        """last_cnn at the CNN's stride, last_vit at 32; the masks from region_bsd_masks; valid: the
        label's valid pixels (B, H, W)."""
        f_cnn = F.avg_pool2d(last_cnn, self.pool, ceil_mode=True)  # the cells of one 32-pixel block, averaged
        cells = F.max_pool2d(valid[:, None].float(), 32, ceil_mode=True)[:, 0]  # 1: the cell has a valid pixel
        m_cnn_to_vit = expand_region_mask(cnn_teaches, self.cells_per_region, cells.shape[-2:]) * cells
        m_vit_to_cnn = expand_region_mask(vit_teaches, self.cells_per_region, cells.shape[-2:]) * cells
        n_cnn, n_vit = (m_vit_to_cnn.sum(), m_cnn_to_vit.sum()) if per_taught else (cells.sum(), cells.sum())
        return ((m_vit_to_cnn * feature_distance(self.q_cnn(f_cnn), last_vit)).sum() / n_cnn.clamp_min(1),
                (m_cnn_to_vit * feature_distance(self.q_vit(last_vit), f_cnn)).sum() / n_vit.clamp_min(1))


# ---- Pixel-wise BSD: which predictions are transferred, in the logit space -------------------------------------------

def pixel_bsd_masks(logits_cnn, logits_vit, target, ignore_index=255, learner_must_be_wrong=True):
    """cnn_teaches = valid & (argmax z_c == y) & (argmax z_v != y) [I]; vit_teaches the mirror.
    With learner_must_be_wrong=False, a right teacher teaches whatever the learner says.
    Logits (B, C, H, W) at label resolution; outputs float {0,1} of shape (B, H, W)."""
    valid = target != ignore_index
    cnn_teaches, vit_teaches = valid & (logits_cnn.argmax(1) == target), valid & (logits_vit.argmax(1) == target)
    if learner_must_be_wrong:
        cnn_teaches, vit_teaches = cnn_teaches & ~vit_teaches, vit_teaches & ~cnn_teaches
    return cnn_teaches.to(logits_cnn.dtype), vit_teaches.to(logits_cnn.dtype)


def log_probs(logits, temperature=1.0):
    """log softmax(z/T) over the classes (dim 1), in fp32 with autocast off; no division when T = 1. Each
    student's, computed once, serves its CE (at T = 1) and both KL directions."""
    with torch.autocast(logits.device.type, enabled=False):
        return F.log_softmax(logits.float() if temperature == 1 else logits.float() / temperature, dim=1)


def kl_map(log_p_student, log_p_teacher):
    """KL(sg P_t ‖ P_s) = Σ_c p_t·(log p_t − log p_s) per pixel, from log-probabilities at temperature T (log_probs):
    (B, C, H, W) -> (B, H, W), fp32, autocast off. Summed as −Σ_c p_t·(log p_s − log p_t): no negation in backward."""
    with torch.autocast(log_p_student.device.type, enabled=False):
        log_p_teacher = log_p_teacher.detach().float()
        return -(log_p_teacher.exp() * (log_p_student.float() - log_p_teacher)).sum(1)


def pixel_bsd_loss(log_p_cnn, log_p_vit, cnn_teaches, vit_teaches, valid, temperature=1.0, per_taught=False):
    """loss_vit = T²·Σ_pixels cnn_teaches·KL(sg Pᶜ ‖ Pᵛ) / N_valid, loss_cnn the mirror image, from the students'
    log-probabilities at temperature T (log_probs); N_valid counts the valid label pixels (an untransferred one
    adds 0) [I]; per_taught=True divides by Σ m. With both masks = valid, this is deep mutual learning (DML)."""
    n_cnn, n_vit = (vit_teaches.sum(), cnn_teaches.sum()) if per_taught else (valid.sum(), valid.sum())
    return (temperature ** 2 * (vit_teaches * kl_map(log_p_cnn, log_p_vit)).sum() / n_cnn.clamp_min(1),
            temperature ** 2 * (cnn_teaches * kl_map(log_p_vit, log_p_cnn)).sum() / n_vit.clamp_min(1))


# ---- The objective: both students' losses from one forward pass ------------------------------------------------------

def upsample_logits(logits, size):
    """Class scores in fp32, resized (bilinear) to the label's size: CE, masks, confusion matrix live there."""
    return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)


def sigmoid_rampup(step, length):
    """w(t) = exp(−5 (1 − t/T)²), rising from ~0 to 1 over T steps, then 1 [I]."""
    return 1.0 if length <= 0 or step >= length else math.exp(-5.0 * (1.0 - step / length) ** 2)


class CTCL(nn.Module):
    """Both students and the projectors each one owns; forward() returns the objective:

        L_cnn = CE_cnn + w(t)·(λ_hfd·HFD_cnn + λ_rbsd·RBSD_cnn + λ_pbsd·PBSD_cnn)      ("CE Eq. (1)" + ...)
        L_vit = CE_vit + w(t)·(λ_hfd·HFD_vit + λ_rbsd·RBSD_vit + λ_pbsd·PBSD_vit)

    Every teacher side is detached: one backward of L_cnn + L_vit gives each student its own
    gradients. "independent": CE alone; "dml": + KL(sg p_peer || p_self) on every valid pixel.
    A term whose λ is 0 is not built (no idle parameters for DDP)."""

    def __init__(self, num_classes, *, method="ctcl", lambda_hfd=1.0, lambda_rbsd=1.0, lambda_pbsd=1.0,
                 region_size=32, rbsd_margin=0.0, region_score="ce", temperature=1.0, pixel_rule="exclusive",
                 bsd_norm="valid", output_stride=16, pretrained=False, vit_weights=None, ignore_index=255):
        super().__init__()
        assert method in ("independent", "dml", "ctcl") and region_score in ("ce", "error") and \
            pixel_rule in ("exclusive", "teacher-right", "lower-ce", "all") and bsd_norm in ("selected", "valid")
        self.method, self.region_score, self.pixel_rule, self.bsd_norm = method, region_score, pixel_rule, bsd_norm
        self.region_size, self.margin, self.temperature = region_size, rbsd_margin, temperature
        self.ignore_index = ignore_index
        self.lambdas = {"dml": 1.0, "hfd": lambda_hfd, "rbsd": lambda_rbsd, "pbsd": lambda_pbsd}
        self.cnn = DeepLabV3Plus(num_classes, output_stride=output_stride, pretrained=pretrained)
        self.vit = SegFormer(num_classes, encoder_weights=vit_weights)
        ctcl = method == "ctcl"
        self.hfd = HFD(64, 32) if ctcl and lambda_hfd else None
        self.rbsd = RegionBSD(256, region_size, output_stride) if ctcl and lambda_rbsd else None
        self.use_pbsd = ctcl and bool(lambda_pbsd)

    def parameter_groups(self):
        """(CNN side, ViT encoder, ViT heads) parameters; a projector trains with the student that owns it."""
        cnn = [self.cnn] + ([self.hfd.cnn_to_vit] if self.hfd else []) + ([self.rbsd.q_cnn] if self.rbsd else [])
        vit_heads = [self.vit.linear, self.vit.fuse, self.vit.classifier]
        vit_heads += ([self.hfd.vit_to_cnn] if self.hfd else []) + ([self.rbsd.q_vit] if self.rbsd else [])
        return [[p for m in modules for p in m.parameters()] for modules in (cnn, [self.vit.encoder], vit_heads)]

    def forward(self, images, target, kd_weight=1.0):
        """Returns L_cnn, L_vit and a dict of detached numbers worth logging."""
        return self.objective(self.cnn(images), self.vit(images), target, kd_weight)

    def objective(self, out_cnn, out_vit, target, kd_weight=1.0):
        """CE against the label, each exchange of --method as a (CNN term, ViT term) pair, then L_cnn, L_vit, logs."""
        z_cnn, z_vit = (upsample_logits(out["logits"], target.shape[-2:]) for out in (out_cnn, out_vit))  # Pᶜ, Pᵛ
        valid = (target != self.ignore_index).float()
        n_valid = valid.sum().clamp_min(1)
        log_p = log_probs(z_cnn), log_probs(z_vit)  # once per student: its CE and, at T = 1, both KL directions
        ce_cnn, ce_vit = (F.nll_loss(lp, target, ignore_index=self.ignore_index, reduction="none") for lp in log_p)
        log_p_t = log_p if self.temperature == 1 else [log_probs(z, self.temperature) for z in (z_cnn, z_vit)]
        logged = {"ce_cnn": ce_cnn.sum() / n_valid, "ce_vit": ce_vit.sum() / n_valid}
        kd = {}  # name -> (term of the CNN, term of the ViT), before λ and w(t)
        if self.method == "dml":
            kd["dml"] = pixel_bsd_loss(*log_p_t, valid, valid, valid, self.temperature)
        if self.hfd is not None:  # the peers' next blocks as fixed functions
            vit_next = frozen(self.vit.encoder, ("patch_embed2", "block2", "norm2"), stage=2)
            kd["hfd"] = self.hfd(out_cnn["low"], out_vit["low"], out_cnn["mid"], out_vit["mid"],
                                 cnn_next=frozen(self.cnn.backbone.layer2), vit_next=vit_next)
        if self.rbsd is not None:
            kd["rbsd"], regions = self.region_bsd(out_cnn["last"], out_vit["last"], z_cnn, z_vit, ce_cnn, ce_vit,
                                                  target, valid)
            logged["regions_cnn_teaches"], logged["regions_vit_teaches"] = (m.mean() for m in regions)
        if self.use_pbsd:
            kd["pbsd"], pixels = self.pixel_bsd(z_cnn, z_vit, log_p_t, ce_cnn, ce_vit, target, valid)
            logged["pixels_cnn_to_vit"], logged["pixels_vit_to_cnn"] = (m.sum() / n_valid for m in pixels)
        loss_cnn = logged["ce_cnn"] + kd_weight * sum(self.lambdas[name] * c for name, (c, v) in kd.items())
        loss_vit = logged["ce_vit"] + kd_weight * sum(self.lambdas[name] * v for name, (c, v) in kd.items())
        for name, (c, v) in kd.items():
            logged[f"{name}_cnn"], logged[f"{name}_vit"] = c, v
        logged["loss_cnn"], logged["loss_vit"] = loss_cnn, loss_vit
        return loss_cnn, loss_vit, {k: v.detach() for k, v in logged.items()}

    def region_bsd(self, last_cnn, last_vit, z_cnn, z_vit, ce_cnn, ce_vit, target, valid):
        """Who teaches each region ("Select"), then the transfer on Fₗᶜ, Fₗᵛ. A region's score [I]: mean CE,
        or (--region-score error) the error rate."""
        scores = (ce_cnn, ce_vit) if self.region_score == "ce" else [(z.argmax(1) != target).float()
                                                                      for z in (z_cnn, z_vit)]
        masks = region_bsd_masks(*scores, target, self.region_size, self.ignore_index, self.margin)
        return self.rbsd(last_cnn, last_vit, *masks, valid, self.bsd_norm == "selected"), masks

    def pixel_bsd(self, z_cnn, z_vit, log_p_t, ce_cnn, ce_vit, target, valid):
        """Which pixels each student teaches (--pixel-rule [I]), then the masked KL of log_p_t (log_probs at T)."""
        if self.pixel_rule == "all":  # no selection: every valid pixel both ways, the DML term
            masks = valid, valid
        elif self.pixel_rule == "lower-ce":  # the student with the lower CE teaches: region BSD's rule, 1×1 regions
            masks = region_bsd_masks(ce_cnn, ce_vit, target, 1, self.ignore_index)
        else:
            masks = pixel_bsd_masks(z_cnn, z_vit, target, self.ignore_index, self.pixel_rule == "exclusive")
        return pixel_bsd_loss(*log_p_t, *masks, valid, self.temperature, self.bsd_norm == "selected"), masks


# ---- Data: the synthetic task, the real data sets, the joint transforms, the sampler ---------------------------------

SYNTHETIC_CLASSES = ("background", "stripes", "dots", "disc", "square")
PLAIN_OUTLINES = {"disc": "ellipse", "square": "rectangle"}  # the plain classes: told by outline alone
OUTLINES = {"ellipse": lambda u, v: u ** 2 + v ** 2 < 1, "rectangle": lambda u, v: u.abs().maximum(v.abs()) < 0.85,
            "diamond": lambda u, v: u.abs() + v.abs() < 1.15}  # inside-tests, coordinates divided by the radii


def texture(name, y, x, period, horizontal):
    """1 (light) / 0 (dark) pattern of an object of class `name` on image coordinates."""
    if name == "stripes":  # horizontal or vertical: a flip keeps the class
        return ((y if horizontal else x) / (period / 2)).floor() % 2
    if name == "dots":
        return ((y % period - period / 2) ** 2 + (x % period - period / 2) ** 2 < (period / 3.5) ** 2).float()
    return torch.ones_like(y)  # plain: one flat colour


def ignore_borders(label, width=1, ignore_index=255):
    """Set to ignore_index every pixel within `width` of a different class, as VOC does."""
    x = F.pad(label[:, None].float(), [width] * 4, mode="replicate")
    hi, minus_lo = (F.max_pool2d(sign * x, 2 * width + 1, stride=1) for sign in (1, -1))  # max, -min of each window
    return label.masked_fill((hi != -minus_lo)[:, 0], ignore_index)


@functools.lru_cache(maxsize=4)  # the tensors are never modified, so runs in one process share them
def make_synthetic(n, size=64, seed=0, max_objects=3, radius=(0.2, 0.4), period=(6, 12)):
    """n images (uint8, 3×size×size) and labels of overlapping objects on grey, whose colour never tells the
    class: two are textures (stripes, dots) of any outline, two are told by outline alone (disc, square): in
    our trials the CNN learned textures sooner, the ViT kept up on outlines, so the students err apart."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    images, labels = torch.empty(n, 3, size, size, dtype=torch.uint8), torch.zeros(n, size, size, dtype=torch.uint8)
    for i in range(n):  # a grey under colour noise: unsaturated, like road, wall or sky
        image = 40 + 175 * torch.rand(1, 1, 1, generator=g) + 20 * torch.randn(3, size, size, generator=g)
        for _ in range(int(torch.randint(1, max_objects + 1, (1,), generator=g))):
            cls = int(torch.randint(1, len(SYNTHETIC_CLASSES), (1,), generator=g))
            name = SYNTHETIC_CLASSES[cls]
            kind = list(OUTLINES)[int(torch.randint(0, 3, (1,), generator=g))]
            cy, cx, ry, rx, angle, p, py, px, turn = torch.rand(9, generator=g).tolist()
            ry, rx = (size * (radius[0] + (radius[1] - radius[0]) * r) for r in (ry, rx))
            if name in PLAIN_OUTLINES:  # round discs and square squares: the outline is the class
                kind, rx = PLAIN_OUTLINES[name], ry
            angle, p = 2 * math.pi * angle, period[0] + (period[1] - period[0]) * p
            dy, dx = yy - cy * size, xx - cx * size
            inside = OUTLINES[kind]((dy * math.cos(angle) - dx * math.sin(angle)) / ry,
                                    (dy * math.sin(angle) + dx * math.cos(angle)) / rx)
            pattern = texture(name, yy + py * p, xx + px * p, p, turn < 0.5)
            # a saturated colour of any hue, drawn alike for every class
            rgb = torch.stack([180 + 75 * torch.rand(1, generator=g), 60 * torch.rand(1, generator=g),
                               255 * torch.rand(1, generator=g)])[torch.randperm(3, generator=g)].reshape(3, 1, 1)
            colour = rgb * (0.35 + 0.65 * pattern) + 5 * torch.randn(3, size, size, generator=g)
            image = torch.where(inside, colour, image)
            labels[i][inside] = cls
        images[i] = image.clamp(0, 255).to(torch.uint8)
    return images, ignore_borders(labels)


@contextlib.contextmanager
def opened(path, what="image"):
    """PIL.Image.open, with a damaged or foreign file as one line that names it."""
    try:
        with PIL.Image.open(path) as image:
            yield image
    except (OSError, SyntaxError, ValueError, RuntimeError) as error:  # RuntimeError: torchvision.io's
        raise UserError(f"cannot decode {what} {path} ({type(error).__name__}): the file is damaged or not an "
                        "image; replace it or leave it out (data_prep.sh fetches a data set's again)") from None


def read_image(path):
    """uint8 RGB (3, H, W) of any image PIL opens, turned as EXIF says (as phones show it); JPEG, PNG by torchvision."""
    with contextlib.suppress(RuntimeError, AttributeError):  # CMYK, damaged, decoders gone (deprecated in 0.29)
        if pathlib.Path(path).suffix.lower() in (".jpg", ".jpeg", ".png"):
            image = torchvision.io.decode_image(torchvision.io.read_file(str(path)), torchvision.io.ImageReadMode.RGB,
                                                apply_exif_orientation=True)
            return image if image.dtype == torch.uint8 else (image.int() >> 8).byte()  # 16 bits: the top byte
    with opened(path) as image:
        image = PIL.ImageOps.exif_transpose(image)
        if image.mode.startswith("I"):  # 16- or 32-bit grey: convert("RGB") would clip, so keep the top byte
            image = PIL.Image.fromarray((numpy.asarray(image) >> 8).astype(numpy.uint8))
        return torch.from_numpy(numpy.array(image.convert("RGB"))).permute(2, 0, 1)


def image_header(path):
    """(H, W) of an image as read_image turns it and its EXIF orientation (1: as stored, 5-8: turned 90°), from the
    header alone: as torchvision.io, not a PNG's eXIf past its pixels (PIL would decode the image to find it)."""
    with opened(path) as image:
        turn = (image.getexif() if image.format != "PNG" or "exif" in image.info else {}).get(0x0112, 1)
        return (image.size if turn in (5, 6, 7, 8) else image.size[::-1]), turn


def read_label(path, size=None, image=None):
    """A label PNG of class ids (palette or grey) as uint8 (H, W), of the size of its `image` as read_image turns it."""
    with opened(path, "label") as png:
        if png.mode not in ("P", "L", "1", "I", "I;16"):
            raise UserError(f"label {path} is {png.mode} colour, not class indices: store each pixel's class "
                            "index (0, 1, ...; 255 ignored), e.g. as a palette PNG")
        fast = png.mode in ("P", "L") and hasattr(torchvision.io, "decode_png")  # 8 bits: as read_image
        label = torchvision.io.decode_png(torchvision.io.read_file(str(path)))[0].numpy() if fast else numpy.array(png)
    if label.itemsize > 1 and not 0 <= label.min(initial=0) <= label.max(initial=0) <= 255:  # 16 or 32 bits
        raise UserError(f"label {path} holds values from {label.min()} to {label.max()}: store class indices 0, 1, "
                        f"... ({IGNORE_INDEX}: ignored) in 8 bits")
    if size is not None and label.shape != tuple(size):
        turned = label.shape == tuple(size)[::-1] and image_header(image)[1] in (5, 6, 7, 8)
        raise UserError(f"label {path} is {label.shape} but its image is {tuple(size)}" + (
            " as its EXIF orientation turns it: a label follows the image as a viewer shows it (turned); turn the "
            "label too" if turned else ": a label must have its image's size"))
    return torch.from_numpy(label.astype(numpy.uint8, copy=False))


class SegmentationSet(torch.utils.data.Dataset):
    """Items: (uint8 image, uint8 label) pairs, or the pairs of their files (read here, in a loader's worker), each
    transformed; a training item (index, seed) seeds its augmentation."""

    def __init__(self, items, transform):
        self.items, self.transform = items, transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        image, label = self.items[index]
        if isinstance(label, pathlib.Path):
            path, image = image, read_image(image)
            label = read_label(label, image.shape[-2:], path)
        with torch.random.fork_rng(devices=[]):  # leave the caller's random stream alone
            if seed is not None:  # the CPU's only: the GPU's drive dropout, drop path
                torch.random.default_generator.manual_seed(seed)
            return self.transform(image, label)


def read_lines(path):
    """The non-empty lines of a UTF-8 text file, stripped (a byte-order mark, as Notepad writes, dropped)."""
    try:
        text = pathlib.Path(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not UTF-8 text (at byte {error.start}): save it as UTF-8") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def voc_pairs(root, split):
    """VOC 2012: train_aug (SBD labels in SegmentationClassAug) when present, else train."""
    root, label_dir = pathlib.Path(root), "SegmentationClass"
    if split == "train" and (root / "ImageSets/Segmentation/train_aug.txt").exists():
        split, label_dir = "train_aug", "SegmentationClassAug"
    path = root / f"ImageSets/Segmentation/{split}.txt"
    stems = read_lines(path) if path.is_file() else []
    if not stems:
        raise UserError(f"split list {path} is {'empty' if path.exists() else 'missing'}: run "
                        "`bash data_prep.sh voc` or fix --data-root")
    return [(root / "JPEGImages" / f"{i}.jpg", root / label_dir / f"{i}.png") for i in stems]


def cityscapes_pairs(root, split):
    """leftImg8bit/SPLIT/CITY/*_leftImg8bit.png with gtFine/SPLIT/CITY/*_gtFine_labelIds.png."""
    try:
        found = torchvision.datasets.Cityscapes(root, split=split, mode="fine", target_type="semantic")
    except RuntimeError:
        raise UserError(f"cityscapes {split} images or labels are missing under {root}: run "
                        "`bash data_prep.sh cityscapes`") from None
    return [(pathlib.Path(image), pathlib.Path(target[0])) for image, target in zip(found.images, found.targets)]


def camvid_pairs(root, split):
    """SegNet's CamVid: {train,val,test}/ and {train,val,test}annot/, void = 11; split: e.g. "train+val"."""
    root = pathlib.Path(root)
    return [(p, root / f"{s}annot" / p.name) for s in split.split("+") for p in sorted((root / s).glob("*.png"))]


def files_by_stem(folder, suffixes):
    """{stem: path} of the files in folder with these suffixes, in any case; hidden ones (macOS's ._x.jpg) skipped."""
    files = [p for p in sorted(folder.glob("*")) if p.suffix.lower() in suffixes and not p.name.startswith(".")]
    stems = collections.Counter(p.stem for p in files)
    if twice := [p.name for p in files if stems[p.stem] > 1]:
        raise UserError(f"{folder} has {twice[0]} and {twice[1]}, two files of one stem: keep one of them")
    return {p.stem: p for p in files}


def folder_pairs(root, split):
    """Your own data: images/<stem>.jpg (.jpeg, .png, .bmp), labels/<stem>.png, stems in train.txt, val.txt."""
    images = files_by_stem(root / "images", (".jpg", ".jpeg", ".png", ".bmp"))
    labels, lists = files_by_stem(root / "labels", (".png",)), [root / "train.txt", root / "val.txt"]
    if not any(p.is_file() for p in lists):
        stems = [s for k, s in enumerate(sorted(images.keys() | labels.keys())) if (k % 10 == 0) == (split == "val")]
    elif not all(p.is_file() for p in lists):
        raise UserError(f"{root} has one of train.txt and val.txt: write both lists of stems, or neither (then "
                        "every 10th sorted stem is for validation)")
    else:
        listed = [read_lines(p) for p in lists]
        if twice := [stem for stem, n in collections.Counter(listed[0] + listed[1]).items() if n > 1]:
            raise UserError(f"{root}: the stem {twice[0]} is listed twice (train.txt, val.txt): list each image once")
        stems = listed[split == "val"]
    for stem in stems:
        if stem not in labels or stem not in images:
            what = images.get(stem) or labels.get(stem) or f"{lists[split == 'val']} lists {stem}, which"
            lack = f"label labels/{stem}.png" if stem in images else f"image images/{stem}.jpg (or .jpeg, .png, .bmp)"
            raise UserError(f"{what} has no {lack} under {root}: add it, or leave {stem} out" + (
                stem not in images.keys() | labels.keys()) * f" (a stem is a file's name without folder and suffix, "
                f"e.g. {pathlib.PurePath(stem).stem})")
    return [(images[stem], labels[stem]) for stem in stems]


def read_classes(root):
    """The names in DIR/classes.txt, one a line, class 0 first, and their colours ('name r g b', else VOC's)."""
    path = pathlib.Path(root) / "classes.txt"
    if not path.parent.is_dir():
        raise UserError(f"--data-root {root} is not a folder: give the one that holds images/, labels/, classes.txt")
    lines = [line.split() for line in read_lines(path)] if path.is_file() else []
    if not 0 < len(lines) < 256:
        problem = "is missing" if not path.is_file() else f"names {len(lines)} classes" if lines else "is empty"
        raise UserError(f"{path} {problem}: write the class names in it, one a line, class 0 first, 255 at most "
                        "('name r g b' sets a colour)")
    rgb = [words[-3:] if len(words) > 3 and all(w.isdigit() and int(w) < 256 for w in words[-3:]) else None
           for words in lines]
    names = [" ".join(words[:-3] if c else words) for words, c in zip(lines, rgb)]
    if twice := next((name for name in names if names.count(name) > 1), None):
        raise UserError(f"{path} names the class {twice} twice: give each class its own name")
    return names, [[int(v) for v in c] if c else PALETTE[k].tolist() for k, c in enumerate(rgb)]


def check_labels(train_pairs, val_pairs, classes):
    """Every label once, before training: mode, size, values, the 0/255 trap (255 is "ignore"), unseen classes,
    images that EXIF turns (said once: their labels are taken to follow them turned)."""
    pairs, seen = train_pairs + val_pairs, torch.zeros(2, 256, dtype=torch.bool)  # training, validation labels
    says, turned = os.environ.get("RANK", "0") == "0", []  # under torchrun every process checks, and one speaks
    for k, (image, label) in enumerate(pairs, 1):
        size, turn = image_header(image)
        values = read_label(label, size, image).unique().long()
        if bad := [v for v in values.tolist() if len(classes) <= v != IGNORE_INDEX]:
            raise UserError(f"label {label} holds values {bad[:5]} outside [0, {len(classes)}) that are not "
                            f"{IGNORE_INDEX}: fix the label, or list the class")
        seen[int(k > len(train_pairs)), values] = True
        turned += [image] * (turn != 1)
        if k % 1000 == 0 and says:
            print(f"checked {k} of {len(pairs)} labels", file=sys.stderr)
    if seen.any(0).nonzero().flatten().tolist() == [0, IGNORE_INDEX]:
        raise UserError(f"the labels in {pairs[0][1].parent} hold only 0 and 255, and 255 means 'ignore': the "
                        "foreground would never be learnt; store it as 1 (and name it on line 2 of classes.txt)")
    if (never := [name for c, name in enumerate(classes) if not seen[0, c]]) and says:
        print(f"warning: the training labels never show {', '.join(never)}", file=sys.stderr)
    if turned and says:
        print(f"warning: {len(turned)} images carry an EXIF rotation, e.g. {turned[0]}: their labels are taken to "
              "follow the image as a viewer shows it (rotated)", file=sys.stderr)


VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
               "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor")
CITYSCAPES_TRAINED = [c for c in torchvision.datasets.Cityscapes.classes if 0 <= c.train_id < 19]  # 19 of 35 ids
CITYSCAPES_CLASSES = tuple(c.name for c in sorted(CITYSCAPES_TRAINED, key=lambda c: c.train_id))
CAMVID_CLASSES = ("sky", "building", "pole", "road", "pavement", "tree", "sign", "fence", "car",
                  "pedestrian", "bicyclist")
CAMVID_COLOURS = ((128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
                  (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192))  # SegNet's colour map
# id -> class (uint8): Cityscapes' 19 by its official table (torchvision's), VOC's 21, CamVid's 11 (11: void) as they
# are; any other id is 255, so that no label of theirs needs a check
CITYSCAPES_LUT = torch.full((256,), IGNORE_INDEX, dtype=torch.uint8).index_put_(
    (torch.tensor([c.id for c in CITYSCAPES_TRAINED]),), torch.tensor([c.train_id for c in CITYSCAPES_TRAINED]).byte())
VOC_LUT, CAMVID_LUT = (torch.arange(256).masked_fill(torch.arange(256) >= n, IGNORE_INDEX).byte() for n in (21, 11))
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # normalize's: every data set's images

# name: classes, root, crop, batch, iterations, reader of (image, label) pairs, splits, other defaults (lr, evals)
CAMVID = dict(classes=CAMVID_CLASSES, root="data/CamVid", crop=(360, 480), batch=8, iters=20_000,
              pairs=camvid_pairs, train="train+val", val="test", lut=CAMVID_LUT, colours=CAMVID_COLOURS)
DATASETS = {
    # synthetic trains from scratch in under 3 CPU minutes: higher learning rates, one evaluation
    "synthetic": dict(classes=SYNTHETIC_CLASSES, root=None, crop=48, batch=16, iters=360,
                      cnn_lr=0.02, vit_lr=6e-4, evals=1),
    "voc": dict(classes=VOC_CLASSES, root="data/VOCdevkit/VOC2012", crop=512, batch=16, iters=40_000,
                pairs=voc_pairs, train="train", val="val", lut=VOC_LUT),
    "cityscapes": dict(classes=CITYSCAPES_CLASSES, root="data/cityscapes", crop=(512, 1024), batch=8, iters=80_000,
                       pairs=cityscapes_pairs, train="train", val="val", lut=CITYSCAPES_LUT),
    "camvid": CAMVID,  # the protocol of final numbers: train + val, evaluated on test
    "camvid-val": dict(CAMVID, train="train", val="val"),  # for choosing a recipe without the test set
    # your own small set, from ImageNet weights: batch 8, half VOC's (about 6 GB in fp32); 10k iterations see
    # 80k crops (VOC's 40k × 16: 60 epochs of 10,582 images; here 200 of 400)
    "folder": dict(classes=None, root=None, crop=512, batch=8, iters=10_000, pairs=folder_pairs, train="train",
                   val="val"),
}


def build_datasets(name, root, crop_size, data_seed=0, synthetic_size=(512, 256), classes=None):
    """(train, val) data sets, train items augmented; a folder's labels checked first, and each validation
    image's size (32 pixels a side at least). val.largest_side: what --predict scales larger photos down to."""
    spec = DATASETS[name]
    classes, lut = classes or spec["classes"], spec.get("lut")
    if name == "synthetic":
        sets = [make_synthetic(n, seed=data_seed + k) for k, n in enumerate(synthetic_size)]
        splits, largest = [list(zip(*s)) for s in sets], sets[1][0].shape[-1]
    else:
        root = pathlib.Path(root or spec["root"])
        if not root.is_dir():
            raise UserError(f"no {name} data at {root.resolve()}: run `bash data_prep.sh {name.split('-')[0]}` "
                            "or point --data-root at it")
        splits = [spec["pairs"](root, split) for split in (spec["train"], spec["val"])]
        for split, pairs in zip((spec["train"], spec["val"]), splits):
            missing = next((p for pair in pairs for p in pair if not p.exists()), None)
            if missing or not pairs:
                raise UserError(f"{name} {split} files are missing, e.g. {missing}" if pairs else
                                f"no {split} images found for {name} under {root}")
        if name == "folder":
            check_labels(*splits, classes)
        sides = [image_header(image)[0] for image, _ in splits[1]]
        if small := next((f"{p} is {h}×{w}" for (p, _), (h, w) in zip(splits[1], sides) if min(h, w) < 32), None):
            raise UserError(f"validation image {small}: the students need 32 pixels a side; scale it up or leave it "
                            "out of the validation split")
        largest = max(max(side) for side in sides)
    train, val = (SegmentationSet(items, JointTransform(c, lut=lut)) for items, c in zip(splits, (crop_size, None)))
    val.largest_side = largest
    return train, val


def normalize(images):
    """uint8 RGB (..., 3, H, W) -> [0, 1] -> ImageNet's mean and std, in training, evaluation and use alike."""
    return v2.functional.normalize(v2.functional.to_dtype(images, scale=True), IMAGENET_MEAN, IMAGENET_STD)


def to_device(images, target, device):
    """A batch as the loader hands it over (uint8, a quarter of fp32's bytes), on the device: normalised, int64."""
    return normalize(images.to(device, non_blocking=True)), target.to(device, non_blocking=True).long()


class JointTransform:
    """uint8 image and label: scale 0.5–2.0, crop (padding 0, label 255), flip, `lut` (id -> class); validation: `lut`.
    v2's draws and pixels (resize, RandomCrop(pad_if_needed), RandomHorizontalFlip), resizing up to the crop's end."""

    def __init__(self, crop_size=None, scale=(0.5, 2.0), lut=None):
        self.crop_size, self.scale, self.lut = crop_size, scale, lut

    def __call__(self, image, label):
        if self.crop_size is not None:
            r, ((h, w), crop) = float(torch.empty(()).uniform_(*self.scale)), (image.shape[-2:], self.crop_size)
            size = [max(1, round(s * r)) for s in (h, w)]
            # RandomCrop's draws, top first; a side shorter than the crop is padded by the difference at both ends
            start = [int(torch.randint(0, abs(n - c) + 1, ())) - max(0, c - n) if n != c else 0
                     for n, c in zip(size, crop)]
            (y0, x0), (y1, x1) = [max(0, s) for s in start], [min(n, s + c) for n, s, c in zip(size, start, crop)]
            # torch leaves a side as long as the image's unresized, whatever the scale: one more row or column
            end = [e + (e == n != m) for e, n, m in zip((y1, x1), (h, w), size)]
            part = torch.ops.aten._upsample_bilinear2d_aa(image[None], end, False, size[0] / h, size[1] / w)[0]
            # a label pixel's source, as torch's "nearest" picks it: floor(index * in / out), in float32
            rows, cols = (numpy.minimum((numpy.arange(a, b, dtype=numpy.float32) * (numpy.float32(n) / m)).astype(int),
                                        n - 1) for a, b, n, m in ((y0, y1, h, size[0]), (x0, x1, w, size[1])))
            pad = [x0 - start[1], start[1] + crop[1] - x1, y0 - start[0], start[0] + crop[0] - y1]
            image = F.pad(part[:, y0:y1, x0:x1], pad)
            label = F.pad(torch.from_numpy(label.numpy().take(rows, 0).take(cols, 1)), pad, value=IGNORE_INDEX)
            if torch.rand(1) < 0.5:  # RandomHorizontalFlip's draw
                image, label = image.flip(-1), label.flip(-1)
        return image, label if self.lut is None else torch.from_numpy(self.lut.numpy().take(label.numpy()))


def training_order(size, *, batch_size, seed=0, rank=0, world_size=1, start_iter=0):
    """Endless (index, augmentation seed) pairs for one process from iteration `start_iter` on: each epoch's
    permutation cut into global batches, process `rank` takes its slice (K processes, a resume: the same)."""
    local, per_epoch = batch_size // world_size, size // batch_size
    epoch, skip = divmod(start_iter, per_epoch)
    while True:
        draw = (seed * 1_000_003 + epoch) * 1_000_003  # distinct for every seed, epoch and place
        order = torch.randperm(size, generator=torch.Generator().manual_seed(draw)).tolist()
        for start in range(skip * batch_size, per_epoch * batch_size, batch_size):
            for place in range(start + rank * local, start + (rank + 1) * local):
                yield order[place], draw + place
        epoch, skip = epoch + 1, 0


def training_batches(dataset, *, batch_size, start_iter, workers, seed, rank, world_size, pin_memory):
    """One DataLoader for the whole run; iteration k gets one batch with or without a resume, with any workers."""
    if len(dataset) < batch_size:
        raise UserError(f"{len(dataset)} training images, fewer than one batch of {batch_size}: lower --batch-size")
    sampler = training_order(len(dataset), batch_size=batch_size, seed=seed, rank=rank, world_size=world_size,
                             start_iter=start_iter)
    # each worker keeps 2 batches (the prefetch factor) in /dev/shm, for each process here; Docker gives it 64 MB
    need = workers * 2 * batch_size // world_size * sum(t.nbytes for t in dataset[(0, 0)]) if workers else 0
    free = shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else math.inf
    if need * int(os.environ.get("LOCAL_WORLD_SIZE", 1)) > free:
        raise UserError(f"/dev/shm has {free / 2 ** 20:.0f} MB free, too little for the batches that {workers} loader "
                        f"workers keep there ({need / 2 ** 20:.0f} MB a process): run docker with --ipc=host or "
                        "--shm-size=2g, or lower --workers")
    # the loader's own generator keeps its worker seeding off the global random stream
    return iter(torch.utils.data.DataLoader(dataset, batch_size=batch_size // world_size, sampler=sampler,
                                            num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0,
                                            generator=torch.Generator().manual_seed(seed)))


# ---- MiT-B0 ImageNet weights: the official checkpoint, or the Hugging Face hub's file --------------------------------

# the hub's (transformers') MiT names -> the official ones (query, key, value -> q, k, v); hub stage I is official I+1
MIT_STAGES = {"patch_embeddings": "patch_embed", "block": "block", "layer_norm": "norm"}
MIT_RENAMES = ((r"(patch_embed\d)\.layer_norm", r"\1.norm"), (r"attention\.self\.layer_norm", "attn.norm"),
               (r"attention\.self\.(q|k|v)[a-z]+", r"attn.\1"), (r"attention\.output\.dense", "attn.proj"),
               (r"layer_norm_(\d)", r"norm\1"), (r"mlp\.dense(\d)", r"mlp.fc\1"), (r"attention\.self\.sr", "attn.sr"))


def mit_from_hub(state_dict):
    """Official MiT names for the hub's (encoder.block.I.J.attention.self.query ...); kv = key rows on value rows."""
    renamed = {}
    for name, tensor in state_dict.items():
        name = re.sub(r"^(segformer\.)?encoder\.(patch_embeddings|block|layer_norm)\.(\d)",
                      lambda m: f"{MIT_STAGES[m[2]]}{int(m[3]) + 1}", name)
        for pattern, official in MIT_RENAMES:
            name = re.sub(pattern, official, name)
        renamed[name] = tensor
    for key in [k for k in renamed if ".attn.k." in k]:
        value = renamed.pop(key.replace(".attn.k.", ".attn.v."))
        renamed[key.replace(".attn.k.", ".attn.kv.")] = torch.cat([renamed.pop(key), value])
    return renamed


def read_weights(path):
    """The tensors of a torch.save file (.pth, .bin), read with weights_only: no code is unpickled."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # whatever the damage, say which file and stop
        raise ValueError(f"not a readable checkpoint ({type(error).__name__}: {' '.join(str(error).split())[:80]})")


def load_encoder_weights(encoder, state_dict):
    """Load MiT weights, official or the hub's (its layout returned), with strict keys: a bad one is a ValueError."""
    state_dict = state_dict.get("state_dict", state_dict)  # some dumps wrap the weights
    hub = any(k.startswith(("encoder.block.", "segformer.encoder.block.")) for k in state_dict)
    layout, state_dict = ("transformers (hub file)", mit_from_hub(state_dict)) if hub else ("official", state_dict)
    heads = ("head.", "classifier.", "decode_head.")  # ImageNet classifiers, segmentation heads
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(heads)}
    own = encoder.state_dict()
    missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
    misshaped = sorted(f"{k} {tuple(state_dict[k].shape)} != {tuple(own[k].shape)}"
                       for k in set(own) & set(state_dict) if state_dict[k].shape != own[k].shape)
    if problems := [f"{name}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}" for name, keys in
                    (("missing", missing), ("unexpected", unexpected), ("misshaped", misshaped)) if keys]:
        raise ValueError(f"MiT checkpoint ({layout} layout) does not match MiT-B0: " + "; ".join(problems))
    encoder.load_state_dict(state_dict, strict=True)
    return layout


# ---- Evaluation: the confusion matrix summed over the split (and the processes), panels ------------------------------

def confusion_matrix(pred, target, num_classes):
    """(C, C) int64 counts, rows = truth, columns = prediction, targets outside [0, C) dropped; no host sync."""
    keep = (target >= 0) & (target < num_classes)
    index = torch.where(keep, target * num_classes + pred, torch.zeros_like(target))
    conf = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=pred.device)
    return conf.scatter_add_(0, index.flatten().long(), keep.flatten().long()).reshape(num_classes, num_classes)


def iou_from_confusion(conf):
    """IoU_k = TP / (TP + FP + FN); a class with zero union is NaN and left out of the mean."""
    conf = conf.double()
    tp = conf.diag()
    per_class = tp / (conf.sum(0) + conf.sum(1) - tp)  # 0/0 = NaN for a class absent from prediction and target
    return per_class.nanmean(), per_class


def agreement_matrix(pred_cnn, pred_vit, target, ignore_index=255):
    """(2, 2) counts of valid pixels, rows: CNN wrong/right, columns: ViT wrong/right; [1, 0]: only the CNN right."""
    cnn_right = torch.where(target == ignore_index, ignore_index, (pred_cnn == target).long())
    return confusion_matrix((pred_vit == target).long(), cnn_right, 2)


def predictions(logits):
    """Each student's class per pixel, and the ensemble's: the argmax of their mean softmax (logit scales differ)."""
    ensemble = (logits["cnn"].softmax(1) + logits["vit"].softmax(1)) / 2
    return {"cnn": logits["cnn"].argmax(1), "vit": logits["vit"].argmax(1), "ensemble": ensemble.argmax(1)}


def predictions_in_bands(logits, size, rows=64):
    """predictions() of the logits upsampled to `size`, `rows` rows at a time: memory holds a band, not a photo."""
    (h, w), device = size, logits["cnn"].device
    xs = (torch.arange(w, device=device) + 0.5) * 2 / w - 1  # pixel centres in grid_sample's [-1, 1]
    preds = {name: torch.empty(1, h, w, dtype=torch.uint8) for name in STUDENTS}
    for top in range(0, h, rows):
        ys = (torch.arange(top, min(h, top + rows), device=device) + 0.5) * 2 / h - 1
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None]  # (1, rows, w, (x, y))
        band = {name: F.grid_sample(z.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
                for name, z in logits.items()}  # upsample_logits' points: equal up to float rounding
        for name, pred in predictions(band).items():
            preds[name][:, top:top + rows] = pred.byte().cpu()
    return preds


@torch.no_grad()
def evaluate(model, dataset, *, num_classes, device, autocast, rank=0, world_size=1, workers=0,
             vis_dir=None, vis_count=0, tag="", colours=None, stop=lambda: 0):
    """Whole images, batch 1, at each label's size, image i by process i mod world_size: C×C and 2×2 counts, summed.
    None if stop() says so before an image (under DDP every process asks as often: a signal's agreement)."""
    model.eval()
    benchmark, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, False  # whole images vary in size
    # zeros, not 0: a process whose shard is empty (fewer images than processes) still sends a tensor
    conf = {name: torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
            for name in ("cnn", "vit", "ensemble")} | {"agreement": torch.zeros(2, 2, dtype=torch.int64, device=device)}
    indices = range(rank, len(dataset), world_size)
    # a generator of its own: evaluating must not move the training's random stream
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=workers, generator=torch.Generator(),
                                         sampler=indices, pin_memory=device.type == "cuda")
    for index, (pixels, ids) in zip(indices, loader):
        if stop():
            return None
        image, target = to_device(pixels, ids, device)
        with autocast:  # both students' class scores, upsampled in fp32 to the label's size
            logits = {name: upsample_logits(getattr(model, name)(image)["logits"], target.shape[-2:])
                      for name in ("cnn", "vit")}
        preds = predictions(logits)
        for name, pred in preds.items():
            conf[name] += confusion_matrix(pred, target, num_classes)
        conf["agreement"] += agreement_matrix(preds["cnn"], preds["vit"], target, model.ignore_index)
        if vis_dir is not None and index < vis_count:
            vis_dir.mkdir(parents=True, exist_ok=True)
            panel = render_panel(pixels[0], target[0], logits["cnn"], logits["vit"], model.region_size, model.margin,
                                 model.ignore_index, colours)
            write_whole(vis_dir / f"{tag}{index:03d}.png", lambda f: panel.save(f, format="PNG"))
    if len(indices) < math.ceil(len(dataset) / world_size) and stop():  # a shard one image short
        return None
    if world_size > 1:
        for c in conf.values():
            torch.distributed.all_reduce(c)
    model.train()
    torch.backends.cudnn.benchmark = benchmark
    return conf


# VOC's colour map: bits 0, 3, 6... of a class index make red's top bits down, bits 1, 4, 7... green's, 2, 5... blue's
PALETTE = sum(((torch.arange(256)[:, None] >> (3 * bit + torch.arange(3))) & 1) << (7 - bit) for bit in range(8)).byte()
DIRECTION_COLOURS = {"CNN teaches": (255, 140, 0), "ViT teaches": (30, 144, 255)}  # orange, blue
STUDENTS = {"cnn": "CNN", "vit": "ViT", "ensemble": "ensemble"}  # what is evaluated; the ensemble costs both students
PANEL_STRIP = 14  # height of each text strip under the tiles
PANEL_TILE = 192  # small images are scaled up (nearest) to at least this short side: readable unzoomed
PANEL_MAX = 1024  # large ones are subsampled to at most this long side: a photo's overlay stays a few MB


def colour_table(colours=None):
    """(256, 3) uint8: the data set's class colours first (VOC's by default), VOC's for the rest (255: cream)."""
    return torch.cat([torch.tensor(colours or (), dtype=torch.uint8).view(-1, 3), PALETTE[len(colours or ()):]])


def draw_panel(tiles, names, legend):
    """A row of tiles (uint8 H×W×3), names below, a legend; small tiles scaled up (nearest), large subsampled."""
    step = max(1, math.ceil(max(tiles[0].shape[:2]) / PANEL_MAX))
    tiles = [tile[::step, ::step] for tile in tiles]
    h, w = tiles[0].shape[:2]
    k = max(1, math.ceil(PANEL_TILE / min(h, w)))
    row = torch.cat(tiles, dim=1).repeat_interleave(k, dim=0).repeat_interleave(k, dim=1)
    canvas = PIL.Image.new("RGB", (len(tiles) * k * w, k * h + 2 * PANEL_STRIP), "white")
    canvas.paste(PIL.Image.fromarray(row.numpy()), (0, 0))
    draw, y, x = PIL.ImageDraw.Draw(canvas), k * h, 2
    for i, name in enumerate(names):
        draw.text((i * k * w + 2, y + 1), name, fill="black")
    for name, colour in legend.items():
        draw.rectangle([x, y + PANEL_STRIP + 3, x + 8, y + PANEL_STRIP + 11], fill=tuple(colour))
        draw.text((x + 11, y + PANEL_STRIP + 1), name, fill="black")
        x += 11 + 7 * len(name) + 10
    return canvas


def render_panel(image, target, z_cnn, z_vit, region_size, margin, ignore_index=255, colours=None):
    """A --vis panel: the (uint8) image, truth, CNN, ViT, region directions, pixel transfers, the direction colours."""
    h, w = target.shape
    ce = [F.cross_entropy(z, target[None], ignore_index=ignore_index, reduction="none") for z in (z_cnn, z_vit)]
    regions = region_bsd_masks(*ce, target[None], region_size, ignore_index, margin)
    pixels = pixel_bsd_masks(z_cnn, z_vit, target[None], ignore_index)
    table = colour_table(colours)
    tiles = [image.permute(1, 2, 0)] + [table[t.cpu()] for t in (target, z_cnn[0].argmax(0), z_vit[0].argmax(0))]
    for masks in ([expand_region_mask(m, region_size, (h, w))[0] for m in regions], [m[0] for m in pixels]):
        tile = torch.full((h, w, 3), 40, dtype=torch.uint8)
        for mask, colour in zip(masks, DIRECTION_COLOURS.values()):  # the CNN's, then the ViT's
            tile[mask.cpu() > 0] = torch.tensor(colour, dtype=torch.uint8)
        tiles.append(tile)
    return draw_panel(tiles, ("image", "truth", "CNN", "ViT", "regions", "pixels"), DIRECTION_COLOURS)


def complementarity(agreement):
    """Shares of the valid pixels where only the CNN, only the ViT, both or neither is right."""
    share = (agreement.double() / agreement.sum().clamp_min(1)).tolist()
    return {"only_cnn": share[1][0], "only_vit": share[0][1], "both": share[1][1], "neither": share[0][0]}


def eval_record(conf):
    """The numbers of one evaluation (report() prints them), JSON-ready: NaN IoUs as null."""
    record = {"complementarity": complementarity(conf["agreement"])}
    for name in STUDENTS:
        miou, per_class = iou_from_confusion(c := conf[name])
        record[name] = {"miou": miou.item(), "pixel_acc": c.diag().sum().item() / max(1, c.sum().item()),
                        "per_class_iou": [None if math.isnan(v) else v for v in per_class.tolist()]}
    return record


def report(record, class_names):
    """An eval_record as a table: a row per class, then mIoU and pixel accuracy; the complementarity below."""
    columns = [record[name] for name in STUDENTS]  # the CNN's, the ViT's, the ensemble's
    rows = [(cls, [c["per_class_iou"][k] for c in columns]) for k, cls in enumerate(class_names)]
    rows += [("mIoU", [c["miou"] for c in columns]), ("pixel accuracy", [c["pixel_acc"] for c in columns])]
    lines = [f"{'class':<16}" + "".join(f"{title + ' IoU':>14}" for title in STUDENTS.values())]
    lines += [f"{title:<16}" + "".join(f"{100 * (math.nan if v is None else v):>14.2f}" for v in values)
              for title, values in rows]
    return "\n".join(lines + ["valid pixels: " + ", ".join(f"{name.replace('_', ' ')} right {100 * share:.1f}%"
                                                           for name, share in record["complementarity"].items())])


# ---- The loop: optimisers and schedules, checkpoints, the step, the log line -----------------------------------------

def build_optimizers(model, *, iters, cnn_lr=0.01, vit_lr=6e-5, vit_warmup=1500, fused=True, start=0, states=()):
    """CNN: SGD + poly(0.9). ViT: AdamW (no decay on norms, biases; decoder, projectors at 10× lr), warm-up, poly(1.0),
    closed forms of the iteration: a resume passes its optimisers' `states` (base rates: their initial_lr) and `start`,
    and gets base·λ(start) of this --iters (no scheduler state is read)."""
    cnn_params, vit_encoder, vit_heads = model.parameter_groups()
    sgd = torch.optim.SGD(cnn_params, lr=cnn_lr, momentum=0.9, weight_decay=1e-4, fused=fused)
    groups = [{"params": [p for p in params if (p.ndim > 1) == decay], "lr": lr, "weight_decay": 0.01 * decay}
              for params, lr in ((vit_encoder, vit_lr), (vit_heads, 10 * vit_lr)) for decay in (True, False)]
    opts = sgd, torch.optim.AdamW(groups, lr=vit_lr, betas=(0.9, 0.999), fused=fused)
    for opt, state in zip(opts, states):
        opt.load_state_dict(state)
    warmup = min(vit_warmup, iters - 1)
    rates = (lambda t: max(0.0, 1 - t / iters) ** 0.9,
             lambda t: 1e-6 + (1 - 1e-6) * t / warmup if t < warmup else max(0.0, 1 - (t - warmup) / (iters - warmup)))
    return opts, [torch.optim.lr_scheduler.LambdaLR(opt, rate, last_epoch=start - 1) for opt, rate in zip(opts, rates)]


def write_whole(path, data, exclusive=False):
    """`data` (bytes, or data(file) that writes) into this process's temporary file, flushed to disk, renamed to `path`
    (exclusive: linked, so that one alone of runs launched together makes it): `path` holds all new data, or the old."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{os.urandom(4).hex()}.tmp")  # no two writers share one
    try:
        with open(tmp, "xb") as f:
            f.write(data) if isinstance(data, bytes) else data(f)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path) if exclusive else os.replace(tmp, path)
    except (OSError, RuntimeError) as error:  # a full disk, a lost mount: one line; FileExistsError is the caller's
        cause = error.__context__ if isinstance(error, RuntimeError) else error  # torch.save's writer wraps OSErrors
        if isinstance(error, FileExistsError) or not isinstance(cause, OSError):
            raise cause if isinstance(cause, KeyboardInterrupt) else error
        kept = f"; the previous {path.name} ({path.stat().st_size / 2 ** 20:.1f} MB) is whole, and writing it " \
            "again needs as much room beside it" if path.is_file() else ""
        raise RunError(f"cannot write {path} ({cause.strerror or cause}){kept}: free some room, or give another "
                       "--out") from None
    finally:  # also after Ctrl-C during the write: no half-written file is left
        tmp.unlink(missing_ok=True)


def load_checkpoint(path):
    path = pathlib.Path(path)
    if not path.is_file():
        raise UserError(f"--resume {path}: " + ("a folder: give the checkpoint in it, e.g. "
                                                f"{path / 'last.pt'}" if path.is_dir() else "no such file"))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"--resume {path} is not a readable checkpoint ({type(error).__name__})") from None
    if not isinstance(ckpt, dict) or not {"model", "iter", "optimizers", "schedulers"} <= set(ckpt):
        raise UserError(f"--resume {path} is not a ctcl.py checkpoint (no model/iter/optimizers entries)")
    saved = ckpt["args"]  # readings of HFD and region BSD this file no longer computes, by the commit that left them
    gone = (saved.get("hfd", "next-stage"), saved.get("rbsd_feature", "encoder")) != ("next-stage", "encoder")
    if since := "9770f74" if "save_every" not in saved else "584f3be" if gone else None:
        raise UserError(f"--resume {path} was written by a ctcl.py older than commit {since}, whose HFD or region "
                        f"BSD this one no longer computes: use that one, `git show {since}~1:ctcl.py > ctcl_old.py`")
    return ckpt


def check_finite(first_bad, saved_at, out, world_size=1):
    """Stop at the first non-finite loss (first_bad: its iteration, else inf); under DDP all ranks, at the earliest."""
    if world_size > 1:
        torch.distributed.all_reduce(first_bad, torch.distributed.ReduceOp.MIN)
    if (bad := float(first_bad)) < math.inf:  # a host sync, made only at log and checkpoint steps
        kept = f"{out / 'last.pt'} (iteration {saved_at}) was left as is" if saved_at else "no checkpoint was written"
        raise RunError(f"non-finite loss at iteration {int(bad)}; stopped, and {kept}: lower the learning rates, or "
                       "try without --amp")


@contextlib.contextmanager
def stop_signals(caught):
    """SIGTERM (a scheduler's preemption, `timeout`) and SIGINT (Ctrl-C) are noted in `caught`, for the loop to
    stop at the end of its step with a checkpoint; a second Ctrl-C stops at once (last.pt stays whole)."""
    def note(signum, frame):
        if caught and signum == signal.SIGINT:
            raise KeyboardInterrupt
        caught.append(signum)
    previous = {s: signal.signal(s, note) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def read_records(path):
    """The records of a metrics.jsonl and how many lines were damaged (a killed run's cut line costs itself alone)."""
    lines = path.read_bytes().splitlines() if path.is_file() else []
    records = []
    for line in lines:
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return records, len(lines) - len(records)


def save_args(args, exclusive=False):
    write_whole(args.out / "args.json", json.dumps(vars(args), default=str, indent=1).encode(), exclusive)


def log_line(it, iters, lrs, means, images_per_s, eta_s):
    cnn, vit = (" ".join(f"{n} {means[f'{n}_{side}']:.3f}" for n in ("ce", "dml", "hfd", "rbsd", "pbsd")
                         if f"{n}_{side}" in means) for side in ("cnn", "vit"))
    line = f"it {it}/{iters} | lr cnn {lrs[0]:.2e} vit {lrs[1]:.2e} | cnn {cnn} | vit {vit}"
    if "regions_cnn_teaches" in means:
        line += f" | regions c>v {means['regions_cnn_teaches']:.0%} v>c {means['regions_vit_teaches']:.0%}"
    if "pixels_cnn_to_vit" in means:
        line += f" | pixels c>v {means['pixels_cnn_to_vit']:.1%} v>c {means['pixels_vit_to_cnn']:.1%}"
    return line + f" | {images_per_s:.1f} img/s | eta {eta_s / 60:.1f} min"


def train_step(model, images, target, optimizers, schedulers, scaler, autocast, kd_weight):
    """One forward of both students, one backward of L_cnn + L_vit, both optimisers step."""
    with autocast:
        loss_cnn, loss_vit, terms = model(images, target, kd_weight)
    loss = loss_cnn + loss_vit  # no teacher side carries a gradient: each student gets its own
    model.zero_grad(set_to_none=True)  # the optimisers hold all of its parameters
    scaler.scale(loss).backward()
    for opt in optimizers:
        scaler.step(opt)
    scaler.update()
    for sched in schedulers:
        sched.step()
    return loss.detach(), terms


def build_model(args, num_classes, ctx=None):
    """CTCL of the flags; under DDP the main process builds first (fetching the ImageNet weights into the cache)."""
    ddp = ctx is not None and ctx.world_size > 1
    if ddp and not ctx.is_main:
        torch.distributed.barrier()
    try:
        keywords = inspect.signature(CTCL).parameters.keys() & vars(args).keys()  # each is the flag of its name
        return CTCL(num_classes, **{name: getattr(args, name) for name in keywords})
    except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
        raise UserError(f"could not fetch torchvision's ImageNet ResNet-18 weights ({error}): run `bash data_prep.sh "
                        "weights` where there is a network (cached in TORCH_HOME), or pass --no-pretrained") from None
    except ValueError as error:  # a MiT checkpoint in another layout
        raise UserError(f"--vit-weights {args.vit_weights}: {error}") from None
    finally:  # also when the main process failed: the others then try, and fail with the same line
        if ddp and ctx.is_main:
            torch.distributed.barrier()


def train(args, ctx, ckpt=None, own=False):
    train_set, val_set = build_datasets(args.data, args.data_root, args.crop_size, args.data_seed, classes=args.classes)
    args.largest_side = val_set.largest_side
    if args.vit_weights is None and args.data != "synthetic" and ctx.is_main:
        print("warning: --vit-weights none trains MiT-B0 from scratch: far below the paper's numbers", file=sys.stderr)
    if args.data == "folder" and not (pathlib.Path(args.data_root) / "train.txt").is_file():
        ctx.print(f"{args.data_root}: no train.txt and val.txt: every 10th sorted stem is for validation "
                  f"({len(val_set)} images)")
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    initial = args if ckpt is None else argparse.Namespace(**{**vars(args), "pretrained": False, "vit_weights": None})
    model = build_model(initial, len(args.classes), ctx).to(ctx.device)  # a checkpoint holds every weight
    if model.vit.weights_layout:
        ctx.print(f"MiT-B0 weights: {args.vit_weights} ({model.vit.weights_layout} layout)")
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.fp16)
    torch.manual_seed(args.seed + ctx.rank)  # dropout and drop path differ across ranks
    start, unlogged, optimizer_states = 0, {}, ()
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as error:  # resume_recipe builds the checkpoint's: an older ctcl.py's layout
            raise UserError(f"--resume {args.resume} holds another model: {str(error).splitlines()[0]}") from None
        start, optimizer_states, unlogged = ckpt["iter"], ckpt["optimizers"], ckpt.get("window", unlogged)
        if ckpt["scaler"]:  # {} from a run without an fp16 scaler: the loss scale then starts afresh
            scaler.load_state_dict(ckpt["scaler"])
        if ctx.rank < len(rngs := ckpt["rng"]):  # with another number of processes: fresh seeds
            torch.set_rng_state(rngs[ctx.rank]["cpu"])
            if rngs[ctx.rank]["cuda"] is not None and torch.cuda.is_initialized():
                torch.cuda.set_rng_state(rngs[ctx.rank]["cuda"])
        ctx.print(f"resumed from {args.resume} at iteration {start}")
    if ctx.world_size > 1 and ctx.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizers, schedulers = build_optimizers(model, iters=args.iters, cnn_lr=args.cnn_lr, vit_lr=args.vit_lr,
                                              vit_warmup=args.vit_warmup, start=start, states=optimizer_states)
    stop_at = min(args.stop_at or args.iters, args.iters)
    training = start < stop_at and not args.eval_only
    batches = training_batches(train_set, batch_size=args.batch_size, start_iter=start, workers=args.workers,
                               seed=args.seed, rank=ctx.rank, world_size=ctx.world_size,
                               pin_memory=ctx.device.type == "cuda") if training else None
    args.out = ctx.on_main(lambda: choose_out(args, own))  # bad input has been refused by now: the run claims OUT
    ctx.print(f"ctcl: {args.method} on {args.data}, {args.iters} iters, device {ctx.device}, batch {args.batch_size} "
              f"({args.batch_size // ctx.world_size} per process), crop {args.crop_size}, out {args.out}")
    launcher = "python" if ctx.world_size == 1 else \
        f"torchrun --nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', ctx.world_size)}"
    go_on = f"`{launcher} ctcl.py --resume {args.out / 'last.pt'}`"  # the command that continues the run

    def stopped(signum, when):  # a stop by a signal: its line, and the shell's exit code (143 SIGTERM, 130 SIGINT)
        return RunError(f"stopped by {signal.Signals(signum).name} {when}; {args.out / 'last.pt'} holds the run: "
                        f"continue it with {go_on}", 128 + signum)
    records = ctx.on_main(lambda: read_records(args.out / "metrics.jsonl")[0])

    def log(*new):  # the records, and metrics.jsonl written whole each time (rank 0): never half a line
        records.extend(new)
        ctx.on_main(lambda: write_whole(args.out / "metrics.jsonl",
                                        "".join(f"{json.dumps(r)}\n" for r in records).encode()))
    # an evaluation that did not finish (a stop, a crash, a damaged image) is made before training goes on
    due = start > 0 and (start % args.eval_every == 0 or start == args.iters) and start not in {
        r.get("iter") for r in records if r.get("type") == "eval"}
    if training:  # args.json says what trained; a stopped run's records after its
        ctx.on_main(lambda: save_args(args))  # checkpoint are superseded: metrics.jsonl reads as one unbroken run
        records[:] = [r for r in records if r.get("iter", 0) <= start]
        log()

    def run_eval(it):
        if ctx.world_size > 1:  # CPU DDP keeps per-rank BN statistics: evaluate rank 0's
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer, 0)
        try:
            conf = evaluate(model, val_set, num_classes=len(args.classes), device=ctx.device, autocast=ctx.autocast(),
                            rank=ctx.rank, world_size=ctx.world_size, workers=args.workers, stop=ctx.stop,
                            vis_dir=args.out / "vis", vis_count=args.vis, tag=f"it{it:06d}_", colours=args.colours)
        except UserError as error:  # a damaged validation image: last.pt holds the run, and a resume evaluates first
            raise UserError(f"{error}; then continue with {go_on}") from None
        if conf is None:
            raise stopped(ctx.stop(), f"during the evaluation at iteration {it}" + ("" if args.eval_only else
                          ", which is made first when you continue"))
        record = eval_record(conf)
        ctx.print(f"evaluation at iteration {it}:\n{report(record, args.classes)}")
        if not args.eval_only:  # metrics.jsonl is the run's record: --eval-only only prints
            log({"type": "eval", "iter": it, **record})
        return conf

    conf = run_eval(start) if due or args.eval_only else None
    if start >= stop_at and not args.eval_only:
        ctx.print(f"checkpoint at iteration {start}: nothing to train" + ("" if due else " (--eval-only evaluates it)"))
    if not training:
        return {"model": model, "conf": conf}
    saved_at = start

    def checkpoint(it):
        # every rank's random states, so that a resume draws the same numbers (bit for bit on the CPU; on CUDA
        # the floats drift, bilinear interpolation's backward being nondeterministic there)
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized()
               else None}
        states = [rng] * ctx.world_size
        if ctx.world_size > 1:  # every rank takes part
            torch.distributed.all_gather_object(states, rng)
        state = {"model": model.state_dict(), "optimizers": [o.state_dict() for o in optimizers],
                 "schedulers": [s.state_dict() for s in schedulers], "scaler": scaler.state_dict(), "iter": it,
                 "rng": states, "args": json.loads(json.dumps(vars(args), default=str)),
                 "window": {"sums": {k: v.cpu() for k, v in sums.items()}, "count": count}}  # unlogged yet
        ctx.on_main(lambda: write_whole(args.out / "last.pt", lambda f: torch.save(state, f)))  # rank 0 writes
        return it

    net = model if ctx.world_size == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if args.compile:  # the DDP-wrapped model, so that the gradient all-reduce overlaps the backward
        net = torch.compile(net)
    first_bad = torch.full((), math.inf, device=ctx.device)
    sums, count = {k: v.to(ctx.device) for k, v in unlogged.get("sums", {}).items()}, unlogged.get("count", 0)
    tick, timed_from = time.time(), start
    for it in range(start + 1, stop_at + 1):
        images, target = to_device(*next(batches), ctx.device)
        # w(t) as a tensor, so that a compiled forward does not recompile as the ramp rises
        kd_weight = torch.full((), sigmoid_rampup(it - 1, args.kd_warmup), device=ctx.device)
        lrs = [optimizers[0].param_groups[0]["lr"], optimizers[1].param_groups[0]["lr"]]  # this step's
        loss, terms = train_step(net, images, target, optimizers, schedulers, scaler, ctx.autocast(), kd_weight)
        first_bad = torch.where(torch.isfinite(loss), first_bad, first_bad.clamp(max=it))
        sums, count = {k: sums.get(k, 0) + v for k, v in terms.items()}, count + 1
        if it % args.log_every == 0 or it == args.iters:  # the same records, however often the run was stopped
            check_finite(first_bad, saved_at, args.out, ctx.world_size)
            means = dict(zip(sums, (torch.stack(list(sums.values())) / count).tolist()))
            elapsed, tick, steps, timed_from = time.time() - tick, time.time(), it - timed_from, it
            rate = steps * args.batch_size / elapsed  # --batch-size is the global batch
            ctx.print(log_line(it, args.iters, lrs, means, rate, (stop_at - it) * elapsed / steps))
            log({"type": "train", "iter": it, "lr_cnn": lrs[0], "lr_vit": lrs[1], "images_per_s": rate, **means})
            sums, count = {}, 0
        signum = ctx.stop()  # under DDP the processes agree: all stop after the same step
        if signum or it % args.save_every == 0 or it % args.eval_every == 0 or it == stop_at:
            check_finite(first_bad, saved_at, args.out, ctx.world_size)
            saved_at = checkpoint(it)
            if signum:
                raise stopped(signum, f"at iteration {it}")
            if it % args.eval_every == 0 or it == args.iters:
                began, conf = time.time(), run_eval(it)
                tick += time.time() - began  # keep evaluation out of images/s
    if stop_at < args.iters:
        ctx.print(f"stopped at iteration {stop_at} (--stop-at): continue with {go_on}")
    return {"model": model, "conf": conf}


# ---- Using what was trained: segment new images (--predict), ship a student (--export) -------------------------------

def load_students(path, device):
    """A checkpoint's model in eval mode and its args (class names and colours: older checkpoints' data set's)."""
    ckpt = load_checkpoint(path)
    saved = argparse.Namespace(**{**vars(get_args_parser().parse_args([])), **ckpt["args"]})
    if not getattr(saved, "classes", None):
        saved.classes, saved.colours = dataset_classes(saved)
    saved.pretrained, saved.vit_weights = False, None  # the checkpoint holds every weight
    model = build_model(saved, len(saved.classes))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), saved


def image_files(paths, out):
    """(file, output name) of the images named and in the folders below (links followed; hidden files, `out` not).
    Name: the path below the folder less its suffix, kept where two would share one (case aside); a clash: refused."""
    kinds = {ext for ext, kind in PIL.Image.registered_extensions().items() if kind in PIL.Image.OPEN}
    found, out = {}, out.resolve()
    for arg in map(pathlib.Path, paths):
        if not arg.exists():
            raise UserError(f"--predict {arg}: no such file or folder")
        files, searched = [] if arg.is_dir() else [(arg, pathlib.Path(arg.name))], set()
        for folder, subfolders, names in os.walk(arg, followlinks=True):  # none for a file
            searched.add(pathlib.Path(folder).resolve())  # a link to a folder above, followed again, would loop
            subfolders[:] = [s for s in subfolders if s[0] != "." and pathlib.Path(folder, s).resolve() not in searched]
            files += [(p, p.relative_to(arg)) for p in map(pathlib.Path(folder).joinpath, names)
                      if p.suffix.lower() in kinds and not p.name.startswith(".") and out not in p.resolve().parents]
        found.update({file.resolve(): (file, name) for file, name in sorted(files)})  # a file given twice is read once
    if not found:
        raise UserError(f"--predict {' '.join(paths)}: no image files there")
    stems = collections.Counter(str(name.with_suffix("")).casefold() for _, name in found.values())
    named = [(f, n if stems[str(n.with_suffix("")).casefold()] > 1 else n.with_suffix("")) for f, n in found.values()]
    names = collections.Counter(str(name).casefold() for _, name in named)  # macOS and Windows ignore case
    if clash := [str(file) for file, name in named if names[str(name).casefold()] > 1]:
        raise UserError(f"--predict: {clash[0]} and {clash[1]} would write the same files: rename one, or segment "
                        "them in two runs, each with its own --out")
    return named


@torch.no_grad()
def predict(args, ctx):
    """Per image, palette PNGs of the CNN's, ViT's, ensemble's classes at its size and an overlay; a photo larger than
    the validation images is scaled down to their size first (bar --full-size), its scores brought back up in bands."""
    files = image_files(args.predict, args.out)[ctx.rank::ctx.world_size]  # under torchrun, each process its share
    model, saved = load_students(args.resume, ctx.device)
    side = getattr(saved, "largest_side", None) or math.inf  # checkpoints older than largest_side: no scaling
    table, began, skipped = colour_table(saved.colours), time.time(), 0
    for n, (path, name) in enumerate(files, 1):
        try:
            image = read_image(path)
        except UserError as error:  # an unreadable image is named and left out: the others are still segmented
            print(f"ctcl.py: skipped: {error}", file=sys.stderr)
            skipped += 1
            continue
        (h, w), scale = image.shape[-2:], 1 if args.full_size else min(1, side / max(image.shape[-2:]))
        small = v2.functional.resize(image, [max(32, round(h * scale)), max(32, round(w * scale))], antialias=True)
        with ctx.autocast():
            logits = {s: getattr(model, s)(normalize(small[None].to(ctx.device)))["logits"] for s in ("cnn", "vit")}
        preds = predictions({s: upsample_logits(z, (h, w)) for s, z in logits.items()}) if max(h, w) <= side \
            else predictions_in_bands(logits, (h, w))
        preds = {kind: pred[0].byte().cpu() for kind, pred in preds.items()}
        make_folder((args.out / name).parent)
        for kind, pred in preds.items():
            png = PIL.Image.frombytes("P", pred.shape[::-1], pred.numpy().tobytes())
            png.putpalette(table.flatten().tolist())
            write_whole(args.out / f"{name}_{kind}.png", lambda f: png.save(f, format="PNG"))
        pixels = image.permute(1, 2, 0)
        present = torch.cat([pred.unique() for pred in preds.values()]).unique().tolist()
        overlay = draw_panel([pixels] + [pixels // 2 + table[pred.long()] // 2 for pred in preds.values()],
                             ["image", *STUDENTS.values()], {saved.classes[c]: table[c].tolist() for c in present})
        write_whole(args.out / f"{name}_overlay.png", lambda f: overlay.save(f, format="PNG"))
        if n % 10 == 0 or n == len(files):
            ctx.print(f"predict: {n}/{len(files)} images, {n / (time.time() - began):.2f} images/s, in {args.out}")
    if skipped:  # each process counts its own
        raise RunError(f"--predict: {skipped} of {len(files)} images skipped, unreadable")


class Deployed(nn.Module):
    """One student as shipped: uint8 RGB (N, 3, H, W) in, class scores (N, C, H, W) out, as evaluation makes them."""

    def __init__(self, student):
        super().__init__()
        self.student = student

    def forward(self, images):
        return upsample_logits(self.student(normalize(images))["logits"], images.shape[-2:])


def export(args):
    """cnn.pt2, vit.pt2: Deployed students for any batch, H and W multiples of 32 from 64, with classes, colours."""
    model, saved = load_students(args.resume, torch.device("cpu"))
    make_folder(out := args.out)
    dims = {0: torch.export.Dim("batch", min=1, max=1024), 2: 32 * torch.export.Dim("h", min=2, max=512),
            3: 32 * torch.export.Dim("w", min=2, max=512)}
    extra = {"classes.json": json.dumps(saved.classes), "colours.json": json.dumps(saved.colours)}
    for name in ("cnn", "vit"):
        program = torch.export.export(Deployed(getattr(model, name)).eval(),
                                      (torch.zeros(2, 3, 64, 96, dtype=torch.uint8),), dynamic_shapes=(dims,))
        write_whole(out / f"{name}.pt2", lambda f: torch.export.save(program, f, extra_files=extra))
        print(f"wrote {out / name}.pt2")


# ---- The command line: devices, DDP, flags, the benchmark, main() ----------------------------------------------------

class Runtime:
    """Device, process group, mixed precision, a stop's agreement, rank 0's work and printing."""

    def __init__(self, gpu, amp):
        self.world_size, self.rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
        self.is_main, self.device, self.caught = self.rank == 0, torch.device("cpu"), []
        gpu = (0 if torch.cuda.is_available() else -1) if gpu is None else gpu
        if self.world_size > 1 and not torch.distributed.is_initialized():  # first, so that errors below are said once
            torch.distributed.init_process_group("nccl" if gpu >= 0 else "gloo")
        if gpu >= 0:  # under DDP, one GPU per process: the process's rank on its machine, from torchrun
            if self.world_size > 1 and "LOCAL_RANK" not in os.environ:
                raise UserError(f"WORLD_SIZE is {self.world_size}, but no LOCAL_RANK tells this process its GPU: "
                                "launch with torchrun --nproc_per_node=GPUS ctcl.py ...")
            index = int(os.environ["LOCAL_RANK"]) if self.world_size > 1 else gpu
            if index >= torch.cuda.device_count():  # 0 where CUDA is missing
                raise UserError(f"--gpu {index}: CUDA sees {torch.cuda.device_count()} GPU(s) here (numbered "
                                "from 0); use --gpu -1 for the CPU")
            self.device = torch.device("cuda", index)
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True  # training crops have one size: let cuDNN pick its fastest kernels
            torch.set_float32_matmul_precision("high")  # TF32 matrix products; cuDNN's convolutions use TF32 already
        # bf16 where the hardware has it natively (no loss scaling needed), else fp16 with a scaler
        bf16 = self.device.type == "cpu" or torch.cuda.is_bf16_supported(including_emulation=False)
        self.amp, self.amp_dtype, self.fp16 = amp, torch.bfloat16 if bf16 else torch.float16, amp and not bf16
        if self.world_size > 1:  # the stop signal's agreement, on the CPU: it waits for no GPU
            self.cpu_group = torch.distributed.new_group(backend="gloo")

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp)

    def stop(self):
        """The signal caught (stop_signals) that ends the run after this step, else 0; the processes agree on it."""
        signum = torch.tensor(self.caught[0] if self.caught else 0)
        if self.world_size > 1:
            torch.distributed.all_reduce(signum, torch.distributed.ReduceOp.MAX, group=self.cpu_group)
        return int(signum)

    def on_main(self, work):
        """work() on rank 0 (the files it alone writes); its result, or its UserError, reaches every process."""
        try:
            result = work() if self.is_main else None
        except UserError as error:
            result = error
        if self.world_size > 1:
            torch.distributed.broadcast_object_list(box := [result], 0)
            result = box[0]
        if isinstance(result, UserError):
            raise result
        return result

    def print(self, *text):
        if self.is_main:
            print(*text, flush=True)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, no usage block: main() prints it
        raise UserError(message)


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # each flag's default, unless its help explains a per-data-set one
        keep = action.default is None or "(default" in (action.help or "")
        return action.help if keep else super()._get_help_string(action)


def number(kind, low, high=math.inf, above=False):
    """An argparse type: a finite `kind` (int or float) >= low (> low if `above`) and <= high."""
    def parse(text):
        value = kind(text)
        if not (math.isfinite(value) and (value > low if above else value >= low) and value <= high):
            bounds = (f"> {low}" if above else f">= {low}") + (f" and <= {high}" if high < math.inf else "")
            what = "a whole number" if kind is int else "a finite number"
            raise argparse.ArgumentTypeError(f"must be {what} {bounds}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value"
    return parse


def get_args_parser():
    p = Parser(description="CTCL (ICCV 2023), reference implementation", formatter_class=HelpWithDefaults)
    a, count, weight, seed = p.add_argument, number(int, 1), number(float, 0), number(int, 0, 999_999)
    a("--data", default="synthetic", choices=list(DATASETS), help="data set (camvid-val: train -> val, for recipes)")
    a("--data-root", help="data folder (default: under ./data; folder: images/, labels/, classes.txt)")
    a("--data-seed", type=seed, default=0, help="seed of the synthetic data")
    a("--gpu", type=number(int, -1), help="GPU index, -1 for the CPU (default: 0 if there is one)")
    a("--iters", type=count, help="training iterations (default: per data set)")
    a("--stop-at", type=count, help="stop after this iteration, with a checkpoint (the schedule runs to --iters)")
    a("--batch-size", type=number(int, 2), help="images per step, all processes together (default: per data set)")
    a("--crop-size", type=number(int, 32, 4096), nargs="+", help="training crop: H W, or a side")
    a("--eval-every", type=count, help="evaluate and checkpoint every N iterations (default: iters/5)")
    a("--save-every", type=count, default=2000, help="also checkpoint every N iterations")
    a("--log-every", type=count, help="log every N iterations (default: iters/30, at most 50)")
    a("--workers", type=number(int, 0), help="loader processes (default: 0 synthetic, else its CPUs, ≤ 16)")
    a("--seed", type=seed, default=0, help="seed of weights, sampling and augmentation")
    a("--out", type=pathlib.Path, help="output folder (default: runs/DATA-METHOD-sSEED, or its next free -2, -3 ...; "
      "the checkpoint's with --resume, its predict/ or export/)")
    a("--resume", help="checkpoint to continue, e.g. OUT/last.pt: its recipe is the default")
    a("--eval-only", action="store_true", help="evaluate the --resume checkpoint and stop")
    a("--amp", action="store_true", help="mixed precision: bf16 where the GPU has it, else fp16 with loss scaling")
    a("--method", default="ctcl", choices=["independent", "dml", "ctcl"], help="CE only; deep mutual learning; CTCL")
    for term, name in (("hfd", "HFD"), ("rbsd", "region-wise BSD"), ("pbsd", "pixel-wise BSD")):
        a(f"--lambda-{term}", type=weight, default=1.0, help=f"[I] weight of {name} (0 = ablation)")
    a("--region-size", type=count, default=32, help="[I] side of a region in label pixels (a multiple of 32)")
    a("--rbsd-margin", type=float, default=0.0, help="[I] a student teaches a region if its score there is "
      "lower than its peer's by more than this (-inf: both teach everywhere)")
    a("--region-score", default="ce", choices=["ce", "error"], help="[I] a region's score: mean CE, or error rate")
    a("--pixel-rule", default="exclusive", choices=["exclusive", "teacher-right", "lower-ce", "all"], help="[I] pixel "
      "BSD where the teacher is right and the learner wrong, or right, or has the lower CE; all: both ways (DML)")
    a("--bsd-norm", default="valid", choices=["valid", "selected"], help="[I] BSD's mean: over valid, or taught")
    a("--temperature", type=number(float, 0, above=True), default=1.0, help="[I] softmax temperature of pixel BSD, DML")
    a("--kd-warmup", type=number(int, 0), help="[I] iterations of the distillation's ramp (default: 5%% of iters)")
    a("--cnn-lr", type=weight, help="[I] SGD learning rate (default: 0.01; synthetic 0.02)")
    a("--vit-lr", type=weight, help="[I] AdamW lr of the ViT encoder, heads ×10 (default: 6e-5; synthetic 6e-4)")
    a("--vit-warmup", type=number(int, 0), help="[I] ViT's lr warm-up (default: min(1500, iters/10))")
    a("--pretrained", action=argparse.BooleanOptionalAction, help="ImageNet ResNet-18 (on for real data)")
    a("--vit-weights", help="MiT-B0 ImageNet checkpoint, or 'none' (default: weights/mit_b0.pth; synthetic none)")
    a("--output-stride", type=int, default=16, choices=[8, 16], help="output stride of the CNN")
    a("--vis", type=number(int, 0), default=0, help="PNG panels written per evaluation to OUT/vis")
    a("--compile", action="store_true", help="torch.compile the students and losses (needs a C++ compiler)")
    a("--full-size", action="store_true", help="--predict at each image's size (default: larger ones at the data's)")
    a = p.add_mutually_exclusive_group().add_argument  # instead of training, one of:
    a("--benchmark", action="store_true", help="time steps of independent, dml, ctcl; print the students' sizes; stop")
    a("--predict", nargs="+", metavar="PATH", help="segment these images (files, folders) with the --resume "
      "checkpoint: class-index PNGs and overlays in --out (default: the checkpoint's folder/predict)")
    a("--export", action="store_true", help="the --resume students as torch.export programs cnn.pt2, vit.pt2 in --out")
    a("--summarize", nargs="+", metavar="RUN_DIR", help="a Markdown table (mean ± std over seeds) of finished runs")
    return p


def dataset_classes(args):
    """The class names and their colours (a checkpoint keeps them in its args)."""
    if args.data == "folder":
        return read_classes(args.data_root)
    classes = DATASETS[args.data]["classes"]
    return list(classes), [list(c) for c in DATASETS[args.data].get("colours", PALETTE[:len(classes)].tolist())]


def fill_defaults(args):
    """Per-data-set defaults of the flags left unset (None), then the checks of more than one flag: one line each."""
    spec, real = DATASETS[args.data], args.data != "synthetic"
    # --workers: this process's CPUs, shared with torchrun's others here; 16 at most (more only fill /dev/shm)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = max(1, min(16, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))) if real else 0

    def default(**values):  # for the flags left unset (None)
        for name, value in values.items():
            setattr(args, name, value if getattr(args, name) is None else getattr(args, name))
    default(iters=spec["iters"], batch_size=spec["batch"], crop_size=spec["crop"], cnn_lr=spec.get("cnn_lr", 0.01),
            vit_lr=spec.get("vit_lr", 6e-5), workers=workers, pretrained=real,
            vit_weights="weights/mit_b0.pth" if real else "none")
    default(eval_every=max(1, args.iters // spec.get("evals", 5)), log_every=max(1, min(50, args.iters // 30)),
            kd_warmup=args.iters // 20, vit_warmup=min(1500, args.iters // 10))
    crop = args.crop_size
    args.crop_size = [crop] * 2 if isinstance(crop, int) else list(crop) * (2 if len(crop) == 1 else 1)
    world = int(os.environ.get("WORLD_SIZE", 1))
    cpu = args.gpu == -1 or (args.gpu is None and not torch.cuda.is_available())
    checks = [
        (len(args.crop_size) == 2, f"--crop-size takes one or two sides, got {' '.join(map(str, args.crop_size))}"),
        (args.batch_size % world == 0, f"--batch-size {args.batch_size} does not split evenly across {world} "
         f"processes: it is the global batch, so make it a multiple of {world}"),
        (args.batch_size // world >= 2 or not cpu, f"--batch-size {args.batch_size} leaves one image per process, "
         "and BatchNorm needs two on the CPU (no SyncBatchNorm there): raise it to at least 2 per process"),
        (args.region_size % 32 == 0, "--region-size must be a positive multiple of 32 (the stride of the encoders' "
         f"last features that region BSD compares), got {args.region_size}"),
        (math.isfinite(args.rbsd_margin) or args.rbsd_margin == -math.inf, f"--rbsd-margin must be a finite number "
         f"or -inf (every region taught both ways), got {args.rbsd_margin}"),
        (args.vit_weights != "", "--vit-weights needs a path, or 'none'"),
        (not args.eval_only or args.resume, "--eval-only needs --resume CHECKPOINT"),
        (args.data != "folder" or args.data_root, "--data folder needs --data-root DIR: the folder that holds "
         "images/, labels/ and classes.txt"),
        (not args.compile or any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++", "clang++")),
         "--compile needs a C++ compiler (torch.compile builds its kernels with one) and none was found on "
         "PATH ($CXX, c++, clang++): install one (e.g. apt install g++) or run without --compile"),
    ]
    if problem := next((message for ok, message in checks if not ok), None):
        raise UserError(problem)
    args.classes, args.colours = dataset_classes(args)
    if args.vit_weights == "none":
        args.vit_weights = None
    elif not args.resume and not pathlib.Path(args.vit_weights).is_file():  # a checkpoint holds every weight
        raise UserError(f"MiT-B0 weights not found at {args.vit_weights}: run `bash data_prep.sh weights`, "
                        "or pass --vit-weights none to train the ViT from scratch")


# where and how to run: the flags --resume never takes from a checkpoint
RUNTIME = {"out", "resume", "stop_at", "eval_only", "workers", "gpu", "vis", "benchmark", "summarize", "compile",
           "predict", "export", "full_size"}
# what does not change what a run learns: runs that differ only in these are seeds of one row of --summarize
NOT_RECIPE = RUNTIME | {"seed", "eval_every", "save_every", "log_every", "largest_side"}


def resume_recipe(args, argv, saved):
    """--resume continues the checkpoint's run: a flag not given takes its value (but those of RUNTIME), a recipe
    flag given another value is refused in one line naming each; --iters may change (see build_optimizers)."""
    parser, unset = get_args_parser(), object()
    parsed = vars(parser.parse_args(argv, argparse.Namespace(**{k: unset for k in vars(parser.parse_args([]))})))
    for name, value in saved.items():
        if parsed.get(name) is unset and name not in RUNTIME:  # a flag not given
            setattr(args, name, "none" if name == "vit_weights" and value is None else value)
    fill_defaults(args)
    names = (set(saved) - NOT_RECIPE - {"iters", "amp", "data_root"}) | {"seed"}
    differ = [k for k in sorted(names) if json.dumps(getattr(args, k, saved[k]), default=str) != json.dumps(saved[k])]
    if differ:  # the classes and colours follow --data and classes.txt: named only when no flag differs
        raise UserError(f"--resume {args.resume} continues a run made with " + (", ".join(
            f"--{k.replace('_', '-')} {saved[k]} (not {getattr(args, k)})" for k in differ if k in parsed) or
            f"the classes {saved['classes']} (classes.txt changed)") + ": drop what differs, or start a new run")


def run_in(folder):
    """What run a folder holds (a run holds its folder from its args.json on), and the way on: two phrases."""
    with contextlib.suppress(Exception):  # mmap: only what is read is loaded
        ckpt = torch.load(folder / "last.pt", map_location="cpu", mmap=True, weights_only=True)
        return f"a run at iteration {ckpt['iter']}", f": continue it with --resume {folder / 'last.pt'}"
    return "a run with no checkpoint yet", " (starting, or stopped before its first: the same command with --resume " \
        "auto starts it there again)"


def choose_out(args, own=False):
    """OUT: --out, else runs/DATA-METHOD-sSEED or its next free -2, -3 ...; resumed (or own: --resume auto), the run's.
    A new run claims it by making args.json exclusively: runs launched together never share one, nor write another's."""
    default = args.out is None
    args.out = args.out or (pathlib.Path(args.resume).parent if args.resume else default_out(args))
    if own or (args.resume and pathlib.Path(args.resume).resolve().parent == args.out.resolve()):
        make_folder(args.out)
        for stale in [] if args.eval_only else args.out.glob(".*.tmp"):  # what a killed run of OUT was writing
            stale.unlink(missing_ok=True)
        return args.out
    taken = args.out
    for k in range(2, 10 ** 6):
        make_folder(args.out)
        try:
            save_args(args, exclusive=True)
            break
        except FileExistsError:
            if not default:
                raise UserError(f"--out {args.out} holds {''.join(run_in(args.out))}, or give another --out") from None
            args.out = taken.with_name(f"{taken.name}-{k}")
    if args.out != taken:
        print(f"{taken} holds {run_in(taken)[0]}: this run writes to {args.out}", flush=True)
    return args.out


def default_out(args):
    return pathlib.Path("runs") / f"{args.data}-{args.method}-s{args.seed}"


def make_folder(folder):
    """mkdir -p, where the first file is written: a file in the way, a read-only disk are one line."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as error:
        raise UserError(f"--out {folder}: cannot write there ({error.strerror}): give another folder") from None


def milliseconds(work, sync, times=1):
    """Wall time of work() in ms, per time; `sync` waits for the GPU, which runs ahead of the host."""
    sync()
    began = time.perf_counter()
    work()
    sync()
    return (time.perf_counter() - began) * 1000 / times


def student_sizes(model, crop_size, device, autocast, sync, runs=5):
    """Per student: parameters (M), GMACs of a crop (FLOPs / 2, attention in its math form), forward ms at batch 1."""
    image, sizes = torch.randn(1, 3, *crop_size, device=device), {}
    for name in ("cnn", "vit"):
        student, counter = getattr(model, name).eval(), FlopCounterMode(display=False)
        with torch.no_grad(), counter, sdpa_kernel(SDPBackend.MATH):
            student(image)
        with torch.no_grad(), autocast:
            times = sorted(milliseconds(lambda: student(image), sync) for _ in range(runs + 1))
        sizes[name] = {"params_m": sum(p.numel() for p in student.parameters()) / 1e6,
                       "gmacs": counter.get_total_flops() / 2e9, "ms_per_image": times[runs // 2]}
    return sizes


def benchmark(args, ctx, rounds=5, steps=3):
    """ms/step of independent, dml, ctcl, interleaved (median of `rounds` after a warm-up), on a GPU with peak memory
    (weights, gradients, moments, a step's most); the students' sizes; one loader worker's img/s, the workers needed."""
    classes, cuda, method, threads = len(args.classes), ctx.device.type == "cuda", args.method, torch.get_num_threads()
    batches = training_batches(build_datasets(args.data, args.data_root, args.crop_size, args.data_seed, (
        args.batch_size, 1), args.classes)[0], batch_size=args.batch_size, start_iter=0, workers=0, seed=args.seed,
        rank=0, world_size=1, pin_memory=False)  # workers 0: this process reads, transforms and collates
    torch.set_num_threads(1)  # as one loader worker; a first batch (the steps') loads the decoders, 16 images are timed
    images, target = to_device(*next(batches), ctx.device)
    n = max(2, 16 // args.batch_size)
    loader = 1000 / milliseconds(lambda: [next(batches) for _ in range(n)], lambda: None, n * args.batch_size)
    torch.set_num_threads(threads)
    scaler, kd_weight = torch.amp.GradScaler(ctx.device.type, enabled=ctx.fp16), torch.ones((), device=ctx.device)
    sync, allocated = (torch.cuda.synchronize, torch.cuda.memory_allocated) if cuda else (lambda: None, lambda: 0)

    def timed(model, opt):
        return milliseconds(lambda: [train_step(model, images, target, *opt, scaler, ctx.autocast(), kd_weight)
                                     for _ in range(steps)], sync, steps)
    args.pretrained, args.vit_weights, runs = False, None, {}  # a step's time does not depend on the weights
    for args.method in ("independent", "dml", "ctcl"):
        before = allocated()
        torch.manual_seed(args.seed)
        model = build_model(args, classes).to(ctx.device)
        if args.compile:
            model.compile()
        opt = build_optimizers(model, iters=10 ** 6)
        runs[args.method] = {"model": model, "opt": opt, "ms": [], "warmup_s": timed(model, opt) * steps / 1000,
                             "held": allocated() - before, "peak": 0}  # held: its weights, gradients, moments
    for _ in range(rounds):
        for run in runs.values():
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            base = allocated()
            run["ms"].append(timed(run["model"], run["opt"]))
            run["peak"] = max(run["peak"], run["held"] + (torch.cuda.max_memory_allocated() - base if cuda else 0))
    ms = {m: sorted(run["ms"])[rounds // 2] for m, run in runs.items()}
    sizes = student_sizes(runs["ctcl"]["model"], args.crop_size, ctx.device, ctx.autocast(), sync)
    result = {f"{m}_ms": v for m, v in ms.items()} | {"ctcl_over_independent": ms["ctcl"] / ms["independent"],
                                                      "warmup_s": {m: r["warmup_s"] for m, r in runs.items()}}
    result |= {"peak_mem_mb": {m: run["peak"] / 2 ** 20 for m, run in runs.items()}} if cuda else {
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # the process's, all three
    step = args.batch_size * 1000 / ms[method]
    result |= {"loader_img_s": loader, "step_img_s": step, "workers_needed": math.ceil(step / loader), "sizes": sizes}
    where = torch.cuda.get_device_name(ctx.device) if cuda else f"CPU ({os.cpu_count()} cores)"
    ctx.print(f"benchmark on {where}, crop {args.crop_size}, batch {args.batch_size}, amp {args.amp}, "
              f"compile {args.compile}, median of {rounds} rounds of {steps} steps\n"
              + "\n".join(f"{m:<12}{v:>8.1f} ms/step{v / ms['independent']:>7.3f} × independent"
                          + (f"{runs[m]['peak'] / 2 ** 20:>9.0f} MB" if cuda else "") for m, v in ms.items())
              + "".join(f"\n{name:<12}{s['params_m']:>8.2f} M parameters{s['gmacs']:>9.2f} GMACs"
                        f"{s['ms_per_image']:>9.1f} ms/image (batch 1)" for name, s in sizes.items())
              + f"\nloader      {loader:>8.1f} img/s from one worker on {args.data} (one thread); the {method} step "
              f"takes {step:.1f} img/s: {result['workers_needed']} workers\n" + json.dumps(result))
    return result


def read_run(folder):
    """(args, final eval record) of a finished run, else a UserError saying why; a damaged line costs itself alone."""
    folder = pathlib.Path(folder)
    if missing := [name for name in ("metrics.jsonl", "args.json") if not (folder / name).is_file()]:
        raise UserError(f"{folder}: " + ("no such folder" if not folder.is_dir() else f"no {missing[0]}"))
    try:
        args = json.loads((folder / "args.json").read_bytes())
    except ValueError:
        raise UserError(f"{folder}: args.json is damaged (not JSON)") from None
    if not isinstance(args, dict) or "iters" not in args:
        raise UserError(f"{folder}: not a run of ctcl.py (its args.json has no iters)")
    records, damaged = read_records(folder / "metrics.jsonl")
    if not (final := [r for r in records if r.get("type") == "eval" and r.get("iter") == args["iters"]]):
        reached = max((r.get("iter", 0) for r in records if r.get("type") == "train"), default=0)
        raise UserError(f"{folder}: no final evaluation (iteration {args['iters']}; trained to {reached} at least"
                        + (f"; metrics.jsonl has {damaged} damaged line(s)" if damaged else "") + ")")
    return args, final[-1]


def summarize(folders):
    """Markdown tables of finished runs: a row per recipe, mean ± std over its seeds; per-class IoU for one data set."""
    runs, skipped = [], []
    for folder in folders:
        try:
            runs.append(read_run(folder))
        except UserError as error:  # said as "left out: ...", above the table
            skipped.append(str(error))
    if not runs:
        raise UserError("--summarize found no finished run (" + "; ".join(skipped) + ")")
    # a flag that older runs did not record ("–") matters only where the runs that did record it differ
    flags = set().union(*(args for args, _ in runs)) - NOT_RECIPE
    differ = sorted(k for k in flags if len({json.dumps(args[k]) for args, _ in runs if k in args}) > 1)
    groups = {}
    for args, record in runs:
        row = groups.setdefault(tuple(json.dumps(args.get(k, "–")) for k in differ), {})
        if args.get("seed") in row:  # a copy or a rerun of one seed is no second seed
            skipped.append(f"{args.get('out')}: its seed {args.get('seed')} is counted already in its row")
        row.setdefault(args.get("seed"), record)
    groups = {key: list(row.values()) for key, row in groups.items()}

    def mean_std(values):
        values = torch.tensor(values, dtype=torch.float64) * 100
        return f"{values.mean():.1f}" + (f" ± {values.std():.1f}" if len(values) > 1 else "")

    def table(columns, rows):
        return ["| " + " | ".join(differ or ["runs"]) + " | " + " | ".join(columns) + " |",
                "|" + "---|" * (max(1, len(differ)) + len(columns))] + \
               ["| " + " | ".join(str(c) for c in ([json.loads(v) for v in key] or ["all"]) + cells) + " |"
                for key, cells in rows]
    def miou(records, s):  # runs made before the ensemble was scored show "–" there
        return mean_std([r[s]["miou"] for r in records]) if all(s in r for r in records) else "–"
    shares = ("only_cnn", "only_vit", "both", "neither")
    lines = [f"left out: {reason}" for reason in skipped] + table(
        ["seeds"] + [f"{title} mIoU" for title in STUDENTS.values()] + [f"{s.replace('_', ' ')} right" for s in shares],
        [(key, [len(records)] + [miou(records, s) for s in STUDENTS]
          + [mean_std([r["complementarity"][s] for r in records]) for s in shares]) for key, records in groups.items()])
    first = runs[0][0]
    classes = first.get("classes") or DATASETS.get(first.get("data"), {}).get("classes", ())
    if classes and all((a.get("data"), a.get("classes")) == (first.get("data"), first.get("classes")) and  # one set
                       len(r[s].get("per_class_iou", ())) == len(classes) for a, r in runs for s in ("cnn", "vit")):
        def iou(records, s):  # a class absent from prediction and truth (null) is left out of its mean
            values = torch.tensor([[math.nan if v is None else v for v in r[s]["per_class_iou"]] for r in records],
                                  dtype=torch.float64)
            return [f"{100 * v:.1f}" for v in values.nanmean(0).tolist()]
        lines += [""] + table(["student", *classes], [(key, [{"cnn": "CNN", "vit": "ViT"}[s], *iou(records, s)])
                                                       for key, records in groups.items() for s in ("cnn", "vit")])
    return "\n".join(lines)


def first_to_fail():
    """Under torchrun a bad flag or file fails every process alike: the first to fail (the store counts) says so."""
    if not torch.distributed.is_initialized():  # torchrun's rank, else srun's or mpirun's (refused by main)
        return next((os.environ[v] for v in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
                     if v in os.environ), "0") == "0"
    try:
        return torch.distributed.distributed_c10d._get_default_store().add("ctcl.py failures", 1) == 1
    except Exception:  # the store went down with the process that held it
        return torch.distributed.get_rank() == 0


def main(argv=None):
    try:
        args = get_args_parser().parse_args(argv)
        if args.summarize:
            table = summarize(sorted({p for pattern in args.summarize for p in glob.glob(pattern) or [pattern]}))
            try:
                print(table, flush=True)
            except BrokenPipeError:  # `--summarize ... | head`: the reader has all it wanted
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # and Python's exit flush stays quiet
            return table
        for variable, launcher in (("SLURM_STEP_NUM_TASKS", "srun --ntasks-per-node=1"), ("PMI_SIZE", "mpirun -ppn 1"),
                                   ("OMPI_COMM_WORLD_SIZE", "mpirun --npernode 1")):  # else each trains on GPU 0
            if "WORLD_SIZE" not in os.environ and int(os.environ.get(variable, 1)) > 1:
                raise UserError(f"{launcher.split()[0]} started {os.environ[variable]} processes, but ctcl.py takes "
                                f"its processes from torchrun: run one task per machine, e.g. `{launcher} torchrun "
                                "--nproc_per_node=GPUS ... ctcl.py ...` (see the README)")
        if args.predict or args.export:  # uses of a trained checkpoint: what they need is in it
            if not args.resume:
                raise UserError("--predict and --export need --resume CHECKPOINT (a last.pt of ctcl.py)")
            args.out = args.out or pathlib.Path(args.resume).parent / ("predict" if args.predict else "export")
            return predict(args, Runtime(args.gpu, args.amp)) if args.predict else export(args)
        own = args.resume == "auto"  # what a requeued job runs: OUT's run goes on from its last.pt, else starts
        if own:
            args.out = args.out or default_out(args)
            args.resume = str(args.out / "last.pt") if (args.out / "last.pt").is_file() else None
        ckpt = load_checkpoint(args.resume) if args.resume else None  # a bad checkpoint fails before any work
        resume_recipe(args, argv, ckpt["args"]) if ckpt else fill_defaults(args)
        if args.benchmark:
            return benchmark(args, Runtime(args.gpu, args.amp))
        ctx = Runtime(args.gpu, args.amp)
        try:
            with stop_signals(ctx.caught):
                return train(args, ctx, ckpt, own)
        except KeyboardInterrupt:  # a second Ctrl-C
            out = args.out or (pathlib.Path(args.resume).parent if args.resume else None)
            raise RunError("stopped at once by a second Ctrl-C; " + (f"{out / 'last.pt'}, if there is one, is whole"
                                                                    if out else "nothing was written"), 130) from None
    except UserError as error:
        for e in (error, error.__context__ or error):  # the loader's workers stop now, not at a garbage collection
            traceback.clear_frames(e.__traceback__)
        # raised in a data-loading worker, the message carries the worker's traceback: keep its last line
        message = re.sub(r"^\S*(User|Run)Error: ", "", str(error).strip().splitlines()[-1])
        if first_to_fail():
            print(f"ctcl.py: {'error: ' if error.code == 2 else ''}{message}", file=sys.stderr)
        raise SystemExit(error.code)
    except KeyboardInterrupt:  # Ctrl-C outside training (--predict, --summarize ...): nothing there to keep
        print("ctcl.py: stopped by Ctrl-C", file=sys.stderr)
        raise SystemExit(130)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
