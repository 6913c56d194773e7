"""``fuseopt.param_groups``: the groups timm's and Hugging Face Trainer's rules give.

timm and transformers are not dependencies: the expected groups below are written out by hand
from their documented rules, on torch.nn models shaped like timm's ResNet and ViT (with timm's
``group_matcher`` and ``no_weight_decay`` methods). Where transformers (5.x) is importable, the
Trainer split is also compared with its own ``get_decay_parameter_names``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fuseopt

LR, WD, DECAY = 1e-3, 0.05, 0.75


# ----------------------------------------------------------------------------------- the models
class Attention(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)


class Mlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim)


class PatchEmbed(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, 4, 4)


class ViT(nn.Module):
    """A ViT's layout and names, as timm's VisionTransformer, without a group_matcher."""

    def __init__(self, depth=2, dim=8):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, dim))
        self.patch_embed = PatchEmbed(dim)
        self.blocks = nn.Sequential(*(Block(dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def no_weight_decay(self):  # timm's
        return {"pos_embed", "cls_token", "dist_token"}


class TimmViT(ViT):
    """With timm's VisionTransformer.group_matcher: the stem, the blocks, the final norm joined
    to the last block (99999), the head unmatched (the last layer)."""

    def group_matcher(self, coarse=False):
        return dict(
            stem=r"^cls_token|pos_embed|patch_embed",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )


class ResNet(nn.Module):
    """A ResNet's layout and names, as timm's and torchvision's, without a group_matcher."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2), BasicBlock(16, 16))
        self.fc = nn.Linear(16, 10)


class TimmResNet(ResNet):
    """With timm's ResNet.group_matcher (fine: one layer per block)."""

    def group_matcher(self, coarse=False):
        return dict(
            stem=r"^conv1|bn1|^stem", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)"
        )


# ------------------------------------------------------------- expected groups, written by hand
def vit_block(i):
    """Block i's (decaying, not decaying) names, in the model's order."""
    p = f"blocks.{i}."
    decay = ["attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"]
    no_decay = ["norm1.weight", "norm1.bias", "attn.qkv.bias", "attn.proj.bias",
                "norm2.weight", "norm2.bias", "mlp.fc1.bias", "mlp.fc2.bias"]  # fmt: skip
    return [p + n for n in decay], [p + n for n in no_decay]


def resnet_block(prefix, downsample=False):
    decay = [f"{prefix}.conv1.weight", f"{prefix}.conv2.weight"]
    no_decay = [f"{prefix}.{bn}.{k}" for bn in ("bn1", "bn2") for k in ("weight", "bias")]
    if downsample:
        decay.append(f"{prefix}.downsample.0.weight")
        no_decay += [f"{prefix}.downsample.1.weight", f"{prefix}.downsample.1.bias"]
    return decay, no_decay


def summary(groups):
    """(names, weight decay, lr) of each group; and each group's params are the named ones."""
    return [(g["param_names"], g["weight_decay"], g.get("lr")) for g in groups]


def check_params(model, groups):
    named = dict(model.named_parameters())
    for g in groups:
        assert set(g) <= {"params", "param_names", "weight_decay", "lr"}
        assert len(g["params"]) == len(g["param_names"])
        assert all(p is named[n] for p, n in zip(g["params"], g["param_names"]))


# -------------------------------------------------------------- timm's param_groups_weight_decay
def test_vit_weight_decay_split_is_timms():
    # timm's rule: no decay where ndim <= 1, the name ends with ".bias", or the model's
    # no_weight_decay() names it (cls_token, pos_embed: 3-d); without decay first.
    model = ViT()
    b0, b1 = vit_block(0), vit_block(1)
    no_decay = ["cls_token", "pos_embed", "patch_embed.proj.bias", *b0[1], *b1[1],
                "norm.weight", "norm.bias", "head.bias"]  # fmt: skip
    decay = ["patch_embed.proj.weight", *b0[0], *b1[0], "head.weight"]
    groups = fuseopt.param_groups(model, WD)
    assert summary(groups) == [(no_decay, 0.0, None), (decay, WD, None)]
    check_params(model, groups)
    assert summary(fuseopt.param_groups(model, WD, lr=LR)) == [
        (no_decay, 0.0, LR),
        (decay, WD, LR),
    ]


def test_resnet_weight_decay_split_is_timms():
    model = ResNet()
    blocks = [
        resnet_block("layer1.0"),
        resnet_block("layer1.1"),
        resnet_block("layer2.0", downsample=True),
        resnet_block("layer2.1"),
    ]
    no_decay = ["bn1.weight", "bn1.bias", *(n for _, nd in blocks for n in nd), "fc.bias"]
    decay = ["conv1.weight", *(n for d, _ in blocks for n in d), "fc.weight"]
    groups = fuseopt.param_groups(model, WD)
    assert summary(groups) == [(no_decay, 0.0, None), (decay, WD, None)]
    check_params(model, groups)


