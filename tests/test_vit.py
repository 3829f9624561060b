"""Transformers in the engine: token layers read as maps with no user-written reshape,
checked against pytorch-grad-cam's ViT and Swin recipes (its ``reshape_transform``); what
can not apply is refused; layers given as modules; classes explained in chunks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import pearson
from torchvision.models import SwinTransformer, VisionTransformer

import explain
from explain.base import MapLayout, infer_layout
from lit_modules.backbones import TorchvisionBackbone, build_backbone

NUM_CLASSES = 10


def _vit(seed: int = 0) -> VisionTransformer:
    """A seconds-cheap ViT: 32x32 images, 4x4 patches (an 8x8 grid), 2 blocks, D = 32."""
    torch.manual_seed(seed)
    net = VisionTransformer(image_size=32, patch_size=4, num_layers=2, num_heads=2,
                            hidden_dim=32, mlp_dim=64, num_classes=NUM_CLASSES)
    # torchvision zero-initialises the head: every gradient below it would be zero.
    torch.nn.init.normal_(net.heads.head.weight, std=0.5)
    return net.eval()


def _swin(seed: int = 0) -> SwinTransformer:
    """A small Swin: 32x32 images, 4x4 patches, two stages (8x8 then 4x4), D = 16 then 32."""
    torch.manual_seed(seed)
    net = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                          window_size=[4, 4], num_classes=NUM_CLASSES)
    return net.eval()


def _inputs(seed: int, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(
        0, NUM_CLASSES, (batch,), generator=gen
    )


def _vit_tokens_to_map(tokens: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's ViT recipe: drop the class token, patch grid to [B, D, h, w]."""
    b, n, d = tokens.shape
    side = int(round((n - 1) ** 0.5))
    return tokens[:, 1:].reshape(b, side, side, d).permute(0, 3, 1, 2)


def _swin_to_map(x: torch.Tensor) -> torch.Tensor:
    """The same for torchvision's Swin: its layers are already [B, h, w, D]."""
    return x.permute(0, 3, 1, 2)


def _minmax(a) -> np.ndarray:
    a = np.asarray(a).reshape(len(a), -1).astype(np.float64)
    a = a - a.min(1, keepdims=True)
    return a / np.maximum(a.max(1, keepdims=True), 1e-30)


def _r(ours, theirs) -> np.ndarray:
    return pearson(_minmax(ours), _minmax(theirs)).numpy()


def _peer(cls_name, model, layer, x, targets, reshape) -> np.ndarray:
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with getattr(pgc, cls_name)(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
        if cls_name == "ScoreCAM":
            cam.batch_size = 64
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])


# (ours, peer class, our options): the options that reproduce the peer's definition, as in
# tests/test_explain_oracles.py.
CAM_METHODS = [
    ("gradcam", "GradCAM", {}),
    ("gradcam_pp", "GradCAMPlusPlus", {"eps": 1e-6}),
    ("xgradcam", "XGradCAM", {}),
    ("hirescam", "HiResCAM", {}),
    ("layercam", "LayerCAM", {}),
    ("scorecam", "ScoreCAM", {"score": "channel_softmax", "align_corners": True}),
    ("eigencam", "EigenCAM", {}),
]
MODELS = {
    # (builder, layer as the user would pick it, pytorch-grad-cam's reshape)
    "vit": (_vit, lambda n: n.encoder.layers[-1].ln_1, _vit_tokens_to_map),
    "vit_block0": (_vit, lambda n: n.encoder.layers[0], _vit_tokens_to_map),
    "swin": (_swin, lambda n: n.norm, _swin_to_map),
    "swin_stage1": (_swin, lambda n: n.features[1][0].norm1, _swin_to_map),
}


@pytest.mark.oracle
@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize(("method", "peer", "options"), CAM_METHODS, ids=[m[0] for m in CAM_METHODS])
def test_token_layers_match_pytorch_grad_cam(method, peer, options, arch):
    build, pick, reshape = MODELS[arch]
    model = build(seed=len(method) + len(arch))
    x, targets = _inputs(seed=len(arch) * 7 + len(method))
    layer = pick(model)
    ours = explain.run(model, x, method, layer=layer, targets=targets, **options)
    theirs = _peer(peer, model, layer, x, targets, reshape)
    assert ours.shape == (3, 32, 32) and torch.isfinite(ours).all() and ours.abs().sum() > 0
    r = _r(ours, theirs)
    if method == "eigencam":  # the SVD's sign is free (see test_explain_oracles.py)
        proj = _projection(model, layer, x)
        torch.testing.assert_close(ours, explain.upsample(proj.clamp_min(0), (32, 32)))
        r = np.maximum(r, _r(explain.upsample((-proj).clamp_min(0), (32, 32)), theirs))
    print(f"ORACLE {method:12s} {arch:12s} min r = {r.min():.10f}")
    assert r.min() >= 0.99, r


