"""LoCoMo: does the memory find what real, months-long conversations said?

LoCoMo (Maharana et al., ACL 2024, github.com/snap-research/locomo, CC BY-NC 4.0) holds
two-person conversations of 19-32 sessions with annotated questions. ``--data`` takes a LoCoMo
JSON file: a list of conversations, with the sessions either at the top level of each
(``session_N``, ``session_N_date_time``) or nested under ``conversation`` (the public
``locomo10.json``). The data is read where it lies; it is never part of the project.

Per conversation, one ``MemoryShard`` (the class the serving app runs as its memory actors,
with its default config, MiniLM and the tiny checkpoint's tokenizer) absorbs every turn through
``absorb_turn`` - the call the ingress makes - as one user whose messages carry the speaker's
name (``name``) and the session's date (``at``). Then every question of categories 1-4 (1
multi-hop, 2 temporal, 3 open-domain, 4 single-hop) is asked in a new session through
``assemble`` with a memory budget of ``--budget`` tokens, and only the memory part of the
prompt (the system message: never the question) is scored:

- evidence recall: share of a question's evidence turns whose text is in the context;
- answer coverage: share of questions all of whose answer's content words are in the context;
- tokens used by memory.

Side by side, on the same budget and tokenizer, three plain baselines pick raw turns, each
prefixed with its session date ("[1:56 pm on 8 May, 2023] Caroline: ..."): the newest turns;
BM25 over those dated turns; MiniLM (dense) over them. Ablation rows rank the memory's own
units with one retriever at a time (dense only, BM25 only, both fused by RRF, fused plus the
entity/speaker/time signals and neighbours) and pack them the way the context does, so every
part has to earn its place. Also: assembly latency p50/p95 (``assemble``: embedding the
question, retrieval, packing, exact token fit), wall and CPU time, and absorb throughput
(turns per second until the shard is drained: units, their embeddings, facts and summaries
included), per wall second and per CPU second (what one shard on an uncontended core does;
other processes on the machine inflate the wall figures, the JSON records the load average).
The turns are fed as the ingress feeds them after replies: ``absorb_turn`` returns once the
turn is in the window and queued, and the shard's worker analyses the queued turns in
batches (actors/memory/learning/absorb_worker.py) while later turns arrive (each call is a step
of the shard's event loop, as separate actor calls are); the clock stops when the queue is
drained. ``--threads``: the embedder's threads (the CPU threads a shard is given for it;
engine/embedding/minilm.py), recorded in the JSON as ``embedder_threads``.

``python benchmarks/locomo.py --data locomo10.json --out F`` writes JSON with
``evidence_recall``, ``answer_coverage``, ``best_baseline_evidence_recall``,
``best_baseline_answer_coverage``, ``temporal_answer_coverage``, ``assembly_p95_ms`` and
``absorb_turns_per_s`` at the first budget. ``--quick`` (one conversation, 40 questions) or
``--limit N`` (questions per conversation) for quick iterations.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.memory.recall.dates import parse_date_time  # noqa: E402
from actors.memory.recall.lexical import LexicalIndex  # noqa: E402
from actors.memory.recall.retrieval import MODES, pack_units, rank_units  # noqa: E402
from actors.memory.shard import MemoryShard  # noqa: E402
from cluster.config.memory import MemoryConfig  # noqa: E402

CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop"}
TARGETS = {"evidence_recall": 0.85, "answer_coverage": 0.65, "temporal_answer_coverage": 0.60,
           "assembly_p95_ms": 25.0, "absorb_turns_per_s": 200.0, "ratio_vs_best_baseline": 1.25}
# a standard English stop list for scoring answers (independent of the memory's own tokenizer)
SCORE_STOP = frozenset(
    """a an the and or but of to in on at for with by from as is are was were be been being it its
    this that these those he she they them his her their i you we my your our me him do does did
    not no yes so if then than there here what which who whom when where why how all any some""".split()
)
_WORD = re.compile(r"[a-z0-9]+")
_BRACKETS = re.compile(r"\s*\[[^\]]*\]")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- data ---------------------------------------------------------------------------------------


def load_conversations(path: Path) -> list[dict]:
    """Conversations in one shape: id, speakers, sessions [(id, date text, epoch, turns)], qa."""
    raw = json.loads(path.read_text())
    out = []
    for item in raw if isinstance(raw, list) else [raw]:
        body = item.get("conversation", item)
        numbers = sorted(int(m.group(1)) for key in body
                         if (m := re.fullmatch(r"session_(\d+)", key)) and isinstance(body[key], list))
        sessions = []
        for n in numbers:
            when = str(body.get(f"session_{n}_date_time", ""))
            at = parse_date_time(when)
            if at is None:
                raise SystemExit(f"{path}: session_{n}_date_time={when!r} of {item.get('sample_id')} is no date")
            sessions.append((f"session_{n}", when, at, body[f"session_{n}"]))
        out.append({"id": item.get("sample_id", f"conv-{len(out)}"), "a": body.get("speaker_a"),
                    "b": body.get("speaker_b"), "sessions": sessions, "qa": item.get("qa", [])})
    return out


def turn_text(turn: dict) -> str:
    text = str(turn.get("text", "")).strip()
    caption = turn.get("blip_caption")
    return f"{text} [shares a photo of {caption}]" if caption else text


def normalize(text: str) -> str:
    return " ".join(_BRACKETS.sub("", text).lower().split())


def content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(str(text).lower()) if w not in SCORE_STOP}


def evidence_ids(qa: dict) -> list[str]:
    ids: list[str] = []
    for item in qa.get("evidence") or []:
        ids += [part.strip() for part in re.split(r"[;,]", str(item)) if part.strip()]
    return ids


def score(context: str, qa: dict, turns_by_id: dict[str, str]) -> tuple[float | None, bool]:
    """(evidence recall or None without known evidence, answer covered)."""
    flat = normalize(context)
    evidence = [turns_by_id[e] for e in evidence_ids(qa) if e in turns_by_id]
    recall = sum(normalize(t) in flat for t in evidence) / len(evidence) if evidence else None
    words = content_words(qa.get("answer", ""))
    have = set(_WORD.findall(context.lower()))
    return recall, bool(words) and words <= have


# -- baselines ----------------------------------------------------------------------------------


def pack_lines(lines: list[tuple[int, str]], order: list[int], budget: int, count) -> str:
    """Lines taken in ``order`` while they fit ``budget`` tokens, shown in conversation order."""
    chosen, used = [], 0
    for i in order:
        cost = count(lines[i][1]) + 1
        if used + cost > budget:
            continue
        used += cost
        chosen.append(i)
    return "\n".join(lines[i][1] for i in sorted(chosen))


class Baselines:
    """Raw dated turns of one conversation: newest, BM25, dense."""

    def __init__(self, conv: dict, embedder, count) -> None:
        self.lines = [(i, f"[{when}] {t.get('speaker')}: {turn_text(t)}")
                      for i, (_, when, _, turns) in enumerate(conv["sessions"]) for t in turns]
        self.count = count
        self.costs = {}
        self.lexical = LexicalIndex()
        for i, (_, line) in enumerate(self.lines):
            self.lexical.add(i, line)
        self.vectors = embedder.embed([line for _, line in self.lines])
        self.embedder = embedder

    def cost(self, line: str) -> int:
        if line not in self.costs:
            self.costs[line] = self.count(line)
        return self.costs[line]

    def contexts(self, question: str, query: np.ndarray, budget: int) -> dict[str, str]:
        n = len(self.lines)
        bm25 = [k for k, _ in self.lexical.search(question, n)]
        bm25 += [i for i in range(n - 1, -1, -1) if i not in set(bm25)]
        dense = list(np.argsort(-(self.vectors @ query), kind="stable"))
        return {
            "newest turns": pack_lines(self.lines, list(range(n - 1, -1, -1)), budget, self.cost),
            "BM25 over dated turns": pack_lines(self.lines, bm25, budget, self.cost),
            "dense (MiniLM) over dated turns": pack_lines(self.lines, dense, budget, self.cost),
        }


# -- one conversation ---------------------------------------------------------------------------


async def run_conversation(conv: dict, config: MemoryConfig, tokenizer, embedder, budgets: list[int],
                           limit: int | None) -> dict:
    shard = MemoryShard(config, tokenizer=tokenizer, embedder=embedder)
    tenant, user = "locomo", conv["id"]
    turns_by_id: dict[str, str] = {}
    total = 0
    started, cpu_started = time.perf_counter(), time.process_time()
    for session_id, _, at, turns in conv["sessions"]:
        for turn_id, turn in enumerate(turns):
            text = turn_text(turn)
            turns_by_id[str(turn.get("dia_id"))] = text
            role = "user" if turn.get("speaker") == conv["a"] else "assistant"
            message = {"role": role, "content": text, "name": turn.get("speaker")}
            await shard.absorb_turn(tenant, user, session_id, turn_id, [message], at=at)
            await asyncio.sleep(0)  # calls to the actor are separate steps of its event loop
            total += 1
    await shard.drain()
    absorb_s = time.perf_counter() - started
    absorb_cpu_s = time.process_time() - cpu_started  # all threads: the embedder's included
    log(f"{conv['id']}: {total} turns absorbed in {absorb_s:.1f} s ({total / absorb_s:.0f} turns/s)")

    baselines = Baselines(conv, embedder, tokenizer.count_tokens)
    questions = [q for q in conv["qa"] if q.get("category") in CATEGORIES]
    if limit:
        questions = questions[:limit]
    rows: list[dict] = []
    latencies: list[float] = []
    cpu_latencies: list[float] = []
    for number, qa in enumerate(questions):
        question = str(qa["question"])
        for budget in budgets:
            request = [{"role": "user", "content": question}]
            base = len(shard.assembler.render(request))
            t0, c0 = time.perf_counter(), time.process_time()
            assembled = await shard.assemble(tenant, user, f"question-{number}", request,
                                             context_length=base + budget, max_tokens=0)
            elapsed = (time.perf_counter() - t0) * 1000
            if budget == budgets[0]:
                latencies.append(elapsed)
                cpu_latencies.append((time.process_time() - c0) * 1000)
            memory_text = "\n".join(m["content"] for m in assembled.messages if m["role"] == "system")
            contexts = {"M-AI memory": (memory_text, assembled.prompt_tokens - base)}
            query = embedder.embed([question])[0]  # what the memory embeds for units too
            for name, text in baselines.contexts(question, query, budget).items():
                contexts[name] = (text, tokenizer.count_tokens(text) if text else 0)
            units = shard.loaded_users()[0].units
            for mode in MODES:  # the memory's own ranking, one part at a time
                found = rank_units(units, question, query, config.units, mode=mode)
                packed = pack_units(found, budget, tokenizer.count_tokens, config.context.units_header)
                contexts[f"units: {mode}"] = (packed.text, tokenizer.count_tokens(packed.text) if packed.text else 0)
            for name, (text, used) in contexts.items():
                recall, covered = score(text, qa, turns_by_id)
                rows.append({"system": name, "budget": budget, "category": qa["category"],
                             "recall": recall, "covered": covered, "tokens": used})
    await shard.close()
    return {"id": conv["id"], "turns": total, "absorb_s": absorb_s, "absorb_cpu_s": absorb_cpu_s, "rows": rows,
            "latencies": latencies, "cpu_latencies": cpu_latencies, "questions": len(questions)}


def summarize(rows: list[dict]) -> dict:
    def agg(selected: list[dict]) -> dict:
        recalls = [r["recall"] for r in selected if r["recall"] is not None]
        return {"questions": len(selected),
                "evidence_recall": round(statistics.fmean(recalls), 3) if recalls else None,
                "answer_coverage": round(statistics.fmean(r["covered"] for r in selected), 3) if selected else None,
                "tokens": round(statistics.fmean(r["tokens"] for r in selected), 1) if selected else None}

    table: dict = {}
    for budget in sorted({r["budget"] for r in rows}):
        for system in dict.fromkeys(r["system"] for r in rows):
            selected = [r for r in rows if r["system"] == system and r["budget"] == budget]
            entry = {"all": agg(selected)}
            for category, name in CATEGORIES.items():
                entry[name] = agg([r for r in selected if r["category"] == category])
            table.setdefault(str(budget), {})[system] = entry
    return table


def print_table(table: dict) -> None:
    for budget, systems in table.items():
        print(f"\nbudget {budget} tokens: evidence recall / answer coverage / tokens")
        print(f"{'system':34s} {'all':>17s} " + " ".join(f"{n:>17s}" for n in CATEGORIES.values()))
        for system, entry in systems.items():
            cells = [entry["all"]] + [entry[n] for n in CATEGORIES.values()]
            print(f"{system:34s} " + " ".join(
                f"{(c['evidence_recall'] or 0):.3f}/{(c['answer_coverage'] or 0):.3f}/{(c['tokens'] or 0):>4.0f}"
                for c in cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="a LoCoMo JSON file (either layout)")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    ap.add_argument("--budgets", default="2048", help="memory budgets in tokens (comma separated)")
    ap.add_argument("--conversations", type=int, default=None, help="only the first N conversations")
    ap.add_argument("--limit", type=int, default=None, help="at most N questions per conversation")
    ap.add_argument("--quick", action="store_true", help="one conversation, 40 questions")
    ap.add_argument("--threads", type=int, default=1,
                    help="the embedder's CPU threads (a batch is split over them)")
    args = ap.parse_args()
    if args.quick:
        args.conversations, args.limit = args.conversations or 1, args.limit or 40

    from engine.embedding.minilm import MiniLMEmbedder
    from engine.tiny.checkpoint import ensure_tiny_checkpoint
    from engine.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(ensure_tiny_checkpoint())
    embedder = MiniLMEmbedder(threads=args.threads)
    # warm both paths (one text: the trace; a batch: the packed encoder), as a running shard is
    embedder.embed(["warm up"])
    embedder.embed([" ".join(["word"] * n) for n in range(1, 65)])
    budgets = [int(b) for b in args.budgets.split(",")]
    # memory may give the whole budget to earlier conversations (a new session has nothing else)
    config = MemoryConfig(context={"units_share": 1.0})
    conversations = load_conversations(args.data)[: args.conversations]
    results = [asyncio.run(run_conversation(c, config, tokenizer, embedder, budgets, args.limit))
               for c in conversations]
    rows = [r for res in results for r in res["rows"]]
    table = summarize(rows)
    print_table(table)
    latencies = [x for res in results for x in res["latencies"]]
    cpu_latencies = [x for res in results for x in res["cpu_latencies"]]
    first = table[str(budgets[0])]
    ours = first["M-AI memory"]["all"]
    baselines = [v["all"] for k, v in first.items() if k in (
        "newest turns", "BM25 over dated turns", "dense (MiniLM) over dated turns")]
    best_recall = max(b["evidence_recall"] or 0 for b in baselines)
    best_coverage = max(b["answer_coverage"] or 0 for b in baselines)
    result = {
        "data": args.data.name, "conversations": [r["id"] for r in results],
        "questions": sum(r["questions"] for r in results), "budget": budgets[0],
        "tokenizer": tokenizer.name, "embedder": embedder.name, "cpus": os.cpu_count(),
        "evidence_recall": ours["evidence_recall"], "answer_coverage": ours["answer_coverage"],
        "best_baseline_evidence_recall": best_recall, "best_baseline_answer_coverage": best_coverage,
        "evidence_recall_ratio": round(ours["evidence_recall"] / best_recall, 3) if best_recall else None,
        "answer_coverage_ratio": round(ours["answer_coverage"] / best_coverage, 3) if best_coverage else None,
        "temporal_answer_coverage": first["M-AI memory"]["temporal"]["answer_coverage"],
        "assembly_p50_ms": round(float(np.percentile(latencies, 50)), 2),
        "assembly_p95_ms": round(float(np.percentile(latencies, 95)), 2),
        "assembly_cpu_p50_ms": round(float(np.percentile(cpu_latencies, 50)), 2),
        "assembly_cpu_p95_ms": round(float(np.percentile(cpu_latencies, 95)), 2),
        "absorb_turns_per_s": round(sum(r["turns"] for r in results) / sum(r["absorb_s"] for r in results), 1),
        # turns per CPU second: what one shard on one uncontended core would absorb
        "absorb_turns_per_cpu_s": round(sum(r["turns"] for r in results) / sum(r["absorb_cpu_s"] for r in results), 1),
        "embedder_threads": args.threads,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "targets": TARGETS, "table": table,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "table"}, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
