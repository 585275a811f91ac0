"""``python -m app keys create|list|revoke``: API keys, managed from the server's shell.

The full key is printed once, on stdout (so ``KEY=$(python -m app keys create --owner alice)``
works); everything meant for a person goes to stderr. Only its hash is stored.
"""

from __future__ import annotations

import argparse
import json
import sys

from sqlalchemy.exc import OperationalError, ProgrammingError

from app.core.db import get_sessionmaker
from app.core.settings import get_settings
from app.keys import service


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app keys", description="manage API keys")
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="create a key for an owner and print it (once)")
    create.add_argument("--owner", required=True, help="the owner every request with this key acts as")
    create.add_argument("--name", default=None, help="a label for people, e.g. the machine it lives on")
    listing = sub.add_parser("list", help="list keys (never the keys themselves)")
    listing.add_argument("--owner", default=None)
    listing.add_argument("--all", action="store_true", help="include revoked keys")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    revoke = sub.add_parser("revoke", help="revoke a key by its id; it stops working at once")
    revoke.add_argument("key_id")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = get_settings()
    if settings.is_sqlite:
        # The embedded mode makes its schema at start; do the same here so keys can come first.
        from app.core.migrate import upgrade_head

        settings.data_dir.mkdir(parents=True, exist_ok=True)
        upgrade_head(settings.database_url)
    try:
        with get_sessionmaker()() as session:
            if args.command == "create":
                try:
                    made = service.create(session, args.owner, args.name)
                except ValueError as exc:
                    print(f"error: {exc}", file=sys.stderr)
                    return 2
                session.commit()
                print(made.key)
                print(
                    f"created key {made.row.id} for owner {made.row.owner_id!r}. It is shown only this once "
                    "(only its hash is stored): keep it now. Send it as 'Authorization: Bearer <key>'.",
                    file=sys.stderr,
                )
                if settings.auth == "off":
                    print("note: LAFTER_AUTH is off here, so the API does not ask for keys", file=sys.stderr)
                return 0
            if args.command == "revoke":
                row = service.revoke(session, args.key_id)
                if row is None:
                    print(f"error: no key with id {args.key_id!r}", file=sys.stderr)
                    return 1
                session.commit()
                print(f"revoked key {row.id} of owner {row.owner_id!r}", file=sys.stderr)
                return 0
            rows = service.list_keys(session, args.owner, include_revoked=args.all)
            for row in rows:
                item = {
                    "id": row.id,
                    "owner": row.owner_id,
                    "name": row.name,
                    "created_at": row.created_at.isoformat(),
                    "revoked_at": row.revoked_at.isoformat() if row.revoked_at else None,
                }
                if args.json:
                    print(json.dumps(item))
                else:
                    state = f"revoked {item['revoked_at']}" if row.revoked_at else "active"
                    print(f"{row.id}  {row.owner_id:<20} {row.name or '-':<20} {item['created_at']}  {state}")
            if not rows and not args.json:
                print("no keys", file=sys.stderr)
            return 0
    except (OperationalError, ProgrammingError) as exc:
        print(
            f"error: cannot use the database {settings.database_url.split('@')[-1]}: {exc.orig}\n"
            "(is it running, and migrated with 'alembic upgrade head'?)",
            file=sys.stderr,
        )
        return 1
