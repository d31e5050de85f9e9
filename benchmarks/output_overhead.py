"""What output processing and constrained decoding cost, against the same runs without them.

Tiny model, CPU, one torch thread, 32 requests in flight (the batch is full):

- constrained decoding: 32 requests with a JSON schema each (nested objects, arrays,
  enums, bounded strings and integers; sampled at temperature 1 with a seed each), then the
  same 32 prompts without a schema, each request asked for exactly as many tokens as its
  constrained twin used (ignore_eos), so both runs have the same steps with the same batch
  sizes. ``constrained_overhead`` = step time with grammars / step time without - 1,
  median over rounds. The time spent in the grammar calls themselves (mask fill + apply +
  accept), measured inside the engine, is reported beside it.
- ``schema_valid_rate``: constrained outputs that end with ``stop``, parse, and satisfy
  their schema (jsonschema), over all rounds. A schema with an unbounded string and a
  small ``max_tokens`` checks that a cut output is reported ``length`` and not valid.
- the output pipeline fed the engine's deltas one token at a time, for prose responses
  (markdown, lists, code, PII) and for the engine's own outputs, in two configurations side by
  side: ``full`` (sanitize, PII redaction, blocklist and injection checks acting, dedup,
  markdown normalization, detect/parse/validate, metrics: ``FULL_OUTPUT``) and ``default``
  (the light default config, which streams token by token). ``pipeline_overhead`` (the full
  pipeline) and ``pipeline_overhead_default`` = pipeline CPU per token / engine CPU per token
  at batch 32 (step time / 32): the share of a token's cost the pipeline adds. Per response, the
  ``finish`` cost (format, parse, validate, metrics) is spread over the response's tokens.

- OpenAI's sampling fields (``benchmarks/sampling_costs.py``): ``n4_speedup``, tokens/s
  of requests with ``n=4`` (siblings sharing the prompt's KV) against 4 separate requests
  each (target >= 1.5), and ``logprobs_overhead``, engine step time with ``top_logprobs=5``
  against none (target <= 0.10).

``python benchmarks/output_overhead.py --out F`` writes JSON with at least
``pipeline_overhead``, ``constrained_overhead`` (fractions), ``schema_valid_rate``,
``n4_speedup`` and ``logprobs_overhead``; ``--parts sampling`` runs only the last two.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.sampling_costs import TARGETS as SAMPLING_TARGETS  # noqa: E402
from benchmarks.sampling_costs import bench_logprobs, bench_n4  # noqa: E402
from cluster.config import ModelConfig  # noqa: E402
from engine.engine import LLMEngine  # noqa: E402
from engine.output import OutputRequest, RawOutput, build_output_processor  # noqa: E402
from engine.output.formats import schema_errors  # noqa: E402
from engine.tiny.checkpoint import ensure_tiny_checkpoint  # noqa: E402
from engine.tiny.corpus import corpus_lines  # noqa: E402
from engine.tokenizer import IncrementalDetokenizer  # noqa: E402
from engine.types import SamplingParams  # noqa: E402

BATCH = 32
TARGETS = {"pipeline_overhead": 0.05, "constrained_overhead": 0.20}
# Every stage on and acting (tests/support/output_full.py switches on the same).
FULL_OUTPUT = {
    "safety": {"default_policy": {"actions": {"pii": "redact", "blocklist": "block", "injection": "redact"}}},
    "formats": {"normalize_markdown": True},
    "post_process": {"dedup": True},
}

SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 10},
                    "country": {"enum": ["FR", "DE", "JP", "US"]},
                },
                "required": ["city", "country"],
            },
        },
        "required": ["name", "age", "address"],
    },
    {
        "type": "object",
        "properties": {
            "tags": {
                "type": "array",
                "items": {"type": "string", "maxLength": 6},
                "minItems": 1,
                "maxItems": 4,
            },
            "done": {"type": "boolean"},
        },
        "required": ["tags", "done"],
    },
    {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "size": {"type": "string", "enum": ["S", "M", "L", "XL"]},
            "note": {"type": ["string", "null"], "maxLength": 8},
        },
        "required": ["color", "size", "note"],
    },
    {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "integer", "minimum": 1, "maximum": 999},
                        "kind": {"enum": ["book", "pen"]},
                    },
                    "required": ["id", "kind"],
                },
            }
        },
        "required": ["items"],
    },
]


def response_format(schema: dict) -> dict:
    return {
        "type": "json_schema",
        "json_schema": {"name": "bench", "schema": schema, "strict": True},
    }


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class CpuTimer:
    """Wraps methods of an object to add up the CPU time of the calling thread in them.

    CPU time, not wall time: on a shared machine other processes stretch wall time by tens
    of percent from one second to the next, which would swamp the differences measured here.
    """

    def __init__(self, obj, *names: str) -> None:
        self.seconds = 0.0
        for name in names:
            setattr(obj, name, self._timed(getattr(obj, name)))

    def _timed(self, fn):
        def wrapper(*args, **kwargs):
            start = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.thread_time() - start

        return wrapper


def run_batch(engine: LLMEngine, prompts, params) -> tuple[list, float, int]:
    """All requests at once; (outputs, seconds, engine steps)."""
    steps0 = engine.stats().steps
    start = time.perf_counter()
    streams = [engine.submit(p, sp) for p, sp in zip(prompts, params)]
    outs = [s.result() for s in streams]
    return outs, time.perf_counter() - start, engine.stats().steps - steps0


def schema_valid(out, schema) -> bool:
    if out.finish_reason != "stop":
        return False
    try:
        value = json.loads(out.text)
    except ValueError:
        return False
    return not schema_errors(value, schema)


def bench_constrained(engine: LLMEngine, prompts: list[list[int]], rounds: int) -> dict:
    grammar = CpuTimer(engine.core.structured_output(), "apply_masks", "accept")
    steps = CpuTimer(engine.core, "_step")  # the loop calls self._step: the wrapper
    schemas = [SCHEMAS[i % len(SCHEMAS)] for i in range(BATCH)]
    ratios, wall_ratios, con_steps_ms, unc_steps_ms, grammar_ms = [], [], [], [], []
    valid = total = 0
    for r in range(-1, rounds):  # round -1 warms both paths up and is not counted
        con_params = [
            SamplingParams(
                max_tokens=200,
                temperature=1.0,
                seed=1000 * r + i,
                response_format=response_format(s),
            )
            for i, s in enumerate(schemas)
        ]
        grammar.seconds = steps.seconds = 0.0
        outs, con_wall, con_steps = run_batch(engine, prompts, con_params)
        grammar_s, con_s = grammar.seconds, steps.seconds
        if r < 0:
            run_batch(
                engine,
                prompts,
                [SamplingParams(max_tokens=len(o.token_ids) + 1, ignore_eos=True) for o in outs],
            )
            continue
        valid += sum(schema_valid(o, s) for o, s in zip(outs, schemas))
        total += len(outs)
        # the same batch shape without grammars: each request runs as many steps as its twin
        lengths = [len(o.token_ids) + (1 if o.finish_reason == "stop" else 0) for o in outs]
        unc_params = [
            SamplingParams(max_tokens=n, temperature=1.0, seed=1000 * r + i, ignore_eos=True)
            for i, n in enumerate(lengths)
        ]
        steps.seconds = 0.0
        _, unc_wall, unc_steps = run_batch(engine, prompts, unc_params)
        unc_s = steps.seconds
        con_step, unc_step = con_s / con_steps, unc_s / unc_steps
        ratios.append(con_step / unc_step - 1.0)
        wall_ratios.append((con_wall / con_steps) / (unc_wall / unc_steps) - 1.0)
        con_steps_ms.append(1000 * con_step)
        unc_steps_ms.append(1000 * unc_step)
        grammar_ms.append(1000 * grammar_s / con_steps)
        log(
            f"  round {r}: {con_steps} steps, CPU {1000 * con_step:.2f} ms/step constrained vs "
            f"{1000 * unc_step:.2f} ms unconstrained, grammar calls {1000 * grammar_s / con_steps:.3f} ms/step; "
            f"wall ratio {wall_ratios[-1]:+.1%}"
        )
    return {
        "constrained_overhead": statistics.median(ratios),
        "constrained_overhead_rounds": ratios,
        "constrained_overhead_wall_clock": statistics.median(wall_ratios),
        "step_ms_constrained": statistics.median(con_steps_ms),
        "step_ms_unconstrained": statistics.median(unc_steps_ms),
        "grammar_ms_per_step": statistics.median(grammar_ms),
        "grammar_share_of_step": statistics.median(grammar_ms) / statistics.median(con_steps_ms),
        "schema_valid_rate": valid / total,
        "schema_outputs": total,
    }


def bench_length_cut(engine: LLMEngine, processor, prompt: list[int]) -> dict:
    """An unbounded string with a small max_tokens: cut, and reported as such."""
    rf = response_format(
        {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
    )
    outs, _, _ = run_batch(
        engine,
        [prompt] * 4,
        [
            SamplingParams(max_tokens=12, temperature=1.0, seed=i, response_format=rf)
            for i in range(4)
        ],
    )
    reported = [
        processor.process(
            RawOutput(
                o.text,
                o.finish_reason,
                o.completion_tokens,
                request=OutputRequest(response_format=rf, max_tokens=12),
            )
        )
        for o in outs
    ]
    return {
        "unbounded_finish_reasons": [o.finish_reason for o in outs],
        "unbounded_reported_valid": [p.valid for p in reported],
    }


def prose_responses(n: int) -> list[str]:
    """Chat-like answers: paragraphs, a list, a code block, now and then PII."""
    lines = corpus_lines(seed=7, num_lines=n * 12)
    out = []
    for i in range(n):
        para = [next(lines) for _ in range(10)]
        body = " ".join(para[:4]) + "\n\n" + "\n".join(f"* {p}" for p in para[4:7]) + "\n\n"
        if i % 3 == 0:
            body += f"You can reach me at user{i}@example.com or +1 415 555 01{i % 100:02d}. "
        if i % 4 == 0:
            body += "```python\nprint('hello')\nfor i in range(3):\n    print(i)\n```\n"
        body += " ".join(para[7:])
        out.append(body)
    return out


def deltas_of(tokenizer, text: str) -> list[str]:
    """The text deltas the engine would stream for ``text``, one per token."""
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add(t) for t in tokenizer.encode(text, add_bos=False)]
    pieces.append(detok.flush())
    return pieces


def bench_pipeline(processor, tokenizer, texts: list[str], repeat: int = 3) -> dict:
    streams = [deltas_of(tokenizer, t) for t in texts]
    tokens = sum(len(d) - 1 for d in streams)
    feed_s = finish_s = 0.0
    for _ in range(repeat):
        for deltas in streams:
            stream = processor.stream(OutputRequest(max_tokens=1024))
            start = time.thread_time()
            for d in deltas:
                stream.feed(d)
            middle = time.thread_time()
            result = stream.finish("stop", len(deltas) - 1)
            finish_s += time.thread_time() - middle
            feed_s += middle - start
        assert result.text  # the last one, to keep the work observable
    n = repeat * tokens
    return {
        "tokens": tokens,
        "responses": len(texts),
        "feed_us_per_token": 1e6 * feed_s / n,
        "finish_ms_per_response": 1000 * finish_s / (repeat * len(texts)),
        "total_us_per_token": 1e6 * (feed_s + finish_s) / n,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument(
        "--checkpoint", default=None, help="checkpoint dir (default: the embedded tiny one)"
    )
    ap.add_argument("--rounds", type=int, default=5, help="constrained/unconstrained round pairs")
    ap.add_argument(
        "--parts", choices=("all", "sampling"), default="all",
        help="sampling: only n4_speedup and logprobs_overhead",
    )
    args = ap.parse_args()

    torch.set_num_threads(1)
    path = Path(args.checkpoint) if args.checkpoint else ensure_tiny_checkpoint()
    config = ModelConfig(
        model_size="tiny",
        checkpoint=str(path),
        dtype="float32",
        device="cpu",
        max_num_seqs=BATCH,
        max_batched_tokens=2048,
        context_length=1024,
        max_tokens=256,
    )
    from cluster.config.output import OutputConfig

    processor = build_output_processor()  # the light default config
    full_processor = build_output_processor(OutputConfig.model_validate(FULL_OUTPUT))
    g = torch.Generator().manual_seed(0)
    r: dict = {"model": path.name, "batch": BATCH, "torch_threads": 1}
    with LLMEngine.from_config(config) as engine:
        prompts = [
            [1] + torch.randint(3, engine.tokenizer.vocab_size, (int(n),), generator=g).tolist()
            for n in torch.randint(16, 64, (BATCH,), generator=g)
        ]
        log("n=4 against 4 separate requests, logprobs against none ...")
        r.update(bench_n4(engine, max(3, args.rounds)))
        r.update(bench_logprobs(engine, prompts, max(3, args.rounds)))
        r["sampling_targets"] = SAMPLING_TARGETS
        r["sampling_targets_met"] = {
            "n4_speedup": r["n4_speedup"] >= SAMPLING_TARGETS["n4_speedup"],
            "logprobs_overhead": r["logprobs_overhead"] <= SAMPLING_TARGETS["logprobs_overhead"],
        }
        if args.parts == "sampling":
            print_sampling(r)
            write(args.out, r)
            return
        run_batch(
            engine,
            prompts[:4],
            [SamplingParams(max_tokens=8, response_format=response_format(s)) for s in SCHEMAS],
        )  # warm-up: compile the grammars
        log(f"constrained decoding at batch {BATCH} ...")
        r.update(bench_constrained(engine, prompts, args.rounds))
        r.update(bench_length_cut(engine, processor, prompts[0]))
        log("engine outputs for the pipeline ...")
        engine_texts = [
            o.text
            for o in run_batch(
                engine,
                prompts,
                [
                    SamplingParams(max_tokens=128, temperature=1.0, seed=i, ignore_eos=True)
                    for i in range(BATCH)
                ],
            )[0]
        ]
        tokenizer = engine.tokenizer
    log("output pipeline ...")
    r["pipeline_prose"] = bench_pipeline(full_processor, tokenizer, prose_responses(48))
    r["pipeline_engine_text"] = bench_pipeline(full_processor, tokenizer, engine_texts)
    r["pipeline_default_prose"] = bench_pipeline(processor, tokenizer, prose_responses(48))
    r["pipeline_default_engine_text"] = bench_pipeline(processor, tokenizer, engine_texts)
    engine_us_per_token = 1000 * r["step_ms_unconstrained"] / BATCH
    worst = max(
        r["pipeline_prose"]["total_us_per_token"], r["pipeline_engine_text"]["total_us_per_token"]
    )
    worst_default = max(
        r["pipeline_default_prose"]["total_us_per_token"],
        r["pipeline_default_engine_text"]["total_us_per_token"],
    )
    r["engine_us_per_token_at_batch"] = engine_us_per_token
    r["pipeline_overhead"] = worst / engine_us_per_token
    r["pipeline_overhead_default"] = worst_default / engine_us_per_token
    r["pipeline_overhead_vs_inter_token_time"] = worst / (1000 * r["step_ms_unconstrained"])
    r["targets"] = TARGETS
    r["targets_met"] = {k: r[k] < v for k, v in TARGETS.items()}
    r["schema_valid_rate_target_met"] = r["schema_valid_rate"] == 1.0
    print_table(r)
    print_sampling(r)
    write(args.out, r)


def write(path: str, r: dict) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=2))


def print_sampling(r: dict) -> None:
    met = r["sampling_targets_met"]
    print(
        f"{'n4_speedup':30} {r['n4_speedup']:7.2f}x  (target >= 1.5, {'met' if met['n4_speedup'] else 'MISSED'}; "
        f"wall clock {r['n4_speedup_wall_clock']:.2f}x; {r['n4_tokens_per_cpu_s']:.0f} vs "
        f"{r['separate_tokens_per_cpu_s']:.0f} tokens per engine CPU-s)"
    )
    print(
        f"{'logprobs_overhead':30} {r['logprobs_overhead']:7.2%}  (target <= 10%, "
        f"{'met' if met['logprobs_overhead'] else 'MISSED'}; {r['step_ms_logprobs5']:.2f} vs "
        f"{r['step_ms_no_logprobs']:.2f} ms/step)"
    )


def print_table(r: dict) -> None:
    print(f"\nbatch {r['batch']}, tiny model, 1 torch thread")
    print(f"{'engine step CPU, no grammar':40}{r['step_ms_unconstrained']:10.2f} ms")
    print(f"{'engine step CPU, 32 grammars':40}{r['step_ms_constrained']:10.2f} ms")
    print(
        f"{'  of which grammar calls':40}{r['grammar_ms_per_step']:10.3f} ms "
        f"({r['grammar_share_of_step']:.1%})"
    )
    print(f"{'engine CPU per token (step / batch)':40}{r['engine_us_per_token_at_batch']:10.1f} us")
    for key, name in (("pipeline_prose", "prose, full"), ("pipeline_engine_text", "engine text, full"),
                      ("pipeline_default_prose", "prose, default"),
                      ("pipeline_default_engine_text", "engine text, default")):
        p = r[key]
        print(
            f"{f'pipeline per token, {name}':40}{p['total_us_per_token']:10.1f} us "
            f"(feed {p['feed_us_per_token']:.1f} us, finish {p['finish_ms_per_response']:.2f} ms/response)"
        )
    print()
    for k, target in r["targets"].items():
        mark = "met" if r["targets_met"][k] else "MISSED"
        print(f"{k:30} {r[k]:7.2%}  (target < {target:.0%}, {mark})")
    print(f"{'pipeline_overhead_default':30} {r['pipeline_overhead_default']:7.2%}  (the light default)")
    print(f"{'(wall clock, noisy)':30} {r['constrained_overhead_wall_clock']:7.2%}")
    print(
        f"{'schema_valid_rate':30} {r['schema_valid_rate']:7.2%}  ({r['schema_outputs']} outputs)"
    )
    print(
        f"{'unbounded string, max_tokens=12':30} finish {r['unbounded_finish_reasons']}, "
        f"valid {r['unbounded_reported_valid']}"
    )


if __name__ == "__main__":
    main()
