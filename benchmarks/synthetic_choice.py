"""Each model's federated protocol chosen on validation, from ``synthetic_quality.py`` result files.

A protocol setting (the local learning rate, say) that suits one model need not suit another, and
choosing it for all models on the proposed model's validation favours that model. This script reads
result files of ``synthetic_quality.py`` that ran the same family and cohort seeds in one mode with
different ``--set`` overrides (the candidates; the file without overrides is the config's protocol),
and picks, **per model**, the candidate with the highest mean over seeds of its validation score:
the mean of the finite parts of the config's selection metric on the validation patients
(``SCORE``: diagnosis AUC, grade AUC, C-index; the F1 terms are n/a under disclosure control on the
sites' validation splits). It never reads a test value to choose. It then reports the chosen runs'
test values (mean ± sd over seeds), the proposed model's paired margins over each baseline, and,
with ``--reference`` (a result file of the same cohorts in a reference mode, centralized say),
each model's chosen run minus its reference run, seed by seed; the reference can be this script's
own result for another mode, so that both modes are compared at their own chosen protocols.

    C="--family gene-conditioned --candidates gene-conditioned,gene-conditioned_lr3e-3"
    python benchmarks/synthetic_choice.py $C --mode centralized
    python benchmarks/synthetic_choice.py $C --mode federated \\
        --reference synthetic_choice_gene-conditioned_centralized

(candidates name result files ``results/synthetic_quality_<name>_<device>.json``; one candidate can
be several files joined by ``+``, runs of one protocol split by ``--label`` (one file a seed, say),
which must record the same overrides and may not hold the same run twice; the reference is a
result file ``results/<stem>_<device>.json`` of either script). Result:
``results/synthetic_choice_<family>_<mode>_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import quality  # noqa: E402
from synthetic_quality import PROPOSED, attention_summary, paired  # noqa: E402

#: the validation metrics a candidate is chosen on: the finite parts of the selection metric
SCORE = ("diagnosis.auc", "grade.auc", "survival.c_index")


def result_path(stem: str, device: str) -> Path:
    """``results/<stem>_<device>.json``, the name ``quality.write_result`` gives a result."""
    return quality.RESULTS / f"{stem}_{device}.json"


def result_file(name: str, device: str) -> Path:
    """A candidate: ``synthetic_quality.py``'s result ``name`` (its family, tag and label parts)."""
    return result_path(f"synthetic_quality_{name}", device)


def load_candidate(name: str, device: str, family: str) -> dict:
    """The result ``name`` names: one file, or the union of the files ``a+b+...`` names, which ran
    one protocol (the same ``setting.overrides``) split over several invocations.

    Raises ValueError naming the file and what was expected: a missing file, another family,
    other overrides, or a (seed, model, mode) run that two of the files hold.
    """
    parts = []
    for part in name.split("+"):
        path = result_file(part, device)
        if not path.is_file():
            raise ValueError(f"{path}: no such result file (--candidates names "
                             f"results/synthetic_quality_<name>_{device}.json, several joined by '+')")
        res = json.loads(path.read_text())
        if res["setting"]["family"] != family:
            raise ValueError(f"{path}: setting.family is {res['setting']['family']!r}, expected {family!r}")
        parts.append((path, res))
    (first_path, first), files = parts[0], []
    want = first["setting"].get("overrides", [])
    seeds: dict[str, dict[str, dict]] = {}
    for path, res in parts:
        got = res["setting"].get("overrides", [])
        if got != want:
            raise ValueError(f"{path}: setting.overrides is {got}, expected {want} (the overrides of "
                             f"{first_path.name}: one candidate is one protocol)")
        for s, row in res["seeds"].items():
            for v, modes in row.items():
                held = seeds.setdefault(s, {}).setdefault(v, {})
                twice = sorted(set(held) & set(modes))
                if twice:
                    raise ValueError(f"{path}: seed {s}, {v}, {', '.join(twice)} is also in one of "
                                     f"{files}: each run belongs to one file of a candidate")
                held.update(modes)
        files.append(path.name)
    return {**first, "seeds": seeds, "files": files}


def validation_score(rows: list[dict]) -> float:
    """Mean over seeds of the mean of ``SCORE`` on validation at the selected round."""
    per_seed = []
    for row in rows:
        vals = [row["val_values"].get(m) for m in SCORE]
        if any(v is None for v in vals):
            raise ValueError(f"a run without validation {SCORE} at its selected round: {row.get('best_round')}")
        per_seed.append(statistics.fmean(vals))
    return statistics.fmean(per_seed)


