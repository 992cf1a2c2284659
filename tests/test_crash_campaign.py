"""Crash campaign: effects happen once, whatever moment a worker is SIGKILLed.

For each connector (static site, SMTP, payments, CMS, the HTTP CRM and the default CRM in the
ledger) a worker running a batch of effects through `IntentLog.execute` is SIGKILLed at every
named crash point (before the intent, after the intent, after the provider committed, before the
outcome is recorded) for 5 seeds, and at at least 100 seeded random moments. Then the step is
retried as a new run (half the time after the `reconcile_stuck` pass the ``stuck_effects`` sensor
runs). Afterwards the provider holds exactly one effect per item (0 duplicates) and the ledger
every item succeeded (0 lost, no intent left in flight). SMTP cannot be asked: an email whose
worker died mid-effect goes to the operator (``needs_operator``), who checks the mail log (here:
the recording server) and resolves it; it is never resent automatically.

Workers are forked from the test process (no interpreter start per kill); the fake providers run
in threads of the test process, and every retry first waits until the provider has finished with
each connection of the dead worker (its server-side sockets are gone), as a real retry comes
long after a killed request was handled. Everything is seeded: a failure names the seed and trial.
"""

from __future__ import annotations

import contextlib
import email
import hashlib
import os
import random
import select
import signal
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.policy import default as default_policy
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import httpx
import pytest
import sqlalchemy as sa
from aiosmtpd.controller import Controller

from aios_dagster.audit import AuditLog, StepContext
from aios_dagster.config import SmtpSettings
from aios_dagster.connectors.base import Connector, ConnectorError, EffectRequest, Receipt
from aios_dagster.connectors.cms_ghost import CmsPost, GhostCms, GhostCmsSettings, key_tag
from aios_dagster.connectors.crm import Contact, CrmHttpSettings, HttpCrm, LedgerCrm, Note
from aios_dagster.connectors.email_smtp import OutgoingEmail, SmtpMailer, message_id_for
from aios_dagster.connectors.intent_log import EffectInProgress, EffectNeedsOperator, IntentLog
from aios_dagster.connectors.payments import (
    METADATA_KEY,
    ChargeRequest,
    PaymentsConnector,
    PaymentsSettings,
)
from aios_dagster.connectors.static_site import SitePost, StaticSitePublisher
from aios_dagster.crashpoints import CRASH_ENV_VAR
from aios_dagster.ledger import Ledger
from aios_dagster.warehouse import Warehouse
from tests.conftest import free_port
from tests.fakes import FakeCrmServer, FakeGhostServer, FakePaymentsServer
from tests.polling import wait_until

SEEDS = (0, 1, 2, 3, 4)
NAMED_POINTS = ("before_intent", "before_call", "after_call", "before_record")
"""Before the intent is claimed, after it (before the provider call), after the provider
committed, and before the outcome is recorded (`IntentLog._finish`)."""
RANDOM_KILLS = 100
"""Random kill moments that must land (the worker still running) per connector."""
MAX_RANDOM_TRIALS = 3 * RANDOM_KILLS
BATCH = 3
"""Effects per worker: small, so the campaign keeps its points within the CI budget."""
DEADLINE_SECONDS = 30.0
WORKFLOW = "campaign"

_BUSY_TCP_STATES = frozenset({"01", "03", "08"})
"""ESTABLISHED, SYN_RECV, CLOSE_WAIT: a server-side socket its application has not closed."""


# --- the providers ---------------------------------------------------------------------------


class Provider:
    """A connector's provider for the campaign: builds connectors, performs, counts effects."""

    name: ClassVar[str]
    unknowable: ClassVar[bool] = False
    """The provider cannot be asked (SMTP): a worker dying mid-effect means the operator."""

    def __init__(self, root: Path, ledger_url: str) -> None:
        self.root = root
        self.ledger_url = ledger_url
        """The ledger the intents are in (the default CRM keeps its tables there too)."""

    def start(self) -> None:
        """Start the fake provider (in threads of the test process)."""

    def stop(self) -> None:
        """Stop it."""

    @property
    def port(self) -> int | None:
        """The TCP port the provider serves on, None for a folder."""
        return None

    def connector(self, trial: int) -> Connector:
        """A fresh connector (own connection pool) for one process and trial."""
        raise NotImplementedError

    def close(self, connector: Connector) -> None:
        """Release a connector's connections."""
        closer = getattr(connector, "close", None)
        if closer is not None:
            closer()

    def perform(self, connector: Connector, item: EffectRequest) -> Callable[[str], Receipt]:
        """The effect of one item, called by the intent log with the key."""
        raise NotImplementedError

    def effects(self, keys: dict[int, list[str]]) -> dict[str, int]:
        """How many effects the provider holds for each key (keys by trial)."""
        raise NotImplementedError

    def total_effects(self) -> int:
        """Every effect the provider holds (stray effects under unknown keys included)."""
        raise NotImplementedError

    def wait_idle(self) -> None:
        """Wait until the provider has finished with every connection (a dead worker's too)."""
        port = self.port
        if port is None:
            return
        wait_until(
            lambda: not _server_busy(port),
            timeout=DEADLINE_SECONDS,
            what=f"{self.name}: the provider on :{port} done with a dead worker's connections",
            interval=0.001,
        )


