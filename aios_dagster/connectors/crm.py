"""A CRM: contacts, notes on them and deals with them, written once per idempotency key.

Two providers behind one `Crm` shape:

- `LedgerCrm` (the default, nothing to sign up for) keeps the CRM in the ledger (SQLite or
  Postgres, migration 11), and the facts warehouse sees it through the ledger snapshot
  (``ledger.crm_contacts``, ``crm_notes``, ``crm_deals``). Every write records its idempotency
  key under a unique constraint, checked and written in one transaction, so a replayed write is
  a no-op that returns the first receipt, and `lookup` finds any write by its key. Contacts and
  deals are upserted (by email; by contact and title): their current state is in
  ``crm_contacts`` / ``crm_deals``, and each write that changed them is a row in
  ``crm_contact_writes`` / ``crm_deal_writes``.
- `HttpCrm` speaks a small REST CRM (``POST /v1/contacts``, ``/v1/notes``, ``/v1/deals``,
  ``GET /v1/effects/{key}``) with the key as the ``Idempotency-Key`` header, which the provider
  honours by replaying the first answer. Errors are mapped as in the payments connector: a 4xx
  is a definite refusal with the provider's message, except 409 (the key is in progress) and
  429 (rate limited), which are transient; a 5xx that says ``Crm-Should-Retry: true``
  committed nothing (transient), any other 5xx may have: `OutcomeUnknown`; a connection that
  never opened is transient, one lost after the request went out is `OutcomeUnknown`, for
  reconciliation through `lookup`. The bearer token only ever goes into the Authorization
  header: never into messages or receipts.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, Literal, Self
from urllib.parse import quote

import httpx
import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy.engine import Connection

from aios_dagster.config import ENV_VAR_NAME
from aios_dagster.connectors.base import (
    Connector,
    EffectFailed,
    HealthReport,
    OutcomeUnknown,
    Receipt,
)
from aios_dagster.connectors.keyed_http import KeyedHttpApi, ProviderBusy
from aios_dagster.ledger import Ledger, utc_now
from aios_dagster.policy.budgets import micros_nearest, to_usd

DealStage = Literal["lead", "qualified", "won", "lost"]


def _email(value: str) -> str:
    value = value.strip().lower()
    local, _, domain = value.partition("@")
    if not local or "." not in domain or " " in value:
        raise ValueError(f"not an email address: {value!r}")
    return value


class Contact(BaseModel):
    """A person the business deals with, known by email (stored lower-case, so one person is
    one contact however the address was typed)."""

    model_config = ConfigDict(frozen=True)

    email: str
    name: str | None = None
    company: str | None = None
    tags: tuple[str, ...] = ()

    @field_validator("email")
    @classmethod
    def _normalized(cls, value: str) -> str:
        return _email(value)


class Note(BaseModel):
    """A free-text note on a contact: every write is a new note (never an update)."""

    model_config = ConfigDict(frozen=True)

    contact_email: str
    body: str = Field(min_length=1)

    @field_validator("contact_email")
    @classmethod
    def _normalized(cls, value: str) -> str:
        return _email(value)


class Deal(BaseModel):
    """A deal with a contact, identified by the contact and its title: a later write with the
    same pair moves it (stage, amount) instead of opening another."""

    model_config = ConfigDict(frozen=True)

    contact_email: str
    title: str = Field(min_length=1)
    amount_usd: float = Field(default=0.0, ge=0)
    stage: DealStage = "lead"

    @field_validator("contact_email")
    @classmethod
    def _normalized(cls, value: str) -> str:
        return _email(value)


def plan_from_tags(contact: Contact | None) -> str:
    """A contact's plan, from its `plan:<name>` tag, lower-cased ('unknown' if none)."""
    for tag in contact.tags if contact else ():
        if tag.startswith("plan:") and tag[5:].strip():
            return tag[5:].strip().lower()
    return "unknown"


