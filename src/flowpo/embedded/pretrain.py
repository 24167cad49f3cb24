"""Pretrain the embedded default: the digit classifier (reward) and the flow model (policy).

Run: `flowpo pretrain` (or `python -m flowpo.embedded.pretrain`; default output `src/flowpo/embedded/assets/`), about
2–3 min on one CPU core; add `--grid docs/img/embedded_samples.png` for a sample grid.

Data: sklearn `load_digits()` (1797 images 8×8, values 0..16) → [0, 1] → ×2 bilinear → 16×16.
A fixed, seeded 80/20 train/test split; only the train split trains either network.

Flow model, rectified flow (Liu et al. arXiv 2209.03003; σ sampling from SD3, arXiv 2403.03206 §3.1):
    x_σ = (1 − σ)·x0 + σ·ε,   L = E ‖v_θ(x_σ, σ, c) − (ε − x0)‖²,
σ ~ logit-normal(0, 1) (σ = sigmoid(u), u ~ N(0, 1); SD3's best-performing choice), the prompt c
replaced by the null (all-PAD) prompt with probability `p_uncond` for classifier-free guidance,
and non-digit words replaced by UNK with probability `p_unk` (so the UNK embedding is trained and
held-out phrasings with unseen words stay in distribution). AdamW, cosine LR; the EMA of the
weights is what ships. The small width and step budget are deliberate: at CFG 1 the model aligns
imperfectly with the prompted digit, leaving room for RL; at CFG 4.5 it aligns well.

Evaluation: 40-step Euler ODE on σ̃ = s·σ/(1 + (s − 1)·σ), s = 3, σ = linspace(1, 0, 41), with
true CFG v = v_u + g·(v_c − v_u); alignment = mean[argmax classifier(x̂) == prompted digit] on
held-out prompts.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from flowpo.embedded import prompts as P
from flowpo.embedded.classifier import DigitClassifier, augment
from flowpo.embedded.flow_net import FlowNet, guided_velocity
from flowpo.schedule import sigmas
from flowpo.solvers import euler

ASSETS = Path(__file__).parent / "assets"


@dataclasses.dataclass
class PretrainConfig:
    seed: int = 0
    """seed of the split, the initialisations and every random draw"""
    test_fraction: float = 0.2
    """fraction of load_digits() held out as the test split"""
    clf_steps: int = 800
    """classifier optimisation steps (batch `clf_batch`)"""
    clf_batch: int = 128
    clf_lr: float = 2e-3
    flow_steps: int = 500
    """flow-model optimisation steps (batch `flow_batch`)"""
    flow_batch: int = 128
    flow_lr: float = 2e-3
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    p_uncond: float = 0.15
    """probability of training on the null prompt (CFG)"""
    p_unk: float = 0.1
    """probability of replacing each non-digit word by UNK"""
    threads: int = 1
    """torch CPU threads; fixed so that the bytes do not depend on the machine's core count
    (one thread also avoids OpenMP spin-wait slowdowns when the cores are shared)"""
    eval_steps: int = 40
    eval_shift: float = 3.0
    eval_per_prompt: int = 8
    """samples per held-out (digit, template) pair for the alignment metric"""


def load_data(seed: int, test_fraction: float = 0.2) -> dict[str, torch.Tensor | str]:
    """The 16×16 digits in [0, 1] and labels, split by a seeded permutation; plus the data sha256."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("flowpo pretrain needs scikit-learn (the digits data set): "
                         "pip install 'flowpo[pretrain]'") from None

    d = load_digits()
    x8 = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # [1797, 1, 8, 8]
    x = F.interpolate(x8, scale_factor=2.0, mode="bilinear", align_corners=False).clamp(0, 1)
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    test, train = perm[:n_test], perm[n_test:]
    sha = hashlib.sha256(d.images.astype("float64").tobytes() + d.target.astype("int64").tobytes()).hexdigest()
    return {"x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test], "sha256": sha}


def _cosine_lr(opt: torch.optim.Optimizer, base: float, step: int, total: int, warmup: int = 100) -> None:
    lr = base * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total))
    for g in opt.param_groups:
        g["lr"] = lr