# --------------------------------------------------------------- timm's param_groups_layer_decay
def vit_layer_groups(norm_layer):
    """timm's groups for a depth-2 ViT: layer 0 the stem, 1 and 2 the blocks, 3 the head; the
    final norm in ``norm_layer``. Groups in order of their first param, the lr scaled by
    DECAY ** (3 - layer)."""
    b0, b1 = vit_block(0), vit_block(1)
    norm = ["norm.weight", "norm.bias"]

    def lr(layer):
        return LR * DECAY ** (3 - layer)

    groups = [
        (["cls_token", "pos_embed", "patch_embed.proj.bias"], 0.0, lr(0)),
        (["patch_embed.proj.weight"], WD, lr(0)),
        (b0[1], 0.0, lr(1)),
        (b0[0], WD, lr(1)),
        (b1[1] + (norm if norm_layer == 2 else []), 0.0, lr(2)),
        (b1[0], WD, lr(2)),
        (["head.weight"], WD, lr(3)),
        ((norm if norm_layer == 3 else []) + ["head.bias"], 0.0, lr(3)),
    ]
    if norm_layer == 3:  # the norm comes before the head: its group, first, holds both
        groups[6], groups[7] = groups[7], groups[6]
    return groups


def test_vit_layer_decay_with_timms_group_matcher_is_timms():
    model = TimmViT()
    groups = fuseopt.param_groups(model, WD, lr=LR, layer_decay=DECAY)
    assert summary(groups) == vit_layer_groups(norm_layer=2)
    check_params(model, groups)


def test_vit_layer_decay_from_numbered_blocks_puts_the_final_norm_with_the_head():
    # Without a group_matcher, the numbered-blocks rule: the same layers, except the final norm
    # (not numbered, after the blocks) is with the head, where timm's matcher puts it with the
    # last block (documented).
    groups = fuseopt.param_groups(ViT(), WD, lr=LR, layer_decay=DECAY)
    assert summary(groups) == vit_layer_groups(norm_layer=3)


@pytest.mark.parametrize("model_class", [TimmResNet, ResNet], ids=["group_matcher", "numbered"])
def test_resnet_layer_decay_is_timms(model_class):
    # timm's ResNet matcher: the stem is layer 0, each block (layerN.M) the next, fc the last;
    # the numbered-blocks rule gives the same layers.
    model = model_class()
    blocks = [
        resnet_block("layer1.0"),
        resnet_block("layer1.1"),
        resnet_block("layer2.0", downsample=True),
        resnet_block("layer2.1"),
    ]
    expected = [
        (["conv1.weight"], WD, LR * DECAY**5),
        (["bn1.weight", "bn1.bias"], 0.0, LR * DECAY**5),
    ]
    for layer, (decay, no_decay) in enumerate(blocks, start=1):
        expected += [
            (decay, WD, LR * DECAY ** (5 - layer)),
            (no_decay, 0.0, LR * DECAY ** (5 - layer)),
        ]
    expected += [(["fc.weight"], WD, LR), (["fc.bias"], 0.0, LR)]
    groups = fuseopt.param_groups(model, WD, lr=LR, layer_decay=DECAY)
    assert summary(groups) == expected
    check_params(model, groups)


def test_group_matcher_coarse_is_not_used():
    # timm asks the matcher for fine groups (coarse=False): ResNet's coarse matcher would give
    # one layer per stage.
    calls = []

    class Spy(TimmResNet):
        def group_matcher(self, coarse=False):
            calls.append(coarse)
            return super().group_matcher(coarse)

    fuseopt.param_groups(Spy(), WD, lr=LR, layer_decay=DECAY)
    assert calls == [False]


def test_layer_function_for_a_model_without_numbered_blocks():
    model = nn.Module()
    model.encoder = nn.Linear(4, 4)
    model.decoder = nn.Linear(4, 4)
    model.head = nn.Linear(4, 2)
    with pytest.raises(ValueError, match="no numbered blocks.*pass layer_id"):
        fuseopt.param_groups(model, WD, lr=LR, layer_decay=0.5)
    depth = {"encoder": 0, "decoder": 1, "head": 2}
    groups = fuseopt.param_groups(
        model, WD, lr=LR, layer_decay=0.5, layer_id=lambda name: depth[name.split(".")[0]]
    )
    assert summary(groups) == [
        (["encoder.weight"], WD, LR * 0.25),
        (["encoder.bias"], 0.0, LR * 0.25),
        (["decoder.weight"], WD, LR * 0.5),
        (["decoder.bias"], 0.0, LR * 0.5),
        (["head.weight"], WD, LR),
        (["head.bias"], 0.0, LR),
    ]