class Crm(Connector):
    """What a workflow may do to the CRM; each write acts at most once per idempotency key."""

    def close(self) -> None:
        """Release what the connector holds (connections); a no-op unless it holds any."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abstractmethod
    def upsert_contact(self, key: str, contact: Contact) -> Receipt:
        """Create the contact, or update the one with this email."""

    @abstractmethod
    def add_note(self, key: str, note: Note) -> Receipt:
        """Add a note to a contact."""

    @abstractmethod
    def upsert_deal(self, key: str, deal: Deal) -> Receipt:
        """Open the deal, or move the one with this contact and title."""

    @abstractmethod
    def find_contact(self, email: str) -> Contact | None:
        """The contact with this email, None if the CRM does not know them (a read: it acts
        on nothing, and a CRM that cannot answer raises OutcomeUnknown)."""

    def plan_of(self, email: str) -> str:
        """The customer's plan, from the contact's `plan:<name>` tag ('unknown' if none)."""
        return plan_from_tags(self.find_contact(email))

    def plans_of(self, emails: Sequence[str]) -> dict[str, str]:
        """Plans of many customers by email (one lookup each unless the CRM can do better)."""
        return {email: self.plan_of(email) for email in emails}


def _stable_id(prefix: str, *parts: str) -> str:
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:16]
    return f"{prefix}_{digest}"


# -- the ledger CRM ----------------------------------------------------------------------------


class LedgerCrm(Crm):
    """The CRM as tables in the ledger: no provider to reach, no key to keep.

    The ledger, not the DuckDB warehouse, is the record: a write here is an effect, and a
    worker SIGKILLed in a DuckDB checkpoint can tear the warehouse file (measured: 1 in 800
    kills of a checkpointing writer left "Corrupt database file ... block at location 12288").
    SQLite's WAL and Postgres survive any kill; the warehouse gets the CRM's facts through the
    ledger snapshot (``ledger.crm_*``) like every other ledger table.
    """

    name = "crm"

    def __init__(self, ledger: Ledger) -> None:
        """The ledger is the kernel's (SQLite by default, or Postgres)."""
        self.ledger = ledger

    def _write(self, key: str, apply: Callable[[Connection, str], Receipt]) -> Receipt:
        """Run `apply(connection, now)` in one transaction unless `key` was already written
        (then return that write's receipt): the check and the write cannot be split."""
        try:
            with self.ledger.transaction() as connection:
                earlier = _find(connection, key)
                if earlier is not None:
                    earlier.detail["replayed"] = True
                    return earlier
                receipt = apply(connection, utc_now())
        except sa.exc.IntegrityError as exc:
            # Another process wrote the same key between our check and our insert (Postgres;
            # SQLite's BEGIN IMMEDIATE serializes writers): the retry finds its receipt.
            raise EffectFailed(f"crm: concurrent write of {key}", transient=True) from exc
        except sa.exc.OperationalError as exc:
            raise EffectFailed(f"crm: the ledger is busy: {exc.orig}", transient=True) from exc
        receipt.detail["replayed"] = False
        return receipt

    def upsert_contact(self, key: str, contact: Contact) -> Receipt:
        """Create or update the contact by email; the write is recorded under `key`."""
        contact_id = _stable_id("ct", contact.email)
        row = {
            "id": contact_id,
            "email": contact.email,
            "name": contact.name,
            "company": contact.company,
            "tags": json.dumps(list(contact.tags)),
            "key": key,
        }

        def apply(connection: Connection, now: str) -> Receipt:
            connection.execute(
                sa.text(
                    "INSERT INTO crm_contacts (contact_id, email, name, company, tags,"
                    " created_at, updated_at, effect_key)"
                    " VALUES (:id, :email, :name, :company, :tags, :now, :now, :key)"
                    " ON CONFLICT (contact_id) DO UPDATE SET name = excluded.name,"
                    " company = excluded.company, tags = excluded.tags,"
                    " updated_at = excluded.updated_at, effect_key = excluded.effect_key"
                ),
                {**row, "now": now},
            )
            connection.execute(
                sa.text(
                    "INSERT INTO crm_contact_writes (effect_key, contact_id, email, name,"
                    " company, tags, written_at)"
                    " VALUES (:key, :id, :email, :name, :company, :tags, :now)"
                ),
                {**row, "now": now},
            )
            return _contact_receipt(contact_id, contact.email, contact.name, contact.company)

        return self._write(key, apply)

    def add_note(self, key: str, note: Note) -> Receipt:
        """Add a note (a new row per key; the contact need not exist yet in this CRM)."""
        note_id = "nt_" + uuid.uuid4().hex[:16]

        def apply(connection: Connection, now: str) -> Receipt:
            connection.execute(
                sa.text(
                    "INSERT INTO crm_notes (note_id, effect_key, contact_email, body, created_at)"
                    " VALUES (:id, :key, :email, :body, :now)"
                ),
                {
                    "id": note_id,
                    "key": key,
                    "email": note.contact_email,
                    "body": note.body,
                    "now": now,
                },
            )
            return _note_receipt(note_id, note.contact_email)

        return self._write(key, apply)

    def upsert_deal(self, key: str, deal: Deal) -> Receipt:
        """Open or move the deal with this contact and title; the write is recorded under `key`."""
        deal_id = _stable_id("dl", deal.contact_email, deal.title)
        micros = micros_nearest(deal.amount_usd)
        row = {
            "id": deal_id,
            "email": deal.contact_email,
            "title": deal.title,
            "micros": micros,
            "stage": deal.stage,
            "key": key,
        }

        def apply(connection: Connection, now: str) -> Receipt:
            connection.execute(
                sa.text(
                    "INSERT INTO crm_deals (deal_id, contact_email, title, amount_micros, stage,"
                    " created_at, updated_at, effect_key)"
                    " VALUES (:id, :email, :title, :micros, :stage, :now, :now, :key)"
                    " ON CONFLICT (deal_id) DO UPDATE SET amount_micros = excluded.amount_micros,"
                    " stage = excluded.stage, updated_at = excluded.updated_at,"
                    " effect_key = excluded.effect_key"
                ),
                {**row, "now": now},
            )
            connection.execute(
                sa.text(
                    "INSERT INTO crm_deal_writes (effect_key, deal_id, contact_email, title,"
                    " amount_micros, stage, written_at)"
                    " VALUES (:key, :id, :email, :title, :micros, :stage, :now)"
                ),
                {**row, "now": now},
            )
            return _deal_receipt(
                deal_id, deal.contact_email, deal.title, to_usd(micros), deal.stage
            )

        return self._write(key, apply)

    def _contacts(self, emails: Sequence[str]) -> list[Contact]:
        """The contacts with these (normalized) emails, in one read."""
        if not emails:
            return []
        query = sa.text(
            "SELECT email, name, company, tags FROM crm_contacts WHERE email IN :emails"
        ).bindparams(sa.bindparam("emails", expanding=True))
        try:
            with self.ledger.transaction() as connection:
                rows = connection.execute(query, {"emails": list(emails)}).all()
        except sa.exc.OperationalError as exc:
            raise OutcomeUnknown(f"crm: cannot read the ledger now: {exc.orig}") from exc
        return [
            Contact(email=e, name=n, company=c, tags=tuple(json.loads(t))) for e, n, c, t in rows
        ]

    def find_contact(self, email: str) -> Contact | None:
        """The contact with this email (addresses are stored lower-case)."""
        found = self._contacts([_email(email)])
        return found[0] if found else None

    def plans_of(self, emails: Sequence[str]) -> dict[str, str]:
        """Every customer's plan in one read of the contacts table."""
        wanted = {_email(e): e for e in emails}
        plans = dict.fromkeys(emails, "unknown")
        for contact in self._contacts(list(wanted)):
            plans[wanted[contact.email]] = plan_from_tags(contact)
        return plans

    def lookup(self, key: str) -> Receipt | None:
        """The write made under `key` (contact, note or deal), None if there was none."""
        try:
            with self.ledger.transaction() as connection:
                return _find(connection, key)
        except sa.exc.OperationalError as exc:
            raise OutcomeUnknown(f"crm: cannot read the ledger now: {exc.orig}") from exc

    def health(self) -> HealthReport:
        """Read the CRM tables, acting on nothing."""
        try:
            with self.ledger.transaction() as connection:
                contacts = connection.execute(
                    sa.text("SELECT COUNT(*) FROM crm_contacts")
                ).scalar_one()
        except sa.exc.SQLAlchemyError as exc:
            return HealthReport(connector=self.name, healthy=False, detail=str(exc))
        return HealthReport(
            connector=self.name, healthy=True, detail=f"{contacts} contacts in the ledger"
        )


