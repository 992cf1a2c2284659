"""Support triage throughput: 1,000 messages in one batch run beside a plain asyncio bound, and
the time from a message landing in the inbox to its first model call with the sensor running.

Why: a batch run must not cost much more than the model calls it makes. The bound is a plain
asyncio loop making the same calls (the same prompts, model and structured output, through the
openai SDK's async client) at the same concurrency against the same endpoint, measured twice:
with `chat.completions.parse()` and, as the gateway does, with the schema built once and the
reply validated by pydantic (the same HTTP requests; on a small machine the SDK's CPU per call
decides the wall time at 32 calls in flight), against the fake OpenAI server (tests/fakes)
answering every call after `--latency` seconds. The server runs in its own process, as a real
endpoint is another machine: in this process its threads would take the interpreter lock from
the client's and blur what is measured. The workflow side is the
real thing: the `customer_messages` sensor tick, then the `support_triage` job in-process on a
temporary Dagster instance, on the operator config's policy engine (budgets, breakers, retries,
audit) with `support.triage_concurrency` = `--concurrency`. Its triage step's wall time (from
the step's start to its success event) is compared with the bound's; the whole run is reported
too (it also stages one approval per reply).

Then, with `--landing`, the real `dagster-daemon` runs the code location with the sensor polling
every second: one message is written to the drop folder and the time until the model server
receives the call that carries it is measured, `--landing` times.

Target (issue 8): the triage step's throughput is at least 0.97x the asyncio bound.

Run (from the repository root):

    /work/venv/bin/python bench/triage_throughput.py [--messages 1000] [--latency 0.2]
        [--concurrency 32] [--landing 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODEL = "gpt-4o-mini"
API_KEY = "sk-bench"
TOPICS = [
    ("Export fails", "Exporting to CSV gives a 500 error since this morning."),
    ("Refund please", "I was charged twice this month, please refund the second charge."),
    ("Dark mode", "Could you add a dark mode? It would be lovely."),
    ("Love it", "Thank you, the new dashboard is brilliant."),
    ("Cannot log in", "Nobody on my team can log in since the update."),
]


def bench_responder() -> Any:
    """The fake server's answers: every triage request gets `_triage_answer`."""
    from tests.fakes.openai_server import ScriptedResponder

    return ScriptedResponder({"Triage": _triage_answer})


def _triage_answer(request: dict[str, Any]) -> dict[str, Any]:
    return {
        # Not a bug: a bug report that repeats no known issue becomes one, and rounds must start
        # from the same memory (the 'known' round seeds it on purpose).
        "category": "feature_request",
        "severity": "P3",
        "duplicate_of": None,
        "refund_usd": None,
        "reply": "Hi,\n\nThank you for writing. We are looking into it.",
        "rationale": "bench",
    }


def _write_messages(folder: Path, count: int, seed: int) -> Path:
    """A drop file of `count` messages, new ids for each seed (one new batch per round)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(count):
        subject, body = rng.choice(TOPICS)
        lines.append(
            json.dumps(
                {
                    "id": f"bench-{seed}-{index}",
                    "from": f"customer{index}@example.com",
                    "subject": subject,
                    "body": f"{body} (message {index})",
                }
            )
        )
    path = folder / f"batch-{seed}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _config(root: Path, base_url: str, concurrency: int, poll_seconds: int = 30) -> Path:
    data = {
        "state_dir": "state",
        "llm": {
            "endpoint": {
                "base_url": base_url,
                "api_key_env": "AIOS_BENCH_KEY",
                "timeout_seconds": 30,
            },
            "tiers": {"draft": {"model": MODEL}, "verify": {"model": MODEL}},
            "roles": {"triager": "draft"},
        },
        "policy": {
            "budgets": {"run_usd": 1000.0, "workflow_day_usd": 1000.0, "month_usd": 10000.0},
            "roles": {"triager": {"verify": False}},
        },
        "support": {
            "inbox": {
                "drop_folders": ["drop"],
                "poll_seconds": poll_seconds,
                "batch_max_messages": 5000,
            },
            "triage_concurrency": concurrency,
        },
    }
    path = root / "aios.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def run_workflow(root: Path, base_url: str, concurrency: int) -> tuple[float, float, int]:
    """Sensor tick + the support_triage job in-process; (triage step s, run s, messages)."""
    import dagster as dg

    import definitions
    from tests.sensor_ticks import run_requests

    defs: dg.Definitions = definitions.defs
    with dg.instance_for_test() as instance:
        [request] = run_requests(defs, "customer_messages", root / "aios.yaml", instance)
        started = time.perf_counter()
        result = defs.resolve_job_def("support_triage").execute_in_process(
            instance=instance, partition_key=request.partition_key, tags=request.tags
        )
        run_seconds = time.perf_counter() - started
        assert result.success
        events = {
            (e.step_key, e.dagster_event.event_type_value): e.timestamp
            for e in instance.all_logs(result.run_id)
            if e.step_key == "support__triage" and e.dagster_event is not None
        }
        step = (
            events[("support__triage", "STEP_SUCCESS")] - events[("support__triage", "STEP_START")]
        )
        tickets = len(result.output_for_node("support__triage").tickets)
    return step, run_seconds, tickets


def seed_known_issues(config: Path, count: int) -> None:
    """`count` known issues in semantic memory, as triage's memory step would have left them."""
    from datetime import UTC, datetime

    from aios_dagster.audit import StepContext
    from aios_dagster.config import load_config
    from aios_dagster.kernel import Kernel
    from aios_dagster.memory.chunking import Document

    kernel = Kernel.build(load_config(config))
    rng = random.Random(count)
    documents = [
        Document(
            source_id=f"issue:seeded-{index}",
            content=f"{subject} (report {index})\n{body}",
            kind="issue",
            workflow="support",
            date=datetime.now(UTC),
            provenance="bench",
        )
        for index, (subject, body) in enumerate(rng.choice(TOPICS) for _ in range(count))
    ]
    step = StepContext(workflow="support", step="bench/seed", partition_key="bench", run_id="b")
    kernel.semantic_index().ingest(documents, context=step)
    kernel.audit.flush()