def _server_busy(port: int) -> bool:
    """Whether a server-side socket on `port` is still open (Linux: /proc/net/tcp)."""
    suffix = f":{port:04X}"
    lines = Path("/proc/net/tcp").read_text(encoding="ascii").splitlines()[1:]
    for line in lines:
        fields = line.split()
        if fields[1].endswith(suffix) and fields[3] in _BUSY_TCP_STATES:
            return True
    return False


def _plain_http() -> httpx.HTTPTransport:
    """A transport for the plain-HTTP fakes: no TLS context to build (25 ms per connector)."""
    return httpx.HTTPTransport(verify=False)


def _slug(item: EffectRequest) -> str:
    return item.item_key.lower()


class SiteProvider(Provider):
    name = "static_site"

    def site(self, trial: int) -> StaticSitePublisher:
        return StaticSitePublisher(
            self.root / f"trial-{trial}", site_url="https://news.example.com/", site_title="Ops"
        )

    def connector(self, trial: int) -> Connector:
        return self.site(trial)

    def perform(self, connector: Connector, item: EffectRequest) -> Callable[[str], Receipt]:
        assert isinstance(connector, StaticSitePublisher)
        post = SitePost(
            slug=_slug(item),
            title=f"Issue {item.item_key}",
            summary="summary",
            published_at=datetime(2026, 11, 23, tzinfo=UTC),
            markdown=f"# {item.item_key}",
            html=f"<h1>{item.item_key}</h1>",
        )
        return lambda key: connector.publish(key, post, item.payload_hash)

    def effects(self, keys: dict[int, list[str]]) -> dict[str, int]:
        found: dict[str, int] = {}
        for trial, trial_keys in keys.items():
            site = self.site(trial)
            counts = Counter(record.idempotency_key for record in site.records())
            feed = site.site_dir / "feed.xml"
            entries = feed.read_text(encoding="utf-8").count("<entry>") if feed.exists() else 0
            assert entries == sum(counts.values()), f"trial {trial}: the feed disagrees"
            found.update((key, counts[key]) for key in trial_keys)
        return found

    def total_effects(self) -> int:
        return sum(1 for _ in self.root.glob("trial-*/posts/*.json"))


