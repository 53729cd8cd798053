"""Results store: one SQLite file of result rows keyed by what determines them.

A row's key is a hash of (input-model fingerprint, recipe hash, measure
config): the same model, recipe and measurement give the same key, so a re-run
reuses the row and a sweep killed halfway resumes at the first recipe without
one. Each row is committed as soon as it is measured.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from datetime import datetime, timezone
from pathlib import Path


def result_key(model_fingerprint: str, recipe_hash: str, measure: dict) -> str:
    blob = json.dumps({"model": model_fingerprint, "recipe": recipe_hash, "measure": measure}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class Store:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path)
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, recipe TEXT, model TEXT, created TEXT, row TEXT)")
        self.db.commit()

    def get(self, key: str) -> dict | None:
        found = self.db.execute("SELECT row FROM results WHERE key = ?", (key,)).fetchone()
        return json.loads(found[0]) if found else None

    def put(self, key: str, row: dict) -> None:
        row = {**row, "key": key, "created": row.get("created") or datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self.db.execute("INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?)",
                        (key, row.get("recipe"), row.get("model"), row["created"], json.dumps(row, default=str)))
        self.db.commit()

    def rows(self) -> list[dict]:
        return [json.loads(r[0]) for r in self.db.execute("SELECT row FROM results ORDER BY created, key")]

    def close(self) -> None:
        self.db.close()
