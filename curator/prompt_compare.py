"""Compare phrasings and template pairs of one finding on a labelled set: ``curator prompts compare``.

Every alternative (a list of phrases, averaged as CheXzero averages them, and a positive /
negative template pair) is scored exactly as ``curator label`` would score it: text embeddings of
the workspace's checkpoints, the softmax method on the stored image embeddings, the ensemble mean.
No image is opened; the checkpoints' text encoders are needed (from the paths recorded at
``embed`` time, or ``--checkpoint``). Each alternative gets the ROC AUC with its 95% bootstrap
interval (the same seeded resamples for all, so they are compared on equal terms) and the PR AUC.

Alternatives: each ``--phrases`` entry alone, plus all of them averaged (unless
``--no-combined``), crossed with each ``--templates`` pair (``"POS|NEG"``, each with one
``{}``). Defaults: the phrases and template pair of the prompt set currently providing the
finding's column (if any) and CheXzero's ``"{}" / "no {}"``.
"""

from __future__ import annotations

import json
from pathlib import Path


def parse_template_pair(text: str) -> tuple[str, str]:
    if "|" not in text:
        raise ValueError(f"template pair {text!r}: write it as \"POSITIVE|NEGATIVE\", e.g. \"{{}}|no {{}}\"")
    pos, neg = (x.strip() for x in text.split("|", 1))
    for t in (pos, neg):
        if t.count("{}") != 1:
            raise ValueError(f"template {t!r} must contain exactly one {{}}")
    return pos, neg


def _current(ws, column: str):
    ps_id = ws.manifest.get("finding_columns", {}).get(column)
    if not ps_id:
        return None
    ps = ws.manifest["prompt_sets"][ps_id]
    from curator.prompts import snake_case

    for f in ps["findings"]:
        if snake_case(f["name"]) == column:
            return {"prompt_set": ps_id, "name": f["name"], "phrases": list(f["phrases"]), "positive": ps["positive"], "negative": ps["negative"]}
    return None


def alternatives(name: str, phrases: list[str] | None, templates: list[tuple[str, str]] | None, combined: bool = True,
                 current: dict | None = None) -> list[dict]:
    """The (phrases, positive, negative) alternatives to score, without duplicates, in a stable order."""
    phrase_sets: list[tuple[str, ...]] = []
    if phrases and any(not p or not p.strip() for p in phrases):
        raise ValueError("--phrases: an empty phrase (each phrase is a finding's wording, e.g. 'pleural effusion')")
    if phrases:
        phrase_sets += [(p,) for p in phrases]
        if combined and len(phrases) > 1:
            phrase_sets.append(tuple(phrases))
    if current:
        phrase_sets.append(tuple(current["phrases"]))
    if not phrase_sets:
        phrase_sets.append((name,))
    pairs = list(templates or [])
    if current:
        pairs.append((current["positive"], current["negative"]))
    if not templates:
        pairs.append(("{}", "no {}"))
    out, seen = [], set()
    for ph in phrase_sets:
        for pos, neg in pairs:
            key = (ph, pos, neg)
            if key in seen:
                continue
            seen.add(key)
            is_current = bool(current) and list(ph) == current["phrases"] and (pos, neg) == (current["positive"], current["negative"])
            out.append({"phrases": list(ph), "positive": pos, "negative": neg, "current": is_current})
    return out


def compare_prompts(ws, truth, finding: str, phrases: list[str] | None = None, templates: list[tuple[str, str]] | None = None,
                    combined: bool = True, level: str | None = None, aggregate: str = "max", n_boot: int = 1000, seed: int = 0,
                    device: str | None = None, checkpoints=None) -> dict:
    """Score every alternative; returns ``{"finding", "column", "n_pos", "n_neg", "alternatives": [...best first]}``."""
    import numpy as np

    from curator import metrics as M
    from curator import zeroshot
    from curator.evaluate import _clean, units
    from curator.workspace import open_workspace
    from curator.pipelines.label import workspace_checkpoints
    from curator.prompts import Finding, PromptSet, snake_case
    from curator.query import connect

    ws = open_workspace(ws)
    column = snake_case(finding)
    if column not in truth.findings:
        raise ValueError(f"the truth CSV has no column for {finding!r} ({column})")
    level = level or truth.level
    cur = _current(ws, column)
    name = cur["name"] if cur else finding
    alts = alternatives(name, phrases, templates, combined, cur)
    cks = checkpoints or workspace_checkpoints(ws, device)
    frame = truth.frame[["image_id", "_study", column]].dropna()
    con = connect(ws, sandbox=False)
    try:
        con.register("truth_ids", frame[["image_id"]])
        emb = con.execute("SELECT e.image_id, e.checkpoint, e.embedding FROM embeddings AS e "
                          "SEMI JOIN truth_ids AS t ON t.image_id = e.image_id ORDER BY e.image_id").df()
    finally:
        con.close()
    ids = np.array(sorted(set(emb.image_id)))
    # (in the truth CSV's order, as `curator evaluate` keeps it: the same resamples, the same intervals)
    frame = frame[frame.image_id.isin(ids)].reset_index(drop=True)
    mats = {}
    for ck in cks:
        sub = emb[emb.checkpoint == ck.sha256].set_index("image_id").loc[frame.image_id, "embedding"]
        mats[ck.sha256] = np.stack(sub.to_numpy()).astype(np.float32) if len(sub) else np.zeros((0, ck.embed_dim), np.float32)
    results = []
    for alt in alts:
        ps = PromptSet(findings=(Finding(name=name, phrases=tuple(alt["phrases"])),), positive=alt["positive"], negative=alt["negative"])
        probs = []
        for ck in cks:
            pos_w, neg_w = zeroshot.prompt_weights(ck.encode_texts, ps)
            probs.append(zeroshot.softmax_probabilities(mats[ck.sha256], pos_w, neg_w)[:, 0])
        p = zeroshot.ensemble(probs)
        f = frame.assign(_score=p)
        y, s, _ = units(f, column, "_score", level, aggregate)
        r = dict(alt)
        n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
        r.update(n_pos=n_pos, n_neg=n_neg)
        if n_pos and n_neg:
            b = M.bootstrap(y, s, n_boot=n_boot, seed=seed)
            r.update(auc=M.roc_auc(y, s), auc_ci_low=b["auc"][0], auc_ci_high=b["auc"][1], pr_auc=M.average_precision(y, s))
        else:
            r.update(auc=None, auc_ci_low=None, auc_ci_high=None, pr_auc=None)
        results.append(r)
    results.sort(key=lambda r: (-(r["auc"] if r["auc"] is not None else -1), not r["current"]))
    n_pos = results[0]["n_pos"] if results else 0
    n_neg = results[0]["n_neg"] if results else 0
    return _clean({"finding": name, "column": column, "level": level, "n_pos": n_pos, "n_neg": n_neg,
                   "current_prompt_set": cur["prompt_set"] if cur else None, "checkpoints": [c.sha256 for c in cks],
                   "bootstrap": {"resamples": n_boot, "seed": seed}, "alternatives": results})