class _Mailbox:
    """An aiosmtpd handler keeping the Message-ID of every accepted message."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.message_ids: list[str] = []

    async def handle_DATA(  # noqa: N802 - aiosmtpd's hook name
        self, server: Any, session: Any, envelope: Any
    ) -> str:
        message = email.message_from_bytes(envelope.content, policy=default_policy)
        with self.lock:
            self.message_ids.extend(str(message["Message-ID"]) for _ in envelope.rcpt_tos)
        return "250 Message accepted for delivery"

    def counts(self) -> Counter[str]:
        with self.lock:
            return Counter(self.message_ids)


class SmtpProvider(Provider):
    name = "smtp"
    unknowable = True

    def __init__(self, root: Path, ledger_url: str) -> None:
        super().__init__(root, ledger_url)
        self.mailbox = _Mailbox()
        self._port = free_port()
        self.controller = Controller(self.mailbox, hostname="127.0.0.1", port=self._port)

    def start(self) -> None:
        self.controller.start()

    def stop(self) -> None:
        self.controller.stop()

    @property
    def port(self) -> int | None:
        return self._port

    def connector(self, trial: int) -> Connector:
        settings = SmtpSettings(
            host="127.0.0.1", port=self._port, starttls=False, timeout_seconds=10
        )
        return SmtpMailer(settings, password=None)

    def perform(self, connector: Connector, item: EffectRequest) -> Callable[[str], Receipt]:
        assert isinstance(connector, SmtpMailer)
        message = OutgoingEmail(to=item.target, subject=f"Issue {item.item_key}", text="Hello")
        return lambda key: connector.send(key, message)

    def effects(self, keys: dict[int, list[str]]) -> dict[str, int]:
        counts = self.mailbox.counts()
        return {key: counts[message_id_for(key)] for group in keys.values() for key in group}

    def total_effects(self) -> int:
        return sum(self.mailbox.counts().values())


class PaymentsProvider(Provider):
    name = "payments"
    SECRET = "sk_test_campaign"

    def __init__(self, root: Path, ledger_url: str) -> None:
        super().__init__(root, ledger_url)
        self.server = FakePaymentsServer(api_key=self.SECRET)

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    @property
    def port(self) -> int | None:
        return int(self.server.url.rsplit(":", 1)[1])

    def connector(self, trial: int) -> Connector:
        settings = PaymentsSettings(base_url=self.server.url, timeout_seconds=10)
        return PaymentsConnector(settings, api_key=self.SECRET, transport=_plain_http())

    def perform(self, connector: Connector, item: EffectRequest) -> Callable[[str], Receipt]:
        assert isinstance(connector, PaymentsConnector)
        charge = ChargeRequest(amount=1500, customer=f"cus_{_slug(item)}")
        return lambda key: connector.charge(key, charge)

    def _counts(self) -> Counter[str]:
        return Counter(
            str(intent["metadata"].get(METADATA_KEY))
            for intent in self.server.succeeded_payment_intents
        )

    def effects(self, keys: dict[int, list[str]]) -> dict[str, int]:
        counts = self._counts()
        return {key: counts[key] for group in keys.values() for key in group}

    def total_effects(self) -> int:
        return sum(self._counts().values())


class CmsProvider(Provider):
    name = "cms"

    def __init__(self, root: Path, ledger_url: str) -> None:
        super().__init__(root, ledger_url)
        self.server = FakeGhostServer()

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    @property
    def port(self) -> int | None:
        return int(self.server.url.rsplit(":", 1)[1])

    def connector(self, trial: int) -> Connector:
        settings = GhostCmsSettings(admin_url=self.server.url, timeout_seconds=10)
        return GhostCms(settings, admin_key=self.server.admin_key, transport=_plain_http())

    def perform(self, connector: Connector, item: EffectRequest) -> Callable[[str], Receipt]:
        assert isinstance(connector, GhostCms)
        post = CmsPost(title=f"Issue {item.item_key}", html="<p>Hello</p>", slug=_slug(item))
        return lambda key: connector.publish(key, post)

    def _counts(self) -> Counter[str]:
        return Counter(
            str(tag["name"])
            for post in self.server.posts
            for tag in post.get("tags") or []
            if str(tag.get("name", "")).startswith("#aios-")
        )

    def effects(self, keys: dict[int, list[str]]) -> dict[str, int]:
        counts = self._counts()
        return {key: counts[key_tag(key)] for group in keys.values() for key in group}

    def total_effects(self) -> int:
        return len(self.server.posts)


class CrmProvider(Provider):
    """The HTTP CRM: each effect is a note on one contact; a note carries its key in its body,
    so the provider's notes can be counted per key."""

    name = "crm_http"
    TOKEN = "crm_campaign_token"
    CONTACT = "reader@example.org"

    def __init__(self, root: Path, ledger_url: str) -> None:
        super().__init__(root, ledger_url)
        self.server = FakeCrmServer(token=self.TOKEN)

    def start(self) -> None:
        self.server.start()
        crm = self.connector(0)
        try:
            assert isinstance(crm, HttpCrm)
            crm.upsert_contact("idem_campaign_contact", Contact(email=self.CONTACT))
        finally:
            self.close(crm)

    def stop(self) -> None:
        self.server.stop()

    @property
    def port(self) -> int | None:
        return int(self.server.url.rsplit(":", 1)[1])

    def connector(self, trial: int) -> Connector:
        settings = CrmHttpSettings(base_url=self.server.url, timeout_seconds=10)
        return HttpCrm(settings, token=self.TOKEN, transport=_plain_http())

    def perform(self, connector: Connector, item: EffectRequest) -> Callable[[str], Receipt]:
        assert isinstance(connector, HttpCrm)
        return lambda key: connector.add_note(
            key, Note(contact_email=self.CONTACT, body=f"reply to {item.item_key} [{key}]")
        )

    def _counts(self) -> Counter[str]:
        return Counter(
            str(note["body"]).rsplit("[", 1)[-1].rstrip("]")
            for note in self.server.notes
            if "[" in str(note["body"])
        )

    def effects(self, keys: dict[int, list[str]]) -> dict[str, int]:
        counts = self._counts()
        return {key: counts[key] for group in keys.values() for key in group}

    def total_effects(self) -> int:
        return len(self.server.notes)