def test_frozen_params_are_left_out_and_change_no_lr():
    model = TimmViT()
    model.patch_embed.requires_grad_(False)
    model.blocks[0].requires_grad_(False)
    model.cls_token.requires_grad_(False)
    groups = fuseopt.param_groups(model, WD, lr=LR, layer_decay=DECAY)
    expected = vit_layer_groups(norm_layer=2)[4:]  # blocks.1, the norm and the head
    assert summary(groups) == [(["pos_embed"], 0.0, LR * DECAY**3), *expected]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert not any(p is q for g in groups for p in g["params"] for q in frozen)


def test_all_frozen_is_an_error():
    model = ResNet().requires_grad_(False)
    with pytest.raises(ValueError, match="no param that requires grad"):
        fuseopt.param_groups(model, WD)


# ------------------------------------------------------------------------- overrides and scales
def test_no_weight_decay_patterns_and_zero_dim_params():
    model = ViT(depth=1)
    model.logit_scale = nn.Parameter(torch.tensor(1.0))  # 0-d: no decay (ndim <= 1)
    groups = fuseopt.param_groups(model, WD, no_weight_decay=["*.attn.qkv.weight", "head.weight"])
    no_decay, decay = groups[0]["param_names"], groups[1]["param_names"]
    assert "logit_scale" in no_decay and "blocks.0.attn.qkv.weight" in no_decay
    assert "head.weight" in no_decay
    assert decay == ["patch_embed.proj.weight", "blocks.0.attn.proj.weight",
                     "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight"]  # fmt: skip
    with pytest.raises(ValueError, match=r"no_weight_decay: 'blocks.\*.atn.qkv.weight' matches no"):
        fuseopt.param_groups(model, WD, no_weight_decay=["blocks.*.atn.qkv.weight"])


def test_lr_and_weight_decay_scales_multiply_per_pattern():
    model = ResNet()
    groups = fuseopt.param_groups(
        model,
        WD,
        lr=LR,
        lr_scales={"fc.*": 10.0, "*.bias": 2.0},
        weight_decay_scales={"layer2.*": 0.5},
    )
    by_name = {n: (g["lr"], g["weight_decay"]) for g in groups for n in g["param_names"]}
    assert by_name["fc.weight"] == (LR * 10.0, WD)
    assert by_name["fc.bias"] == (LR * 10.0 * 2.0, 0.0)  # both patterns; no decay stays 0
    assert by_name["layer2.0.conv1.weight"] == (LR, WD * 0.5)
    assert by_name["layer2.0.bn1.weight"] == (LR, 0.0)
    assert by_name["conv1.weight"] == (LR, WD)
    assert by_name["bn1.bias"] == (LR * 2.0, 0.0)
    assert len(by_name) == len(list(model.parameters()))
    # With layer decay, a pattern's factor multiplies the layer's.
    groups = fuseopt.param_groups(model, WD, lr=LR, layer_decay=DECAY, lr_scales={"conv1.*": 3.0})
    lrs = {n: g["lr"] for g in groups for n in g["param_names"]}
    assert lrs["conv1.weight"] == LR * (3.0 * DECAY**5)
    assert lrs["bn1.weight"] == LR * DECAY**5


