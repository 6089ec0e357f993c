"""How far upstream's jacobian_operator_norm, as its code ships, is from the true per-sample
operator norm; and how far lipdd's is.

On a trained run's training points (default: the pipeline's run, results/train/run.json, at its
first and last checkpoints) it computes, per sample:
- the reference: the largest singular value of the float64 Jacobian, by SVD;
- lipdd's value (lipdd.measures.jacobian, the path `lipdd stats` takes);
- upstream's estimate as its core/metric_helpers.py computes it: the Jacobian stored as an
  (N, C, H, W, K) tensor (output k at index -k), then viewed as (N, C*H*W*K / H, H) before 10 power
  iterations from a random vector that stop, per sample, once the estimate moves by less than 0.01
  (a sample whose first estimate is below 0.01 keeps the initial 0); and its --bigmem path, whose
  input is tiled with x.repeat (batch-major) while the cotangent rows follow sample-major order.

    .venv/bin/python benchmarks/upstream_estimator.py [--run-id ID] [--num-samples 500]

The last line is one JSON object: relative errors (estimate / reference - 1) per checkpoint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from lipdd import config, data, tracking
from lipdd.measures.jacobian import input_jacobian, operator_norm
from lipdd.models import model_for


def upstream_lowmem_jacobian(model, x, K):
    x = x.clone().requires_grad_(True)
    logits = model(x)
    J = torch.zeros(x.shape + (K,))
    mask = torch.zeros_like(logits)
    mask[:, 0] = 1
    for k in range(K):
        logits.backward(gradient=mask, retain_graph=True)
        J[..., -k] = x.grad
        x.grad.zero_()
        mask = torch.roll(mask, 1, dims=1)
    return J


def upstream_bigmem_jacobian(model, x, K):
    n = len(x)
    tiled = x.repeat((K,) + (1,) * (x.dim() - 1)).requires_grad_(True)
    model(tiled).backward(gradient=torch.eye(K).repeat((n, 1)))
    return tiled.grad.view(n, K, -1).transpose(1, 2)


def upstream_spectral_norm(J, steps=10, atol=1e-2):
    J = J.reshape(J.shape[0], -1, J.shape[2])
    n = J.shape[0]
    index = torch.arange(n)
    v = torch.randn(n, J.shape[2], 1)
    v /= v.norm(dim=1, keepdim=True)
    sigma_prev = torch.zeros(n)
    for _ in range(steps):
        u = J @ v
        u /= u.norm(dim=1, keepdim=True)
        v = J.transpose(1, 2) @ u
        v /= v.norm(dim=1, keepdim=True)
        sigma = ((J @ v).transpose(1, 2) @ u).flatten()
        moved = (sigma - sigma_prev[index]).abs() >= atol
        if not moved.any():
            break
        sigma_prev[index[moved]] = sigma[moved]
        index, v, J = index[moved], v[moved], J[moved]
    return sigma_prev


def summary(estimate: np.ndarray, exact: np.ndarray) -> dict:
    rel = estimate / exact - 1
    return dict(
        median=float(np.median(rel)),
        min=float(rel.min()),
        max=float(rel.max()),
        zeros=int((estimate == 0).sum()),
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-id", help="default: the pipeline's run in results/train/run.json")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = config.build({}, params_file=args.params)
    run_id = (
        args.run_id or json.loads((Path(cfg.results_dir) / "train/run.json").read_text())["run_id"]
    )
    client = tracking.get_client(tracking.tracking_uri(cfg.tracking_uri), create=False)
    run = client.get_run(run_id)
    run_cfg = config.from_flat(run.data.params)
    prepared = data.ensure_prepared(run_cfg, run.data.tags.get("dataset_hash"))
    loader = data.Loader.of(
        prepared.splits["train"].take(np.arange(args.num_samples)),
        prepared.meta,
        "cpu",
        args.num_samples,
    )
    x, y = next(iter(loader))
    K = prepared.meta["num_classes"]
    model = model_for(run_cfg, prepared.meta).eval()
    checkpoints = tracking.list_checkpoints(client, run_id)
    out = {"run_id": run_id, "model": run_cfg.model_name, "num_samples": args.num_samples}
    for epoch, artifact in (checkpoints[0], checkpoints[-1]):
        model.load_state_dict(tracking.load_checkpoint(client, run_id, artifact)["model"])
        exact = torch.linalg.matrix_norm(
            input_jacobian(model.double(), x.double(), y), ord=2
        ).numpy()
        model.float()
        ours = operator_norm(input_jacobian(model, x, y)).double().numpy()
        lowmem = upstream_spectral_norm(upstream_lowmem_jacobian(model, x, K)).double().numpy()
        bigmem = upstream_spectral_norm(upstream_bigmem_jacobian(model, x, K)).double().numpy()
        row = {
            "median_norm": float(np.median(exact)),
            "lipdd": summary(ours, exact),
            "upstream": summary(lowmem, exact),
            "upstream_bigmem": summary(bigmem, exact),
        }
        print(
            f"epoch {epoch}: median norm {row['median_norm']:.4g}; relative error median [min, "
            "max]:"
        )
        for name in ("lipdd", "upstream", "upstream_bigmem"):
            s = row[name]
            print(
                f"  {name:12} {s['median']:+.3g} [{s['min']:+.3g}, {s['max']:+.3g}], {s['zeros']} "
                "zeros"
            )
        out[f"epoch_{epoch}"] = row
    print(json.dumps(out))


if __name__ == "__main__":
    main()