class LedgerCrmProvider(Provider):
    """The default CRM, tables in the ledger the intents are in (as in the kernel): a worker
    killed inside its SQLite transaction leaves nothing half-written, and the retry finds the
    note by its key (`lookup`) or writes it."""

    name = "crm"  # the connector's own name: it names the crash points
    CONTACT = "reader@example.org"

    def connector(self, trial: int) -> Connector:
        return LedgerCrm(Ledger(self.ledger_url))

    def close(self, connector: Connector) -> None:
        assert isinstance(connector, LedgerCrm)
        connector.ledger.dispose()

    def perform(self, connector: Connector, item: EffectRequest) -> Callable[[str], Receipt]:
        assert isinstance(connector, LedgerCrm)
        return lambda key: connector.add_note(
            key, Note(contact_email=self.CONTACT, body=f"reply to {item.item_key}")
        )

    def _note_keys(self) -> list[str]:
        ledger = Ledger(self.ledger_url)
        try:
            with ledger.transaction() as tx:
                rows = tx.execute(sa.text("SELECT effect_key FROM crm_notes")).scalars()
                return [str(key) for key in rows]
        finally:
            ledger.dispose()

    def effects(self, keys: dict[int, list[str]]) -> dict[str, int]:
        counts = Counter(self._note_keys())
        return {key: counts[key] for group in keys.values() for key in group}

    def total_effects(self) -> int:
        return len(self._note_keys())


PROVIDERS: dict[str, type[Provider]] = {
    p.name: p
    for p in (
        SiteProvider,
        SmtpProvider,
        PaymentsProvider,
        CmsProvider,
        CrmProvider,
        LedgerCrmProvider,
    )
}


# --- the campaign ----------------------------------------------------------------------------


@dataclass
class Tally:
    """What the campaign did to one connector, and what it found afterwards."""

    connector: str
    trials: int = 0
    named_kills: int = 0
    random_kills: int = 0
    random_finished: int = 0
    """Random delays that outlived the worker (it finished the batch): not counted as kills."""
    left_in_flight: int = 0
    """Intents a dead worker left in flight (claimed, outcome unrecorded)."""
    stuck_reconciled: int = 0
    needs_operator: int = 0
    operator_happened: int = 0
    items: int = 0
    effects: int = 0
    duplicates: int = 0
    lost: int = 0
    resolved: int = 0
    problems: list[str] = field(default_factory=list)

    HEADER: ClassVar[str] = (
        f"{'connector':<12}{'trials':>7}{'named':>7}{'random':>7}{'items':>7}{'effects':>8}"
        f"{'dupes':>7}{'lost':>6}{'resolved':>9}{'in_flight':>10}{'stuck':>6}{'needs_op':>9}"
        f"{'op:sent':>8}"
    )

    def row(self) -> str:
        return (
            f"{self.connector:<12}{self.trials:>7}{self.named_kills:>7}{self.random_kills:>7}"
            f"{self.items:>7}{self.effects:>8}{self.duplicates:>7}{self.lost:>6}"
            f"{self.resolved:>9}{self.left_in_flight:>10}{self.stuck_reconciled:>6}"
            f"{self.needs_operator:>9}"
            f"{self.operator_happened:>8}"
        )


