"""CTCL: CNN-Transformer Collaborative Learning for semantic segmentation, in one file.

A reference implementation of Zhu, Luo, Zheng, Wang and Wang, "A Good Student is
Cooperative and Reliable: CNN-Transformer Collaborative Learning for Semantic
Segmentation", ICCV 2023 (arXiv 2307.12574). Two students learn together with no
pre-trained teacher: a ResNet-18 DeepLabV3+ (CNN) and a SegFormer-B0 (ViT).
  * HFD, heterogeneous feature distillation: each student mimics the other's
    low-layer features through a projector of its own.
  * Region-wise BSD: in each region of the decoder feature space, the student with
    the lower cross-entropy there teaches the other one.
  * Pixel-wise BSD: a prediction is transferred only where the teacher is right and
    the learner is wrong.

Run it:
    python ctcl.py                                   # synthetic data, CPU, a few minutes
    bash data_prep.sh voc && python ctcl.py --data voc --gpu 0
    torchrun --nproc_per_node=4 ctcl.py --data voc   # DDP, one process per GPU
    python ctcl.py --method independent              # baselines: independent, dml
    python ctcl.py --benchmark --gpu 0               # ms/step of independent, dml, ctcl
    python -m pytest -q test_ctcl.py                 # the tests

Choices the paper's abstract leaves open are marked [I] (interpreted) below; each is
a flag, and the README lists them under "What we inferred".
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.segmentation.deeplabv3 import ASPP
from torchvision.ops import StochasticDepth

IGNORE_INDEX = 255  # VOC's "void" label: padding, object borders, unlabelled pixels


# ----------------------------------------------------------------------------------
# The CNN student: ResNet-18 DeepLabV3+

def conv_bn_relu(in_channels, out_channels, kernel_size=1):
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def dilate_stage(stage, dilation):
    """Run a ResNet BasicBlock stage at stride 1 with dilated 3x3 convs [I].

    torchvision refuses replace_stride_with_dilation for BasicBlock, so we edit the
    built convs; their weights keep their shapes, so ImageNet weights still load."""
    stage[0].conv1.stride = (1, 1)
    if stage[0].downsample is not None:
        stage[0].downsample[0].stride = (1, 1)
    for block in stage:
        for conv in (block.conv1, block.conv2):
            conv.dilation, conv.padding = (dilation, dilation), (dilation, dilation)


class DeepLabV3Plus(nn.Module):
    """ResNet-18 + ASPP + DeepLabV3+ decoder. Returns {low, feat, logits}, all at stride 4."""

    def __init__(self, num_classes, output_stride=16, pretrained=False):
        super().__init__()
        assert output_stride in (8, 16), f"output_stride must be 8 or 16, got {output_stride}"
        weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1 if pretrained else None
        self.backbone = torchvision.models.resnet18(weights=weights)
        del self.backbone.fc, self.backbone.avgpool  # a dense head replaces them
        if output_stride == 8:
            dilate_stage(self.backbone.layer3, 2)
        dilate_stage(self.backbone.layer4, 2 if output_stride == 16 else 4)
        rates = (6, 12, 18) if output_stride == 16 else (12, 24, 36)
        self.aspp = ASPP(512, list(rates), out_channels=256)
        self.low_proj = conv_bn_relu(64, 48)
        self.fuse = nn.Sequential(conv_bn_relu(256 + 48, 256, 3), conv_bn_relu(256, 256, 3))
        self.classifier = nn.Conv2d(256, num_classes, 1)

    def forward(self, x):
        b = self.backbone
        low = b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(x)))))
        context = self.aspp(b.layer4(b.layer3(b.layer2(low))))
        context = F.interpolate(context, size=low.shape[-2:], mode="bilinear", align_corners=False)
        feat = self.fuse(torch.cat([context, self.low_proj(low)], dim=1))
        return {"low": low, "feat": feat, "logits": self.classifier(feat)}


# ----------------------------------------------------------------------------------
# The ViT student: MiT-B0 encoder + SegFormer all-MLP decoder.
# Module names follow the official MiT checkpoint so that mit_b0.pth loads as is.

class OverlapPatchEmbed(nn.Module):
    """Strided conv (patches overlap), then LayerNorm over the tokens."""

    def __init__(self, in_channels, dim, *, patch_size, stride):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x):
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


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
            x = self.sr(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)
            x = self.norm(x)
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
    """Linear -> depthwise 3x3 conv -> GELU -> Linear; the conv leaks position, so no
    position embedding is needed."""

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
    """MiT encoder; the defaults are MiT-B0. forward(x) returns the 4 stage maps (NCHW)."""

    def __init__(self, widths=(32, 64, 160, 256), heads=(1, 2, 5, 8), depths=(2, 2, 2, 2),
                 sr_ratios=(8, 4, 2, 1), mlp_ratio=4, drop_path=0.1):
        super().__init__()
        self.widths = widths
        rates = torch.linspace(0, drop_path, sum(depths)).tolist()  # rises block by block
        in_channels = 3
        for i, (dim, n_heads, depth, sr) in enumerate(zip(widths, heads, depths, sr_ratios), 1):
            patch, stride = (7, 4) if i == 1 else (3, 2)
            setattr(self, f"patch_embed{i}",
                    OverlapPatchEmbed(in_channels, dim, patch_size=patch, stride=stride))
            first = sum(depths[:i - 1])
            setattr(self, f"block{i}", nn.ModuleList(
                MiTBlock(dim, heads=n_heads, sr_ratio=sr, mlp_ratio=mlp_ratio,
                         drop_path=rates[first + j]) for j in range(depth)))
            setattr(self, f"norm{i}", nn.LayerNorm(dim, eps=1e-6))
            in_channels = dim
        self.apply(init_mit_weights)

    def forward(self, x):
        maps = []
        for i in range(1, len(self.widths) + 1):
            x, h, w = getattr(self, f"patch_embed{i}")(x)
            for block in getattr(self, f"block{i}"):
                x = block(x, h, w)
            x = getattr(self, f"norm{i}")(x)
            x = x.transpose(1, 2).reshape(x.shape[0], -1, h, w)
            maps.append(x)
        return maps


def init_mit_weights(module):
    """The initialisation of the official MiT code, for training from scratch."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0, math.sqrt(2.0 / fan_out))
        nn.init.zeros_(module.bias)