def _find(connection: Connection, key: str) -> Receipt | None:
    params = {"key": key}
    contact = connection.execute(
        sa.text(
            "SELECT contact_id, email, name, company FROM crm_contact_writes"
            " WHERE effect_key = :key"
        ),
        params,
    ).first()
    if contact is not None:
        return _contact_receipt(*contact)
    note = connection.execute(
        sa.text("SELECT note_id, contact_email FROM crm_notes WHERE effect_key = :key"), params
    ).first()
    if note is not None:
        return _note_receipt(*note)
    deal = connection.execute(
        sa.text(
            "SELECT deal_id, contact_email, title, amount_micros, stage FROM crm_deal_writes"
            " WHERE effect_key = :key"
        ),
        params,
    ).first()
    if deal is not None:
        deal_id, email, title, micros, stage = deal
        return _deal_receipt(deal_id, email, title, to_usd(int(micros)), stage)
    return None


def _contact_receipt(contact_id: str, email: str, name: str | None, company: str | None) -> Receipt:
    detail = {"kind": "contact", "email": email, "name": name, "company": company}
    return Receipt(provider_id=contact_id, detail=detail)


def _note_receipt(note_id: str, contact_email: str) -> Receipt:
    return Receipt(provider_id=note_id, detail={"kind": "note", "contact_email": contact_email})


