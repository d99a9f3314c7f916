"""``vaebench report``: a Markdown report with tables and PNG figures, all derived from the records.

Figures (matplotlib's object-oriented API on the Agg canvas; no display needed):

``loglik.png``                 test log p(x) (AIS, IS) and ELBO per method, mean ± SE over seeds
``iwae_k.png``                 IWAE_K against K on the ``vi`` model, with log p(x), ELBO[q] and ELBO[q*]
``loglik_vs_time.png``         test ELBO per epoch against training wall-clock, final log p(x) marked
``gaps.png``                   approximation and amortisation gaps of the ``vi`` model (Cremer et al. 2018)
``variance.png``               spread of the K-sample bound and gradient SNR against K
``aggregate_posterior.png``    one z per test point from each method's posterior, projected on its
                               two leading principal components, against the prior's contours
``samples.png``                decoder samples and test reconstructions per method
``hmc.png``                    HMC traces on p(z|x) (the hmc decoder, else vi) and AIS acceptance rates

A figure whose inputs are missing (for instance no ``hmc`` run, or a data set not installed on this
machine) is replaced by a line in the report saying why.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from vaebench.config import HMCConfig
from vaebench.data import evaluation_data, load_dataset, subset_dataset
from vaebench.errors import VaebenchError
from vaebench.inference.hmc import sample_posterior
from vaebench.results import ResultsError, read_records, record_label, records_frame
from vaebench.rundir import LOG_FILE, load_run, staged_directory
from vaebench.tables import format_table, unavailable_lines
from vaebench.threads import torch_threads

FIGURE_DIR = "figures"
REPORT_FILE = "report.md"
COLORS = {"vi": "tab:blue", "iwae": "tab:orange", "hmc": "tab:green"}
PROJECTION_POINTS = 1000
"""At most this many test points are drawn in the aggregate-posterior projection."""


_label = record_label


def _series(record: Mapping[str, Any], name: str, k: int) -> float | None:
    """The value at ``k`` of the typed series ``name`` of a record (``None`` where missing)."""
    return next((p["value"] for p in record.get("series", {}).get(name, []) if p["k"] == k), None)


def _series_ks(records: Sequence[Mapping[str, Any]], name: str) -> list[int]:
    return sorted({p["k"] for r in records for p in r.get("series", {}).get(name, [])})


def _hmc_config(record: Mapping[str, Any], **changes: Any) -> HMCConfig:
    """The HMC settings the compare stored for the report (``report_hmc``), as an :class:`HMCConfig`."""
    settings = record["config"]["compare"].get("report_hmc")
    if not settings:
        raise _Skip("the records hold no report_hmc settings (written by an older compare)")
    return HMCConfig(**{**settings, **changes})


def _color(label: str, index: int = 0) -> str:
    base = label.split("-")[0]
    if base == "iwae":
        return ["tab:orange", "tab:red", "tab:purple", "tab:brown"][index % 4]
    return COLORS.get(base, "tab:gray")


def _mean_se(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return math.nan, math.nan
    mean = float(np.mean(values))
    se = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan
    return mean, se


def _save(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)


class Report:
    """Builds the figures and the Markdown of one results directory."""

    def __init__(self, results_dir: str | os.PathLike) -> None:
        self.results_dir = Path(results_dir)
        self.records = read_records(self.results_dir)
        if not self.records:
            raise ResultsError(f"{self.results_dir / 'records.jsonl'} holds no records")
        self.frame = records_frame(self.records)
        self.runs = [r for r in self.records if r["kind"] == "run"]
        self.labels = list(dict.fromkeys(_label(r) for r in self.runs))
        self._data: dict[str, Any] = {}

    def of_kind(self, kind: str, method: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.records if r["kind"] == kind and (method is None or r["method"] == method)]

    # ------------------------------------------------------------------ figures
    def fig_loglik(self, path: Path) -> str:
        if not self.runs:
            raise _Skip("no run records")
        fig = Figure(figsize=(7, 4))
        ax = fig.add_subplot()
        series = [("log_px_ais", "log p(x), AIS", "o"), ("log_px_is", "log p(x), IS", "s"), ("elbo", "ELBO", "v")]
        plotted = 0
        for j, (metric, name, marker) in enumerate(series):
            xs, ys, es = [], [], []
            for i, label in enumerate(self.labels):
                values = [r["metrics"].get(metric) for r in self.runs if _label(r) == label]
                mean, se = _mean_se(values)
                if not math.isnan(mean):
                    xs.append(i + (j - 1) * 0.15)
                    ys.append(mean)
                    es.append(0.0 if math.isnan(se) else se)
            if xs:
                ax.errorbar(xs, ys, yerr=es, fmt=marker, capsize=3, label=name)
                plotted += 1
        if not plotted:
            raise _Skip("no log-likelihood metrics in the run records")
        ax.set_xticks(range(len(self.labels)), self.labels)
        ax.set_ylabel("nats per test datapoint")
        ax.set_title("Test log-likelihood by method (mean ± SE over seeds)")
        ax.legend()
        ax.grid(alpha=0.3)
        _save(fig, path)
        return "Test log p(x) and ELBO of every trained model, mean ± standard error over seeds."

    def fig_certification(self, path: Path) -> str:
        """BDMC bounds on simulated data against T, for the first seed's decoder of every method."""
        runs = [r for r in self._first_seed_runs()
                if r["diagnostics"].get("ais", {}).get("certificate", {}).get("bounds")]
        if not runs:
            raise _Skip("no certified AIS in the run records (settings: certify = None)")
        fig = Figure(figsize=(7, 4))
        ax = fig.add_subplot()
        for i, record in enumerate(runs):
            certificate = record["diagnostics"]["ais"]["certificate"]
            steps = [entry[0] for entry in certificate["history"]]
            lower = [entry[0] for entry in certificate["bounds"]]
            upper = [entry[1] for entry in certificate["bounds"]]
            color = _color(_label(record), i)
            ax.plot(steps, lower, "o-", color=color, label=f"{_label(record)} (T = {certificate['steps']}"
                                                             f"{'' if certificate['certified'] else ', uncertified'})")
            ax.plot(steps, upper, "s--", color=color)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("annealing steps T")
        ax.set_ylabel("log p(x), nats per simulated datapoint")
        ax.set_title("BDMC: AIS lower (o) and reverse-AIS upper (s) bounds against T")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        _save(fig, path)
        return ("Certification of AIS (Wu et al. 2017): on data simulated from each decoder (first seed), the "
                "forward-AIS lower bound and the reverse-AIS upper bound as T doubles; AIS on the test set runs at "
                "the first T whose gap plus its standard error is below the tolerance.")

    def fig_iwae_k(self, path: Path) -> str:
        bounds = self.of_kind("bounds")
        if not bounds:
            raise _Skip("no bounds records (the `vi` method was not run)")
        ks = _series_ks(bounds, "iwae")
        if not ks:
            raise _Skip("the bounds records hold no IWAE_K series (written by an older compare)")
        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot()
        means, ses = zip(*[_mean_se([_series(r, "iwae", k) for r in bounds]) for k in ks])
        ax.errorbar(ks, means, yerr=[0 if math.isnan(s) else s for s in ses], fmt="o-", capsize=3, label="IWAE_K bound")
        reference = bounds[0]["diagnostics"].get("log_px", "ais")
        mean, _ = _mean_se([r["metrics"].get("log_px") for r in bounds])
        ax.axhline(mean, color="k", ls="--", label=f"log p(x) ({reference.upper()})")
        mean, _ = _mean_se([r["metrics"].get("elbo") for r in bounds])
        ax.axhline(mean, color="tab:blue", ls=":", label="ELBO[q]")
        gaps = self.of_kind("gaps")
        if gaps:
            mean, _ = _mean_se([r["metrics"].get("elbo_qstar") for r in gaps])
            ax.axhline(mean, color="tab:green", ls="-.", label="ELBO[q*] (per-datapoint)")
        ax.set_xscale("log")
        ax.set_xlabel("K (importance samples)")
        ax.set_ylabel("nats per test datapoint")
        ax.set_title("IWAE_K on the vi-trained model")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        _save(fig, path)
        return ("The importance-weighted bound IWAE_K of the `vi` model's encoder as K grows, against the "
                f"log-likelihood ({reference.upper()}) and the ELBO of the amortised q and of the optimised q*.")

    def _history(self, record: Mapping[str, Any]) -> list[dict[str, Any]]:
        if record.get("run_dir") is None:
            return []
        path = self.results_dir / record["run_dir"] / LOG_FILE
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def fig_loglik_vs_time(self, path: Path) -> str:
        fig = Figure(figsize=(7, 4))
        ax = fig.add_subplot()
        drawn = False
        for i, label in enumerate(self.labels):
            color = _color(label, i)
            for j, record in enumerate(r for r in self.runs if _label(r) == label):
                history = [row for row in self._history(record) if "test_elbo" in row]
                if history:
                    ax.plot([row["seconds"] for row in history], [row["test_elbo"] for row in history], color=color,
                            alpha=0.6, label=f"{label}: test ELBO per epoch" if j == 0 else None)
                    drawn = True
                final = record["metrics"].get("log_px_ais", record["metrics"].get("log_px_is"))
                seconds = record["wall_time"].get("train")
                if final is not None and seconds is not None:
                    ax.plot([seconds], [final], marker="*", ms=11, color=color, ls="none",
                            label=f"{label}: final log p(x)" if j == 0 else None)
                    drawn = True
        if not drawn:
            raise _Skip("no training histories or final log-likelihoods")
        ax.set_xlabel("training wall-clock (s)")
        ax.set_ylabel("nats per test datapoint")
        ax.set_title("Log-likelihood against training time")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        _save(fig, path)
        return ("Test ELBO after every epoch against training wall-clock time (one line per seed), and the final "
                "test log p(x) (AIS where available, else IS) of each run (stars).")

    def fig_gaps(self, path: Path) -> str:
        gaps = self.of_kind("gaps")
        if not gaps:
            raise _Skip("no gaps records (the `vi` method was not run)")
        labels = list(dict.fromkeys(_label(r) for r in gaps))          # one bar per guide family
        fig = Figure(figsize=(4 + 1.2 * len(labels), 5))
        ax = fig.add_subplot()
        for i, label in enumerate(labels):
            mine = [r for r in gaps if _label(r) == label]
            approx = _mean_se([r["metrics"]["approximation_gap"] for r in mine])
            amort = _mean_se([r["metrics"]["amortisation_gap"] for r in mine])
            total = _mean_se([r["metrics"]["inference_gap"] for r in mine])
            ax.bar([i], [approx[0]], color="tab:green", label="approximation gap: log p(x) − ELBO[q*]" if not i else None)
            ax.bar([i], [amort[0]], bottom=[approx[0]], color="tab:orange",
                   label="amortisation gap: ELBO[q*] − ELBO[q]" if not i else None)
            ax.errorbar([i], [total[0]], yerr=[0 if math.isnan(total[1]) else total[1]], color="k", capsize=4,
                        label="inference gap log p(x) − ELBO[q] (± SE over seeds)" if not i else None)
        ax.set_xticks(range(len(labels)), [f"{label} decoder" for label in labels])
        ax.set_xlim(-1, len(labels))
        ax.set_ylabel("nats per test datapoint")
        ax.set_title("Inference gap, decomposed")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1))
        _save(fig, path)
        return ("Each `vi` model's inference gap split into approximation and amortisation gaps (Cremer et al. 2018), "
                "every guide family against a q* of its own family.")

    def fig_variance(self, path: Path) -> str:
        records = self.of_kind("variance")
        if not records:
            raise _Skip("no variance records (the `vi` method was not run)")
        ks = _series_ks(records, "bound_std")
        if not ks:
            raise _Skip("the variance records hold no series over K (written by an older compare)")
        fig = Figure(figsize=(9, 3.8))
        left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        mean = [_mean_se([_series(r, "bound_std", k) for r in records])[0] for k in ks]
        left.plot(ks, mean, "o-")
        left.set_xscale("log")
        left.set_yscale("log")
        left.set_xlabel("K")
        left.set_ylabel("std of the K-sample bound (nats)")
        left.set_title("Monte Carlo spread (K=1: ELBO)")
        left.grid(alpha=0.3, which="both")
        for name, style, text in (("snr_decoder", "o-", "decoder (IWAE)"),
                                  ("snr_encoder", "s-", "encoder (IWAE)"),
                                  ("snr_encoder_dreg", "^--", "encoder (DReG)")):
            values = [_mean_se([_series(r, name, k) for r in records])[0] for k in ks]
            right.plot(ks, values, style, label=text)
        right.set_xscale("log")
        right.set_yscale("log")
        right.set_xlabel("K")
        right.set_ylabel("gradient SNR |E g| / std g")
        right.set_title("Gradient signal-to-noise")
        right.legend(fontsize=8)
        right.grid(alpha=0.3, which="both")
        _save(fig, path)
        return ("Left: standard deviation of the K-sample bound per datapoint. Right: gradient signal-to-noise ratio "
                "of encoder and decoder parameters (Rainforth et al. 2018), with DReG encoder gradients "
                "(Tucker et al. 2019); on the `vi` model, mean over seeds.")

    def _model_and_data(self, record: Mapping[str, Any]) -> tuple[Any, torch.Tensor, torch.Tensor | None]:
        """The record's trained model (CPU) and its test data (as scored) and labels."""
        model, train_config, _ = load_run(self.results_dir / record["run_dir"], device="cpu")
        key = (train_config.dataset, train_config.data_dir)
        if key not in self._data:
            dataset = subset_dataset(load_dataset(*key), None, record["config"]["compare"].get("test_subset"))
            self._data[key] = (evaluation_data(dataset, "test", model.likelihood), dataset.test_labels)
        x, labels = self._data[key]
        return model, x.to(next(model.parameters()).dtype), labels

    def _first_seed_runs(self) -> list[dict[str, Any]]:
        seed = min(r["seed"] for r in self.runs)
        return [r for r in self.runs if r["seed"] == seed]

    def _posterior_draws(self, model: Any, x: torch.Tensor, record: Mapping[str, Any]) -> tuple[torch.Tensor, str]:
        seed = record["seed"]
        if model.has_encoder:
            import pyro
            pyro.set_rng_seed(seed)
            with torch.no_grad():
                z, _ = model.encoder_proposal(x, 1)
            return z[0], "z ~ q(z|x)"
        generator = torch.Generator().manual_seed(seed)
        result = sample_posterior(model, x, _hmc_config(record, num_samples=1, chains=1), generator)
        return result.samples[-1, 0], "z ~ p(z|x) by HMC"

    def fig_aggregate(self, path: Path) -> str:
        from sklearn.decomposition import PCA

        runs = self._first_seed_runs()
        fig = Figure(figsize=(3.6 * len(runs), 3.8))
        aggregates = {(r["method"], r["k"], r["seed"]): r for r in self.of_kind("aggregate")}
        for i, record in enumerate(runs):
            ax = fig.add_subplot(1, len(runs), i + 1)
            model, x, labels = self._model_and_data(record)
            x, labels = x[:PROJECTION_POINTS], None if labels is None else labels[:PROJECTION_POINTS]
            z, what = self._posterior_draws(model, x, record)
            z = z.detach().double().cpu().numpy()
            pca = PCA(n_components=min(2, z.shape[1])).fit(z)
            proj = z @ pca.components_.T          # through the origin: the prior N(0, I) projects to N(0, I₂)
            if proj.shape[1] == 1:
                proj = np.concatenate([proj, np.zeros_like(proj)], axis=1)
            ax.scatter(proj[:, 0], proj[:, 1], s=4, c=None if labels is None else labels.numpy(), cmap="tab10",
                       alpha=0.7)
            for radius in (1, 2, 3):
                t = np.linspace(0, 2 * np.pi, 200)
                ax.plot(radius * np.cos(t), radius * np.sin(t), color="k", lw=0.8, alpha=0.6)
            title = f"{_label(record)}: {what}"
            aggregate = aggregates.get((record["method"], record["k"], record["seed"]))
            if aggregate is not None:
                m = aggregate["metrics"]
                title += f"\nKL(q(z)‖p(z)) = {m['marginal_kl']:.2f}, I(x;z) = {m['mutual_information']:.2f}"
            ax.set_title(title, fontsize=8)
            ax.set_aspect("equal")
            limit = max(3.5, float(np.abs(proj).max()) * 1.05)
            ax.set_xlim(-limit, limit)
            ax.set_ylim(-limit, limit)
            ax.set_xlabel("PC 1")
            ax.set_ylabel("PC 2")
        _save(fig, path)
        return (f"One latent draw per test point (at most {PROJECTION_POINTS}) from each method's posterior (seed "
                f"{runs[0]['seed']}): z ~ q(z|x) with an encoder, the last state of a batched-HMC chain on p(z|x) "
                "after the compare's report_hmc warm-up without one; projected on its two leading principal directions (through the origin, so the "
                "prior N(0, I) projects to N(0, I₂)); circles are the prior's 1, 2 and 3 standard-deviation contours; "
                "colours are digit classes.")

    def fig_samples(self, path: Path) -> str:
        runs = self._first_seed_runs()
        columns = 10
        panels: list[tuple[str, torch.Tensor]] = []
        side = 0
        for record in runs:
            model, x, _ = self._model_and_data(record)
            side = int(round(math.sqrt(model.config.data_dim)))
            if side * side != model.config.data_dim:
                raise _Skip(f"data of dimension {model.config.data_dim} are not square images")
            if not panels:
                panels.append(("test data", x[:columns]))
            generator = torch.Generator().manual_seed(record["seed"])
            _, samples = model.sample(columns, generator=generator)
            panels.append((f"{_label(record)}: samples", samples))
            if model.has_encoder:
                with torch.no_grad():
                    loc, _ = model.encode(x[:columns])
                    out = model.observation_mean(x[:columns], loc)
                panels.append((f"{_label(record)}: reconstruction", out))
        fig = Figure(figsize=(columns * 0.75 + 1.6, 0.8 * len(panels) + 0.2))
        for r, (name, images) in enumerate(panels):
            for c in range(min(columns, images.shape[0])):
                ax = fig.add_subplot(len(panels), columns, r * columns + c + 1)
                ax.imshow(images[c].detach().double().reshape(side, side).numpy(), cmap="gray_r", vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                if c == 0:
                    ax.set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
        fig.subplots_adjust(left=0.2, right=0.99, top=0.99, bottom=0.01, wspace=0.05, hspace=0.08)
        fig.savefig(path, dpi=110)
        return ("Top row: test images (fixed binarisation). Per method (seed "
                f"{runs[0]['seed']}): decoder means of samples z ~ p(z), and the decoder mean at the encoder mean "
                "for the test images above (reconstruction); hmc has no encoder, so samples only.")

    def fig_hmc(self, path: Path) -> str:
        """Trace plots of batched HMC on p(z|x) for a few test points, and the acceptance of HMC moves."""
        runs = self._first_seed_runs()
        record = next((r for r in runs if r["method"] == "hmc"), None) or next((r for r in runs if r["method"] == "vi"),
                                                                                runs[0])
        model, x, _ = self._model_and_data(record)
        config = _hmc_config(record, chains=1)
        result = sample_posterior(model, x[:4], config, torch.Generator().manual_seed(record["seed"]))
        summary = result.diagnostics.summary()
        fig = Figure(figsize=(10, 3.6))
        ax = fig.add_subplot(1, 2, 1)
        draws = result.samples[:, 0, :, 0].detach().double().cpu().numpy()          # [S, 4]: z_1 of 4 points
        for i in range(draws.shape[1]):
            ax.plot(draws[:, i], lw=0.8, label=f"test point {i}")
        ax.set_xlabel("HMC iteration after warm-up")
        ax.set_ylabel("z₁")
        ax.set_title(f"{_label(record)} decoder: HMC on p(z|x); acceptance {summary['acceptance_rate']:.2f}, "
                     f"step {summary['step_size_mean']:.2g}", fontsize=8)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        right = fig.add_subplot(1, 2, 2)
        accept = [(_label(r), r["diagnostics"].get("ais", {}).get("acceptance_rate")) for r in self.runs]
        accept = [(label, a) for label, a in accept if a is not None]
        if accept:
            labels = list(dict.fromkeys(label for label, _ in accept))
            for i, label in enumerate(labels):
                values = [a for l, a in accept if l == label]
                right.plot([i] * len(values), values, "o", color=_color(label, i))
            right.set_xticks(range(len(labels)), labels)
            right.axhline(0.65, color="k", ls="--", lw=0.8, label="AIS target 0.65")
            right.set_ylim(0, 1)
            right.set_ylabel("mean acceptance of AIS's HMC moves")
            right.set_title("AIS transitions, per run", fontsize=9)
            right.legend(fontsize=7)
        else:
            right.text(0.5, 0.5, "no AIS diagnostics in the records", ha="center", va="center")
            right.set_axis_off()
        _save(fig, path)
        return (f"Left: z₁ of four test points under batched HMC on p(z|x) for the {_label(record)} decoder (seed "
                f"{record['seed']}; {config.num_warmup} warm-up iterations, {config.num_leapfrog} leapfrog steps; "
                f"{summary.get('divergences', 0)} divergences). Right: mean acceptance rate of the HMC transitions "
                "inside AIS for every run, against AIS's adaptation target.")

    # ------------------------------------------------------------------ the document
    def inference_table(self) -> str:
        """Mean ± SE over seeds of each ``vi`` model's inference-comparison metrics, one block per guide family."""
        rows = []
        spec: list[tuple[str, str, str]] = []
        for label in dict.fromkeys(_label(r) for r in self.of_kind("gaps")):
            families = {r["diagnostics"].get("local_vi", {}).get("q*", "per-datapoint Gaussian")
                        for r in self.of_kind("gaps") if _label(r) == label}
            qstar = "/".join(sorted(families))
            spec += [("gaps", f"{label}|log_px", f"{label}: log p(x) (reference)"),
                     ("gaps", f"{label}|elbo_q", f"{label}: ELBO[q] (amortised guide)"),
                     ("gaps", f"{label}|elbo_qstar", f"{label}: ELBO[q*] ({qstar})"),
                     ("gaps", f"{label}|inference_gap", f"{label}: inference gap log p(x) − ELBO[q]"),
                     ("gaps", f"{label}|approximation_gap", f"{label}: approximation gap log p(x) − ELBO[q*]"),
                     ("gaps", f"{label}|amortisation_gap", f"{label}: amortisation gap ELBO[q*] − ELBO[q]")]
        bounds = self.of_kind("bounds")
        for label in dict.fromkeys(_label(r) for r in bounds):
            spec += [("bounds", f"{label}|iwae@{k}", f"{label}: IWAE_{k}")
                     for k in _series_ks([r for r in bounds if _label(r) == label], "iwae")]
        for label in dict.fromkeys(_label(r) for r in self.of_kind("aggregate")):
            spec += [("aggregate", f"{label}|average_kl", f"{label}: E KL(q(z\\|x)‖p(z))"),
                     ("aggregate", f"{label}|mutual_information", f"{label}: I(x; z) under q"),
                     ("aggregate", f"{label}|marginal_kl", f"{label}: KL(q(z)‖p(z))"),
                     ("aggregate", f"{label}|log_n", f"{label}: log N (bound on I)")]
        for kind, metric, text in spec:
            records = self.of_kind(kind)
            if "|" in metric:
                label, metric = metric.split("|")
                records = [r for r in records if _label(r) == label]
            if "@" in metric:
                name, k = metric.split("@")
                values = [_series(r, name, int(k)) for r in records]
            else:
                values = [r["metrics"].get(metric) for r in records]
            mean, se = _mean_se(values)
            if math.isnan(mean):
                continue
            rows.append({"quantity": text, "nats": f"{mean:.3f}" + ("" if math.isnan(se) else f" ± {se:.3f}"),
                         "seeds": len([v for v in values if v is not None])})
        if not rows:
            return "_No inference-comparison records (the `vi` method was not run)._\n"
        return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True) + "\n"

    def variance_table(self) -> str:
        records = self.of_kind("variance")
        if not records:
            return ""
        ks = _series_ks(records, "bound_std")
        rows = []
        for k in ks:
            row = {"K": k}
            for metric, name in (("bound_std", "std of bound (nats)"), ("snr_encoder", "SNR encoder (IWAE)"),
                                 ("snr_encoder_dreg", "SNR encoder (DReG)"), ("snr_decoder", "SNR decoder")):
                mean, se = _mean_se([_series(r, metric, k) for r in records])
                row[name] = f"{mean:.3g}" + ("" if math.isnan(se) else f" ± {se:.2g}")
            rows.append(row)
        return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True) + "\n"

    def write(self, out: Path) -> list[str]:
        """Write ``report.md``, ``table.{md,tex,csv}`` and ``figures/*.png`` into ``out``; return figure notes."""
        figures_dir = out / FIGURE_DIR
        figures_dir.mkdir()
        figures: list[tuple[str, str, Callable[[Path], str]]] = [
            ("loglik.png", "Log-likelihood per method", self.fig_loglik),
            ("certification.png", "AIS certified by BDMC", self.fig_certification),
            ("iwae_k.png", "IWAE_K against K", self.fig_iwae_k),
            ("loglik_vs_time.png", "Log-likelihood against wall-clock", self.fig_loglik_vs_time),
            ("gaps.png", "Approximation and amortisation gaps", self.fig_gaps),
            ("variance.png", "Variance of bounds and gradients", self.fig_variance),
            ("aggregate_posterior.png", "Aggregate posterior against the prior", self.fig_aggregate),
            ("samples.png", "Samples and reconstructions", self.fig_samples),
            ("hmc.png", "HMC traces and acceptance", self.fig_hmc),
        ]
        sections, skipped = [], []
        for name, title, draw in figures:
            try:
                caption = draw(figures_dir / name)
                sections.append(f"### {title}\n\n![{title}]({FIGURE_DIR}/{name})\n\n{caption}\n")
            except (_Skip, VaebenchError) as exc:
                sections.append(f"### {title}\n\n_Not drawn: {exc}._\n")
                skipped.append(f"{name}: {exc}")
        for fmt, suffix in (("markdown", "md"), ("latex", "tex"), ("csv", "csv")):
            (out / f"table.{suffix}").write_text(format_table(self.records, fmt))
        (out / REPORT_FILE).write_text(self.markdown(sections))
        return skipped

    def markdown(self, sections: Sequence[str]) -> str:
        first = self.records[0]
        prov = first["provenance"]
        compare = first["config"]["compare"]
        commits = sorted({r["provenance"]["git_commit"] for r in self.records})
        settings = ", ".join(f"{k}={v}" for k, v in compare.items() if k in (
            "preset", "dataset", "methods", "iwae_ks", "seeds", "latent_dim", "hidden", "activation", "epochs",
            "batch_size", "lr", "lr_schedule", "is_k", "test_subset", "train_subset"))
        unavailable = unavailable_lines(self.records)
        lines = [
            "# vaebench comparison report", "",
            f"Generated from `{self.results_dir / 'records.jsonl'}` ({len(self.records)} records). "
            "Every number below is computed from those records.", "",
            f"- settings: {settings}",
            f"- versions: {', '.join(f'{k} {v}' for k, v in prov['versions'].items())}",
            f"- device: {prov['device']}",
            f"- git commit(s): {', '.join(commits)}",
            f"- command: `{prov['command']}`",
        ]
        if unavailable:
            lines += ["", "**Unavailable in this run** (no number stands in for these):", ""]
            lines += [f"- {line.removeprefix('unavailable: ')}" for line in unavailable]
        lines += ["", "## Comparison", "", format_table(self.records, "markdown"),
                  "## Inference on the vi-trained decoder", "", self.inference_table(), self.variance_table(),
                  "## Figures", ""]
        lines += list(sections)
        return "\n".join(lines) + "\n"


class _Skip(Exception):
    """A figure cannot be drawn from these records; the message says why."""


def write_report(results_dir: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False,
                 threads: int | None = 1) -> list[str]:
    """Build the report of ``results_dir`` into directory ``out`` (atomically); return the skipped figures.

    Models are loaded on the CPU and run with ``threads`` torch threads (``None``: torch's default;
    one is fastest for small networks on a busy machine).

    Raises
    ------
    ResultsError
        Missing or corrupt results (see :func:`vaebench.results.read_records`).
    RunDirError
        ``out`` exists and is not empty (without ``overwrite``), or its parent is missing.
    """
    report = Report(results_dir)
    with staged_directory(out, overwrite) as staging, torch_threads(threads):
        return report.write(staging)