def load_encoder_weights(encoder, state_dict):
    """Load an official MiT checkpoint (its classifier head.* dropped) with strict keys.

    A missing, unexpected or misshaped key raises a ValueError that names it."""
    state_dict = state_dict.get("state_dict", state_dict)  # some dumps wrap the weights
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    own = encoder.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    misshaped = sorted(f"{k} {tuple(state_dict[k].shape)} != {tuple(own[k].shape)}"
                       for k in set(own) & set(state_dict) if state_dict[k].shape != own[k].shape)
    problems = [f"{name}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                for name, keys in (("missing", missing), ("unexpected", unexpected),
                                   ("misshaped", misshaped)) if keys]
    if problems:
        raise ValueError("MiT checkpoint does not match MiT-B0: " + "; ".join(problems))
    encoder.load_state_dict(state_dict, strict=True)


class SegFormer(nn.Module):
    """MiT-B0 + all-MLP decoder. Returns {low, feat, logits}, all at stride 4."""

    def __init__(self, num_classes, encoder_weights=None, embed_dim=256, drop_path=0.1):
        super().__init__()
        self.encoder = MixTransformer(drop_path=drop_path)
        if encoder_weights is not None:
            load_encoder_weights(self.encoder, torch.load(encoder_weights, map_location="cpu",
                                                          weights_only=True))
        # a per-token Linear is a 1x1 conv on the map
        self.linear = nn.ModuleList(nn.Conv2d(w, embed_dim, 1) for w in self.encoder.widths)
        self.fuse = conv_bn_relu(4 * embed_dim, embed_dim)
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = nn.Conv2d(embed_dim, num_classes, 1)

    def forward(self, x):
        maps = self.encoder(x)
        size = maps[0].shape[-2:]
        fused = torch.cat([F.interpolate(lin(m), size=size, mode="bilinear", align_corners=False)
                           for lin, m in zip(self.linear, maps)], dim=1)
        feat = self.fuse(fused)
        return {"low": maps[0], "feat": feat, "logits": self.classifier(self.dropout(feat))}


