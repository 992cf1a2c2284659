"""The operator config: defaults need nothing, and a bad value stops with a message that names
the key and says what is wrong (through the library and through `aios config check`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from aios_dagster.cli.main import app
from aios_dagster.config import (
    CONFIG_ENV_VAR,
    AiosConfig,
    ConfigError,
    load_config,
    parse_config,
)


def _write(folder: Path, text: str, name: str = "aios.yaml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def _error(data: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, source="test.yaml")
    return str(caught.value)


def _assert_all_defaults(config: AiosConfig) -> None:
    assert config.llm.endpoint.base_url is None
    assert config.llm.tier_for_role("drafter") == "rules"
    assert config.llm.tier_for_role("planner") == "rules"
    assert config.newsletter.feeds == []
    assert config.newsletter.notes_dir is None
    assert config.smtp is None
    assert config.newsletter.length.min_words <= config.newsletter.length.max_words


# --- defaults need nothing ----------------------------------------------------------------


def test_an_empty_file_is_a_valid_offline_config(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, ""))
    _assert_all_defaults(config)
    assert config.state_path == (tmp_path / ".aios").resolve()


def test_a_file_of_comments_only_is_a_valid_config(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, "# nothing set yet\n# llm:\n#   endpoint: x\n"))
    _assert_all_defaults(config)


def test_no_file_at_all_means_defaults_in_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(CONFIG_ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)  # no ./aios.yaml here
    config = load_config()
    _assert_all_defaults(config)
    assert config.base_dir == tmp_path.resolve()


def test_the_environment_variable_selects_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path, "newsletter: {title: Picked By Env}\n", name="elsewhere.yaml")
    monkeypatch.setenv(CONFIG_ENV_VAR, str(path))
    monkeypatch.chdir(tmp_path.parent)
    assert load_config().newsletter.title == "Picked By Env"


def test_a_key_left_empty_means_its_default_like_a_deleted_key(tmp_path: Path) -> None:
    # What an operator gets by deleting the values under a key but keeping the key.
    text = (
        "newsletter:\n"
        "  feeds:\n"
        "  cadence:\n"
        "llm:\n"
        "  endpoint:\n"
        "    base_url:\n"
        "    api_key_env:\n"
        "smtp:\n"
    )
    config = load_config(_write(tmp_path, text))
    _assert_all_defaults(config)
    assert config.llm.endpoint.api_key_env == "AIOS_LLM_API_KEY"
    assert config.newsletter.cadence.timezone == "UTC"


def test_a_tier_model_with_its_own_price_is_accepted() -> None:
    config = parse_config(
        {
            "llm": {
                "endpoint": {"base_url": "http://127.0.0.1:11434/v1/"},
                "tiers": {"draft": {"model": "llama3.1:8b"}},
                "prices": {"llama3.1:8b": {"input_per_million": 0, "output_per_million": 0}},
            }
        }
    )
    assert config.llm.endpoint.base_url == "http://127.0.0.1:11434/v1"
    assert config.llm.tier_for_role("drafter") == "draft"
    assert config.llm.price_table()["llama3.1:8b"].input_per_million == 0


# --- a bad value names the key and the problem -------------------------------------------


@pytest.mark.parametrize(
    ("data", "key", "problem"),
    [
        pytest.param(
            {"newsletter": {"length": {"min_words": 900, "max_words": 100}}},
            "newsletter.length",
            "min_words must not exceed max_words",
            id="min-words-above-max",
        ),
        pytest.param(
            {"llm": {"endpoint": {"base_url": "localhost:11434/v1"}}},
            "llm.endpoint.base_url",
            "must be an http(s) URL",
            id="base-url-not-a-url",
        ),
        pytest.param(
            {"newsletter": {"lenght": {"min_words": 10}}},
            "newsletter.lenght",
            "unknown key",
            id="typo-nested",
        ),
        pytest.param(
            {"newsleter": {"title": "x"}},
            "newsleter",
            "unknown key",
            id="typo-top-level",
        ),
        pytest.param(
            {"newsletter": {"cadence": {"timezone": "Mars/Olympus_Mons"}}},
            "newsletter.cadence.timezone",
            "unknown time zone 'Mars/Olympus_Mons'",
            id="unknown-timezone",
        ),
        pytest.param(
            {"newsletter": {"cadence": {"timezone": "../../etc/passwd"}}},
            "newsletter.cadence.timezone",
            "unknown time zone",
            id="timezone-path",
        ),
        pytest.param(
            {"smtp": {"host": "mail.example.com", "port": 70000}},
            "smtp.port",
            "less than or equal to 65535",
            id="smtp-port-out-of-range",
        ),
        pytest.param(
            {"smtp": {"host": "mail.example.com", "port": 0}},
            "smtp.port",
            "greater than or equal to 1",
            id="smtp-port-zero",
        ),
        pytest.param(
            {"llm": {"tiers": {"draft": {"model": "mystery-model-9000"}}}},
            "llm.tiers",
            "draft.model 'mystery-model-9000' has no price: add it under llm.prices",
            id="tier-model-without-price",
        ),
        pytest.param(
            {"llm": {"endpoint": {"api_key_env": "sk-abc123"}}},
            "llm.endpoint.api_key_env",
            "must be the NAME of an environment variable",
            id="literal-api-key",
        ),
        pytest.param(
            {"smtp": {"host": "mail.example.com", "password_env": "hunter2!"}},
            "smtp.password_env",
            "must be the NAME of an environment variable",
            id="literal-smtp-password",
        ),
        pytest.param(
            {"operator": {"email": "operator at example dot com"}},
            "operator.email",
            "is not an email address such as name@example.com",
            id="bad-email",
        ),
        pytest.param(
            {"newsletter": {"subscribers": ["a@example.com", "not-an-address"]}},
            "newsletter.subscribers.1",
            "'not-an-address' is not an email address",
            id="bad-subscriber-names-its-position",
        ),
        pytest.param(
            {"newsletter": {"feeds": ["ftp://feeds.example.com/rss"]}},
            "newsletter.feeds",
            "must be an http(s) URL or a local path",
            id="feed-scheme",
        ),
        pytest.param(
            {"newsletter": {"max_items": "lots"}},
            "newsletter.max_items",
            "valid integer",
            id="not-a-number",
        ),
        pytest.param(
            {"llm": {"roles": {"drafter": "premium"}}},
            "llm.roles.drafter",
            "'rules', 'draft' or 'verify'",
            id="unknown-tier-name",
        ),
        pytest.param(
            {"payments": {"api_key_env": "sk_live_abc123"}},
            "payments.api_key_env",
            "NAME of an environment variable",
            id="payments-key-instead-of-its-variable",
        ),
        pytest.param(
            {"cms": {"admin_url": "blog.example.com"}},
            "cms.admin_url",
            "http(s) URL",
            id="cms-url-without-scheme",
        ),
        pytest.param(
            {"base_dir": "/etc"},
            "base_dir",
            "unknown key",
            id="base-dir-comes-from-the-file-location-only",
        ),
    ],
)
def test_a_bad_value_names_the_key_and_the_problem(data: Any, key: str, problem: str) -> None:
    message = _error(data)
    assert message.startswith("invalid operator config test.yaml:")
    assert f"\n  {key}: " in message, message
    line = next(line for line in message.splitlines() if line.startswith(f"  {key}: "))
    assert problem in line, message


def test_every_bad_key_is_reported_at_once() -> None:
    message = _error(
        {
            "smtp": {"host": "mail.example.com", "port": 70000},
            "newsletter": {"cadence": {"timezone": "Nowhere/Land"}, "max_items": 0},
        }
    )
    keys = [line.split(":")[0].strip() for line in message.splitlines()[1:]]
    assert sorted(keys) == ["newsletter.cadence.timezone", "newsletter.max_items", "smtp.port"]


def test_a_literal_secret_is_not_echoed_back() -> None:
    secret = "sk-proj-abcdefghijklmnop1234567890"
    message = _error({"llm": {"endpoint": {"api_key_env": secret}}})
    assert "llm.endpoint.api_key_env" in message
    assert secret not in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("newsletter: [unclosed\n", "is not valid YAML", id="not-yaml"),
        pytest.param("key: value\n\tbad: tab\n", "is not valid YAML", id="tab-indent"),
        pytest.param("- a\n- b\n", "the top level must be a mapping", id="top-level-list"),
        pytest.param("just a sentence\n", "the top level must be a mapping", id="top-level-str"),
    ],
)
def test_an_unreadable_file_says_why(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert expected in str(caught.value)
    assert str(path) in str(caught.value)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "aios.yaml"
    with pytest.raises(ConfigError, match="operator config file not found") as caught:
        load_config(missing)
    assert str(missing) in str(caught.value)


def test_a_file_that_is_not_utf8_is_refused_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "aios.yaml"
    path.write_bytes("newsletter: {title: Caf\u00e9}\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="cannot read operator config") as caught:
        load_config(path)
    assert str(path) in str(caught.value)


# --- relative paths -----------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "company"
    folder.mkdir()
    path = _write(
        folder,
        yaml.safe_dump(
            {
                "state_dir": "state",
                "newsletter": {
                    "feeds": [
                        "feeds/a.xml",
                        "file://feeds/b.xml",
                        "/srv/feeds/c.xml",
                        "https://example.com/feed.xml",
                    ],
                    "notes_dir": "notes",
                    "subscribers_file": "people.csv",
                    "site_dir": "public",
                },
            }
        ),
    )
    monkeypatch.chdir(tmp_path)  # the working folder must not matter
    config = load_config(Path("company") / "aios.yaml")
    root = folder.resolve()
    assert config.base_dir == root
    assert config.state_path == root / "state"
    assert config.feed_locations() == [
        str(root / "feeds" / "a.xml"),
        str(root / "feeds" / "b.xml"),
        "/srv/feeds/c.xml",
        "https://example.com/feed.xml",
    ]
    assert config.resolve(config.newsletter.notes_dir or Path()) == root / "notes"
    assert config.resolve(config.newsletter.subscribers_file or Path()) == root / "people.csv"
    # A relative site folder lives inside the state directory.
    assert config.site_path == root / "state" / "public"
    assert path.exists()


# --- `aios config check` ----------------------------------------------------------------


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    # `--config` writes $AIOS_CONFIG for the process; this restores it after the test.
    monkeypatch.setenv(CONFIG_ENV_VAR, "/nonexistent/placeholder.yaml")
    return CliRunner()


def test_config_check_exits_2_naming_the_bad_key(tmp_path: Path, runner: CliRunner) -> None:
    path = _write(
        tmp_path,
        "newsletter:\n  length: {min_words: 900, max_words: 100}\nsmtp: {host: mx, port: 99999}\n",
    )
    result = runner.invoke(app, ["--config", str(path), "config", "check"])
    assert result.exit_code == 2, result.output
    assert "newsletter.length: min_words must not exceed max_words" in result.stderr
    assert "smtp.port: Input should be less than or equal to 65535" in result.stderr
    assert "config is valid" not in result.output
    assert not (tmp_path / ".aios").exists()  # nothing was built from a bad config


def test_config_check_exits_2_for_a_missing_file(tmp_path: Path, runner: CliRunner) -> None:
    missing = tmp_path / "missing.yaml"
    result = runner.invoke(app, ["--config", str(missing), "config", "check"])
    assert result.exit_code == 2
    assert "operator config file not found" in result.stderr


def test_config_check_exits_0_and_summarizes_a_good_file(tmp_path: Path, runner: CliRunner) -> None:
    path = _write(
        tmp_path,
        "state_dir: state\nnewsletter:\n  feeds: [feeds/a.xml, https://example.com/rss]\n",
    )
    result = runner.invoke(app, ["--config", str(path), "config", "check"])
    assert result.exit_code == 0, result.output
    assert "config is valid" in result.stdout
    assert "none (every role runs on the rules tier)" in result.stdout
    assert str((tmp_path / "state").resolve()) in result.stdout
    assert "feeds:           2" in result.stdout


def test_connector_sections_become_resources_and_their_keys_are_redacted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aios_dagster.audit import StepContext
    from resources import build_resources
    from tests.conftest import write_config

    path = write_config(
        tmp_path,
        {
            "payments": {"base_url": "http://127.0.0.1:9", "api_key_env": "TEST_PAYMENTS_KEY"},
            "cms": {"admin_url": "http://127.0.0.1:9", "admin_key_env": "TEST_GHOST_KEY"},
        },
    )
    monkeypatch.setenv("TEST_PAYMENTS_KEY", "sk_test_never_in_the_audit_1234")
    monkeypatch.setenv("TEST_GHOST_KEY", "6489:deadbeefcafe0000deadbeefcafe0000")
    resources = build_resources(path)
    assert resources["payments"].api_key_env == "TEST_PAYMENTS_KEY"
    assert resources["cms"].admin_url == "http://127.0.0.1:9"
    plain = build_resources(write_config(tmp_path / "plain"))
    assert "payments" not in plain and "cms" not in plain
    assert plain["crm"].base_url is None  # the CRM lives in the facts warehouse by default

    kernel = resources["aios"].kernel()
    kernel.audit.note(
        StepContext(workflow="billing", step="charge"),
        kind="effect",
        actor="connector:payments",
        subject="charge",
        decision="failed",
        reason="401: Invalid API Key provided: sk_test_never_in_the_audit_1234; ghost key "
        "6489:deadbeefcafe0000deadbeefcafe0000",
    )
    kernel.audit.flush()
    [row] = kernel.warehouse.query("SELECT reason FROM audit.events WHERE subject = 'charge'")
    assert "sk_test_never" not in row["reason"] and "deadbeefcafe" not in row["reason"]
