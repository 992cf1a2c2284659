"""The operator's inbox: a small web app to read, approve, reject and edit what waits for them.

Server-rendered pages (Starlette and Jinja, no JavaScript), bound to 127.0.0.1 by default and
opened with a token printed at start that is exchanged for a session cookie; every form carries
a CSRF token. Drafts come from feeds and emails and are untrusted: they are rendered from
Markdown with raw HTML off, sanitized, and served under a Content-Security-Policy that forbids
scripts and remote loads. Start it with `aios inbox`.

Importing this package is cheap (no web framework is loaded): `aios_dagster.web.app` holds the
app, `decisions` the operator's decisions the CLI shares.
"""