# ----------------------------------------------------------------------------------
# HFD: heterogeneous feature distillation, in the low-layer feature space

def l2_normalize(x):
    """n(x): unit L2 norm over the channels at each pixel."""
    return F.normalize(x, dim=1, eps=1e-12)


def mimic_loss(student, teacher, weight=None):
    """Σ_pixels w·||n(student) − sg(n(teacher))||² / max(1, Σ w); plain mean if w is None."""
    if student.shape[-2:] != teacher.shape[-2:]:
        student = F.interpolate(student, size=teacher.shape[-2:], mode="bilinear", align_corners=False)
    dist = (l2_normalize(student) - l2_normalize(teacher).detach()).pow(2).sum(dim=1)
    if weight is None:
        return dist.mean()
    return (weight * dist).sum() / weight.sum().clamp_min(1)


def projector(in_channels, out_channels):
    """1x1 conv -> BN -> ReLU -> 1x1 conv [I]."""
    return nn.Sequential(conv_bn_relu(in_channels, out_channels), nn.Conv2d(out_channels, out_channels, 1))


class HFD(nn.Module):
    """Heterogeneous feature distillation on the stride-4 features.

        loss_cnn = mean_pixels ||n(P_c→v(f_c)) − sg(n(f_v))||²
        loss_vit = mean_pixels ||n(P_v→c(f_v)) − sg(n(f_c))||²

    Each student owns the projector into its peer's space [I]; the target is always
    detached and has no learnable map on it, so nothing can collapse."""

    def __init__(self, cnn_channels=64, vit_channels=32):
        super().__init__()
        self.cnn_to_vit = projector(cnn_channels, vit_channels)
        self.vit_to_cnn = projector(vit_channels, cnn_channels)

    def forward(self, low_cnn, low_vit):
        return (mimic_loss(self.cnn_to_vit(low_cnn), low_vit),
                mimic_loss(self.vit_to_cnn(low_vit), low_cnn))


# ----------------------------------------------------------------------------------
# Region-wise BSD: who teaches whom, region by region, in the decoder feature space

