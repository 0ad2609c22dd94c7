"""Convolution, batch norm and pooling on onnx-cpu (backends/onnx/_aten_vision.py): each PyTorch
form against eager on fresh inputs, a ResNet-shaped network and a ViT, and the refusals."""

import pytest
import torch
import torch.nn as nn

import flashc
from flashc.errors import UnsupportedOpError
from flashc_testing import rel_err

pytest.importorskip("onnxruntime")


class SmallResNet(nn.Module):
    """ResNet-18's pieces: conv/bn/relu stem, max pooling, a strided residual block with a 1x1
    projection, adaptive average pooling, a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 7, 2, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        self.block = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16))
        self.proj = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.block(x) + self.proj(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def trained_statistics(model: nn.Module) -> nn.Module:
    """Batch norms with running statistics and affine parameters away from the identity."""
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def check(model: nn.Module, shape: tuple, tol: float = 1e-5) -> None:
    model = model.eval()
    cm = flashc.compile(model, "onnx-cpu", (torch.randn(shape),))
    for _ in range(2):
        x = torch.randn(shape)
        with torch.no_grad():
            want = model(x)
        assert rel_err(cm(x), want) < tol


def test_resnet_shaped_network():
    torch.manual_seed(0)
    check(trained_statistics(SmallResNet()), (2, 3, 32, 32))


@pytest.mark.parametrize("layer,shape", [
    (nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2), (1, 4, 9, 11)),
    (nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4, bias=False), (2, 4, 8, 8)),
    (nn.Conv2d(3, 5, (3, 5), padding="same"), (1, 3, 7, 9)),
    (nn.Conv2d(3, 5, 4, padding="same"), (1, 3, 8, 8)),  # even kernel: the extra pad goes at the end
    (nn.Conv2d(3, 5, 3, padding="valid"), (1, 3, 7, 9)),
    (nn.Conv1d(3, 4, 5, stride=2, padding=2), (2, 3, 17)),
    (nn.Conv1d(3, 4, 3, padding="same", dilation=2), (1, 3, 9)),  # ONNX Runtime: no SAME_UPPER with dilation
    (nn.ConvTranspose1d(2, 3, 3, stride=2, padding=1, output_padding=1), (1, 2, 6)),
    (nn.ConvTranspose2d(2, 3, 3, dilation=2, padding=1, output_padding=1), (1, 2, 6, 6)),  # output_padding = stride
    (nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True), (1, 2, 10, 10)),
    (nn.MaxPool2d(2, dilation=2), (1, 2, 9, 9)),
    (nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False), (1, 2, 10, 10)),
    (nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True), (1, 2, 10, 10)),
    (nn.AdaptiveAvgPool2d((2, 3)), (1, 2, 8, 9)),
    (nn.AdaptiveAvgPool1d(1), (2, 3, 7)),
], ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else "")
def test_each_form_matches_eager(layer, shape):
    torch.manual_seed(1)
    check(layer, shape)


def test_an_output_padding_onnx_runtime_cannot_take_is_refused_by_name():
    with pytest.raises(UnsupportedOpError, match=r"output_padding \[1\] at or above the stride \[1\] and above "
                                                 r"the padding \[0\]"):
        flashc.compile(nn.ConvTranspose1d(2, 3, 3, dilation=2, output_padding=1).eval(), "onnx-cpu",
                       (torch.randn(1, 2, 6),))


def test_batch_norm_1d_in_eval_mode():
    torch.manual_seed(2)
    check(trained_statistics(nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8))), (4, 6))


def test_overlapping_adaptive_windows_are_refused_by_name():
    with pytest.raises(UnsupportedOpError, match="adaptive average pooling from \\[7, 7\\] to \\[3, 3\\]"):
        flashc.compile(nn.AdaptiveAvgPool2d(3).eval(), "onnx-cpu", (torch.randn(1, 2, 7, 7),))


def test_vit_patch_embedding_and_encoder():
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(3)
    vit = ViTModel(ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                             image_size=32, patch_size=8)).eval()
    cm = flashc.compile(vit, "onnx-cpu", (torch.randn(1, 3, 32, 32),))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = vit(x).last_hidden_state
    assert rel_err(cm(x).last_hidden_state, want) < 1e-5
