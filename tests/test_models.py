"""Encoders and heads: the seed-002 architecture, receptive fields and exact sliding-window evaluation, ResNet
parameter counts (counted on the meta device, no forward at full size), projection head, classifier, probe
freezing, channels_last and config validation of the patch size."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cytonet.config import ModelConfig, paper_receptive_field, paper_total_stride
from cytonet.errors import ConfigError
from cytonet.models import (
    ClassificationModel,
    ContrastiveModel,
    LinearClassifier,
    PaperEncoder,
    ProjectionHead,
    build_classifier,
    build_contrastive_model,
    build_encoder,
)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_paper_encoder_architecture() -> None:
    enc = build_encoder(ModelConfig(encoder="paper", n_blocks=6, patch_size_px=1129))
    assert isinstance(enc, PaperEncoder)
    convs = [m for m in enc.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 16, 32, 32, 64, 64, 64, 64, 128, 128, 128, 128]
    assert (convs[0].kernel_size, convs[0].stride) == ((5, 5), (4, 4))
    assert all(c.kernel_size == (3, 3) and c.stride == (1, 1) for c in convs[1:])
    assert all(c.padding == (0, 0) for c in convs)  # 'valid' by default
    # Every convolution is followed by BatchNorm and ReLU; a 2x2 max-pool follows blocks 1-5 only.
    layers = [m for m in enc.trunk.modules() if not isinstance(m, nn.Sequential)]
    kinds = [type(m).__name__ for m in layers]
    for i, m in enumerate(layers):
        if isinstance(m, nn.Conv2d):
            assert kinds[i + 1 : i + 3] == ["BatchNorm2d", "ReLU"]
    pools = [m for m in layers if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 5 and all(p.kernel_size == 2 and p.stride == 2 for p in pools)
    assert kinds[-1] == "ReLU" and enc.out_dim == 128


@pytest.mark.parametrize(("n_blocks", "rf"), [(4, 265), (5, 553), (6, 1129)])
def test_receptive_field_gives_1x1_map(n_blocks: int, rf: int) -> None:
    assert paper_receptive_field(n_blocks) == rf
    enc = PaperEncoder(n_blocks).eval()
    with torch.no_grad():
        assert enc.features(torch.rand(1, 1, rf, rf)).shape[-2:] == (1, 1)
        if n_blocks < 6:  # one stride more: a 2x2 map (skipped at 1257 px to keep the test cheap)
            big = rf + paper_total_stride(n_blocks)
            assert enc.features(torch.rand(1, 1, big, big)).shape[-2:] == (2, 2)
        with pytest.raises(RuntimeError):
            enc.features(torch.rand(1, 1, rf - paper_total_stride(n_blocks), rf - paper_total_stride(n_blocks)))


@pytest.mark.parametrize("n_blocks", [2, 4])
def test_valid_encoder_is_exact_sliding_window(n_blocks: int) -> None:
    # One pass over a larger tile equals per-patch evaluation at every grid point (dense inference is exact).
    torch.manual_seed(0)
    enc = PaperEncoder(n_blocks).eval()
    rf, s = paper_receptive_field(n_blocks), paper_total_stride(n_blocks)
    tile = torch.rand(1, 1, rf + 2 * s, rf + s)
    with torch.no_grad():
        dense = enc.features(tile)  # (1, C, 3, 2)
        assert dense.shape[-2:] == (3, 2)
        for i in range(3):
            for j in range(2):
                patch = tile[:, :, i * s : i * s + rf, j * s : j * s + rf]
                torch.testing.assert_close(enc(patch)[0], dense[0, :, i, j], rtol=1e-5, atol=1e-5)


def test_same_padding_any_size() -> None:
    enc = PaperEncoder(4, padding="same").eval()
    with torch.no_grad():
        assert enc(torch.rand(2, 1, 100, 130)).shape == (2, 64)


def test_patch_size_validation_names_valid_sizes() -> None:
    ModelConfig(n_blocks=4, patch_size_px=265).validate("model")
    ModelConfig(n_blocks=4, patch_size_px=265 + 32).validate("model")
    ModelConfig(n_blocks=6, patch_size_px=1129).validate("model")
    with pytest.raises(ConfigError, match=r"model\.patch_size_px.*265, 297"):
        ModelConfig(n_blocks=4, patch_size_px=256).validate("model")
    with pytest.raises(ConfigError, match="1129"):
        ModelConfig(n_blocks=6, patch_size_px=1024).validate("model")
    with pytest.raises(ConfigError, match="553"):
        ModelConfig(n_blocks=5, patch_size_px=265).validate("model")


@pytest.mark.parametrize(("name", "count"), [("resnet50", 23_501_760), ("resnet101", 42_493_888)])
def test_resnet_parameter_counts(name: str, count: int) -> None:
    # Standard torchvision counts (25,557,032 / 44,549,160) minus fc (2,049,000) and with a 1-channel stem
    # (-6,272). Built on the meta device: no memory, no initialisation cost.
    with torch.device("meta"):
        enc = build_encoder(ModelConfig(encoder=name, patch_size_px=224))  # type: ignore[arg-type]
    assert n_params(enc) == count
    assert enc.out_dim == 2048


def test_resnet50_forward_small() -> None:
    enc = build_encoder(ModelConfig(encoder="resnet50", patch_size_px=64)).eval()
    with torch.no_grad():
        assert enc(torch.rand(2, 1, 64, 64)).shape == (2, 2048)


def test_projection_head() -> None:
    head = ProjectionHead(64, 128, 128)
    assert isinstance(head.bn1, nn.BatchNorm1d) and isinstance(head.relu, nn.ReLU)
    assert (head.fc1.in_features, head.fc1.out_features, head.fc2.out_features) == (64, 128, 128)
    z = head(torch.randn(8, 64))
    assert z.shape == (8, 128)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        zb = head(torch.randn(8, 64))
    assert zb.dtype == torch.float32
    torch.testing.assert_close(zb.norm(dim=1), torch.ones(8))


def test_contrastive_model_from_config() -> None:
    cfg = ModelConfig(n_blocks=2, patch_size_px=49, proj_hidden_dim=16, proj_dim=8)
    model = build_contrastive_model(cfg)
    assert isinstance(model, ContrastiveModel)
    x = torch.rand(4, 1, 49, 49)
    assert model(x).shape == (4, 8) and model.encode(x).shape == (4, 32)


def test_linear_probe_freezes_encoder() -> None:
    cfg = ModelConfig(n_blocks=2, patch_size_px=49)
    model = build_classifier(cfg, n_classes=5, freeze_encoder=True)
    assert isinstance(model, ClassificationModel) and isinstance(model.classifier, LinearClassifier)
    bn = next(m for m in model.encoder.modules() if isinstance(m, nn.BatchNorm2d))
    before = bn.running_mean.clone()  # type: ignore[union-attr]
    model.train()
    assert not model.encoder.training and model.classifier.training
    logits = model(torch.rand(6, 1, 49, 49))
    logits.sum().backward()
    assert logits.shape == (6, 5)
    assert torch.equal(bn.running_mean, before)  # type: ignore[arg-type]
    assert all(p.grad is None and not p.requires_grad for p in model.encoder.parameters())
    assert model.classifier.fc.weight.grad is not None
    # Scratch training: everything trains.
    scratch = build_classifier(cfg, n_classes=5)
    scratch(torch.rand(3, 1, 49, 49)).sum().backward()
    assert all(p.grad is not None for p in scratch.parameters())


def test_channels_last_same_result() -> None:
    torch.manual_seed(0)
    cl = build_encoder(ModelConfig(n_blocks=3, patch_size_px=121, channels_last=True)).eval()
    first_conv = next(m for m in cl.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.weight.is_contiguous(memory_format=torch.channels_last)
    plain = PaperEncoder(3).eval()
    plain.load_state_dict(cl.state_dict())
    x = torch.rand(2, 1, 121, 121)
    with torch.no_grad():
        torch.testing.assert_close(cl(x), plain(x), rtol=1e-5, atol=1e-5)


def test_bf16_autocast_forward_backward() -> None:
    model = build_contrastive_model(ModelConfig(n_blocks=2, patch_size_px=49, channels_last=True))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = model(torch.rand(4, 1, 49, 49))
    z.sum().backward()
    assert z.dtype == torch.float32 and all(p.grad is not None for p in model.parameters())