def best_prompt_toml(result: dict) -> str:
    """A prompt-set TOML holding the best alternative (for ``curator label --prompts``)."""
    best = result["alternatives"][0]
    q = json.dumps
    return (f"# best of {len(result['alternatives'])} alternatives for {result['finding']} (AUC {best['auc']:.4f} on "
            f"{result['n_pos']} positive / {result['n_neg']} negative)\n"
            f"name = {q(result['column'] + '-best')}\npositive = {q(best['positive'])}\nnegative = {q(best['negative'])}\n\n"
            f"[[finding]]\nname = {q(result['finding'])}\nphrases = [{', '.join(q(p) for p in best['phrases'])}]\n")


# ----------------------------------------------------------------------------------------------
# command line: curator prompts compare
# ----------------------------------------------------------------------------------------------
def add_cli(subparsers) -> None:
    from curator.evaluate import add_truth_args

    p = subparsers.add_parser("prompts", help="work with prompts (compare phrasings on a labelled set)",
                              description="Prompt tools. `curator prompts compare` scores alternative phrasings and template pairs.")
    sub = p.add_subparsers(dest="prompts_command", metavar="SUBCOMMAND")
    sub.required = True
    c = sub.add_parser(
        "compare",
        help="AUC of alternative phrasings / template pairs of one finding on a labelled CSV",
        description="Score each alternative phrasing and template pair of FINDING from the stored image embeddings (no image is "
        "read; the checkpoints' text encoders are loaded) and print ROC AUC with 95% bootstrap intervals, best first.",
    )
    add_truth_args(c)
    c.add_argument("--finding", required=True, metavar="NAME", help="finding name or column, e.g. 'Pleural Effusion'")
    c.add_argument("--phrases", nargs="+", default=None, metavar="TEXT", help="alternative phrasings (each scored alone, and all averaged)")
    c.add_argument("--templates", nargs="+", default=None, metavar="POS|NEG", help='template pairs, e.g. "{}|no {}" "there is {}|there is no {}"')
    c.add_argument("--no-combined", action="store_true", help="do not add the average of all --phrases")
    c.add_argument("--checkpoint", "-c", action="append", metavar="CK", help="checkpoint files, if they moved since `embed`")
    c.add_argument("--device", default=None, help="torch device (default: CUDA when available)")
    c.add_argument("--out", default=None, metavar="JSON", help="also write the results as JSON")
    c.add_argument("--write-best", default=None, metavar="TOML", help="write the best alternative as a prompt-set file")
    c.add_argument("--json", action="store_true", help="print JSON")
    c.set_defaults(func=_cli_compare)


def _cli_compare(args) -> int:
    from curator.evaluate import truth_from_args
    from curator.workspace import open_workspace
    from curator.pipelines.label import workspace_checkpoints
    from curator.prompts import snake_case

    templates = [parse_template_pair(t) for t in args.templates] if args.templates else None
    truth = truth_from_args(args, findings=[snake_case(args.finding)])
    cks = None
    if args.checkpoint:
        from curator.cli import resolve_checkpoint_arg

        cks = workspace_checkpoints(open_workspace(args.workspace), args.device, [resolve_checkpoint_arg(x) for x in args.checkpoint])
    res = compare_prompts(args.workspace, truth, args.finding, phrases=args.phrases, templates=templates, combined=not args.no_combined,
                          level=args.level, aggregate=args.aggregate, n_boot=args.resamples, seed=args.seed, device=args.device, checkpoints=cks)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    if args.write_best and res["alternatives"] and res["alternatives"][0]["auc"] is not None:
        Path(args.write_best).write_text(best_prompt_toml(res))
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    print(f"{res['finding']} ({res['column']}): {res['n_pos']} positive, {res['n_neg']} negative {res['level']}s")
    for r in res["alternatives"]:
        auc = "n/a" if r["auc"] is None else f"{r['auc']:.4f} [{r['auc_ci_low']:.3f}, {r['auc_ci_high']:.3f}]"
        mark = "  (current)" if r["current"] else ""
        print(f"  AUC {auc}  {r['positive']!r} / {r['negative']!r}  phrases {r['phrases']}{mark}")
    if args.write_best:
        print(f"best written to {args.write_best}")
    return 0
