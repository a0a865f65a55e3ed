"""rsp's evaluation presets against an independent AutoAttack, on the same model and the same images.

    pip download torchattacks --no-deps -d /tmp/ta && pip install --no-deps /tmp/ta/*.whl   # test-only
    python scripts/independent_autoattack.py runs/paper/pgd-at-bcs-0.9-s0/train \
        --data-dir ../shared/data/cifar-10-subset --n-examples 200

For a train, structure or export folder, scores the PyTorch twin (eval mode, inputs in [0, 1]) on the first N
test images with rsp verify's presets (`default`, `autoattack`, optionally `reference`: the same plans and
budgets verify resolves) and with torchattacks (Kim 2020), an implementation written independently of rsp:

- `torchattacks-aa-budgets`: torchattacks' APGD-CE, APGD-T (9 targets), FAB-T (9 targets) and Square (5000
  queries) at the original AutoAttack's budgets (100 iterations), each on what the earlier ones left robust;
- `torchattacks-autoattack`: torchattacks' own `AutoAttack(version="standard")`, which runs its components at
  their 10-iteration defaults (weaker than the original AutoAttack: reported, not the reference figure).

Robust accuracy is clean-correct and still correct on the adversarial image, per example; the last line is one
JSON object with every figure and the images rsp left robust that torchattacks broke. torchattacks is never a
dependency of rsp: this script and its test skip when it is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def _torchattacks_suites(model, eps: float, n_classes: int, seed: int) -> dict:
    import torchattacks as ta

    def budgets():
        return [ta.APGD(model, norm="Linf", eps=eps, steps=100, n_restarts=1, loss="ce", seed=seed),
                ta.APGDT(model, norm="Linf", eps=eps, steps=100, n_restarts=1, n_classes=n_classes, seed=seed),
                ta.FAB(model, norm="Linf", eps=eps, steps=100, n_restarts=1, multi_targeted=True,
                       n_classes=n_classes, seed=seed),
                ta.Square(model, norm="Linf", eps=eps, n_queries=5000, n_restarts=1, seed=seed)]

    return {"torchattacks-aa-budgets": budgets,
            "torchattacks-autoattack": lambda: [ta.AutoAttack(model, norm="Linf", eps=eps, version="standard",
                                                              n_classes=n_classes, seed=seed)]}


@torch.no_grad()
def _correct(model, x, y, batch: int = 256) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch]).argmax(1) == y[i:i + batch] for i in range(0, len(x), batch)])


def _run_suite(model, x, y, attacks) -> tuple[torch.Tensor, dict]:
    """Each attack on the examples the earlier ones left robust (AutoAttack's order); per example robust mask."""
    robust = _correct(model, x, y)
    per = {}
    for atk in attacks:
        idx = torch.nonzero(robust).squeeze(1)
        t0 = time.perf_counter()
        if idx.numel():
            adv = atk(x[idx], y[idx])
            adv = adv.detach()
            assert float((adv - x[idx]).abs().max()) <= atk.eps + 1e-6 and 0 <= float(adv.min()) <= float(adv.max()) <= 1
            robust[idx] = _correct(model, adv, y[idx])
        per[type(atk).__name__] = {"robust_acc": robust.float().mean().item(), "time_s": round(time.perf_counter() - t0, 1)}
    return robust, per


def compare(folder: str | Path, data_dir: str | None, n_examples: int, seed: int = 0, presets=("default", "autoattack"),
            suites=("torchattacks-aa-budgets",), device: str = "cpu", log=print) -> dict:
    from rsp.artifacts import load_model, read_manifest
    from rsp.attacks import ensemble_eval
    from rsp.verify import AUTOATTACK_BUDGETS, VerifyOptions, _eval_data, pgd_step_size, resolve_evaluation

    folder = Path(folder)
    manifest = read_manifest(folder)
    model = load_model(folder, device=device).eval()
    eps = float((manifest.get("attack") or {}).get("eps") or 8 / 255)
    x, y, dataset, n_classes = _eval_data(manifest, VerifyOptions(output=None, data_dir=data_dir, n_examples=n_examples))
    x, y = x.to(device), y.to(device)
    out = {"folder": str(folder), "dataset": dataset, "n_examples": len(y), "eps": eps, "seed": seed,
           "clean_acc": _correct(model, x, y).float().mean().item(), "robust_acc": {}, "per_attack": {}, "time_s": {}}
    masks = {}
    for name in presets:
        plan = resolve_evaluation(VerifyOptions(output=None, preset=name, n_examples=n_examples))
        t0 = time.perf_counter()
        ens = ensemble_eval(model, x, y, attacks=plan["attacks"], eps=eps, steps=plan["steps"], restarts=plan["restarts"],
                            step_size=pgd_step_size(plan, eps), seed=seed, cumulative=plan["cumulative"],
                            **AUTOATTACK_BUDGETS)
        masks[f"rsp-{name}"] = ens["robust"].cpu()
        out["per_attack"][f"rsp-{name}"] = {a: v["robust_acc"] for a, v in ens["per_attack"].items()}
        out["time_s"][f"rsp-{name}"] = round(time.perf_counter() - t0, 1)
    built = _torchattacks_suites(model, eps, n_classes, seed)
    for name in suites:
        t0 = time.perf_counter()
        masks[name], out["per_attack"][name] = _run_suite(model, x, y, built[name]())
        masks[name] = masks[name].cpu()
        out["time_s"][name] = round(time.perf_counter() - t0, 1)
    for name, m in masks.items():
        out["robust_acc"][name] = m.float().mean().item()
        log(f"{name}: robust {out['robust_acc'][name]:.4f} on {len(y)} images ({out['time_s'][name]} s)")
    # images an rsp preset calls robust that the independent suite broke: what rsp missed
    out["missed_by_rsp"] = {f"{p} vs {s}": torch.nonzero(masks[p] & ~masks[s]).squeeze(1).tolist()
                            for p in masks if p.startswith("rsp-") for s in masks if not s.startswith("rsp-")}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="an rsp train, structure or export folder")
    ap.add_argument("--data-dir")
    ap.add_argument("--n-examples", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", action="append", help="rsp verify presets, repeatable [default: default, autoattack]")
    ap.add_argument("--stock", action="store_true", help="also torchattacks' own AutoAttack (10-iteration components)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    try:
        import torchattacks  # noqa: F401
    except ImportError:
        print("torchattacks is not installed: pip install --no-deps torchattacks (test-only)", file=sys.stderr)
        return 2
    suites = ("torchattacks-aa-budgets",) + (("torchattacks-autoattack",) if args.stock else ())
    out = compare(args.folder, args.data_dir, args.n_examples, args.seed, tuple(args.preset or ("default", "autoattack")),
                  suites, args.device, log=lambda s: print(s, file=sys.stderr))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
