"""Run-directory outputs (DESIGN.md): metrics.jsonl, TensorBoard, sample grids, report.md + plots.

Only the main process writes. Metric names: the contract keys (`step`, `reward_mean`,
`reward_std`, `nfe`, `wall_s`, `eval_reward_mean`) at the top level, the rest namespaced
(`loss/…`, `stats/…`, `time/…`, `reward/…`, `replay/…`, `eval/…`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch


class RunLog:
    def __init__(self, out: str | Path, *, enabled: bool = True, tensorboard: bool = True, wandb: bool = False,
                 config: dict | None = None, purge_step: int | None = None):
        """purge_step: a resumed run's first iteration; TensorBoard drops events logged at or after it
        by the killed session, so no step appears twice."""
        self.out = Path(out)
        self.enabled = enabled
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        (self.out / "samples").mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.out / "tb"), purge_step=purge_step)
            except ImportError:  # an optional extra: say so once and log to metrics.jsonl only
                import sys

                print("flowpo: log.tensorboard=true but tensorboard is not installed; logging to metrics.jsonl "
                      "only (pip install 'flowpo[tensorboard]', or set log.tensorboard=false)", file=sys.stderr)
                self.tb = None
        if wandb:
            try:
                import wandb as wb
            except ImportError:
                raise RuntimeError("log.wandb=true needs wandb: pip install wandb") from None
            self.wandb = wb.init(project="flowpo", config=config, dir=str(self.out))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(clean) + "\n")
        step = int(record.get("step", 0))
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(float(v)):
                    self.tb.add_scalar(k, float(v), step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def grid(self, images: torch.Tensor, name: str, nrow: int, labels: list[str] | None = None,
             rewards: list[float] | None = None) -> Path | None:
        """Save images [N, C, H, W] in [0, 1] as one PNG grid (upsampled ×4 when small), each
        tile captioned with its label (its prompt) and, when given, its reward."""
        if not self.enabled:
            return None
        path = self.out / "samples" / f"{name}.png"
        save_grid(images, path, nrow, labels=labels, rewards=rewards)
        return path

    def eval_records(self, step: int, records: list[dict]) -> Path | None:
        """One JSON line per evaluation sample (prompt, metadata, rewards) in evals/<step>.jsonl,
        written to a temporary name and renamed, so a kill leaves no half-written file."""
        if not self.enabled or not records:
            return None
        path = self.out / "evals" / f"{step:06d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, default=str) + "\n" for r in records))
        tmp.replace(path)
        return path

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def save_grid(images: torch.Tensor, path: str | Path, nrow: int, pad: int = 1,
              labels: list[str] | None = None, rewards: list[float] | None = None) -> None:
    """Images [N, C, H, W] in [0, 1] (videos [N, C, F, H, W]: their first frames) as one PNG grid,
    `nrow` per row (tiles under 64 px upsampled);
    `labels`: one caption per tile under it (its prompt, word-wrapped over up to CAPTION_LINES
    lines, cut from the right past them, so a prompt's start and, for the embedded prompts, the
    asked digit stay visible); `rewards`: each tile's reward, shown under its caption."""
    from PIL import Image

    x = images.detach().float().clamp(0, 1).cpu()
    if x.dim() == 5:  # videos [N, C, F, H, W] (Wan): each tile is the first frame
        x = x[:, :, 0]
    n, c, h, w = x.shape
    scale = max(1, 64 // max(h, w))
    ncol = math.ceil(n / nrow)
    canvas = torch.ones((c, ncol * (h + pad) + pad, nrow * (w + pad) + pad))
    for i in range(n):
        r, q = divmod(i, nrow)
        canvas[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = x[i]
    arr = (canvas * 255).round().byte().permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0] if c == 1 else arr)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    if labels or rewards:
        n_cap = len(labels or rewards or [])
        labels = list(labels or [""] * n_cap)
        img = _captioned(img.convert("RGB"), labels, nrow, (h + pad) * scale, (w + pad) * scale, pad * scale,
                         rewards)
    img.save(path)


CAPTION_LINES = 4
"""Most lines of a tile's caption (the embedded held-out prompts need up to 4 at 64 px)."""


def _wrap(text: str, width: float, measure, lines: int) -> list[str]:
    """`text` word-wrapped to `width` pixels (`measure(s)`: the width of s), at most `lines` lines;
    what does not fit is cut from the right and marked with "…"."""
    out: list[str] = []
    words = text.split()
    while words and len(out) < lines:
        line = words.pop(0)
        while measure(line) > width and len(line) > 1:  # a word wider than the tile: break it
            cut = len(line) - 1
            while cut > 1 and measure(line[:cut]) > width:
                cut -= 1
            words.insert(0, line[cut:])
            line = line[:cut]
        while words and measure(line + " " + words[0]) <= width:
            line += " " + words.pop(0)
        out.append(line)
    if words and out:  # more than fits: the last line ends in "…"
        last = out[-1]
        while last and measure(last + "…") > width:
            last = last[:-1]
        out[-1] = last + "…"
    return out


