"""Compute-optimal model size and token count: Chinchilla (Hoffmann et al. 2022) and Kaplan et al. (2020).

Every law here has the form N_opt(C) = k * C^a, with training FLOPs C = 6 N D, so D_opt = C / (6 N_opt). Each law
needs an exponent a and a constant k; where a paper publishes only the exponent, k comes from a published point:

- approach 1 (minimum over training curves, Hoffmann Table 2): a = 0.50. The paper gives no constant; its text and
  Figure 2 give 67B parameters for Gopher's budget of 5.76e23 FLOPs, so N_opt = 67e9 * (C / 5.76e23)^0.50.
  This reproduces the paper's Table 3 (approach 1's projections) within 3.3% in N and 4.5% in D when each row
  is looked up by its FLOPs (the 4.5% is the 67B row, whose own 1.5T tokens are rounded: 6 N D = 1.05 C there).
  Looked up by parameters alone it is worse for small models: a = 0.50 makes D/N a constant
  5.76e23 / (6 * 67e9^2) = 21.4 tokens per parameter, so 400M -> 8.6B tokens (table: 8.0B, +7%) and
  1B -> 21.4B (table: 20.2B, +6%). The table's own rows imply an exponent of ~0.498 (D/N grows from 20 to 21.6
  across the table); we keep the published 0.50 rather than fit the table we test against.
- approach 2 (IsoFLOP profiles): a = 0.49, anchored at 63B parameters for Gopher's budget (Hoffmann Figure 3).
- approach 3 (parametric loss): L(N, D) = E + A/N^alpha + B/D^beta; its minimum along C = 6 N D is closed-form
  (see `approach3_optimal_params`). With the published, rounded coefficients it gives 32B at Gopher's budget and
  a = 0.452; the paper reports ~40B and a = 0.46 from its unrounded fit (Besiroglu et al. 2024 note the mismatch).
- the rule of thumb D = 20 N: C = 6 N (20 N) = 120 N^2, so N_opt = (C / 120)^0.5.
- Kaplan et al. 2020, Table 6: N_opt = 1.3e9 * C_min^0.73 with C_min in PF-days (8.64e19 FLOPs). Kaplan counts
  non-embedding parameters and C_min is the least compute that reaches a loss (batches far below the critical
  batch size; at the critical batch a run spends 2 C_min, Kaplan eq. 5.5): a comparison, not a like-for-like law.
  Its tokens, C / (6 N), equal Table 6's B_crit x S_min to 3%; Table 6's D_opt (2e10 C_min^0.27) is about twice that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

# approach 3's published fit (Hoffmann et al. 2022, eq. 10)
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28
GOPHER_FLOPS = 5.76e23
PF_DAY = 1e15 * 86400


def chinchilla_loss(n_params: float, n_tokens: float) -> float:
    """Approach 3's predicted final loss (nats/token on MassiveText): E + A / N^alpha + B / D^beta."""
    return E + A / n_params**ALPHA + B / n_tokens**BETA


def approach3_optimal_params(flops: float) -> float:
    # Minimise L over N with D = C / (6N):  B / D^beta = B (C/6)^-beta N^beta, so
    #   dL/dN = -alpha A N^(-alpha-1) + beta B (C/6)^-beta N^(beta-1) = 0
    #   <=> N^(alpha+beta) = (alpha A / (beta B)) (C/6)^beta
    #   <=> N_opt = G (C/6)^a,  G = (alpha A / (beta B))^(1/(alpha+beta)),  a = beta / (alpha+beta)
    # (and symmetrically D_opt = G^-1 (C/6)^b, b = alpha / (alpha+beta)).
    g = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
    return g * (flops / 6) ** (BETA / (ALPHA + BETA))


@dataclass(frozen=True)
class Law:
    """N_opt(C) = k * C^a; D_opt = C / (6 N_opt)."""

    name: str
    k: float
    a: float
    source: str

    def params(self, flops: float) -> float:
        return self.k * flops**self.a

    def flops_for_params(self, n_params: float) -> float:
        return (n_params / self.k) ** (1 / self.a)

    def flops_for_tokens(self, n_tokens: float) -> float:
        # D = C / (6 k C^a) = C^(1-a) / (6k)  =>  C = (6 k D)^(1 / (1-a))
        return (6 * self.k * n_tokens) ** (1 / (1 - self.a))


