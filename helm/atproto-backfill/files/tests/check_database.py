"""`helm test`: the consumers' database accepts a connection with DATABASE_URL (never printed)."""

import os
import sys

import psycopg


def main() -> int:
    try:
        with psycopg.connect(os.environ["DATABASE_URL"], connect_timeout=10) as conn:
            user, version = conn.execute("SELECT current_user, current_setting('server_version')").fetchone()
    except psycopg.Error as e:
        print(f"cannot connect to the database: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"connected as {user} to PostgreSQL {version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