@dataclass
class Campaign:
    provider: Provider
    ledger_url: str
    scratch: Path
    tally: Tally
    ledger: Ledger = field(init=False)
    intents: IntentLog = field(init=False)

    def __post_init__(self) -> None:
        self.ledger = Ledger(self.ledger_url)
        self.ledger.migrate()
        self.intents = _intent_log(self.ledger, self.scratch, "parent")

    def items(self, trial: int) -> list[EffectRequest]:
        name = self.provider.name
        return [
            EffectRequest(
                workflow=WORKFLOW,
                item_key=f"{name.replace('_', '-')}-t{trial}-i{index}",
                action=f"{name}_effect",
                target=f"reader-{trial}-{index}@example.com",
                payload_hash=hashlib.sha256(f"{name}:{trial}:{index}".encode()).hexdigest(),
            )
            for index in range(BATCH)
        ]

    # -- the worker ---------------------------------------------------------------------

    def worker(
        self, trial: int, crash_at: str | None, crash_index: int, kill_after: float | None
    ) -> tuple[str, float]:
        """Fork a worker running the trial's batch; returns how it ended and how long it ran.

        `crash_at` arms a named crash point before item `crash_index` (the worker SIGKILLs
        itself there); `kill_after` SIGKILLs it that many seconds after it started the batch.
        """
        self.ledger.dispose()  # no SQLite connection crosses the fork
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the worker; it never returns
            os.close(ready_r)
            self._work(trial, crash_at, crash_index, ready_w)
        os.close(ready_w)
        pidfd = os.pidfd_open(pid)
        try:
            readable, _, _ = select.select([ready_r], [], [], DEADLINE_SECONDS)
            started = time.monotonic()
            assert readable and os.read(ready_r, 1) == b"r", f"trial {trial}: worker never began"
            if kill_after is not None:
                exited, _, _ = select.select([pidfd], [], [], kill_after)
                if not exited:
                    os.kill(pid, signal.SIGKILL)
            exited, _, _ = select.select([pidfd], [], [], DEADLINE_SECONDS)
            if not exited:
                os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            ran = time.monotonic() - started
            assert exited, f"trial {trial}: worker hung past {DEADLINE_SECONDS}s (crash {crash_at})"
        finally:
            os.close(pidfd)
            os.close(ready_r)
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
            return "killed", ran
        code = os.waitstatus_to_exitcode(status)
        assert code == 0, f"trial {trial}: worker failed with {code} (crash {crash_at})"
        return "finished", ran

    def _work(self, trial: int, crash_at: str | None, crash_index: int, ready: int) -> NoReturn:
        code = 70
        try:
            os.environ.pop(CRASH_ENV_VAR, None)
            ledger = Ledger(self.ledger_url)
            ledger.migrate()
            intents = _intent_log(ledger, self.scratch, f"worker-{os.getpid()}")
            connector = self.provider.connector(trial)
            context = _context(f"run-{trial}-first", trial)
            os.write(ready, b"r")
            for index, item in enumerate(self.items(trial)):
                if crash_at is not None and index == crash_index:
                    os.environ[CRASH_ENV_VAR] = f"{self.provider.name}.{crash_at}"
                perform = self.provider.perform(connector, item)
                with contextlib.suppress(EffectNeedsOperator, EffectInProgress, ConnectorError):
                    intents.execute(connector, item, perform, context)
            code = 0
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            code = 71
        finally:
            os._exit(code)

    # -- the retry, and the operator ----------------------------------------------------

    def retry(self, trial: int, rng: random.Random) -> None:
        """The step retried as a new run (after the stuck-effects pass, half the time)."""
        items = self.items(trial)
        with self.ledger.transaction() as tx:
            stuck = tx.execute(
                sa.text("SELECT COUNT(*) FROM intents WHERE state = 'in_flight'")
            ).scalar_one()
        self.tally.left_in_flight += int(stuck)
        self.provider.wait_idle()
        connector = self.provider.connector(trial)
        try:
            if rng.random() < 0.5:
                report = self.intents.reconcile_stuck({self.provider.name: connector})
                self.tally.stuck_reconciled += len(report.effects)
                for effect in report.effects:
                    if effect.verdict == "needs_operator":
                        self.tally.needs_operator += 1
                        self.operator(effect.key)
            pending = items
            for _ in range(4):
                context = _context(f"run-{trial}-retry-{rng.randrange(10**6)}", trial)
                left: list[EffectRequest] = []
                for item in pending:
                    perform = self.provider.perform(connector, item)
                    try:
                        self.intents.execute(connector, item, perform, context)
                    except EffectNeedsOperator:
                        if self.intents.state_of(item.key) == "needs_operator":
                            self.tally.needs_operator += 1
                            self.operator(item.key)
                        left.append(item)
                    except (ConnectorError, EffectInProgress) as exc:
                        self.tally.problems.append(f"trial {trial}: retry: {exc}")
                        left.append(item)
                if not left:
                    break
                pending = left
        finally:
            self.provider.close(connector)

    def operator(self, key: str) -> None:
        """The operator checks the mail log for the effect's Message-ID and resolves it."""
        if not self.provider.unknowable:
            self.tally.problems.append(f"{key}: needs the operator on an askable provider")
            return
        self.provider.wait_idle()
        (sent,) = self.provider.effects({0: [key]}).values()
        self.tally.operator_happened += sent > 0
        self.intents.resolve(
            key, happened=sent > 0, actor="operator:campaign", note="checked the mail log"
        )

    def check(self, trials: int) -> None:
        """After the retries: one effect per item at the provider, every intent succeeded."""
        keys = {trial: [item.key for item in self.items(trial)] for trial in range(1, trials + 1)}
        counts = self.provider.effects(keys)
        with self.ledger.transaction() as tx:
            states = dict(
                tx.execute(sa.text("SELECT idempotency_key, state FROM intents")).tuples().all()
            )
        for trial, trial_keys in keys.items():
            for key in trial_keys:
                state = states.get(key)
                self.tally.items += 1
                self.tally.effects += counts[key]
                self.tally.duplicates += max(0, counts[key] - 1)
                if state == "succeeded" and counts[key] >= 1:
                    self.tally.resolved += 1
                else:
                    self.tally.lost += 1
                    self.tally.problems.append(
                        f"trial {trial}: {key} is {state} with {counts[key]} effects"
                    )


