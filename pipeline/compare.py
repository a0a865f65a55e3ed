"""rsp compare: the weights and topology of several runs side by side (a dense run and its pruned versions).

Reads train and structure folders (any stage folder with a model.safetensors) through artifacts.py and
writes, into one new folder, report.md + compare.json + PNGs, sealed by a manifest.json (stage "compare").
Figures, per run, per conv/linear layer and over all of them:

  density            non-zero weights / weights (conv and linear weights; biases and BatchNorm excluded)
  moments            of the non-zero weights, in float64: mean, std (population), skewness (third standardised
                     moment), excess kurtosis (fourth standardised moment - 3; 0 for a normal), mean |w|
  histograms         of the non-zero weights, bins symmetric about 0 and shared by the runs (weights_hist.png)
  degrees            a layer is a bipartite graph from its input units to its output units. Units are channels
                     (conv) or features (linear; after a flatten each input feature is one unit). Two degrees:
                       weights:  in-degree of an output unit = its non-zero (in, kh, kw) entries (fan-in in
                                 connections); out-degree of an input unit = its non-zero (out, kh, kw) entries
                       channels: in-degree = input channels joined to it by a kernel with any non-zero;
                                 out-degree = output channels it feeds through such a kernel
                     (equal for linear layers). Per layer: the distribution ([degree, units] pairs), mean, std,
                     min, median, max and the largest possible degree; over all layers: the same figures of
                     degree / largest possible degree, pooled over all units.
  zero filters       output units whose weights are all zero (count, share); over all layers: summed counts
                     over summed units
  zero input units   input channels/features no output reads (all-zero slice)
  mask overlap       Jaccard |A & B| / |A | B| of the non-zero masks of every pair of runs of the same
                     architecture (same model and layer shapes, channels in training order), per layer and
                     overall (summed intersections over summed unions), next to the value expected of masks
                     drawn at random with the same per-layer counts. Other pairs are skipped, with the reason.

A structure folder whose regroup step ran has its channels permuted (the function is the same, the positions
are not), and a shrunk one has other shapes: both are compared on everything except the overlap.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .artifacts import (MANIFEST, ArtifactError, atomic_write_text, load_complete_model, lock_folder, rsp_bookkeeping,
                        sha256_file, write_json, write_manifest)
from .sparse import sparsifiable_layers

STAGE = "compare"


class CompareError(ArtifactError):
    """Bad input for rsp compare: one line, exit code 2."""


@dataclass
class CompareOptions:
    bins: int = 60  # weight histogram bins (degree histograms: one bin per degree up to this many)
    labels: list | None = None  # names of the runs in the report (default: their folder names)


@dataclass
class _Run:
    path: Path
    label: str
    manifest: dict
    weights: dict  # layer name -> float32 weight (cpu)
    arch: tuple  # (model name, ((layer, shape), ...))
    permuted: bool  # channels not in training order (structure's regroup ran)


# --- figures of one layer -------------------------------------------------------------------------


def moments(values: torch.Tensor) -> dict:
    """Mean, std, skewness, excess kurtosis and mean |w| of a 1-d tensor (float64; None where undefined)."""
    x = values.detach().to(torch.float64).reshape(-1)
    if x.numel() == 0:
        return {"mean": None, "std": None, "skewness": None, "excess_kurtosis": None, "mean_abs": None}
    mean = x.mean()
    c = x - mean
    var = (c * c).mean()
    std = var.sqrt()
    out = {"mean": mean.item(), "std": std.item(), "skewness": None, "excess_kurtosis": None,
           "mean_abs": x.abs().mean().item()}
    if var.item() > 0:
        out["skewness"] = ((c ** 3).mean() / var ** 1.5).item()
        out["excess_kurtosis"] = ((c ** 4).mean() / var ** 2 - 3.0).item()
    return out


def degree_summary(degrees: torch.Tensor, max_possible: int) -> dict:
    d = degrees.to(torch.int64).reshape(-1)
    values, counts = torch.unique(d, return_counts=True)
    f = d.to(torch.float64)
    return {"max_possible": int(max_possible), "units": int(d.numel()), "mean": f.mean().item(),
            "std": f.std(unbiased=False).item(), "min": int(d.min()), "median": float(np.median(d.numpy())),
            "max": int(d.max()), "distribution": [[int(v), int(c)] for v, c in zip(values, counts)]}


def _unit_view(w: torch.Tensor) -> torch.Tensor:
    """The non-zero mask as (out, in, kh*kw): a linear layer is a 1x1 kernel."""
    nz = w != 0
    return nz.reshape(w.shape[0], w.shape[1], -1)


def layer_figures(w: torch.Tensor) -> dict:
    nz3 = _unit_view(w)
    out_units, in_units, k = nz3.shape
    nonzero = int(nz3.sum())
    kernels = nz3.any(2)  # (out, in): a channel-level edge
    in_w, out_w = nz3.sum((1, 2)), nz3.sum((0, 2))
    zero_filters, zero_inputs = int((in_w == 0).sum()), int((out_w == 0).sum())
    return {
        "shape": list(w.shape), "numel": w.numel(), "nonzero": nonzero, "density": nonzero / w.numel(),
        "moments": moments(w[w != 0]),
        "in_degree": {"weights": degree_summary(in_w, in_units * k), "channels": degree_summary(kernels.sum(1), in_units)},
        "out_degree": {"weights": degree_summary(out_w, out_units * k),
                       "channels": degree_summary(kernels.sum(0), out_units)},
        "zero_filters": {"count": zero_filters, "units": out_units, "share": zero_filters / out_units},
        "zero_input_channels": {"count": zero_inputs, "units": in_units, "share": zero_inputs / in_units},
    }


def _pooled_share(run: _Run, direction: str, kind: str) -> dict:
    """degree / largest possible degree over every unit of every layer."""
    shares = []
    for w in run.weights.values():
        nz3 = _unit_view(w)
        o, i, k = nz3.shape
        if kind == "weights":
            deg, top = (nz3.sum((1, 2)), i * k) if direction == "in" else (nz3.sum((0, 2)), o * k)
        else:
            deg, top = (nz3.any(2).sum(1), i) if direction == "in" else (nz3.any(2).sum(0), o)
        shares.append(deg.to(torch.float64) / top)
    s = torch.cat(shares)
    return {"units": int(s.numel()), "mean": s.mean().item(), "std": s.std(unbiased=False).item(),
            "min": s.min().item(), "median": float(np.median(s.numpy())), "max": s.max().item()}


def run_figures(run: _Run) -> dict:
    layers = {n: layer_figures(w) for n, w in run.weights.items()}
    numel = sum(v["numel"] for v in layers.values())
    nonzero = sum(v["nonzero"] for v in layers.values())
    pooled = torch.cat([w[w != 0].reshape(-1) for w in run.weights.values()])
    overall = {"layers": len(layers), "numel": numel, "nonzero": nonzero, "density": nonzero / numel,
               "moments": moments(pooled)}
    for key in ("zero_filters", "zero_input_channels"):
        count, units = sum(v[key]["count"] for v in layers.values()), sum(v[key]["units"] for v in layers.values())
        overall[key] = {"count": count, "units": units, "share": count / units}
    overall["in_degree_share"] = {k: _pooled_share(run, "in", k) for k in ("weights", "channels")}
    overall["out_degree_share"] = {k: _pooled_share(run, "out", k) for k in ("weights", "channels")}
    return {"overall": overall, "layers": layers}


# --- overlap ----------------------------------------------------------------------------------------


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def overlap(a: dict, b: dict) -> dict:
    """Jaccard of the non-zero masks of two runs with the same layers and shapes, per layer and overall."""
    layers, inter_sum, union_sum, e_inter_sum, e_union_sum = {}, 0, 0, 0.0, 0.0
    for name, wa in a.items():
        ma, mb = wa != 0, b[name] != 0
        inter, union = int((ma & mb).sum()), int((ma | mb).sum())
        n, ka, kb = ma.numel(), int(ma.sum()), int(mb.sum())
        e_inter = ka * kb / n
        e_union = ka + kb - e_inter
        layers[name] = {"intersection": inter, "union": union, "jaccard": _ratio(inter, union),
                        "chance": _ratio(e_inter, e_union)}
        inter_sum, union_sum = inter_sum + inter, union_sum + union
        e_inter_sum, e_union_sum = e_inter_sum + e_inter, e_union_sum + e_union
    overall = {"intersection": inter_sum, "union": union_sum, "jaccard": _ratio(inter_sum, union_sum),
               "chance": _ratio(e_inter_sum, e_union_sum)}
    return {"overall": overall, "layers": layers}


def _why_not_comparable(a: _Run, b: _Run) -> str | None:
    if a.arch != b.arch:
        (na, la), (nb, lb) = a.arch, b.arch
        if na != nb:
            return f"different models ({na} vs {nb})"
        if [n for n, _ in la] != [n for n, _ in lb]:
            return f"different layers ({len(la)} vs {len(lb)})"
        n, sa, sb = next((n, sa, sb) for (n, sa), (_, sb) in zip(la, lb) if sa != sb)
        return (f"different layer shapes (first: {n} {'x'.join(map(str, sa))} vs {'x'.join(map(str, sb))}"
                + ("; a shrunk structure folder" if any(r.manifest.get("stage") == "structure" for r in (a, b)) else "")
                + ")")
    permuted = [r.label for r in (a, b) if r.permuted]
    if permuted:
        return (f"channels of {' and '.join(permuted)} were permuted by rsp structure's regroup step, so equal "
                "positions are not the same connections")
    return None


# --- the stage --------------------------------------------------------------------------------------


def _labels(paths: list[Path], given: list | None) -> list[str]:
    if given:
        if len(given) != len(paths):
            raise CompareError(f"--label was given {len(given)} times for {len(paths)} runs: give one per run, or none")
        if len(set(given)) != len(given):
            raise CompareError("--label names must differ")
        return [str(g) for g in given]
    labels = [p.name or str(p) for p in paths]
    # runs/a/train and runs/b/train: a/train and b/train; still equal: numbered
    labels = ["/".join(p.resolve().parts[-2:]) if labels.count(lab) > 1 else lab for p, lab in zip(paths, labels)]
    return [lab if labels.count(lab) == 1 else f"{lab}#{i + 1}" for i, lab in enumerate(labels)]


def _open(path: Path, label: str) -> _Run:
    if not path.exists():
        raise CompareError(f"{path} does not exist")
    manifest, model = load_complete_model(path)
    layers = sparsifiable_layers(model)
    if not layers:
        raise CompareError(f"{path}: model {manifest['model']['name']} has no conv or linear layer")
    weights = {n: m.weight.detach().to(torch.float32).cpu() for n, m in layers}
    arch = (manifest["model"]["name"], tuple((n, tuple(w.shape)) for n, w in weights.items()))
    structure = manifest.get("structure") if isinstance(manifest.get("structure"), dict) else {}
    permuted = manifest.get("stage") == "structure" and bool(structure.get("regroup", True))
    return _Run(path, label, manifest, weights, arch, permuted)


def _check_output(output: Path, sources: list[Path]) -> None:
    for s in sources:
        if output.resolve() == s.resolve():
            raise CompareError(f"--output {output} is one of the runs: choose a new folder")
    if output.exists() and not output.is_dir():
        raise CompareError(f"--output {output} exists and is not a folder")
    if output.is_dir():
        held = sorted(p.name for p in output.iterdir() if not rsp_bookkeeping(p.name))
        if held:
            raise CompareError(f"--output {output} is not empty (holds {held[0]}"
                               + (f" and {len(held) - 1} more" if len(held) > 1 else "") + "): choose a new or empty folder")


def run(sources: list, output: str | Path, opts: CompareOptions | None = None, log=print) -> dict:
    opts = opts or CompareOptions()
    paths = [Path(s) for s in sources]
    output = Path(output)
    if not paths:
        raise CompareError("rsp compare needs at least one run folder (a train or structure folder)")
    if opts.bins < 2:
        raise CompareError(f"--bins must be >= 2, got {opts.bins}")
    seen = {}
    for p in paths:
        key = p.resolve()
        if key in seen:
            raise CompareError(f"{p} is given twice (as {seen[key]} too)")
        seen[key] = p
    _check_output(output, paths)
    labels = _labels(paths, opts.labels)
    runs = [_open(p, lab) for p, lab in zip(paths, labels)]
    with lock_folder(output, new=True):  # the one writer of output until the manifest is sealed
        _check_output(output, paths)  # again under the lock: another process may have written there meanwhile
        return _compare(runs, labels, output, opts, log)


def _compare(runs: list[_Run], labels: list[str], output: Path, opts: CompareOptions, log) -> dict:
    t0 = time.perf_counter()

    figures = {r.label: run_figures(r) for r in runs}
    for r in runs:
        ov = figures[r.label]["overall"]
        m = ov["moments"]
        log(f"{r.label:<16} density {ov['density']:.4f}  std {_f(m['std'])}  kurtosis {_f(m['excess_kurtosis'])}  "
            f"zero filters {ov['zero_filters']['count']}  zero inputs {ov['zero_input_channels']['count']}")

    pairs, matrix = [], [[None] * len(runs) for _ in runs]
    for i, a in enumerate(runs):
        if figures[a.label]["overall"]["nonzero"]:
            matrix[i][i] = 1.0
        for j in range(i + 1, len(runs)):
            b = runs[j]
            why = _why_not_comparable(a, b)
            entry = {"a": a.label, "b": b.label, "computed": why is None, "skipped_because": why}
            if why is None:
                entry.update(overlap(a.weights, b.weights))
                matrix[i][j] = matrix[j][i] = entry["overall"]["jaccard"]
                log(f"jaccard {a.label} / {b.label}: {_f(entry['overall']['jaccard'])} "
                    f"(chance {_f(entry['overall']['chance'])})")
            else:
                log(f"overlap {a.label} / {b.label} skipped: {why}")
            pairs.append(entry)

    pictures, plots_note = _plots(output, runs, figures, pairs, matrix, opts)
    result = {
        "rsp_version": __version__,
        "runs": [{"label": r.label, "path": str(r.path), "stage": r.manifest.get("stage"), "model": r.manifest["model"],
                  "method": r.manifest.get("method"), "objective": r.manifest.get("objective"),
                  "target_sparsity": r.manifest.get("target_sparsity"), "metrics": _metrics(r.manifest),
                  "manifest_sha256": sha256_file(r.path / MANIFEST), "channels_permuted": r.permuted,
                  **figures[r.label]} for r in runs],
        "overlap": {"labels": labels, "jaccard_matrix": matrix, "pairs": pairs},
        "figures": pictures,
        "definitions": _DEFINITIONS,
        "time_s": round(time.perf_counter() - t0, 3),
    }
    write_json(output / "compare.json", result)
    atomic_write_text(output / "report.md", _markdown(result, runs, pictures, plots_note))
    files = ["compare.json", "report.md"] + pictures
    manifest = {"stage": STAGE, "status": "complete", "rsp_version": __version__,
                "runs": [{"label": r.label, "path": str(r.path), "stage": r.manifest.get("stage"),
                          "manifest_sha256": result["runs"][k]["manifest_sha256"]} for k, r in enumerate(runs)]}
    sealed = write_manifest(output, manifest, files)
    return {**sealed, "result": result}


_DEFINITIONS = {
    "density": "non-zero conv/linear weights / all conv/linear weights (biases excluded)",
    "moments": "of the non-zero weights, float64: population std, skewness = m3 / m2^1.5, "
               "excess_kurtosis = m4 / m2^2 - 3 (0 for a normal)",
    "units": "output and input channels of a conv; output and input features of a linear",
    "degree.weights": "in: non-zero (in, kh, kw) entries of an output unit; out: non-zero (out, kh, kw) entries of an "
                      "input unit",
    "degree.channels": "in: input channels joined to an output channel by a kernel with any non-zero; out: output "
                       "channels an input channel feeds",
    "degree_share": "overall: degree / largest possible degree of its layer, pooled over every unit of every layer",
    "zero_filters": "output units with all weights zero; overall: summed counts / summed units",
    "zero_input_channels": "input units no output reads (all-zero slice); overall: summed counts / summed units",
    "jaccard": "|A & B| / |A | B| of the non-zero masks; overall: summed intersections / summed unions; null when "
               "both masks are empty",
    "chance": "the same ratio of expectations for masks drawn uniformly at random with each layer's non-zero counts",
}


def _metrics(manifest: dict) -> dict:
    m = manifest.get("metrics") or {}
    return {k: m.get(k) for k in ("clean_acc", "robust_acc", "split", "attack")}


def _f(v, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _stem(name: str) -> str:
    return name.replace(".", "_")


def _plots(output: Path, runs: list[_Run], figures: dict, pairs: list, matrix: list, opts: CompareOptions):
    from .report_plots import _pyplot, histogram_grid, layer_lines, pair_matrix

    if _pyplot() is None:
        return [], "matplotlib is not installed here: no PNGs (pip install matplotlib)"
    layer_order = list(dict.fromkeys(n for r in runs for n in r.weights))
    colors = {r.label: f"C{i % 10}" for i, r in enumerate(runs)}  # one colour per run in every figure
    pictures = []

    panels = []
    for name in layer_order + ["all layers"]:
        have = [r for r in runs if name in r.weights or name == "all layers"]
        values = {r.label: (torch.cat([w[w != 0] for w in r.weights.values()]) if name == "all layers"
                            else r.weights[name][r.weights[name] != 0]) for r in have}
        top = max((v.abs().max().item() for v in values.values() if v.numel()), default=1.0)
        edges = np.linspace(-top, top, opts.bins + 1)
        panels.append((name, edges.tolist(), {lab: np.histogram(v.numpy(), edges)[0].tolist()
                                              for lab, v in values.items()}))
    if histogram_grid(output / "weights_hist.png", panels, "weight (non-zeros only)", "share of the non-zeros",
                      "Non-zero weights per layer (each run normalised to its own count)", colors):
        pictures.append("weights_hist.png")

    for direction in ("in", "out"):
        for kind in ("weights", "channels"):
            panels = []
            for name in layer_order:
                have = [r for r in runs if name in r.weights]
                # a fully dense layer has every unit at the largest degree: drawn, it would squash a sparse
                # run's distribution into the first bin, so it is left out (its figures are in the tables)
                have = [r for r in have if figures[r.label]["layers"][name]["density"] < 1.0] or have
                stats = {r.label: figures[r.label]["layers"][name][f"{direction}_degree"][kind] for r in have}
                top = max(s["max"] for s in stats.values())
                width = max(1, -(-(top + 1) // opts.bins))  # whole degrees per bin
                edges = np.arange(0, top + width + 1, width) - 0.5
                hist = {}
                for lab, s in stats.items():
                    degrees = np.repeat([d for d, _ in s["distribution"]], [c for _, c in s["distribution"]])
                    hist[lab] = np.histogram(degrees, edges)[0].tolist()
                unit = "output unit" if direction == "in" else "input unit"
                panels.append((f"{name} ({direction}-degree of an {unit})", edges.tolist(), hist))
            fname = f"{direction}_degree_{kind}.png"
            what = "non-zero weights" if kind == "weights" else "connected channels"
            if histogram_grid(output / fname, panels, f"{direction}-degree ({what})", "share of the units",
                              f"{direction.capitalize()}-degree distributions ({what}) per layer; runs dense in a "
                              "layer are not drawn there", colors):
                pictures.append(fname)

    labels = [r.label for r in runs]
    if pair_matrix(output / "jaccard.png", labels, matrix, "Jaccard of the non-zero masks, all layers (n/a: skipped)"):
        pictures.append("jaccard.png")
    density = {r.label: [figures[r.label]["layers"][n]["density"] if n in r.weights else None for n in layer_order]
               for r in runs}
    if layer_lines(output / "density.png", layer_order, density, "density (non-zero share)", "Density per layer"):
        pictures.append("density.png")
    dense = {r.label for r in runs if figures[r.label]["overall"]["density"] == 1.0}
    computed = [p for p in pairs if p["computed"] and not {p["a"], p["b"]} & dense]  # with a dense run: its density
    if computed:
        series = {f"{p['a']} / {p['b']}": [p["layers"].get(n, {}).get("jaccard") for n in layer_order] for p in computed}
        if layer_lines(output / "jaccard_layers.png", layer_order, series, "Jaccard", "Mask overlap per layer"):
            pictures.append("jaccard_layers.png")
    return pictures, None


def _markdown(result: dict, runs: list[_Run], pictures: list[str], plots_note: str | None) -> str:
    R = result["runs"]
    lines = ["# rsp compare report", "",
             f"{len(R)} run(s); weights read from each folder's model.safetensors (sha256 checked). "
             "Definitions at the end.", "",
             "| run | folder | stage | model | method | objective | target sparsity | density | clean | robust |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in R:
        m = r["metrics"]
        lines.append(f"| {r['label']} | `{r['path']}` | {r['stage']} | {r['model']['name']} | {r['method']} | "
                     f"{r['objective']} | {r['target_sparsity']} | {r['overall']['density']:.4f} | "
                     f"{_f(m.get('clean_acc'))} | {_f(m.get('robust_acc'))} |")
    lines += ["", "## All layers", "",
              "| run | non-zero / weights | density | mean | std | skewness | excess kurtosis | mean abs | zero filters | "
              "zero input units | in-degree share (mean, min-max) | out-degree share (mean, min-max) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in R:
        o, m = r["overall"], r["overall"]["moments"]
        ind, outd = o["in_degree_share"]["weights"], o["out_degree_share"]["weights"]
        lines.append(f"| {r['label']} | {o['nonzero']} / {o['numel']} | {o['density']:.4f} | {_f(m['mean'], 5)} | "
                     f"{_f(m['std'], 5)} | {_f(m['skewness'], 3)} | {_f(m['excess_kurtosis'], 3)} | {_f(m['mean_abs'], 5)} | "
                     f"{o['zero_filters']['count']} / {o['zero_filters']['units']} | "
                     f"{o['zero_input_channels']['count']} / {o['zero_input_channels']['units']} | "
                     f"{ind['mean']:.3f} ({ind['min']:.3f}-{ind['max']:.3f}) | "
                     f"{outd['mean']:.3f} ({outd['min']:.3f}-{outd['max']:.3f}) |")

    ov = result["overlap"]
    labels = ov["labels"]
    lines += ["", "## Mask overlap (Jaccard of the non-zero masks, all layers)", ""]
    if len(labels) < 2:
        lines += ["One run: nothing to overlap.", ""]
    else:
        lines += ["| | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        for lab, row in zip(labels, ov["jaccard_matrix"]):
            lines.append(f"| {lab} | " + " | ".join("n/a" if v is None else f"{v:.4f}" for v in row) + " |")
        lines += ["", "| pair | intersection | union | Jaccard | at random (same counts) |", "|---|---|---|---|---|"]
        for p in ov["pairs"]:
            if p["computed"]:
                o = p["overall"]
                lines.append(f"| {p['a']} / {p['b']} | {o['intersection']} | {o['union']} | {_f(o['jaccard'])} | "
                             f"{_f(o['chance'])} |")
        dense = [r["label"] for r in R if r["overall"]["density"] == 1.0]
        if dense:
            lines += ["", f"{', '.join(dense)} {'is' if len(dense) == 1 else 'are'} fully dense: the Jaccard of an "
                      "all-ones mask with another run is that run's density (and equals the random baseline); "
                      "for a dense run the informative figures are the moments, histograms and degrees."]
        skipped = [p for p in ov["pairs"] if not p["computed"]]
        if skipped:
            lines += ["", "Skipped (overlap needs the same architecture, channels in training order):", ""]
            lines += [f"- {p['a']} / {p['b']}: {p['skipped_because']}" for p in skipped]
        computed = [p for p in ov["pairs"] if p["computed"]]
        if computed:
            names = list(computed[0]["layers"])
            lines += ["", "Per layer:", "", "| layer | " + " | ".join(f"{p['a']} / {p['b']}" for p in computed) + " |",
                      "|---|" + "---|" * len(computed)]
            for n in names:
                lines.append(f"| {n} | " + " | ".join(
                    f"{_f(p['layers'][n]['jaccard'])} (random {_f(p['layers'][n]['chance'])})" for p in computed) + " |")
    lines += [""]

    lines += ["## Per layer", "",
              "Degrees count non-zero weights (in: of an output unit, out: of an input unit); "
              "`channels` counts connected channels. mean (min-max) of max possible.", ""]
    order = list(dict.fromkeys(n for r in R for n in r["layers"]))
    for n in order:
        lines += [f"### {n}", "",
                  "| run | shape | density | mean | std | skewness | excess kurtosis | mean abs | in-degree | "
                  "in-degree (channels) | out-degree | out-degree (channels) | zero filters | zero input units |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in R:
            v = r["layers"].get(n)
            if v is None:
                continue
            m = v["moments"]

            def deg(d):
                return f"{d['mean']:.1f} ({d['min']}-{d['max']}) of {d['max_possible']}"

            lines.append(f"| {r['label']} | {'x'.join(map(str, v['shape']))} | {v['density']:.4f} | {_f(m['mean'], 5)} | "
                         f"{_f(m['std'], 5)} | {_f(m['skewness'], 3)} | {_f(m['excess_kurtosis'], 3)} | "
                         f"{_f(m['mean_abs'], 5)} | {deg(v['in_degree']['weights'])} | {deg(v['in_degree']['channels'])} | "
                         f"{deg(v['out_degree']['weights'])} | {deg(v['out_degree']['channels'])} | "
                         f"{v['zero_filters']['count']} / {v['zero_filters']['units']} | "
                         f"{v['zero_input_channels']['count']} / {v['zero_input_channels']['units']} |")
        lines.append("")

    lines += ["## Figures", ""]
    if plots_note:
        lines += [plots_note, ""]
    captions = {"weights_hist.png": "histograms of the non-zero weights, runs overlaid",
                "in_degree_weights.png": "in-degree distributions (non-zero weights per output unit)",
                "in_degree_channels.png": "in-degree distributions (connected input channels per output channel)",
                "out_degree_weights.png": "out-degree distributions (non-zero weights per input unit)",
                "out_degree_channels.png": "out-degree distributions (connected output channels per input channel)",
                "jaccard.png": "Jaccard matrix of the non-zero masks (all layers)",
                "density.png": "density per layer", "jaccard_layers.png": "Jaccard per layer for each compared pair without a fully dense run"}
    lines += [f"- {captions.get(p, p)}: ![{p}]({p})" for p in pictures]
    lines += ["", "## Definitions", ""] + [f"- **{k}**: {v}" for k, v in result["definitions"].items()]
    return "\n".join(lines) + "\n"