def _anchored(name: str, a: float, n_at: float, flops_at: float, source: str) -> Law:
    return Law(name, n_at / flops_at**a, a, source)


_A3 = BETA / (ALPHA + BETA)
LAWS: dict[str, Law] = {
    "approach1": _anchored("Chinchilla approach 1", 0.50, 67e9, GOPHER_FLOPS,
                           "Hoffmann et al. 2022, Table 2 (a=0.50), anchored at 67B for 5.76e23 FLOPs (Figure 2)"),
    "approach2": _anchored("Chinchilla approach 2", 0.49, 63e9, GOPHER_FLOPS,
                           "Hoffmann et al. 2022, Table 2 (a=0.49), anchored at 63B for 5.76e23 FLOPs (Figure 3)"),
    # G (C/6)^a = (G 6^-a) C^a, and G is the closed form at C = 6
    "approach3": Law("Chinchilla approach 3", approach3_optimal_params(6.0) * 6.0**-_A3, _A3,
                     "Hoffmann et al. 2022, eq. 10: E=1.69 A=406.4 B=410.7 alpha=0.34 beta=0.28"),
    "20x": Law("20 tokens per parameter", 120**-0.5, 0.5, "rule of thumb from Hoffmann et al. 2022: D = 20 N"),
    "kaplan": Law("Kaplan et al. 2020", 1.3e9 / PF_DAY**0.73, 0.73,
                  "Kaplan et al. 2020, Table 6: N = 1.3e9 * C_min[PF-days]^0.73 (non-embedding N)"),
}


def plan(flops: float | None = None, params: float | None = None, tokens: float | None = None) -> dict:
    """The compute-optimal (N, D, C) of every law, given exactly one of FLOPs, parameters or tokens, with
    approach 3's predicted loss at each point."""
    given = [(k, v) for k, v in (("flops", flops), ("params", params), ("tokens", tokens)) if v is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of --flops, --params, --tokens")
    key, value = given[0]
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"--{key} must be a positive number, got {value!r}")
    rows = []
    for name, law in LAWS.items():
        c = {"flops": lambda: value, "params": lambda: law.flops_for_params(value),
             "tokens": lambda: law.flops_for_tokens(value)}[key]()
        n = value if key == "params" else law.params(c)
        d = value if key == "tokens" else c / (6 * n)
        rows.append({"law": name, "name": law.name, "params": n, "tokens": d, "flops": 6 * n * d,
                     "tokens_per_param": d / n, "loss": chinchilla_loss(n, d), "source": law.source})
    return {"given": {key: value}, "laws": rows}


def plot_frontier(path: str | Path, flops: float | None = None) -> Path:
    """A PNG of approach 3's iso-FLOP curves (loss against N at fixed C = 6 N D) with every law's N_opt marked."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("--plot needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import numpy as np

    budgets = [10.0**e for e in range(18, 27)]
    if flops is not None and all(abs(math.log10(flops / c)) > 0.05 for c in budgets):
        budgets = sorted(budgets + [flops])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    cmap = plt.get_cmap("viridis")
    for i, c in enumerate(budgets):
        centre = math.log10(approach3_optimal_params(c))
        n = np.logspace(centre - 1.5, centre + 1.5, 200)
        ax.plot(n, chinchilla_loss(n, c / (6 * n)), color=cmap(i / max(len(budgets) - 1, 1)),
                lw=2.5 if c == flops else 1, label=f"C = {c:.0e}")
    markers = {"approach1": "o", "approach2": "s", "approach3": "^", "20x": "d", "kaplan": "x"}
    cs = np.logspace(18, 27, 50)
    for name, law in LAWS.items():
        pts = [(law.params(c), chinchilla_loss(law.params(c), c / (6 * law.params(c)))) for c in budgets]
        ax.scatter(*zip(*pts), marker=markers[name], s=25, zorder=3, label=law.name)
        ax2.loglog(cs, law.params(cs), label=law.name)
    ax.set(xscale="log", xlabel="parameters N", ylabel="predicted loss (approach 3)", title="iso-FLOP profiles")
    ax.legend(fontsize=6, ncol=2)
    ax2.set(xlabel="training FLOPs C = 6 N D", ylabel="compute-optimal N", title="compute-optimal frontier")
    if flops is not None:
        ax2.axvline(flops, color="gray", ls="--", lw=1)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    if not path.suffix:  # savefig would add .png itself; name the file it writes
        path = path.with_name(path.name + ".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