def run_bound(drop: Path, base_url: str, concurrency: int, *, lean: bool = False) -> float:
    """The same calls from a plain asyncio loop (AsyncOpenAI, a semaphore); wall seconds.

    `lean`: instead of `chat.completions.parse()`, send the schema built once and validate the
    reply with pydantic, as the gateway does (the same HTTP requests, less client CPU).
    """
    from openai import AsyncOpenAI

    from aios_dagster.gateway.client import response_format_for
    from aios_dagster.inbound.drop_folder import parse_drop_line
    from assets.support.models import Triage, TriageInput, ticket_id_for
    from assets.support.prompts import triager_prompt

    lines = [line for line in drop.read_bytes().splitlines() if line.strip()]
    prompts = []
    for line in lines:
        message = parse_drop_line(line, origin="bench", max_bytes=10**7)
        inputs = TriageInput(
            ticket_id=ticket_id_for(message.item_key), message=message, plan="unknown"
        )
        prompts.append(triager_prompt(inputs))

    async def main() -> float:
        client = AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0)
        gate = asyncio.Semaphore(concurrency)

        async def one(prompt: Any) -> None:
            messages: Any = [
                {"role": "system", "content": prompt.system},
                {"role": "user", "content": prompt.user},
            ]
            async with gate:
                if lean:
                    reply = await client.chat.completions.create(
                        model=MODEL,
                        messages=messages,
                        response_format=response_format_for(Triage),
                        max_tokens=1500,
                    )
                    Triage.model_validate_json(reply.choices[0].message.content or "")
                else:
                    await client.chat.completions.parse(
                        model=MODEL,
                        messages=messages,
                        response_format=Triage,
                        max_tokens=1500,
                    )

        started = time.perf_counter()
        await asyncio.gather(*(one(p) for p in prompts))
        elapsed = time.perf_counter() - started
        await client.close()
        return elapsed

    return asyncio.run(main())


class Landing(NamedTuple):
    """One probe message's way from the drop folder to its first model call, in seconds."""

    total: float
    """Landed -> the model server received its call."""
    to_run: float
    """Landed -> the sensor's run was created (sensor tick)."""
    to_start: float
    """Run created -> run started (coordinator, launcher, run worker start and code import)."""
    to_call: float
    """Run started -> the call (the messages step, then triage's first call)."""


def measure_landing(root: Path, server: Any, times: int) -> list[Landing]:
    """Each probe's landing -> first model call, daemon running, with where the time went."""
    home = root / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {
        **os.environ,
        "AIOS_CONFIG": str(root / "aios.yaml"),
        "DAGSTER_HOME": str(home),
        "AIOS_BENCH_KEY": API_KEY,
        "PYTHONWARNINGS": "ignore",
        "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
    }
    log = (root / "daemon.log").open("wb")
    daemon = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster-daemon"), "run", "-f", "definitions.py"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    landed_at: list[tuple[float, float]] = []  # (wall landed, wall called) per probe
    try:
        for attempt in range(times + 1):  # the first one includes the daemon's own start
            marker = f"landing-probe-{attempt}-{time.time_ns()}"
            path = root / "drop" / f"{marker}.jsonl"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(
                json.dumps({"id": marker, "from": "probe@example.com", "body": marker}) + "\n"
            )
            landed = time.monotonic()
            landed_wall = time.time()
            tmp.rename(path)
            deadline = landed + 180
            while time.monotonic() < deadline:
                hit = [
                    r.received_at
                    for r in server.completions
                    if r.body and marker in json.dumps(r.body)
                ]
                if hit:
                    if attempt > 0:
                        landed_at.append((landed_wall, landed_wall + hit[0] - landed))
                    break
                time.sleep(0.05)
            else:
                raise TimeoutError(f"no model call for {marker}; see {root / 'daemon.log'}")
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        daemon.wait(timeout=60)
        log.close()
    return _where_the_time_went(home, landed_at)