def _projection(model, layer, x) -> torch.Tensor:
    """Eigen-CAM's signed projection ``[B, h, w]`` of the layer, by the peer's reshape."""
    from explain.cam import principal_projection

    store = {}
    handle = layer.register_forward_hook(lambda m, i, o: store.setdefault("o", o.detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    out = store["o"]
    fmap = _vit_tokens_to_map(out) if out.dim() == 3 else _swin_to_map(out)
    return principal_projection(fmap)


def test_layer_by_name_equals_layer_by_module():
    model = _vit()
    x, targets = _inputs(1)
    by_module = explain.run(model, x, "gradcam", layer=model.encoder.layers[-1].ln_1)
    by_name = explain.run(model, x, "gradcam", layer="encoder.layers.encoder_layer_1.ln_1")
    torch.testing.assert_close(by_module, by_name, rtol=0, atol=0)
    assert by_name.shape == (3, NUM_CLASSES, 32, 32)
    with pytest.raises(explain.ExplainError, match="not a submodule of VisionTransformer"):
        explain.run(model, x, "gradcam", layer=torch.nn.LayerNorm(32))


def test_ablationcam_keeps_the_class_token():
    """Ablation at a token layer zeroes one channel of every patch token, not the class
    token; the engine's map equals that computed by hand."""
    model = _vit(seed=5)
    x, targets = _inputs(5, batch=1)
    layer = model.encoder.layers[-1].ln_1
    ours = explain.run(model, x, "ablationcam", layer=layer, targets=targets)
    store = {}
    handle = layer.register_forward_hook(lambda m, i, o: store.setdefault("o", o.detach().clone()))
    with torch.no_grad():
        base = model(x)[0, targets[0]]
    handle.remove()
    tokens = store["o"]
    drops = []
    for k in range(tokens.shape[-1]):
        def ablate(m, i, o, k=k):
            o = o.clone()
            o[:, 1:, k] = 0
            return o

        h = layer.register_forward_hook(ablate)
        with torch.no_grad():
            drops.append((base - model(x)[0, targets[0]]) / base)
        h.remove()
    fmap = _vit_tokens_to_map(tokens)[0]
    expected = torch.einsum("k,khw->hw", torch.stack(drops), fmap).clamp_min(0)
    torch.testing.assert_close(ours[0], explain.upsample(expected, (32, 32)), rtol=1e-4,
                               atol=1e-5 * float(expected.abs().max()))


def test_reciprocam_runs_on_tokens():
    model = _vit(seed=6)
    x, targets = _inputs(6, batch=2)
    maps = explain.run(model, x, "reciprocam", layer=model.encoder.layers[-1].ln_1,
                       targets=targets, score="logit")
    assert maps.shape == (2, 32, 32) and torch.isfinite(maps).all() and maps.std() > 0


@pytest.mark.parametrize("method", ["guided_backprop", "guided_gradcam"])
def test_guided_backprop_refuses_gelu(method):
    model = _vit()
    with pytest.raises(explain.ExplainError, match="GELU"):
        explain.run(model, _inputs(0)[0], method, layer=model.encoder.layers[-1].ln_1)


def test_cam_refused_on_vit_and_block_output_is_a_known_dead_end():
    model = _vit()
    x, targets = _inputs(2)
    with pytest.raises(explain.ExplainError, match="global-average-pooling"):
        explain.run(model, x, "cam", layer=model.encoder.layers[-1].ln_1, targets=targets)
    # The last block's output reaches the logits only through the class token: every
    # patch token's gradient is zero there, hence the default layer is ln_1 of that block.
    dead = explain.run(model, x, "gradcam", layer=model.encoder.layers[-1], targets=targets)
    assert dead.abs().max() == 0


def test_backbone_declares_the_vit_layer():
    backbone = TorchvisionBackbone(_vit(), num_classes=4)
    assert backbone.default_layer == "net.encoder.layers.encoder_layer_1.ln_1"
    assert backbone.net.num_classes == 4 == backbone.num_classes  # not the replaced head's
    x, _ = _inputs(3)
    maps = explain.run(backbone, x, "gradcam")  # no layer, no reshape: both declared
    same = explain.run(backbone.net, x, "gradcam", layer="encoder.layers.encoder_layer_1.ln_1")
    torch.testing.assert_close(maps, same, rtol=0, atol=0)
    assert maps.shape == (3, 4, 32, 32)


def test_inferred_and_declared_layouts():
    assert infer_layout((2, 65, 32), (32, 32)) == MapLayout("tokens", 1, (8, 8))
    assert infer_layout((2, 64, 32), (32, 32)) == MapLayout("tokens", 0, (8, 8))
    assert infer_layout((2, 34, 8), (32, 64)) == MapLayout("tokens", 2, (4, 8))  # 2 prefix
    assert infer_layout((2, 5), (32, 32)) == MapLayout("nchw")

    class Tokens(torch.nn.Module):
        """A home-made token model: [B, 16, D] patch tokens, D first (declared)."""

        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Conv2d(3, 8, 8, stride=8)
            self.mix = torch.nn.Linear(8, 8)
            self.head = torch.nn.Linear(8, 3)

        def explain_layout(self, name: str) -> MapLayout | None:
            return MapLayout("tokens", 0, (4, 4)) if name == "mix" else None

        def forward(self, x):
            t = self.embed(x).flatten(2).transpose(1, 2)
            return self.head(torch.relu(self.mix(t)).mean(1))

    torch.manual_seed(0)
    net = Tokens()
    x = torch.randn(2, 3, 32, 32)
    maps = explain.run(net, x, "hirescam", layer="mix", targets=torch.tensor([0, 2]))
    # By hand: HiResCAM at a token layer is relu(sum_d grad * token) per patch.
    t = net.embed(x).flatten(2).transpose(1, 2)
    m = net.mix(t).detach().requires_grad_(True)
    score = net.head(torch.relu(m).mean(1))
    (g,) = torch.autograd.grad(score[[0, 1], [0, 2]].sum(), m)
    expected = (g * m).sum(-1).clamp_min(0).reshape(2, 4, 4)
    torch.testing.assert_close(maps, explain.upsample(expected.detach(), (32, 32)))


# -- classes in chunks ---------------------------------------------------------------------


@pytest.mark.parametrize("method", ["gradcam", "hirescam", "eigencam", "saliency", "smoothgrad"])
@pytest.mark.parametrize("where", ["split", "hooked", "vit"])
def test_chunked_equals_unchunked(method, where, tiny_explain_net):
    if where == "vit":
        model = _vit(seed=9)
        layer = model.encoder.layers[-1].ln_1
        x = _inputs(9, batch=2)[0]
    else:
        model = tiny_explain_net(split=where == "split", num_classes=NUM_CLASSES)
        layer = "block"
        x = torch.randn(2, 3, 16, 16)
    options = {"samples": 3} if method == "smoothgrad" else {}
    whole = explain.run(model, x, method, layer=layer, class_chunk=NUM_CLASSES, **options)
    for chunk in (1, 3):
        part = explain.run(model, x, method, layer=layer, class_chunk=chunk, **options)
        torch.testing.assert_close(part, whole, rtol=1e-5, atol=1e-6 * float(whole.abs().max()))
    assert whole.shape == (2, NUM_CLASSES, *x.shape[-2:]) and whole.abs().sum() > 0
    if explain.get(method).class_specific:
        assert (whole[:, 0] - whole[:, 1]).abs().max() > 0  # the classes really differ


def test_class_chunk_default_and_bad_values(tiny_explain_net):
    # 16 images at 224: 10 classes a chunk (51 MB of working set a class); 1 image: 167.
    assert explain.class_chunk_for(torch.empty(16, 3, 224, 224)) == 10
    assert explain.class_chunk_for(torch.empty(1, 3, 224, 224)) == 167
    with pytest.raises(explain.ExplainError, match="class_chunk must be >= 1"):
        explain.run(tiny_explain_net(), torch.randn(1, 3, 16, 16), "gradcam", class_chunk=0)


def test_chunks_share_one_forward(tiny_explain_net):
    """A chunk pays its backward only: the trunk runs once, whatever the chunk size."""
    model = tiny_explain_net(split=False, num_classes=NUM_CLASSES)
    calls = []
    handle = model.stem.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        explain.run(model, torch.randn(2, 3, 16, 16), "gradcam", layer="block", class_chunk=2)
        explain.run(model, torch.randn(2, 3, 16, 16), "saliency", class_chunk=2)
    finally:
        handle.remove()
    # Each run: one probe forward for the class count, one forward for all five chunks.
    assert len(calls) == 2 * 2


@pytest.mark.slow
@pytest.mark.oracle
def test_vit_b_16_at_224_matches_pytorch_grad_cam():
    """Random-weight torchvision vit_b_16, its declared layer, two images, three methods."""
    torch.manual_seed(0)
    backbone = build_backbone("tv:vit_b_16", num_classes=1000).eval()
    net = backbone.net
    torch.nn.init.normal_(net.heads.head.weight, std=0.05)  # not torchvision's zeros
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 224, 224, generator=gen)
    targets = torch.tensor([3, 917])
    layer = net.encoder.layers[-1].ln_1
    for method, peer, options in CAM_METHODS[:3]:
        ours = explain.run(backbone, x, method, targets=targets, **options)  # declared layer
        theirs = _peer(peer, net, layer, x, targets, _vit_tokens_to_map)
        r = _r(ours, theirs)
        print(f"ORACLE {method:12s} vit_b_16@224 min r = {r.min():.10f}")
        assert r.min() >= 0.99, r
    every = explain.run(backbone, x[:1], "gradcam", class_chunk=250)
    assert every.shape == (1, 1000, 224, 224)
    torch.testing.assert_close(every[0, 917], explain.run(backbone, x[:1], "gradcam",
                               targets=torch.tensor([917]))[0], rtol=1e-4, atol=1e-6)
