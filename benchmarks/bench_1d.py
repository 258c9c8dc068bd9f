"""1-D spatially varying convolution: CoordGate vs CNNs vs CoordConv (paper section IV.1).

Reproduces the shape of the 1-D experiment of Howard, Norreys & Döpp, "CoordGate: Efficiently Computing
Spatially-Varying Convolutions in Convolutional Neural Networks" (arXiv:2401.04680): a network must learn a
fixed linear operator ``y = A x`` whose row ``i`` is a Gaussian kernel with an offset and a width that change
with ``i``. A plain CNN applies the same kernel everywhere, so away from the ends of the signal it can only
learn an average of the rows (near the ends the zero padding inside its receptive field tells it where it
is, which a deep CNN on a short signal can exploit); a CoordGate layer mixes a few kernels with weights that
depend on the position.

Choices made here (the paper gives the setting, not every number):

* **Operator (eq. 5).** Three regimes across the signal, in normalised position ``u = i / (N - 1)``:
  first third offset 0 px, width sigma 1.0 px; middle third offset +2 px, sigma 0.5 px; last third offset
  -2 px, sigma 0.7 px. The offset and the width move between regimes along ``tanh`` steps centred at
  ``u = 1/3`` and ``u = 2/3`` with a half-width of 0.04 in ``u``, so both vary smoothly with ``i``. Row ``i``
  is ``exp(-(j - i - offset_i)^2 / (2 sigma_i^2))`` over the columns ``j`` of the signal, normalised to unit
  sum (so rows near the ends, which lose part of their Gaussian, are renormalised). The regimes are defined
  in ``u``, so a longer signal has the same three thirds with wider transitions in pixels; offsets and
  widths stay in pixels.
* **Data.** 10,000 inputs per length, each sample uniform on [0, 1] (i.i.d. per pixel), split
  8,000 train / 1,000 validation / 1,000 test; lengths 30 (as in the paper) and 128. Targets are min-max
  scaled with the training split's extremes to unit range [0, 1]; inputs are already on [0, 1]. PSNR is
  ``10 log10(1 / MSE)`` on the test split on that scale. The data are fixed (seed 1234) for every model and
  seed; the model seeds change the initialisation and batch order only.
* **Training "to convergence".** Adam (lr 5e-3), MSE, batch 100, at most ``--epochs`` (100) epochs. An epoch
  is progress when the validation MSE falls at least 0.5 % (0.02 dB) below the last progress; the learning
  rate halves after 5 epochs without progress (ReduceLROnPlateau); training stops after ``--patience`` (12)
  epochs without progress, once the learning rate is below 1e-4, or at the budget. The best-validation
  weights are restored before testing; the table reports the epochs actually run (a value equal to the
  budget means the model was still improving slowly when it was stopped).
* **Models.** All convolutions use "same" zero padding.
  ``CNN(L, k, C)``: ``L`` Conv1d layers of kernel ``k``, ``C`` hidden channels, ReLU between, the last layer
  to 1 channel (for ``L = 1`` the only layer is 1 -> 1). ``CoordConv``: ``CNN(4, 7, 4)`` with a normalised
  coordinate channel (pixel centres on [-1, 1], the project's ``field_coordinates`` convention) concatenated
  to every layer's input. ``CoordGate``: one ``Conv1d(1 -> 3, k = 7)``, its 3 output channels multiplied
  by a gate from a pixel-wise MLP of the normalised coordinate (1 -> 16 -> 3, GELU between, linear output),
  then a 1x1 convolution 3 -> 1 that combines them. ``CoordGate, random gate input``: the same network with
  the MLP fed uniform random numbers on [-1, 1] re-sampled for every sample, position and forward pass
  (training and test) instead of the coordinate: the paper's control, which carries no position.
* **Inference time.** Median over repeats of one forward pass on a batch of 1,000 length-30 inputs, CPU,
  ``--threads`` threads (default 1), in microseconds per sample. The CoordGate gate is recomputed at every
  call (it depends on the length only and could be cached, as the package's ``CoordGate`` does); the
  random-gate control runs its MLP on a fresh ``(batch, 1, length)`` noise tensor, hence its cost.
* **Seeds.** One model seed (0) in the full mode, to keep the run near ten minutes on one CPU thread; pass
  ``--seeds 0 1`` for the mean over two (``PSNR`` then reads ``mean ± half-range``; epochs are the mean).
  ``--quick`` uses seed 0, 2,000 samples and at most 12 epochs (a smoke test, not a result).
* **Reference lines.** The PSNR of predicting the training-target mean, and the best PSNR any single k = 7
  layer with 3 position-gated channels could reach (truncated SVD of the operator's in-window rows, see
  ``gated_layer_ceiling_db``): with offsets jumping by 2-4 px between regimes, the transition rows are not in
  the span of three kernels, so a one-layer CoordGate with C = 3 cannot be exact on this operator.

Usage::

    python benchmarks/bench_1d.py                # full run, seed 0 (about 10 minutes on one CPU thread)
    python benchmarks/bench_1d.py --seeds 0 1    # mean over two seeds (about twice as long)
    python benchmarks/bench_1d.py --quick        # smoke test, well under two minutes

Prints one markdown table and two reference lines.
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

# (offset px, width sigma px) of the three regimes, first / middle / last third of the signal.
REGIMES: tuple[tuple[float, float], ...] = ((0.0, 1.0), (2.0, 0.5), (-2.0, 0.7))
TRANSITION = 0.04  # half-width of the tanh steps between regimes, in normalised position
DATA_SEED = 1234


# ----------------------------------------------------------------------------------------------- data


def regime_profile(length: int) -> tuple[np.ndarray, np.ndarray]:
    """Offset and width (pixels) of the kernel at each output position (paper eq. 5, three regimes).

    Returns
    -------
    offset, sigma
        Arrays of shape ``(length,)``.
    """
    u = np.linspace(0.0, 1.0, length)
    steps = [0.5 * (1.0 + np.tanh((u - edge) / TRANSITION)) for edge in (1.0 / 3.0, 2.0 / 3.0)]
    (o0, s0), (o1, s1), (o2, s2) = REGIMES
    offset = o0 + (o1 - o0) * steps[0] + (o2 - o1) * steps[1]
    sigma = s0 + (s1 - s0) * steps[0] + (s2 - s1) * steps[1]
    return offset, sigma


def convolution_matrix(length: int) -> np.ndarray:
    """``(length, length)`` matrix whose row ``i`` is the unit-sum Gaussian kernel of position ``i``."""
    offset, sigma = regime_profile(length)
    i = np.arange(length)[:, None]
    j = np.arange(length)[None, :]
    rows = np.exp(-((j - i - offset[:, None]) ** 2) / (2.0 * sigma[:, None] ** 2))
    return rows / rows.sum(axis=1, keepdims=True)


def make_splits(n_samples: int, length: int, seed: int = DATA_SEED) -> tuple[dict, float]:
    """Train / validation / test pairs ``(x, y)`` of shape ``(n, 1, length)``; targets scaled to unit range.

    The split is 80 / 10 / 10 %; the target scaling uses the training split's minimum and maximum.

    Returns
    -------
    splits, scale
        ``{"train": (x, y), "val": ..., "test": ...}`` and the raw target range the targets were divided by.
    """
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 1.0, size=(n_samples, length))
    y = x @ convolution_matrix(length).T
    n_val = n_test = n_samples // 10
    n_train = n_samples - n_val - n_test
    lo, hi = y[:n_train].min(), y[:n_train].max()
    y = (y - lo) / (hi - lo)
    to_t = lambda a: torch.from_numpy(a.astype(np.float32))[:, None, :]  # noqa: E731
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n_samples)}
    return {k: (to_t(x[a:b]), to_t(y[a:b])) for k, (a, b) in bounds.items()}, float(hi - lo)


def gated_layer_ceiling_db(length: int, channels: int, kernel: int, scale: float) -> float:
    """Approximate best test PSNR of one k-tap conv layer with ``channels`` position-gated channels.

    Such a layer applies at position ``i`` a kernel from one shared ``channels``-dimensional subspace of
    ``kernel``-tap kernels, whatever the gate. For i.i.d. inputs of variance 1/12 (uniform on [0, 1]) the
    expected squared error of row ``i`` is ``||row_i - kernel_i||^2 / 12`` (a bias absorbs the mean), so the
    best layer is the truncated SVD of the in-window rows; the weights outside the window are lost. Rows at
    the ends are treated as if padding mattered, so the value is slightly pessimistic there.
    """
    a = convolution_matrix(length)
    half = kernel // 2
    window = np.zeros((length, kernel))
    for i in range(length):
        for d in range(-half, half + 1):
            if 0 <= i + d < length:
                window[i, d + half] = a[i, i + d]
    lost = (a**2).sum() - (window**2).sum()
    s = np.linalg.svd(window, compute_uv=False)
    err = (lost + (s[channels:] ** 2).sum()) / 12.0 / length / scale**2
    return psnr_db(err)


def coordinates(length: int) -> torch.Tensor:
    """Pixel-centre coordinates on [-1, 1], shape ``(1, 1, length)``."""
    p = torch.arange(length, dtype=torch.float32)
    return ((2.0 * p - (length - 1)) / max(length - 1, 1))[None, None, :]


# --------------------------------------------------------------------------------------------- models


class CNN1d(nn.Module):
    """``layers`` same-padded Conv1d of kernel ``kernel`` with ``channels`` hidden channels, ReLU between.

    With ``coord=True`` (CoordConv) a normalised coordinate channel is concatenated to every layer's input.
    """

    def __init__(self, layers: int, kernel: int, channels: int, coord: bool = False) -> None:
        super().__init__()
        self.coord = coord
        widths = [1] + [channels] * (layers - 1) + [1]
        extra = 1 if coord else 0
        self.convs = nn.ModuleList(
            nn.Conv1d(c_in + extra, c_out, kernel, padding=kernel // 2) for c_in, c_out in zip(widths, widths[1:])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = coordinates(x.shape[-1]).expand(x.shape[0], -1, -1) if self.coord else None
        for n, conv in enumerate(self.convs):
            if n:
                x = torch.relu(x)
            x = conv(torch.cat([x, c], dim=1) if c is not None else x)
        return x


class CoordGate1d(nn.Module):
    """One Conv1d(1 -> C, k), its channels gated by a pixel-wise MLP, then a 1x1 conv C -> 1.

    ``gate_input="coords"`` feeds the MLP the normalised coordinate (CoordGate); ``"random"`` feeds it uniform
    noise on [-1, 1], re-sampled per sample, position and call (the paper's control: no position at all).
    """

    def __init__(self, kernel: int = 7, channels: int = 3, hidden: int = 16, gate_input: str = "coords") -> None:
        super().__init__()
        if gate_input not in ("coords", "random"):
            raise ValueError(f"gate_input must be 'coords' or 'random', got {gate_input!r}")
        self.gate_input = gate_input
        self.conv = nn.Conv1d(1, channels, kernel, padding=kernel // 2)
        self.mlp = nn.Sequential(nn.Conv1d(1, hidden, 1), nn.GELU(), nn.Conv1d(hidden, channels, 1))
        self.combine = nn.Conv1d(channels, 1, 1)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_input == "coords":
            return self.mlp(coordinates(x.shape[-1]).to(x))  # (1, C, N), broadcast over the batch
        return self.mlp(torch.rand_like(x) * 2.0 - 1.0)  # (B, C, N)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine(self.conv(x) * self.gate(x))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "CNN(1,7,1)": lambda: CNN1d(1, 7, 1),
    "CNN(3,7,4)": lambda: CNN1d(3, 7, 4),
    "CNN(4,7,4)": lambda: CNN1d(4, 7, 4),
    "CNN(8,7,4)": lambda: CNN1d(8, 7, 4),
    "CNN(4,7,20)": lambda: CNN1d(4, 7, 20),
    "CoordConv CNN(4,7,4)": lambda: CNN1d(4, 7, 4, coord=True),
    "CoordGate(1,7,3)": lambda: CoordGate1d(7, 3, 16, "coords"),
    "CoordGate(1,7,3), random gate input": lambda: CoordGate1d(7, 3, 16, "random"),
}


# ------------------------------------------------------------------------------------ train / measure


def mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    with torch.no_grad():
        err = sum(float(((model(x[a:a + batch]) - y[a:a + batch]) ** 2).sum()) for a in range(0, len(x), batch))
    return err / y.numel()


def fit(model: nn.Module, splits: dict, *, max_epochs: int, patience: int, batch: int = 100, lr: float = 5e-3,
        seed: int = 0) -> int:
    """Train with Adam/MSE until early stopping; restore the best-validation weights. Returns epochs run.

    An epoch counts as progress when the validation MSE falls by at least 0.5 % (0.02 dB) below the last
    progress; the learning rate halves after 5 epochs without progress; training stops after ``patience``
    epochs without progress, when the learning rate has been halved below 1e-4, or after ``max_epochs``.
    """
    x, y = splits["train"]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=5, threshold=0.005)
    best, best_state, reference, stale, epoch = float("inf"), copy.deepcopy(model.state_dict()), float("inf"), 0, 0
    for epoch in range(1, max_epochs + 1):
        model.train()
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
        val = mse(model, *splits["val"])
        sched.step(val)
        if val < best:
            best, best_state = val, copy.deepcopy(model.state_dict())
        if val < reference * 0.995:
            reference, stale = val, 0
        else:
            stale += 1
        if stale >= patience or opt.param_groups[0]["lr"] < 1e-4:
            break
    model.load_state_dict(best_state)
    return epoch


def psnr_db(mse_value: float) -> float:
    return 10.0 * float(np.log10(1.0 / max(mse_value, 1e-30)))


def inference_us(model: nn.Module, length: int = 30, batch: int = 1000, repeats: int = 15) -> float:
    """Median microseconds per sample of one forward pass on a batch of ``batch`` inputs."""
    model.eval()
    x = torch.rand(batch, 1, length)
    times = []
    with torch.inference_mode():
        for n in range(repeats + 3):
            t0 = time.perf_counter()
            model(x)
            if n >= 3:  # first calls warm up allocator and kernels
                times.append(time.perf_counter() - t0)
    return float(np.median(times)) / batch * 1e6


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _fmt_psnr(values: list[float]) -> str:
    mean = float(np.mean(values))
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {(max(values) - min(values)) / 2:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=10_000, help="samples per length (80/10/10 %% split)")
    ap.add_argument("--lengths", type=int, nargs=2, default=[30, 128], help="the two signal lengths")
    ap.add_argument("--epochs", type=int, default=100, help="epoch budget per model")
    ap.add_argument("--patience", type=int, default=12, help="early-stopping patience (epochs)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), metavar="MODEL")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke test: 2,000 samples, <= 12 epochs, seed 0")
    args = ap.parse_args()
    if args.quick:
        args.samples, args.epochs, args.patience, args.seeds = 2_000, 12, 4, [0]

    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    made = {n: make_splits(args.samples, n) for n in args.lengths}
    splits = {n: made[n][0] for n in args.lengths}
    print(f"# 1-D spatially varying convolution (CoordGate paper IV.1): {args.samples} samples per length "
          f"(80/10/10 %), lengths {args.lengths}, Adam/MSE, <= {args.epochs} epochs with early stopping "
          f"(patience {args.patience}), seeds {args.seeds}, {args.threads} thread(s)")

    n30, n128 = args.lengths
    header = (f"| model | params | PSNR (dB) length {n30} | PSNR (dB) length {n128} | epochs ({n30} / {n128}) "
              f"| inference µs/sample (length {n30}, batch 1000) |")
    rows = []
    for name in args.models:
        psnrs: dict[int, list[float]] = {n: [] for n in args.lengths}
        epochs: dict[int, list[int]] = {n: [] for n in args.lengths}
        timings: list[float] = []
        for seed in args.seeds:
            for n in args.lengths:
                torch.manual_seed(seed)
                model = MODELS[name]()
                epochs[n].append(fit(model, splits[n], max_epochs=args.epochs, patience=args.patience, seed=seed))
                torch.manual_seed(seed)  # the random-gate control draws its noise from the global generator
                psnrs[n].append(psnr_db(mse(model, *splits[n]["test"])))
                if n == n30:
                    timings.append(inference_us(model, n30))
        ep = " / ".join(f"{np.mean(epochs[n]):.0f}" for n in args.lengths)
        rows.append(f"| {name} | {n_params(model)} | {_fmt_psnr(psnrs[n30])} | {_fmt_psnr(psnrs[n128])} | {ep} "
                    f"| {np.median(timings):.2f} |")
        print(f"  done {name} ({time.perf_counter() - t_all:.0f} s)", flush=True)

    print()
    print(header)
    print("|" + "---|" * 6)
    print("\n".join(rows))
    ref = {n: psnr_db(float(((splits[n]["test"][1] - splits[n]["train"][1].mean()) ** 2).mean())) for n in args.lengths}
    print(f"\nreference: predicting the training-target mean gives {ref[n30]:.2f} dB (length {n30}), "
          f"{ref[n128]:.2f} dB (length {n128}); PSNR = 10 log10(1 / MSE) on targets scaled to unit range")
    ceil = {n: gated_layer_ceiling_db(n, 3, 7, made[n][1]) for n in args.lengths}
    print(f"ceiling: any single k=7 layer with 3 position-gated channels (rank-3 kernel subspace) can reach at most "
          f"about {ceil[n30]:.2f} dB (length {n30}), {ceil[n128]:.2f} dB (length {n128})")
    print(f"(total {time.perf_counter() - t_all:.0f} s)")


if __name__ == "__main__":
    main()
