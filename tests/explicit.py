"""Explicit float64 references the measures' tests share."""

import torch


def explicit_norm(affine, shape) -> float:
    """Largest singular value of the matrix of affine's linear part, built column by column
    (float64)."""
    matrix = torch.autograd.functional.jacobian(
        lambda x: affine(x[None])[0], torch.zeros(shape, dtype=torch.float64)
    )
    return torch.linalg.svdvals(matrix.reshape(matrix[..., 0, 0, 0].numel(), -1))[0].item()


def with_running_stats(model):
    """Batch norm with running statistics and affine parameters far from their defaults."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            for t in (m.running_mean, m.weight, m.bias):
                t.data.normal_()
            m.running_var.data.uniform_(0.2, 3.0)
    return model.eval()