def train_classifier(data: dict, cfg: PretrainConfig) -> tuple[DigitClassifier, float]:
    """Cross-entropy on augmented train images; returns the model and its test accuracy."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    torch.manual_seed(cfg.seed + 1)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.clf_lr, weight_decay=cfg.weight_decay)
    x, y = data["x_train"], data["y_train"]
    for step in range(cfg.clf_steps):
        idx = torch.randint(len(y), (cfg.clf_batch,), generator=gen)
        _cosine_lr(opt, cfg.clf_lr, step, cfg.clf_steps)
        loss = F.cross_entropy(model(augment(x[idx], gen)), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(data["x_test"]).argmax(1) == data["y_test"]).float().mean().item()
    return model, acc


def _train_tokens(labels: torch.Tensor, cfg: PretrainConfig, gen: torch.Generator) -> torch.Tensor:
    """Training prompts for `labels` with UNK word dropout and null-prompt dropout: [N, L]."""
    n_t = len(P.TRAIN_TEMPLATES)
    tmpl = torch.randint(n_t, (len(labels),), generator=gen).tolist()
    texts = [P.train_prompts(int(d))[t] for d, t in zip(labels, tmpl)]
    tokens = P.tokenize(texts)  # [N, L]
    digit_ids = torch.tensor([P.VOCAB[w] for w in P.NUMERALS + P.NUMBER_WORDS])
    droppable = (tokens > P.UNK) & ~torch.isin(tokens, digit_ids)
    tokens = torch.where(droppable & (torch.rand(tokens.shape, generator=gen) < cfg.p_unk), P.UNK, tokens)
    uncond = torch.rand(len(labels), generator=gen) < cfg.p_uncond
    return torch.where(uncond[:, None], P.PAD, tokens)


def train_flow(data: dict, cfg: PretrainConfig) -> tuple[FlowNet, list[float]]:
    """Rectified-flow training (module docstring); returns the EMA model and the loss curve."""
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    torch.manual_seed(cfg.seed + 2)
    model = FlowNet()
    ema = FlowNet()
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.flow_lr, weight_decay=cfg.weight_decay)
    x_all = 2 * data["x_train"] - 1  # [M, 1, 16, 16] in [-1, 1]
    y_all = data["y_train"]
    losses = []
    for step in range(cfg.flow_steps):
        idx = torch.randint(len(y_all), (cfg.flow_batch,), generator=gen)
        x0, tokens = x_all[idx], _train_tokens(y_all[idx], cfg, gen)  # [N, 1, 16, 16], [N, L]
        eps = torch.randn(x0.shape, generator=gen)
        sigma = torch.sigmoid(torch.randn(len(idx), generator=gen))  # [N] logit-normal
        s = sigma[:, None, None, None]
        x_sigma = (1 - s) * x0 + s * eps
        _cosine_lr(opt, cfg.flow_lr, step, cfg.flow_steps)
        loss = (model(x_sigma, sigma, tokens) - (eps - x0)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        losses.append(loss.item())
        if (step + 1) % 500 == 0:
            print(f"flow step {step + 1}/{cfg.flow_steps} loss {sum(losses[-500:]) / 500:.4f}", flush=True)
    return ema.eval(), losses


@torch.no_grad()
def sample(model: FlowNet, tokens: torch.Tensor, guidance: float, steps: int, shift: float,
           gen: torch.Generator) -> torch.Tensor:
    """Euler ODE on the shared schedule (flowpo.schedule) with true CFG (flow_net.guided_velocity),
    the sampler the trainer evaluates with; returns x0 in [-1, 1]-ish: [N, 1, 16, 16]."""
    x = torch.randn((len(tokens), 1, 16, 16), generator=gen)
    x0, _ = euler(lambda xx, sig: guided_velocity(model, xx, sig, tokens, guidance), x, sigmas(steps, shift))
    return x0


def alignment(model: FlowNet, clf: DigitClassifier, guidance: float, cfg: PretrainConfig) -> float:
    """Fraction of held-out-prompt samples whose classifier argmax is the prompted digit."""
    texts = [p for d in range(10) for p in P.heldout_prompts(d) for _ in range(cfg.eval_per_prompt)]
    labels = torch.tensor([P.prompt_digit(p) for p in texts])
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    x = sample(model, P.tokenize(texts), guidance, cfg.eval_steps, cfg.eval_shift, gen)
    with torch.no_grad():
        pred = clf(((x + 1) / 2).clamp(0, 1)).argmax(1)
    return (pred == labels).float().mean().item()


def sample_grid(model: FlowNet, path: str | Path, guidances: tuple[float, ...] = (1.0, 4.5),
                per_digit: int = 8, seed: int = 0, scale: int = 4) -> None:
    """PNG of samples: one panel per guidance, rows = digits 0-9 (held-out prompts), `per_digit` columns."""
    from PIL import Image

    texts = [P.heldout_prompts(d)[i % len(P.HELDOUT_TEMPLATES)] for d in range(10) for i in range(per_digit)]
    panels = []
    for g in guidances:
        x = sample(model, P.tokenize(texts), g, 40, 3.0, torch.Generator().manual_seed(seed))
        cells = F.pad(((x + 1) / 2).clamp(0, 1).view(10, per_digit, 16, 16), (1, 1, 1, 1), value=0.3)
        img = cells.permute(0, 2, 1, 3).reshape(10 * 18, 18 * per_digit)  # rows = digits
        panels.append(F.pad(img, (4, 4, 4, 4), value=0.6))  # grey border between panels
    grid = (torch.cat(panels, 1) * 255).round().to(torch.uint8).numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def _save(module: torch.nn.Module, path: Path, meta: dict[str, str]) -> str:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path), metadata=meta)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pretrain(out_dir: str | Path | None = None, seed: int = 0, flow_steps: int = PretrainConfig.flow_steps,
             clf_steps: int = PretrainConfig.clf_steps, threads: int = PretrainConfig.threads) -> dict:
    """Train both networks deterministically, write the assets to `out_dir`; returns metrics."""
    cfg = PretrainConfig(seed=seed, flow_steps=flow_steps, clf_steps=clf_steps, threads=threads)
    out = Path(out_dir) if out_dir is not None else ASSETS
    out.mkdir(parents=True, exist_ok=True)
    prev_threads, prev_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    try:
        t0 = time.time()
        data = load_data(cfg.seed, cfg.test_fraction)
        clf, clf_acc = train_classifier(data, cfg)
        t_clf = time.time() - t0
        print(f"classifier test acc {clf_acc:.4f} ({t_clf:.0f} s)", flush=True)
        flow, losses = train_flow(data, cfg)
        t_flow = time.time() - t0 - t_clf
        align = {f"align_cfg{g}": alignment(flow, clf, g, cfg) for g in (1.0, 4.5)}
        metrics = {
            "classifier_test_acc": clf_acc,
            **align,
            "flow_loss_last100": sum(losses[-100:]) / len(losses[-100:]),
            "flow_params": sum(p.numel() for p in flow.parameters()),
            "classifier_params": sum(p.numel() for p in clf.parameters()),
            "n_train": len(data["y_train"]), "n_test": len(data["y_test"]),
            "wall_s_classifier": t_clf, "wall_s_flow": t_flow, "wall_s": time.time() - t0,
        }
        # one metadata key each: safetensors writes several keys in hash order, which breaks byte equality
        metrics["flow_sha256"] = _save(flow, out / "flow.safetensors", {"format": "flowpo-embedded-v1 FlowNet"})
        metrics["classifier_sha256"] = _save(clf, out / "classifier.safetensors",
                                             {"format": "flowpo-embedded-v1 DigitClassifier"})
        record = {"metrics": metrics, "config": dataclasses.asdict(cfg), "data_sha256": data["sha256"],
                  "torch": torch.__version__}
        (out / "pretrain.json").write_text(json.dumps(record, indent=2) + "\n")
        return metrics
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="flowpo pretrain", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/pretrain",
                    help="output folder (default runs/pretrain; the shipped weights are in "
                         f"{ASSETS}: overwrite them only by naming that folder, --out {ASSETS})")
    ap.add_argument("--seed", type=int, default=0, help="seed of the split and all draws")
    ap.add_argument("--flow-steps", type=int, default=PretrainConfig.flow_steps, help="flow-model steps")
    ap.add_argument("--clf-steps", type=int, default=PretrainConfig.clf_steps, help="classifier steps")
    ap.add_argument("--threads", type=int, default=PretrainConfig.threads, help="torch CPU threads")
    ap.add_argument("--grid", default=None, help="also write a PNG sample grid (CFG 1 | CFG 4.5) here")
    a = ap.parse_args(argv)
    for flag, value, lo, hi in (("--seed", a.seed, 0, 2 ** 32 - 1), ("--flow-steps", a.flow_steps, 1, 10 ** 7),
                                ("--clf-steps", a.clf_steps, 1, 10 ** 7), ("--threads", a.threads, 1, 1024)):
        if not lo <= value <= hi:
            ap.error(f"{flag} {value} is out of range; give {lo} to {hi}")
    if not a.out.strip() or (Path(a.out).exists() and not Path(a.out).is_dir()):
        ap.error(f"--out {a.out!r}: give a folder path (not empty, not an existing file)")
    if a.grid is not None and (not a.grid.strip() or Path(a.grid).is_dir()):
        ap.error(f"--grid {a.grid!r}: give a PNG file path")
    metrics = pretrain(a.out, seed=a.seed, flow_steps=a.flow_steps, clf_steps=a.clf_steps, threads=a.threads)
    print(json.dumps(metrics, indent=2))
    print(f"wrote {a.out}; train on them with model.path={Path(a.out) / 'flow.safetensors'}")
    if a.grid:
        from safetensors.torch import load_file

        net = FlowNet()
        net.load_state_dict(load_file(str(Path(a.out or ASSETS) / "flow.safetensors")))
        sample_grid(net.eval(), a.grid)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