def _deal_receipt(
    deal_id: str, contact_email: str, title: str, amount_usd: float, stage: str
) -> Receipt:
    detail = {
        "kind": "deal",
        "contact_email": contact_email,
        "title": title,
        "amount_usd": amount_usd,
        "stage": stage,
    }
    return Receipt(provider_id=deal_id, detail=detail)


# -- the HTTP CRM ------------------------------------------------------------------------------


class CrmHttpSettings(BaseModel):
    """Where the HTTP CRM is and which environment variable holds its bearer token."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = Field(min_length=1)
    token_env: str = "AIOS_CRM_TOKEN"
    timeout_seconds: float = Field(default=15.0, gt=0, le=300)

    @field_validator("token_env")
    @classmethod
    def _env_name(cls, value: str) -> str:
        if not ENV_VAR_NAME.match(value):
            raise ValueError("must be the NAME of an environment variable, not a token")
        return value

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL")
        return value.rstrip("/")


class CrmBusy(ProviderBusy):
    """The CRM committed nothing and asked to be tried again (409 key in progress, 429, a 5xx
    with ``Crm-Should-Retry: true``); `retry_after` is honoured by the retry policy."""


class HttpCrm(Crm):
    """A REST CRM reached over HTTP, under the effect's idempotency key."""

    name = "crm_http"

    def __init__(
        self,
        settings: CrmHttpSettings,
        *,
        token: str | None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """`token` is the secret read by the caller from ``settings.token_env``."""
        self.settings = settings
        self._api = KeyedHttpApi(
            label="crm",
            base_url=settings.base_url,
            timeout_seconds=settings.timeout_seconds,
            should_retry_header="Crm-Should-Retry",
            token=token,
            token_env=settings.token_env,
            transport=transport,
        )

    def close(self) -> None:
        """Release pooled connections."""
        self._api.close()

    def upsert_contact(self, key: str, contact: Contact) -> Receipt:
        """``POST /v1/contacts``: the provider upserts by email."""
        body = self._post("/v1/contacts", contact.model_dump(mode="json"), key)
        return _http_receipt("contact", body)

    def add_note(self, key: str, note: Note) -> Receipt:
        """``POST /v1/notes``: one note per key, the provider replays a repeated key."""
        return _http_receipt("note", self._post("/v1/notes", note.model_dump(mode="json"), key))

    def upsert_deal(self, key: str, deal: Deal) -> Receipt:
        """``POST /v1/deals``: the provider upserts by contact and title."""
        return _http_receipt("deal", self._post("/v1/deals", deal.model_dump(mode="json"), key))

    def find_contact(self, email: str) -> Contact | None:
        """``GET /v1/contacts/{email}``: the contact, None on 404."""
        found = self._api.get_json(f"/v1/contacts/{quote(_email(email))}", missing_is_none=True)
        if found is None:
            return None
        return Contact(
            email=str(found["email"]),
            name=found.get("name"),
            company=found.get("company"),
            tags=tuple(found.get("tags") or ()),
        )

    def lookup(self, key: str) -> Receipt | None:
        """``GET /v1/effects/{key}``: what the provider committed under `key`, None on 404."""
        found = self._api.get_json(f"/v1/effects/{key}", missing_is_none=True)
        if found is None:
            return None
        return _http_receipt(str(found.get("kind")), found.get("object") or {})

    def health(self) -> HealthReport:
        """``GET /v1/account``: the token works and the CRM answers, nothing is acted on."""
        try:
            self._api.get_json("/v1/account")
        except (EffectFailed, OutcomeUnknown) as exc:
            return HealthReport(connector=self.name, healthy=False, detail=str(exc))
        return HealthReport(connector=self.name, healthy=True, detail=self.settings.base_url)

    def _post(self, path: str, payload: dict[str, Any], key: str) -> dict[str, Any]:
        try:
            response = self._api.post(path, key, json=payload)
        except ProviderBusy as exc:
            raise CrmBusy(str(exc), retry_after=exc.retry_after) from exc
        body = response.json()
        if not isinstance(body, dict) or "id" not in body:
            raise OutcomeUnknown(f"crm: {response.status_code} answer to {path} without an id")
        body["replayed"] = response.headers.get("Idempotent-Replayed") == "true"
        return body


def _http_receipt(kind: str, body: dict[str, Any]) -> Receipt:
    fields = ("email", "name", "company", "contact_email", "title", "amount_usd", "stage")
    detail: dict[str, Any] = {"kind": kind}
    detail.update({name: body[name] for name in fields if name in body})
    if "replayed" in body:
        detail["replayed"] = body["replayed"]
    return Receipt(provider_id=str(body["id"]), detail=detail)