def _intent_log(ledger: Ledger, scratch: Path, who: str) -> IntentLog:
    audit = AuditLog(Warehouse(scratch / f"{who}.duckdb"), scratch / f"spool-{who}")
    return IntentLog(ledger, audit, lease=timedelta(seconds=30))


def _context(run_id: str, trial: int) -> StepContext:
    return StepContext(
        workflow=WORKFLOW, step="campaign/effects", partition_key=f"t{trial}", run_id=run_id
    )


@pytest.fixture
def campaign(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Campaign]:
    ledger_url = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    provider = PROVIDERS[request.param](tmp_path / "provider", ledger_url)
    provider.start()
    try:
        yield Campaign(
            provider=provider,
            ledger_url=ledger_url,
            scratch=tmp_path,
            tally=Tally(connector=provider.name),
        )
    finally:
        provider.stop()


@pytest.mark.parametrize("campaign", list(PROVIDERS), indirect=True)
def test_sigkill_at_every_point_then_retry_gives_each_effect_once(campaign: Campaign) -> None:
    tally = campaign.tally
    trial = 0

    def run(crash_at: str | None, crash_index: int, kill_after: float | None) -> tuple[str, float]:
        nonlocal trial
        trial += 1
        tally.trials += 1
        ended, ran = campaign.worker(trial, crash_at, crash_index, kill_after)
        campaign.retry(trial, rng)
        return ended, ran

    rng = random.Random(f"calibrate:{campaign.provider.name}")
    # An undisturbed batch first: it times the window the random kills fall into.
    ended, batch_seconds = run(None, 0, None)
    assert ended == "finished"

    for seed in SEEDS:
        rng = random.Random(f"named:{campaign.provider.name}:{seed}")
        for point in NAMED_POINTS:
            ended, _ = run(point, rng.randrange(BATCH), None)
            assert ended == "killed", f"seed {seed}: {point} was never reached"
            tally.named_kills += 1

    rng = random.Random(f"random:{campaign.provider.name}")
    while tally.random_kills < RANDOM_KILLS:
        assert tally.trials < MAX_RANDOM_TRIALS, "too few random kills landed"
        ended, ran = run(None, 0, rng.uniform(0, batch_seconds))
        tally.random_kills += ended == "killed"
        tally.random_finished += ended == "finished"
        if ended == "finished":  # the window was too wide: a batch can take no longer than this
            batch_seconds = min(batch_seconds, ran)

    campaign.check(trial)

    with campaign.ledger.transaction() as tx:
        rows = tx.execute(sa.text("SELECT state, COUNT(*) FROM intents GROUP BY state")).all()
    states = {str(state): int(count) for state, count in rows}
    stray = campaign.provider.total_effects() - tally.effects
    print(f"\n{Tally.HEADER}\n{tally.row()}")
    print(f"  ledger states {states}; random delays outlived the worker: {tally.random_finished}")
    for problem in tally.problems[:20]:
        print(f"  problem: {problem}")

    assert tally.named_kills == len(SEEDS) * len(NAMED_POINTS)
    assert tally.random_kills >= RANDOM_KILLS
    assert tally.duplicates == 0
    assert tally.lost == 0
    assert stray == 0, f"{stray} effects at the provider under no campaign key"
    assert tally.resolved == tally.items == tally.effects
    assert states == {"succeeded": tally.items}, states  # none in flight, failed or waiting
    assert not [p for p in tally.problems if "askable" in p]
    if not campaign.provider.unknowable:
        assert tally.needs_operator == 0
