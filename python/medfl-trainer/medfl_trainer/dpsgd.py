"""Record-level DP-SGD inside a hospital's own trainer, exactly as the site's ledger
accounts it (the agent charges before training and refuses a result whose noise is
below its charge).

What the accountant assumes, and this helper enforces:

- **Poisson sampling** at rate q: each row joins each step's batch independently with
  probability q (from the operating system's randomness), not shuffled fixed batches
  (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016, Alg. 1; the
  subsampled Gaussian's RDP, Mironov, Talwar, Zhang 2019);
- **per-example clipping** of each row's gradient to L2 norm C;
- **Gaussian noise** N(0, σ²C²) on each step's sum of clipped gradients, drawn by OpenDP
  (the library the agent uses) on the grid 2^-30 as the agent does; its privacy map gives
  the effective multiplier 1/√(2ρ) that the trainer reports and the agent checks;
- the sum divided by the expected batch size q·n (n the site's rows), as the built-in
  trainer does, and exactly the manifest's number of steps;
- features scaled by the manifest's **public** statistics (never the site's own), and no
  batch-normalization statistics (they would be a non-private function of the batch).

Usage::

    dpsgd = mt.DpSgd(task, n_rows=len(y), n_params=w.size + 1)
    for batch in dpsgd.batches():           # index arrays, possibly empty
        g = per_example_gradients(batch)    # shape (len(batch), n_params)
        step = dpsgd.noisy_mean(g)          # clipped, summed, noised, divided by q·n
        ...                                 # your optimizer step with `step`
    return mt.Update(..., noise_multiplier=dpsgd.effective_noise_multiplier)
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np

from medfl_trainer.protocol import Task, TrainerError

#: OpenDP's noise grid 2^k, as the agent's (``medfl_shared::dp::NOISE_GRID_K``).
NOISE_GRID_K = -30


def gaussian_measurement(n_params: int, clip: float, sigma: float):
    """OpenDP's Gaussian on a vector of ``n_params`` floats of L2 sensitivity ``clip``,
    noise scale σ·C on the grid 2^-30, zCDP: the agent's ``GaussianNoise``."""
    import opendp.prelude as dp

    dp.enable_features("contrib")
    return dp.m.make_gaussian(
        dp.vector_domain(dp.atom_domain(T=float, nan=False), size=n_params),
        dp.l2_distance(T=float),
        scale=sigma * clip,
        k=NOISE_GRID_K,
    )


def effective_noise_multiplier(n_params: int, clip: float, sigma: float) -> float:
    """1/√(2ρ) by OpenDP's privacy map: what the agent's ledger charges per step."""
    rho = gaussian_measurement(n_params, clip, sigma).map(clip)
    return (2.0 * rho) ** -0.5


class DpSgd:
    """One round's DP-SGD for a task with ``privacy.unit == "record"``."""

    def __init__(self, task: Task, n_rows: int, n_params: int):
        p = task.privacy
        if p.unit != "record":
            raise TrainerError("privacy", f"DP-SGD is for record-level DP; this task's unit is {p.unit!r}")
        if task.center is None or task.scale is None:
            raise TrainerError("privacy", "record-level DP needs the manifest's public scaling")
        if not (0.0 < p.sample_rate <= 1.0 and p.clip_norm > 0.0 and p.noise_multiplier > 0.0 and p.steps > 0):
            raise TrainerError("privacy", f"unusable DP-SGD parameters {p}")
        if n_rows <= 0:
            raise TrainerError("data", "no rows to train on")
        self.q = p.sample_rate
        self.steps = int(p.steps)
        self.clip = p.clip_norm
        self.n_rows = n_rows
        self.n_params = n_params
        self._measurement = gaussian_measurement(n_params, p.clip_norm, p.noise_multiplier)
        rho = self._measurement.map(p.clip_norm)
        self.effective_noise_multiplier = (2.0 * rho) ** -0.5
        self.expected_batch = max(self.q * n_rows, 1.0)
        self.clipped = 0

    def batches(self) -> Iterator[np.ndarray]:
        """``steps`` Poisson samples of row indices (each row in with probability q)."""
        for _ in range(self.steps):
            if self.q >= 1.0:
                yield np.arange(self.n_rows)
                continue
            draws = np.frombuffer(os.urandom(8 * self.n_rows), dtype="<u8")
            yield np.flatnonzero(draws < np.uint64(int(self.q * 2**64)))

    def noisy_mean(self, per_example: np.ndarray) -> np.ndarray:
        """Clips each row of ``per_example`` (batch × n_params) to C, sums, adds OpenDP's
        noise and divides by the expected batch size q·n."""
        g = np.asarray(per_example, dtype=np.float64).reshape(-1, self.n_params)
        norms = np.linalg.norm(g, axis=1)
        factors = np.minimum(1.0, self.clip / np.maximum(norms, 1e-12))
        self.clipped += int(np.count_nonzero(factors < 1.0))
        total = (g * factors[:, None]).sum(axis=0) if len(g) else np.zeros(self.n_params)
        noisy = np.asarray(self._measurement(total.tolist()), dtype=np.float64)
        return noisy / self.expected_batch