def _captioned(img, labels: list[str], nrow: int, th: int, tw: int, pad: int, rewards: list[float] | None = None):
    """A caption strip under each row of tiles of `img` (tile pitch th × tw): each tile's label
    (wrapped) and its reward where known."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    draw0 = ImageDraw.Draw(img)

    def measure(s: str) -> float:
        return draw0.textlength(s, font=font)

    line_h = 11
    texts = []
    for i, label in enumerate(labels):
        lines = _wrap(label, tw - pad - 3, measure, CAPTION_LINES)
        if rewards is not None and i < len(rewards) and rewards[i] is not None and math.isfinite(float(rewards[i])):
            lines.append(f"r={float(rewards[i]):.3f}")
        texts.append(lines)
    cap = line_h * max([len(t) for t in texts] + [1]) + 2
    rows = math.ceil(len(labels) / nrow)
    out = Image.new("RGB", (img.width, img.height + rows * cap), "white")
    draw = ImageDraw.Draw(out)
    for r in range(rows):
        out.paste(img.crop((0, r * th, img.width, (r + 1) * th + pad)), (0, r * (th + cap)))
        for q in range(nrow):
            i = r * nrow + q
            if i < len(texts):
                for k, line in enumerate(texts[i]):
                    draw.text((pad + q * tw, r * (th + cap) + th + pad - 1 + k * line_h), line, fill="black",
                              font=font)
    return out


def read_metrics(path: str | Path, *, notice: bool = False) -> list[dict]:
    """The records of a metrics.jsonl; a last line cut short (a full disk, a kill mid-write) is
    dropped (said on stderr with `notice`); a bad line elsewhere raises ValueError naming it."""
    p = Path(path)
    if not p.exists():
        return []
    if not p.is_file():  # a FIFO would block the read
        raise ValueError(f"{p} is not a regular file; the run log is damaged (move it away)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{p} is not UTF-8 text; the run log is damaged (restore it or remove the bad bytes)") from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1:
                if notice:
                    import sys

                    print(f"flowpo: {p}: dropping a partial last line ({len(line)} characters)", file=sys.stderr)
                break
            raise ValueError(f"{p} line {i + 1} is not JSON; the run log is damaged (fix or remove the line)") from None
    return out


def truncate_metrics(path: str | Path, iteration: int) -> None:
    """Drop metric lines written after the checkpoint at `iteration` (a run killed mid-way), so a
    resumed run's log has each step once: training lines < iteration, eval lines ≤ iteration."""
    p = Path(path)
    if not p.exists():
        return
    keep = [r for r in read_metrics(p, notice=True)
            if r["step"] < iteration or ("eval_reward_mean" in r and r["step"] <= iteration)]
    p.write_text("".join(json.dumps(r) + "\n" for r in keep))


def write_report(out: str | Path, title: str = "flowpo run") -> Path:
    """report.md with the reward curves (PNG) and the sample grids of the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    rows = read_metrics(out / "metrics.jsonl")
    train = [r for r in rows if "reward_mean" in r]
    evals = [r for r in rows if "eval_reward_mean" in r]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    if train:
        s = [r["step"] for r in train]
        m = [r["reward_mean"] for r in train]
        sd = [r.get("reward_std", 0.0) for r in train]
        ax[0].plot(s, m, label="train reward (mean ± std over the batch)")
        lo_r = min(r.get("reward_min", a - b) for r, a, b in zip(train, m, sd))
        hi_r = max(r.get("reward_max", a + b) for r, a, b in zip(train, m, sd))
        # the band stays inside the rewards' observed range (a probability's band never passes 1)
        ax[0].fill_between(s, [max(a - b, lo_r) for a, b in zip(m, sd)], [min(a + b, hi_r) for a, b in zip(m, sd)],
                           alpha=0.2)
    if evals:
        ax[0].plot([r["step"] for r in evals], [r["eval_reward_mean"] for r in evals], "o-", label="eval reward")
        ax[1].plot([r.get("wall_s", 0) for r in evals], [r["eval_reward_mean"] for r in evals], "o-")
    ax[0].set_xlabel("iteration")
    ax[0].set_ylabel("reward")
    ax[0].legend()
    ax[1].set_xlabel("wall time (s)")
    ax[1].set_ylabel("eval reward")
    fig.tight_layout()
    fig.savefig(out / "reward_curve.png", dpi=100)
    plt.close(fig)
    lines = [f"# {title}", "", "![reward curves](reward_curve.png)", "",
             "The train reward is scored on the rollouts (stochastic samplers, training prompts); the eval reward "
             "on deterministic ODE samples of held-out prompts from fixed noise, so the two need not agree "
             "(the train reward usually sits above).", ""]
    if evals:
        lines += ["| iteration | eval reward | wall s | nfe |", "|---|---|---|---|"]
        for r in evals:
            lines.append(f"| {r['step']} | {r['eval_reward_mean']:.4f} | {r.get('wall_s', 0):.1f} | {r.get('nfe', 0)} |")
        lines.append("")
    grids = sorted((out / "samples").glob("*.png")) if (out / "samples").exists() else []
    for g in grids[:1] + grids[-1:] if len(grids) > 1 else grids:
        lines += [f"## {g.stem}", "", f"![{g.stem}](samples/{g.name})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


class _NoBar:
    """The progress bar when there is none (log.progress=false, ranks but the first)."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, values: dict) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(show: bool, total: int, initial: int):
    """A tqdm bar over the iterations, or a null one."""
    if not show:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="flowpo", dynamic_ncols=True)