def _where_the_time_went(home: Path, probes: list[tuple[float, float]]) -> list[Landing]:
    """Match each probe to the run the sensor made for it (the first created after it landed)."""
    import dagster as dg

    os.environ["DAGSTER_HOME"] = str(home)
    with dg.DagsterInstance.get() as instance:
        records = sorted(
            instance.get_run_records(dg.RunsFilter(job_name="support_triage")),
            key=lambda r: r.create_timestamp.timestamp(),
        )
    landings = []
    for landed, called in probes:
        record = next(r for r in records if r.create_timestamp.timestamp() >= landed)
        created = record.create_timestamp.timestamp()
        started = record.start_time or created
        landings.append(
            Landing(called - landed, created - landed, started - created, called - started)
        )
    return landings


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--landing", type=int, default=3, help="landing probes (0: skip)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--known-issues", type=int, default=200)
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of bound, lean bound, workflow (medians)"
    )
    args = parser.parse_args()

    from tests.fakes.openai_process import FakeOpenAIServerProcess
    from tests.fakes.openai_server import FakeOpenAIServer

    os.environ["AIOS_BENCH_KEY"] = API_KEY
    os.environ.setdefault("DAGSTER_HOME", tempfile.mkdtemp(prefix="aios-bench-home-"))
    responder = f"{Path(__file__).parent.name}.{Path(__file__).stem}:bench_responder"
    with (
        tempfile.TemporaryDirectory(prefix="aios-bench-", ignore_cleanup_errors=True) as tmp,
        FakeOpenAIServerProcess(responder, latency=args.latency, api_key=API_KEY) as remote,
    ):
        root = Path(tmp)
        _config(root, remote.base_url, args.concurrency)
        os.environ["AIOS_CONFIG"] = str(root / "aios.yaml")
        print(
            f"messages {args.messages}, latency {args.latency * 1000:.0f} ms,"
            f" concurrency {args.concurrency}, {args.rounds} rounds"
        )
        ideal = args.messages / args.concurrency * args.latency
        print(f"  ideal (messages / concurrency x latency): {ideal:.2f} s")
        print(
            "  round   .parse() bound   lean bound   triage step   whole run"
            "   vs .parse()   vs lean"
        )

        def one_round(name: str, seed: int) -> tuple[float, float, float, float]:
            drop = _write_messages(root / "drop", args.messages, seed)
            bound = run_bound(drop, remote.base_url, args.concurrency)
            lean = run_bound(drop, remote.base_url, args.concurrency, lean=True)
            step, run_seconds, tickets = run_workflow(root, remote.base_url, args.concurrency)
            assert tickets == args.messages, f"{tickets} tickets for {args.messages} messages"
            print(
                f"  {name:>5} {bound:14.2f} s {lean:10.2f} s {step:11.2f} s"
                f" {run_seconds:9.2f} s {bound / step:11.3f}x {lean / step:7.3f}x"
            )
            return bound, lean, step, run_seconds

        # Every round a new batch, memory without known issues: comparable rounds.
        rounds = [one_round(str(number + 1), args.seed + number) for number in range(args.rounds)]
        bound, lean, step, run_seconds = (statistics.median(r[i] for r in rounds) for i in range(4))
        print(
            f"  median {bound:13.2f} s {lean:10.2f} s {step:11.2f} s {run_seconds:9.2f} s"
            f" {bound / step:11.3f}x {lean / step:7.3f}x"
        )
        for name, value in ((".parse()", bound), ("schema built once", lean)):
            ratio = value / step
            verdict = "PASS" if ratio >= 0.97 else "FAIL"
            print(
                f"  triage throughput vs the {name} bound (medians): {ratio:.3f}x"
                f" (>= 0.97: {verdict})"
            )
        print(f"  (the whole run also stages {args.messages} approvals and remembers new issues)")
        # Then a batch with known issues in memory: triage embeds every message and searches
        # them, pipelined with the model calls.
        seed_known_issues(root / "aios.yaml", args.known_issues)
        one_round("known", args.seed + args.rounds)
        print(f"  ('known': another batch, with {args.known_issues} known issues in memory)")

        if args.landing:  # the server in this process: its request log times the landing
            with FakeOpenAIServer(
                bench_responder(), latency=args.latency, api_key=API_KEY
            ) as server:
                _config(root, server.base_url, args.concurrency, poll_seconds=1)
                landings = measure_landing(root, server, args.landing)
            totals = [landing.total for landing in landings]
            print(
                f"landing -> first model call, sensor polling every 1 s, daemon running: "
                f"median {statistics.median(totals):.2f} s, max {max(totals):.2f} s "
                f"over {len(landings)} messages"
            )
            for part, what in (
                ("to_run", "landed -> run created (sensor tick)"),
                ("to_start", "run created -> started (queue, launch, code import)"),
                ("to_call", "run started -> first model call (steps)"),
            ):
                median = statistics.median(getattr(landing, part) for landing in landings)
                print(f"  {what:<55} median {median:6.2f} s")


if __name__ == "__main__":
    main()
