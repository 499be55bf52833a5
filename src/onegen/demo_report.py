"""The demo's report: a table per task, a plain-language reading of it, example answers with their
retrieval trace, and a bar plot. Pure presentation of `results` (see `demo.run_demo`); nothing is
measured here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .data import Corpus


def timing_line(timings: dict[str, float], total: float) -> str:
    """One line: how long each stage took."""
    marks = list(timings.items()) + [("end", total)]
    names = {"world": "world", "minilm": "MiniLM training", "scratch": "scratch training",
             "ret_only": "retrieval-only training", "gen_only": "generation-only training", "eval": "evaluation"}
    return ", ".join(f"{names[a]} {t1 - t0:.0f} s" for (a, t0), (_, t1) in zip(marks, marks[1:], strict=False)
                     if a in names)


def _fmt(x: Any) -> str:
    return "—" if x is None else f"{x:.2f}"


def _params(n: int) -> str:
    return f"{n / 1e6:.1f} M"


def print_report(console: Any, results: dict, examples: dict[str, list[dict]], corpus: Corpus) -> None:
    """A table per task, what it shows in plain words, and example answers with their retrieval trace."""
    from rich.table import Table

    for task, rows in results["tasks"].items():
        n = next(iter(rows.values()))["n"]
        title = {"qa": "Single-hop QA", "multihop": "Multi-hop QA (two retrievals per answer)",
                 "el": "Entity linking (one retrieval per mention)"}[task]
        table = Table(title=f"{title} — {n} held-out items, entities never seen in training")
        table.add_column("system")
        table.add_column("models · params")
        heads = (["link P", "link R", "link F1"] if task == "el"
                 else ["R@1 hop 1", "R@1 hop 2", "EM", "F1"])
        for h in [*heads, "ms/answer"]:
            table.add_column(h, justify="right")
        for name, m in rows.items():
            values = ([m["precision"], m["recall"], m["f1"]] if task == "el"
                      else [m.get("hop1_recall@1"), m.get("hop2_recall@1"), m["em"], m["f1"]])
            table.add_row(name, f"{m['models']} · {_params(m['params'])}", *map(_fmt, values),
                          f"{m['ms_per_answer']:.0f}")
        console.print(table)
    console.print(_wording_lines(results))
    console.print(_explanation(results))
    console.print("\n[bold]Example answers of OneGen · MiniLM start (the first held-out items)[/bold]")
    per_task = 3 if len(examples) == 1 else 1
    for task, rows in examples.items():
        for ex in rows[:per_task]:
            console.print(_example(task, ex["item"], ex["pred"], corpus), highlight=False)


def _wording_lines(results: dict) -> str:
    lines = ["OneGen · MiniLM start, split by wording (all items are about entities unseen in training):"]
    for task, rows in results["tasks"].items():
        parts = []
        for name, m in rows["OneGen · MiniLM start"].get("by_wording", {}).items():
            shown = ([("link F1", m["f1"])] if task == "el" else
                     [(f"R@1 hop {h}", m[f"hop{h}_recall@1"]) for h in (1, 2) if f"hop{h}_recall@1" in m]
                     + [("EM", m["em"])])
            parts.append(f"{name} (n={m['n']}): " + ", ".join(f"{k} {v:.2f}" for k, v in shown))
        lines.append(f"  {task}: " + "; ".join(parts))
    return "\n".join(lines)


def _explanation(results: dict) -> str:
    tasks = results["tasks"]
    lines = ["\n[bold]What the table shows[/bold]",
             "Every row answers the same held-out items: questions (or sentences) about entities that no "
             "training sample mentions, partly in wordings never seen in training.",
             "• [bold]OneGen · MiniLM start[/bold] is ONE model. While it writes, it emits a [RQ] token; the "
             "hidden state of that very token is the search query, the found document is inserted and "
             "writing goes on. No second model, no second pass.",
             "• [bold]from scratch[/bold] sees the same samples for as many steps, from random weights: the "
             "pretrained start is what makes a few minutes of CPU training enough.",
             "• The pipeline rows keep the OneGen model as the writer but let a separate retriever pick the "
             "documents from the question and what was written so far: BM25 (word overlap), the un-tuned "
             "MiniLM sentence embedder (a second model), and the gold documents (the writer's ceiling).",
             "• R@1 hop h: the right document ranked first at the h-th retrieval; EM/F1: the final answer "
             "(SQuAD normalisation); link P/R/F1: mention span and linked entity both right; ms/answer: "
             "wall time per item, batched generation."]
    for task, rows in tasks.items():
        ours = rows["OneGen · MiniLM start"]
        key = "f1" if task == "el" else "hop1_recall@1"
        best = max(rows.items(), key=lambda kv: kv[1][key])
        if task != "el" and best[0] not in ("OneGen · MiniLM start", "gold docs → generator"):
            lines.append(f"• {task}: {best[0]} retrieves best at hop 1 ({best[1][key]:.2f} vs OneGen "
                         f"{ours[key]:.2f}) — names in the question match names in the documents.")
        two = rows.get("retrieval-only → generation-only")
        if two is not None:
            what = (f"link F1 {two['f1']:.2f} vs OneGen {ours['f1']:.2f}" if task == "el" else
                    f"R@1 hop 1 {two['hop1_recall@1']:.2f} vs OneGen {ours['hop1_recall@1']:.2f}"
                    + (f", hop 2 {two.get('hop2_recall@1', 0):.2f} vs {ours.get('hop2_recall@1', 0):.2f}"
                       if task == "multihop" else "") + f", EM {two['em']:.2f} vs {ours['em']:.2f}")
            lines.append(f"• {task}: the two-model system (a retrieval-only MiniLM re-reading the context at each "
                         f"[RQ] of a generation-only MiniLM, same data and steps): {what}.")
        gold_gen, gold_ours = rows.get("gold docs → generation-only"), rows.get("gold docs → generator")
        if gold_gen is not None and gold_ours is not None:
            lines.append(f"• {task}: given the gold documents, the OneGen writer reaches EM {gold_ours['em']:.2f}, "
                         f"the generation-only writer {gold_gen['em']:.2f}: what joint training costs (or "
                         f"gives) generation.")
        if task == "multihop":
            lines.append(f"• multihop: at hop 2 the query is the bridge entity OneGen itself wrote: OneGen "
                         f"{ours.get('hop2_recall@1', 0):.2f}, BM25 {rows['BM25 → generator'].get('hop2_recall@1', 0):.2f}"
                         f", MiniLM embedder {rows['MiniLM embedder → generator'].get('hop2_recall@1', 0):.2f}.")
    return "\n".join(lines)


def _title(corpus: Corpus, doc_id: str) -> str:
    return (corpus[doc_id].title or doc_id) if doc_id in corpus else doc_id


def _example(task: str, item: dict, pred: dict, corpus: Corpus) -> str:
    if task == "el":
        gold = {(e["start"], e["end"]): e["id"] for e in item["entities"]}
        links = []
        for e in pred.get("entities", []):
            ok = gold.get((e["start"], e["end"])) == e["id"]
            links.append(f"'{item['text'][e['start']:e['end']]}' → {e['id']} «{_title(corpus, e['id'])}» "
                         f"{'✓' if ok else '✗'}")
        return f"\n[el] {item['text']}\n   links: " + ("; ".join(links) or "none")
    ok = "✓" if pred["answer"].lower() == item["answers"][0].lower() else "✗"
    out = [f"\n[{task}] Q: {item['question']}", f"   answer: {pred['answer']!r} {ok} (gold: {item['answers'][0]!r})"]
    for hop, r in enumerate(pred["retrievals"]):
        gold = item["gold_docs"][hop] if hop < len(item["gold_docs"]) else []
        top = [f"{d} «{_title(corpus, d)}» {s:.2f}{' (gold)' if d in gold else ''}"
               for d, s in zip(r["doc_ids"][:2], r["scores"][:2], strict=False)]
        out.append(f"   [RQ] #{hop + 1} → " + "  |  next: ".join(top))
    return "\n".join(out)


def save_plot(results: dict, path: Path) -> None:
    """Bars per task: retrieval and answer quality of each system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), squeeze=False)
    for ax, (task, rows) in zip(axes[0], tasks.items(), strict=True):
        keys = ({"link P": "precision", "link R": "recall", "link F1": "f1"} if task == "el" else
                {"R@1 hop 1": "hop1_recall@1", "R@1 hop 2": "hop2_recall@1", "EM": "em"})
        keys = {k: v for k, v in keys.items() if any(v in m for m in rows.values())}
        width = 0.8 / len(keys)
        for j, (label, key) in enumerate(keys.items()):
            ax.bar([i + j * width for i in range(len(rows))], [m.get(key, 0) for m in rows.values()], width,
                   label=label)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
        ax.set_xticklabels([n.replace(" → ", "\n→ ").replace(" · ", "\n") for n in rows], fontsize=7)
        ax.set_ylim(0, 1.2)
        ax.set_title(task)
        ax.legend(fontsize=7, loc="upper center", ncols=len(keys))
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