def choose(candidates: dict[str, dict], mode: str, seeds: list[str]) -> dict[str, dict]:
    """model -> {"candidate", "overrides", "validation_score", "scores": {candidate: score}} for every
    model that at least one candidate ran on all ``seeds`` in ``mode``; only such candidates compete."""
    models = sorted({v for res in candidates.values() for s in seeds for v in res["seeds"].get(s, {})})
    chosen = {}
    for v in models:
        scores = {}
        for name, res in candidates.items():
            rows = [res["seeds"].get(s, {}).get(v, {}).get(mode) for s in seeds]
            if all(rows):
                scores[name] = validation_score(rows)
        if scores:
            best = max(scores, key=scores.get)
            chosen[v] = {"candidate": best, "overrides": candidates[best]["setting"].get("overrides", []),
                         "validation_score": scores[best], "scores": scores}
    return chosen


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", required=True, help="the family the result files ran (a check, and the output's name)")
    ap.add_argument("--mode", default="federated", help="the mode whose protocol is chosen (default federated)")
    ap.add_argument("--candidates", required=True,
                    help="comma-separated result names: results/synthetic_quality_<name>_<device>.json; "
                    "'a+b' joins the files of one protocol")
    ap.add_argument("--reference", default="", help="the stem of a result file (results/<stem>_<device>.json, "
                    "synthetic_quality_... or synthetic_choice_...) whose --reference-mode runs the chosen ones are compared with")
    ap.add_argument("--reference-mode", default="centralized")
    ap.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    names = args.candidates.split(",")
    candidates = {}
    for name in names:
        try:
            candidates[name] = load_candidate(name, args.device, args.family)
        except ValueError as err:
            ap.error(str(err))
    seeds = sorted(set.intersection(*(set(r["seeds"]) for r in candidates.values())), key=int)
    if not seeds:
        ap.error("the candidates share no cohort seed")
    chosen = choose(candidates, args.mode, seeds)
    if not chosen:
        ap.error(f"no model ran in mode {args.mode!r} on seeds {seeds} in any candidate")
    per_seed = [{v: {args.mode: candidates[c["candidate"]]["seeds"][s][v][args.mode]} for v, c in chosen.items()}
                for s in seeds]
    models = tuple(chosen)
    summary = quality.summarise({v: [s[v][args.mode]["values"] for s in per_seed] for v in models},
                                quality.PAPER_METRICS)
    margins = ({b: paired(per_seed, PROPOSED, b, args.mode) for b in models if b != PROPOSED}
               if PROPOSED in chosen else {})
    gaps = {}
    if args.reference:
        ref_path = result_path(args.reference, args.device)
        if not ref_path.is_file():
            ap.error(f"{ref_path}: no such result file")
        ref = json.loads(ref_path.read_text())
        for v in models:
            refs = [ref["seeds"].get(s, {}).get(v, {}).get(args.reference_mode) for s in seeds]
            if all(refs):
                gaps[v] = quality.differences([s[v][args.mode]["values"] for s in per_seed],
                                              [r["values"] for r in refs], per="per_seed")
    payload = {
        **quality.result_header(f"synthetic_choice_{args.family}_{args.mode}", __file__, argv, t0),
        "setting": {"family": args.family, "mode": args.mode, "seeds": [int(s) for s in seeds],
                    "candidates": {n: {"files": r["files"],
                                       "overrides": r["setting"].get("overrides", [])} for n, r in candidates.items()},
                    "choice": f"per model, the candidate with the highest mean over seeds of mean({', '.join(SCORE)}) "
                              "on validation at each run's selected round; no test value is read to choose",
                    "reference": {"file": result_path(args.reference, args.device).name, "mode": args.reference_mode}
                    if args.reference else None},
        "chosen": chosen, "summary": {args.mode: summary},
        "proposed_minus_baseline": {args.mode: margins},
        "gaps": {f"{args.mode} - {args.reference_mode}": gaps} if gaps else {},
        "attention_auc": attention_summary(per_seed, models, (args.mode,)),
        "seeds": {s: r for s, r in zip(seeds, per_seed)},
    }
    path = quality.write_result(payload, quick=False)
    for v, c in chosen.items():
        print(f"{v}: {c['candidate']} ({' '.join(c['overrides']) or 'the config'}); validation "
              + ", ".join(f"{n} {x * 100:.1f}" for n, x in c["scores"].items()))
    print(quality.markdown_table(summary, quality.PAPER_METRICS, label="model"))
    for b, d in margins.items():
        print(f"  {PROPOSED} - {b}: " + ", ".join(f"{m} {quality.fmt(d[m])}" for m in SCORE))
    for v, d in gaps.items():
        print(f"  {v} {args.mode} - {args.reference_mode}: " + ", ".join(f"{m} {quality.fmt(d[m])}" for m in SCORE))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