def region_sums(x, region_size):
    """Sum a (B, H, W) map over region_size² blocks; the last row/column may be partial."""
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % region_size, -w % region_size
    x = F.pad(x, (0, pad_w, 0, pad_h))
    b, hp, wp = x.shape
    return x.reshape(b, hp // region_size, region_size, wp // region_size, region_size).sum((2, 4))


def region_bsd_masks(ce_cnn, ce_vit, target, region_size=32, ignore_index=255, margin=0.0):
    """Which student teaches each region_size² block of the label grid.

    Reliability of a student in block R = its mean CE over R's valid pixels [I].
        cnn_teaches[R] = R has a valid pixel and  mean_CE_vit(R) − mean_CE_cnn(R) > margin
    and vit_teaches the mirror image; ties and empty blocks: neither.
    Inputs (B, H, W); outputs float {0,1} of shape (B, ceil(H/r), ceil(W/r))."""
    valid = (target != ignore_index).to(ce_cnn.dtype)
    count = region_sums(valid, region_size)
    mean_cnn = region_sums(ce_cnn.detach() * valid, region_size) / count.clamp_min(1)
    mean_vit = region_sums(ce_vit.detach() * valid, region_size) / count.clamp_min(1)
    has_valid = count > 0
    cnn_teaches = has_valid & (mean_vit - mean_cnn > margin)
    vit_teaches = has_valid & (mean_cnn - mean_vit > margin)
    return cnn_teaches.to(ce_cnn.dtype), vit_teaches.to(ce_cnn.dtype)


def expand_region_mask(mask, cells_per_region, size):
    """Region grid -> feature grid, exactly: cell (y, x) belongs to region (y // s, x // s)."""
    s = cells_per_region
    return mask.repeat_interleave(s, dim=1).repeat_interleave(s, dim=2)[:, :size[0], :size[1]]


class RegionBSD(nn.Module):
    """Region-wise bidirectional selective distillation on the decoder features.

        loss_vit = Σ_pixels m_c→v ||n(Q_v(F_v)) − sg(n(F_c))||² / max(1, Σ m_c→v)
        loss_cnn = Σ_pixels m_v→c ||n(Q_c(F_c)) − sg(n(F_v))||² / max(1, Σ m_v→c)

    m_c→v is cnn_teaches expanded from the region grid to the feature grid."""

    def __init__(self, channels=256, region_size=32, feature_stride=4):
        super().__init__()
        assert region_size % feature_stride == 0, (
            f"region_size ({region_size}) must be a multiple of the feature stride ({feature_stride})")
        self.cells_per_region = region_size // feature_stride
        self.q_cnn = nn.Conv2d(channels, channels, 1)  # [I] each student's own projector
        self.q_vit = nn.Conv2d(channels, channels, 1)

    def forward(self, feat_cnn, feat_vit, cnn_teaches, vit_teaches):
        size = feat_cnn.shape[-2:]
        m_cnn_to_vit = expand_region_mask(cnn_teaches, self.cells_per_region, size)
        m_vit_to_cnn = expand_region_mask(vit_teaches, self.cells_per_region, size)
        return (mimic_loss(self.q_cnn(feat_cnn), feat_vit, m_vit_to_cnn),
                mimic_loss(self.q_vit(feat_vit), feat_cnn, m_cnn_to_vit))


# ----------------------------------------------------------------------------------
# Pixel-wise BSD: which predictions are transferred, in the logit space

def pixel_bsd_masks(logits_cnn, logits_vit, target, ignore_index=255):
    """cnn_teaches = valid & (argmax z_c == y) & (argmax z_v != y) [I]; vit_teaches the mirror.

    Logits (B, C, H, W) at label resolution; outputs float {0,1} of shape (B, H, W)."""
    valid = target != ignore_index
    cnn_right = logits_cnn.argmax(dim=1) == target
    vit_right = logits_vit.argmax(dim=1) == target
    dtype = logits_cnn.dtype
    return (valid & cnn_right & ~vit_right).to(dtype), (valid & vit_right & ~cnn_right).to(dtype)


def masked_kl(student_logits, teacher_logits, mask, temperature=1.0):
    """T² · Σ_pixels m · KL(sg softmax(z_t/T) || softmax(z_s/T)) / max(1, Σ m)."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)
    return temperature ** 2 * (mask * kl).sum() / mask.sum().clamp_min(1)


def pixel_bsd_loss(logits_cnn, logits_vit, cnn_teaches, vit_teaches, temperature=1.0):
    """loss_vit = masked_kl(z_v <- z_c, cnn_teaches), loss_cnn = masked_kl(z_c <- z_v, vit_teaches).

    With both masks = every valid pixel, this is deep mutual learning (DML)."""
    return (masked_kl(logits_cnn, logits_vit, vit_teaches, temperature),
            masked_kl(logits_vit, logits_cnn, cnn_teaches, temperature))


# ----------------------------------------------------------------------------------
# Evaluation: confusion matrix and IoU

def confusion_matrix(pred, target, num_classes, ignore_index=255):
    """(C, C) int64 counts, rows = ground truth, columns = prediction.

    Pixels whose target lies outside [0, C) (e.g. ignore_index) are dropped. Made with
    scatter_add, so it stays on the device with no host sync."""
    keep = (target >= 0) & (target < num_classes)
    index = torch.where(keep, target * num_classes + pred, torch.zeros_like(target))
    conf = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=pred.device)
    conf.scatter_add_(0, index.flatten().long(), keep.flatten().long())
    return conf.reshape(num_classes, num_classes)


def iou_from_confusion(conf):
    """IoU_k = TP / (TP + FP + FN); a class with zero union is NaN and left out of the mean."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    per_class = tp / union  # 0/0 = NaN for a class absent from prediction and target
    return per_class.nanmean(), per_class


def pixel_accuracy(conf):
    return conf.diag().sum().double() / conf.sum().clamp_min(1)