# ------------------------------------------------------------------- Hugging Face Trainer's split
class RMSNorm(nn.Module):
    """A model's own RMSNorm class (not a LayerNorm): only its name keeps it from decaying."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class DecoderLayer(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.input_layernorm = RMSNorm(dim)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.q_norm = nn.RMSNorm(dim)  # "*_norm": no decay (transformers 5)
        self.o_proj = nn.Linear(dim, dim, bias=True)
        self.bias_gate = nn.Linear(dim, dim, bias=False)  # "bias" in the name: no decay
        self.normalizer = nn.Linear(dim, dim, bias=False)  # not a "norm" part: decays
        self.post = nn.LayerNorm(dim)  # a LayerNorm: no decay, whatever its name


class TextModel(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.embed_tokens = nn.Embedding(11, dim)
        self.layers = nn.ModuleList(DecoderLayer(dim) for _ in range(2))
        self.norm = nn.RMSNorm(dim)  # a "norm" part: no decay
        self.lm_head = nn.Linear(dim, 11, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(1.0))  # 0-d: decays under Trainer's rule


def hf_expected():
    decay, no_decay = ["embed_tokens.weight"], []
    for i in range(2):
        p = f"layers.{i}."
        decay += [p + "q_proj.weight", p + "o_proj.weight", p + "normalizer.weight"]
        no_decay += [p + n for n in ("input_layernorm.weight", "q_norm.weight", "o_proj.bias",
                                     "bias_gate.weight", "post.weight", "post.bias")]  # fmt: skip
    return decay + ["lm_head.weight", "logit_scale"], [*no_decay, "norm.weight"]


def test_hf_trainer_split():
    model = TextModel()
    decay, no_decay = hf_expected()
    groups = fuseopt.param_groups(model, WD, split="hf")
    assert summary(groups) == [
        (sorted_as(model, decay), WD, None),
        (sorted_as(model, no_decay), 0.0, None),
    ]
    check_params(model, groups)
    vit = fuseopt.param_groups(ViT(), WD, split="hf")
    assert "cls_token" in vit[0]["param_names"]  # Trainer does not read timm's no_weight_decay()
    timm = fuseopt.param_groups(model, WD)  # timm's rule differs on 1-d/0-d and named ones
    assert (
        "logit_scale" in timm[0]["param_names"]
        and "layers.0.bias_gate.weight" in timm[1]["param_names"]
    )


def sorted_as(model, names):
    order = [n for n, _ in model.named_parameters()]
    return sorted(names, key=order.index)


def test_hf_split_equals_transformers_trainer():
    transformers = pytest.importorskip("transformers", minversion="5.0")
    from transformers import Trainer

    for model in (TextModel(), ViT(), ResNet()):
        theirs = Trainer.get_decay_parameter_names(None, model)  # (self is not read)
        groups = fuseopt.param_groups(model, WD, split="hf")
        assert groups[0]["weight_decay"] == WD
        assert set(groups[0]["param_names"]) == set(theirs), transformers.__version__
        assert set(groups[1]["param_names"]).isdisjoint(theirs)


# ------------------------------------------------------------------------- use with optimizers
def test_groups_work_with_torch_and_fuseopt_optimizers_and_load_by_name():
    model = TimmViT()
    groups = fuseopt.param_groups(model, WD, lr=LR, layer_decay=DECAY)
    x = torch.randn(2, 8)
    for opt_class in (torch.optim.AdamW, fuseopt.AdamW):
        opt = opt_class(copy.copy(groups), lr=1.0)  # the groups' lrs win over the default
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in groups]
        model.head(model.norm(x)).sum().backward()
        opt.step()
        opt.zero_grad()
        saved = opt.state_dict()
        assert saved["param_groups"][-1]["param_names"] == ["head.bias"]
    # Regrouped (no layer decay now), the state loads by name.
    opt = fuseopt.AdamW(fuseopt.param_groups(model, WD), lr=LR)
    assert opt.load_state_dict(saved, by_name=True) == ([], [])
    head = opt.state[model.head.weight]
    saved_id = saved["param_groups"][-2]["params"][0]  # head.weight: the last layer's decay group
    assert saved["param_groups"][-2]["param_names"] == ["head.weight"]
    assert torch.equal(head["exp_avg"], saved["state"][saved_id]["exp_avg"])
    assert head["step"].item() == 1


# --------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(weight_decay=-0.1), ValueError, "Invalid weight_decay value: -0.1"),
        (dict(lr=-1.0), ValueError, "Invalid learning rate: -1.0"),
        (dict(split="bert"), ValueError, "split must be 'timm' or 'hf', but got 'bert'"),
        (dict(lr=LR, layer_decay=0.0), ValueError, r"Invalid layer_decay value: 0.0 \(it must"),
        (dict(lr=LR, layer_decay=1.5), ValueError, "Invalid layer_decay value: 1.5"),
        (dict(layer_decay=0.5), ValueError, "layer_decay needs lr"),
        (dict(lr_scales={"fc.*": 2.0}), ValueError, "lr_scales needs lr"),
        (dict(layer_id=lambda n: 0), ValueError, "layer_id is given but layer_decay is None"),
        (
            dict(lr=LR, layer_decay=0.5, layer_id=lambda n: -1),
            ValueError,
            r"layer_id\('conv1.weight'\) returned -1",
        ),
        (
            dict(lr=LR, layer_decay=0.5, layer_id=lambda n: 0),
            ValueError,
            "layer_id puts every param in one layer",
        ),
        (dict(lr=LR, lr_scales=["fc.*"]), TypeError, "lr_scales must be a mapping"),
        (
            dict(lr=LR, lr_scales={"fc.*": -2.0}),
            ValueError,
            r"Invalid lr_scales factor for 'fc.\*': -2.0",
        ),
        (
            dict(weight_decay_scales={"fx.*": 2.0}),
            ValueError,
            r"weight_decay_scales: 'fx.\*' matches no",
        ),
        (
            dict(no_weight_decay="fc.weight"),
            TypeError,
            "no_weight_decay must be an iterable of names",
        ),
    ],
)
def test_errors_name_the_argument(kwargs, error, match):
    kwargs = {"weight_decay": WD, **kwargs}
    with pytest.raises(error, match=match):
        fuseopt.param_groups(ResNet(), **kwargs)


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fuseopt.param_groups([torch.zeros(2, requires_grad=True)], WD)
